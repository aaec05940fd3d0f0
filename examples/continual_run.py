"""A continual-learning run of the built-in tasks, and its Markdown report.

Shows: ``load_run_spec("builtin")`` (the shipped run spec: weather, reviews, intent, topic learned
one after another into a bank, strategy ``bank``), shrunk with ``with_overrides``; ``run_sequence``
learning the tasks in order and evaluating every task after each one (the accuracy matrix, with the
true task id and with the learned router); ``write_report`` turning ``RUN_DIR/result.json`` into
Markdown (ACC, BWT, forgetting, ...). Rerun with the same ``--out`` and the run resumes (here: is done).

Run from the repository root (the bundled all-MiniLM-L6-v2 by default, no download, CPU is fine)::

    PYTHONPATH=. python examples/continual_run.py [--base MODEL_DIR] [--out DIR] [--max-train 80] [--epochs 1]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from adaptbank.continual.loop import run_sequence
from adaptbank.continual.runspec import STRATEGIES, load_run_spec
from adaptbank.core.backbone import DEFAULT_BACKBONE
from adaptbank.report.build import build_report, write_report


def main(argv: list[str] | None = None) -> dict[str, object]:
    p = argparse.ArgumentParser(description="A continual run of the built-in tasks and its report.")
    p.add_argument("--base", default=DEFAULT_BACKBONE, help="backbone: a Hugging Face folder or the bundled MiniLM")
    p.add_argument("--out", type=Path, default=None, help="folder for the run and report (default: a temp dir)")
    p.add_argument("--strategy", default="bank", choices=STRATEGIES, help="continual strategy (default: bank)")
    p.add_argument("--max-train", type=int, default=80)
    p.add_argument("--max-test", type=int, default=40)
    p.add_argument("--epochs", type=float, default=1)
    p.add_argument("--max-length", type=int, default=40)
    args = p.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="adaptbank-continual-"))

    # The shipped spec, on our backbone and shrunk; the overrides are recorded in result.json.
    spec = load_run_spec("builtin").with_overrides(strategy=args.strategy, max_train=args.max_train,
                                                   max_test=args.max_test, epochs=args.epochs,
                                                   max_length=args.max_length, backbone=args.base)
    print(f"run {spec.name!r}: {', '.join(spec.task_names)} with strategy {spec.strategy}")
    run_dir = out / "run"
    result = run_sequence(spec, run_dir, log=print)  # one progress line per task; returns result.json

    # The report reads only result.json; "md", "html" or "json".
    markdown = write_report([run_dir], "md", out / "report.md")
    print("\n" + markdown)
    summary = build_report([run_dir])  # the same figures as a dict: acc, bwt, forgetting, routed, ...
    routed = summary["routed"]
    print(f"ACC {summary['acc']:.3f}, BWT {summary['bwt']:+.3f}"
          + (f", routed ACC {routed['acc']:.3f}" if routed else "") + f"; report: {out / 'report.md'}")
    return {"run_dir": str(run_dir), "tasks": result["tasks"], "finished": result["finished"],
            "oracle": result["oracle"]["matrix"], "acc": summary["acc"], "bwt": summary["bwt"],
            "routed_acc": routed["acc"] if routed else None, "report": markdown}


if __name__ == "__main__":
    main()
