"""Training time of the defaults' probe rule against the earlier rule, interleaved on one machine.

Issue 10 allows the new defaults at most 1.2x the training time of the old. Per task (default clinc150,
the 150-class worst case for choosing C, and trec), ``train_task`` runs with ``TrainConfig()`` (C chosen
from 0.01 / 0.1 / 1 on a held-out quarter, head halved) and with ``probe_c=1.0, probe_scale=1.0`` (the
earlier rule), alternating for ``--rounds`` rounds, each run on a fresh model over the same frozen
backbone; it prints the median seconds of each and their ratio. Run it on a quiet machine only: it
prints the load average at the start and refuses above 1.5 unless ``--force``.

Usage::

    python bench/defaults_time.py --json bench/results/defaults_time.json
"""

from __future__ import annotations

import argparse
import os
import statistics

from _common import environment, setup_torch, table, write_json


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=["clinc150", "trec"])
    p.add_argument("--max-train", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--force", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    load = os.getloadavg()[0]
    print(f"load average at start: {load:.2f}")
    if load >= 1.5 and not args.force:
        raise SystemExit("the machine is not quiet (load average >= 1.5); timing refused (--force to run anyway)")
    setup_torch(args.threads)
    from adaptbank import AdaptBankModel, LoRAConfig, TrainConfig
    from adaptbank.core.backbone import Backbone, load_backbone
    from adaptbank.core.records import share_frozen
    from adaptbank.data.load import load_task
    from adaptbank.training.loop import train_task

    backbone = load_backbone()
    rules = {"default": TrainConfig(), "c1-full": TrainConfig(probe_c=1.0, probe_scale=1.0)}
    out: dict = {"env": environment(args.threads), "load_at_start": load, "tasks": {}}
    rows = []
    for task in args.tasks:
        data = load_task(task, max_train=args.max_train, max_test=1, seed=0)
        texts, labels = [e.text for e in data.train], [e.label for e in data.train]
        secs: dict[str, list[float]] = {k: [] for k in rules}
        for r in range(args.rounds):
            for name in (list(rules) if r % 2 == 0 else list(rules)[::-1]):  # interleaved, order alternating
                model = AdaptBankModel(Backbone(backbone.name, share_frozen(backbone.model), backbone.tokenizer,
                                                backbone.path))
                model.reserved_layers = 2
                model.add_task(task, LoRAConfig(), data.labels, seed=0)
                res = train_task(model, task, texts, labels, rules[name])
                secs[name].append(res.seconds)
                print(f"   {task} {name:<8} round {r}: {res.seconds:.1f}s ({res.steps} steps)", flush=True)
        med = {k: statistics.median(v) for k, v in secs.items()}
        out["tasks"][task] = {"seconds": secs, "median": med, "ratio": med["default"] / med["c1-full"]}
        rows.append([task, med["default"], med["c1-full"], med["default"] / med["c1-full"]])
    print(table(["task", "default s", "c1-full s", "default / c1-full"], rows))
    print(f"load average at end: {os.getloadavg()[0]:.2f}")
    write_json(args.json, out)


if __name__ == "__main__":
    main()
