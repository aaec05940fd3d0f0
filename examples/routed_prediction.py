"""Routed prediction: one batch of inputs from different tasks, no task ids given.

Shows: a bank of the four built-in tasks (weather, reviews, intent, topic), each with its own LoRA
expert and head; ``bank.load_routed(top_k=2)`` loads them all with the learned router attached;
``predict`` answers a mixed list of texts in one batch (the router picks each row's experts inside
the forward, the chosen task's head gives the label); ``bank.evaluate_routed()`` compares routed
accuracy (no task id) with oracle accuracy (true task id) over each task's test split.

Run from the repository root (the bundled all-MiniLM-L6-v2 by default, no download, CPU is fine)::

    PYTHONPATH=. python examples/routed_prediction.py [--base MODEL_DIR] [--out DIR] [--max-train 80] [--epochs 1]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from adaptbank import LoRAConfig, TrainConfig
from adaptbank.bank import AdapterBank
from adaptbank.core.backbone import DEFAULT_BACKBONE
from adaptbank.data.load import load_task
from adaptbank.routing.predict import predict

TASKS = ("weather", "reviews", "intent", "topic")


def main(argv: list[str] | None = None) -> dict[str, object]:
    p = argparse.ArgumentParser(description="Routed prediction over a bank of the built-in tasks.")
    p.add_argument("--base", default=DEFAULT_BACKBONE, help="backbone: a Hugging Face folder or the bundled MiniLM")
    p.add_argument("--out", type=Path, default=None, help="folder to create the bank in (default: a temp dir)")
    p.add_argument("--max-train", type=int, default=80)
    p.add_argument("--max-test", type=int, default=40)
    p.add_argument("--epochs", type=float, default=1)
    p.add_argument("--max-length", type=int, default=40)
    p.add_argument("--per-task", type=int, default=2, help="test inputs of each task in the mixed batch")
    args = p.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="adaptbank-routed-"))

    bank = AdapterBank.init(out / "bank", base=args.base)
    train = TrainConfig(epochs=args.epochs, max_train=args.max_train, max_test=args.max_test,
                        max_length=args.max_length)
    for task in TASKS:  # each add refits the router (LDA on lower-layer features) in the same commit
        r = bank.add_task(task, LoRAConfig(), train)
        print(f"added {task}: test accuracy {r.test_accuracy:.3f} ({r.seconds:.1f}s)")

    # A mixed list: a few test inputs of every task, interleaved, answered in one batch.
    data = {t: load_task(t, max_train=1, max_test=args.per_task, seed=1) for t in TASKS}
    mixed = [(t, d.test[i].text, d.labels[d.test[i].label]) for i in range(args.per_task) for t, d in data.items()]
    routed = bank.load_routed(top_k=2)  # all experts + the router; top 2 experts mixed per row
    preds = predict(routed, [text for _, text, _ in mixed], max_length=args.max_length)
    rows = []
    for (true_task, text, true_label), pr in zip(mixed, preds):
        mix = ", ".join(f"{t} {w:.2f}" for t, w in pr.routing.items())
        print(f"{text[:44]!r:<46} -> {pr.task}: {pr.label} ({pr.score:.2f}); routing {mix}; "
              f"true {true_task}: {true_label}")
        rows.append({"true_task": true_task, "true_label": true_label, "task": pr.task, "label": pr.label,
                     "score": pr.score, "routing": pr.routing})

    report = bank.evaluate_routed(top_k=2)  # over each task's stored test split
    avg = report["average"]
    print(f"average over {len(TASKS)} tasks: router picks the right task {avg['router_accuracy']:.3f}, routed "
          f"accuracy {avg['routed_accuracy']:.3f} vs oracle {avg['oracle_accuracy']:.3f} "
          f"({avg['routed_over_oracle']:.2f}x)")
    return {"bank": str(bank.path), "tasks": bank.tasks(), "predictions": rows, "average": avg,
            "per_task": report["tasks"]}


if __name__ == "__main__":
    main()
