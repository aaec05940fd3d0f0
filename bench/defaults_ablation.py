"""What costs the default training its points: ablations of add-task's defaults, chosen on validation.

Each variant changes one thing against ``TrainConfig()`` as a bank trains it (LoRA q+v r=8, experts in
layers 2-5 because layers 0-1 feed the router, head initialised as a logistic-regression probe,
expert lr 5e-4, head lr 2e-3, 3 epochs, 128 tokens). The defaults changed once on these results: ``c1-full``
is the earlier rule (probe C = 1, head as fitted), whose runs were recorded as ``default`` before. Every run trains on ``--max-train`` examples of
the task's training split minus a validation split carved from it (``--val``, drawn with the seed,
never the test split) and reports validation and test accuracy, steps and training seconds. Choose
on the validation column; the test column is what the README shows.

Resumable: each (task, variant) result is written to ``--json`` as soon as it is done, and a rerun
skips what is there. Runnable in pieces (``--tasks amazon --variants default fresh-head``).

Usage::

    python bench/defaults_ablation.py --tasks amazon yelp sst2 --json bench/results/defaults_ablation.json
    python bench/defaults_ablation.py --tasks sst2 --variants default lr-1e-3 --max-train 200 --val 50 --max-test 100
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import time
from pathlib import Path

from _common import environment, setup_torch, table

VARIANTS: dict[str, tuple[str, dict, dict]] = {
    # name: (what changes, TrainConfig overrides, model/method overrides)
    "default": ("TrainConfig() as add-task uses it: probe C chosen on a held-out quarter, head halved", {}, {}),
    "c1-full": ("the previous defaults: probe C = 1, head kept as fitted", {"probe_c": 1.0, "probe_scale": 1.0}, {}),
    "all-layers": ("experts in layers 0-5 too (no router layers kept free)", {}, {"reserved": 0}),
    "one-router-layer": ("experts in layers 1-5 (router reads layer 0 only)", {}, {"reserved": 1}),
    "fresh-head": ("random head, no probe initialisation", {"probe_init": False}, {}),
    "head-warmup": ("random head trained alone for 1 epoch, then head and expert together", {"probe_init": False},
                    {"head_warmup": 1.0}),
    "probe-C0.1": ("probe head with 10x stronger L2 (C = 0.1)", {"probe_init": False}, {"probe_c": 0.1}),
    "probe-C0.01": ("probe head with 100x stronger L2 (C = 0.01)", {"probe_init": False}, {"probe_c": 0.01}),
    "probe-cv": ("probe head with C chosen by 3-fold CV on the training split", {"probe_init": False},
                 {"probe_c": "cv"}),
    "probe-cv-half": ("probe-cv head with its weights halved (softer start: more gradient for the expert)",
                      {"probe_init": False}, {"probe_c": "cv", "probe_scale": 0.5}),
    "probe-C0.1-half": ("probe head with C = 0.1, its weights halved", {"probe_init": False},
                        {"probe_c": 0.1, "probe_scale": 0.5}),
    "fresh-all-layers": ("random head, experts in layers 0-5 too", {"probe_init": False}, {"reserved": 0}),
    "probe-C0.1-half-all-layers": ("probe head with C = 0.1 halved, experts in layers 0-5 too",
                                   {"probe_init": False}, {"probe_c": 0.1, "probe_scale": 0.5, "reserved": 0}),
    "lr-1e-3": ("expert lr 1e-3", {"lr": 1e-3}, {}),
    "lr-2e-3": ("expert lr 2e-3", {"lr": 2e-3}, {}),
    "head-lr-5e-4": ("head lr 5e-4 (= expert lr)", {"head_lr": 5e-4}, {}),
    "epochs-5": ("5 epochs", {"epochs": 5.0}, {}),
    "epochs-2": ("2 epochs", {"epochs": 2.0}, {}),
    "rank-16": ("LoRA rank 16 (alpha 32)", {}, {"rank": 16}),
    "all-linear": ("LoRA on every linear layer", {}, {"targets": "all-linear"}),
    "all-linear-lr-1e-3": ("LoRA on every linear layer, expert lr 1e-3", {"lr": 1e-3}, {"targets": "all-linear"}),
}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=["amazon", "yelp", "sst2"])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--max-train", type=int, default=1000, help="training examples drawn (validation included)")
    p.add_argument("--val", type=int, default=200, help="of those, held out for validation")
    p.add_argument("--max-test", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default="bench/results/defaults_ablation.json")
    return p.parse_args()


def run(backbone, task: str, data, variant: str, seed: int) -> dict:
    from adaptbank import AdaptBankModel, LoRAConfig, TrainConfig
    from adaptbank.core.backbone import Backbone
    from adaptbank.core.records import share_frozen
    from adaptbank.data.tokens import tokenize
    from adaptbank.training.evaluate import evaluate
    from adaptbank.training.features import task_features
    from adaptbank.training.loop import Row, epoch_batches, fit, total_steps, train_task

    _, train_kw, model_kw = VARIANTS[variant]
    cfg = TrainConfig(seed=seed, **train_kw)
    rank = model_kw.get("rank", 8)
    method = LoRAConfig(rank=rank, alpha=2.0 * rank, targets=model_kw.get("targets", "qv"))
    model = AdaptBankModel(Backbone(backbone.name, share_frozen(backbone.model), backbone.tokenizer, backbone.path))
    model.reserved_layers = model_kw.get("reserved", 2)
    model.add_task(task, method, data["labels"], seed=seed)
    t0 = time.perf_counter()
    texts, labels = [t for t, _ in data["train"]], [y for _, y in data["train"]]
    if model_kw.get("head_warmup"):  # the head alone first (expert frozen at zero), with the one loop
        warm = dataclasses.replace(cfg, epochs=model_kw["head_warmup"])
        ids = tokenize(model.tokenizer, texts, cfg.max_length)
        rows = [Row(x, y, task) for x, y in zip(ids, labels)]
        fit(model, epoch_batches(rows, warm, seed), steps=total_steps(len(rows), warm), cfg=warm, seed=seed,
            groups=[{"params": list(model.heads[task].parameters()), "lr": cfg.head_lr, "name": "head"}],
            features=task_features(model, task), what=f"head warm-up of {task!r}")
    if "probe_c" in model_kw:  # the probe head with another regularisation strength, then as train_task
        _probe_with_c(model, task, texts, labels, cfg, model_kw["probe_c"], model_kw.get("probe_scale", 1.0))
    res = train_task(model, task, texts, labels, cfg)
    seconds = time.perf_counter() - t0
    val = evaluate(model, task, [t for t, _ in data["val"]], [y for _, y in data["val"]], max_length=cfg.max_length)
    test = evaluate(model, task, [t for t, _ in data["test"]], [y for _, y in data["test"]], max_length=cfg.max_length)
    return {"val": val, "test": test, "probe_train_accuracy": res.probe_accuracy, "steps": res.steps,
            "train_seconds": seconds, "trainable_params": sum(p.numel() for p in model.expert_parameters(task)),
            "config": cfg.to_dict(), "method": method.to_dict(), "reserved_layers": model.reserved_layers}


def _probe_with_c(model, task: str, texts: list[str], labels: list[int], cfg, c: float | str,
                  scale: float = 1.0) -> None:
    """Initialise the head as a logistic-regression probe on the frozen features with L2 strength ``1/c``
    (``"cv"``: C from {0.01, 0.1, 1, 10} by 3-fold cross-validation on the training texts), its weights
    and bias multiplied by ``scale``."""
    import torch
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV

    from adaptbank.data.tokens import tokenize
    from adaptbank.training.features import encode

    feats = encode(model, tokenize(model.tokenizer, texts, cfg.max_length)).numpy()  # (N, D)
    clf = (LogisticRegressionCV(Cs=[0.01, 0.1, 1.0, 10.0], cv=3, max_iter=2000, random_state=cfg.seed) if c == "cv"
           else LogisticRegression(C=float(c), max_iter=2000, random_state=cfg.seed)).fit(feats, labels)
    coef, bias = torch.as_tensor(clf.coef_, dtype=torch.float32), torch.as_tensor(clf.intercept_, dtype=torch.float32)
    if coef.shape[0] == 1:  # two classes: one row, split symmetrically (as training.features.fit_probe)
        coef, bias = torch.cat([-coef / 2, coef / 2]), torch.cat([-bias / 2, bias / 2])
    if coef.shape[0] != model.heads[task].linear.out_features:
        raise ValueError(f"{task}: the training split lacks some classes; probe variants need all of them")
    with torch.no_grad():
        model.heads[task].linear.weight.copy_(coef * scale)
        model.heads[task].linear.bias.copy_(bias * scale)
    if c == "cv":
        print(f"      probe-cv chose C = {float(clf.C_[0])}", flush=True)


def split(task: str, max_train: int, n_val: int, max_test: int, seed: int) -> dict:
    from adaptbank.data.load import load_task

    d = load_task(task, max_train=max_train, max_test=max_test, seed=seed)
    train = [(e.text, e.label) for e in d.train]
    order = list(range(len(train)))
    random.Random(f"val-{task}-{seed}").shuffle(order)
    val_idx = set(order[:n_val])
    return {"labels": d.labels, "train": [train[i] for i in range(len(train)) if i not in val_idx],
            "val": [train[i] for i in sorted(val_idx)], "test": [(e.text, e.label) for e in d.test]}


def main() -> None:
    args = parse()
    setup_torch(args.threads)
    from adaptbank.core.backbone import load_backbone

    path = Path(args.json)
    out = json.loads(path.read_text()) if path.is_file() else {"runs": {}}
    out["env_last"] = environment(args.threads)
    print(f"load average at start: {os.getloadavg()[0]:.2f} (accuracy does not depend on it; seconds do)")
    backbone = load_backbone()
    for task in args.tasks:
        data = split(task, args.max_train, args.val, args.max_test, args.seed)
        print(f"== {task}: {len(data['train'])} train / {len(data['val'])} val / {len(data['test'])} test", flush=True)
        for variant in args.variants:
            key = f"{task}/{variant}/{args.max_train}-{args.val}-{args.max_test}-{args.seed}"
            if key in out["runs"]:
                continue
            r = run(backbone, task, data, variant, args.seed)
            out["runs"][key] = r
            print(f"   {variant:<20} val {100 * r['val']:.1f}  test {100 * r['test']:.1f}  "
                  f"{r['steps']} steps {r['train_seconds']:.0f}s", flush=True)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(out, indent=1))
            os.replace(tmp, path)
    rows = []
    for variant in args.variants:
        row: list[object] = [variant, VARIANTS[variant][0]]
        for task in args.tasks:
            r = out["runs"].get(f"{task}/{variant}/{args.max_train}-{args.val}-{args.max_test}-{args.seed}")
            row += [None, None] if r is None else [100 * r["val"], 100 * r["test"]]
        rows.append(row)
    head = ["variant", "what changes"] + [f"{t} {c}" for t in args.tasks for c in ("val", "test")]
    print(table(head, rows))


if __name__ == "__main__":
    main()
