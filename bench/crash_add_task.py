"""Crash test: `adaptbank add-task` killed with SIGKILL at random moments, N trials.

    python bench/crash_add_task.py --trials 30

After every trial `verify` must pass, every earlier task must load identical tensors, and the new
task must be complete or absent. Uses a tiny saved BERT and a shortened training so trials are quick.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=30)
    ap.add_argument("--max-delay", type=float, default=None,
                    help="kill within this many seconds of the start [1.1x a calibrated uninterrupted add-task]")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    from _crash import run_trials
    from conftest import _write_tiny_bert

    from adaptbank.bank.facade import AdapterBank
    from adaptbank.core.config import LoRAConfig, TrainConfig

    work = Path(tempfile.mkdtemp(prefix="adaptbank-crash-"))
    model = _write_tiny_bert(work / "model")
    bank = AdapterBank.init(work / "bank", base=str(model))
    short = TrainConfig(epochs=1, max_train=60, max_test=30, max_length=32)
    bank.add_task("weather", LoRAConfig(rank=4), short)
    bank.add_task("topic", LoRAConfig(rank=4), short, share_a="g")
    extra = ["--epochs", "2", "--max-train", "200", "--max-test", "60", "--max-length", "32", "--share-a", "g",
             "--rank", "4"]
    results = run_trials(work / "bank", "intent", extra, args.trials, args.max_delay, args.seed)
    counts = Counter(r.outcome if not r.outcome.startswith("corrupt") else "corrupt" for r in results)
    for r in results:
        print(f"  kill after {r.delay:5.2f}s: {r.outcome}")
    print(f"{len(results)} trials: {counts['complete']} complete, {counts['absent']} absent, {counts['corrupt']} corrupt")
    return 1 if counts["corrupt"] else 0


if __name__ == "__main__":
    sys.exit(main())
