"""A bank of all nine shared tasks, added one by one: routed vs oracle accuracy, and router forgetting.

    python bench/nine_tasks_routed.py --max-train 1000 --epochs 1 --json bench/results/nine_tasks_routed.json
    python bench/nine_tasks_routed.py --max-train 500 --max-test 500 --router-pools mean+rms --json ...
    python bench/nine_tasks_routed.py --max-train 500 --max-test 500 --router-replay 500 --json ...

After each addition, the router's task-identification accuracy is measured on the test split of every
task seen so far (the router alone: its features come from the frozen lower layers, so this needs only
those layers). At the end, `eval --routed` (per-task router, routed and oracle accuracy, confusion).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TASKS = ["ag_news", "amazon", "yelp", "dbpedia", "yahoo", "sst2", "trec", "banking77", "clinc150"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=TASKS)
    ap.add_argument("--max-train", type=int, default=1000)
    ap.add_argument("--max-test", type=int, default=500)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bank", default=None, help="bank folder [a new temp folder]")
    ap.add_argument("--router-pools", default="mean", help="RouterConfig.pools of the bank: mean, rms or mean+rms")
    ap.add_argument("--router-replay", type=int, default=0,
                    help="RouterConfig.replay of the bank: router vectors kept per task for the replay router (0: LDA)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from adaptbank.bank.facade import AdapterBank
    from adaptbank.core.config import LoRAConfig, RouterConfig, TrainConfig
    from adaptbank.data.load import load_task
    from adaptbank.data.tokens import tokenize
    from adaptbank.training.features import frozen_pass

    path = Path(args.bank or tempfile.mkdtemp(prefix="adaptbank-nine-")) / "bank"
    bank = AdapterBank.init(path, router=RouterConfig(pools=args.router_pools, replay=args.router_replay))
    train = TrainConfig(epochs=args.epochs, max_train=args.max_train, max_test=args.max_test)
    feats: dict[str, torch.Tensor] = {}
    router_acc: list[dict[str, float]] = []
    start = time.perf_counter()
    commits: list[float] = []
    for task in args.tasks:
        r = bank.add_task(task, LoRAConfig(), train)
        commits.append((r.phase_seconds or {}).get("commit", 0.0))
        model = bank.new_model()
        data = load_task(task, max_train=1, max_test=args.max_test, seed=0)
        ids = tokenize(model.tokenizer, [e.text for e in data.test], train.max_length)
        feats[task] = frozen_pass(model, ids, router_layers=bank.router_layers, pools=bank.router_pools)[1]
        router = bank.router()
        row = {t: float((router(x).argmax(1) == router.names.index(t)).float().mean()) for t, x in feats.items()}
        router_acc.append(row)
        print(f"+{task}: oracle {100 * r.test_accuracy:.1f}%, router on seen tasks "
              + ", ".join(f"{t} {100 * a:.1f}" for t, a in row.items()), flush=True)
    res = bank.evaluate_routed()
    first = args.tasks[0]
    out = {"config": vars(args), "bank": str(path), "router_accuracy_after_each_addition": router_acc,
           "router_forgetting_first_task": {"right_after": router_acc[0][first], "at_end": router_acc[-1][first]},
           "routed": res, "commit_seconds": commits, "seconds": time.perf_counter() - start}
    print(f"\n{'task':<10} {'router':>7} {'routed':>7} {'oracle':>7}")
    for t, row in res["tasks"].items():
        print(f"{t:<10} {100 * row['router_accuracy']:7.1f} {100 * row['routed_accuracy']:7.1f} "
              f"{100 * row['oracle_accuracy']:7.1f}")
    a = res["average"]
    print(f"{'average':<10} {100 * a['router_accuracy']:7.1f} {100 * a['routed_accuracy']:7.1f} "
          f"{100 * a['oracle_accuracy']:7.1f}   routed/oracle = {a['routed_over_oracle']:.3f}")
    print(f"router forgetting, {first}: {100 * router_acc[0][first]:.1f}% right after it was added, "
          f"{100 * router_acc[-1][first]:.1f}% after all {len(args.tasks)} tasks")
    print("add-task commit (task files + router refit) s: " + ", ".join(f"{c:.2f}" for c in commits))
    print("confusion (true -> chosen, off-diagonal):")
    for t, row in res["confusion"].items():
        off = {k: v for k, v in row.items() if k != t}
        if off:
            print(f"  {t}: " + ", ".join(f"{k} {v}" for k, v in sorted(off.items(), key=lambda p: -p[1])))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
