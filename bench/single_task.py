"""One task at a time: adaptbank LoRA vs peft LoRA vs a frozen linear probe, measured in one run.

For each task (default the nine shared tasks; 1,000 train / 500 test as in ANCHORS.md, 128 tokens,
seed 0; resumable per task through ``--json``, runnable one task at a time), LoRA on
query+value, r=8, alpha 16, dropout 0.1:

* ``adaptbank default``: ``AdaptBankModel(load_backbone())``, ``add_task``, ``train_task`` with
  ``TrainConfig()`` as shipped (probe-initialised head, head_lr 2e-3, 3 epochs);
* ``adaptbank like-for-like``: the same with peft's settings: ``--epochs`` (2), one learning rate for
  expert and head (``--lr``), ``probe_init=False``;
* ``peft``: ``get_peft_model(AutoModel, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1,
  target_modules=["query", "value"]))`` + mean-pool -> dropout 0.1 -> linear head, AdamW, with the
  very same batches (adaptbank's ``tokenize``/``batches``/``collate``: dynamic padding, same shuffle
  seed), learning rate, warm-up/decay schedule, gradient clipping, weight decay and epochs as the
  like-for-like run, so only the implementation differs;
* ``frozen LogReg``: scikit-learn ``LogisticRegression(max_iter=2000)`` on the frozen backbone's
  mask-aware mean-pooled last hidden state.

Train examples/s count optimiser-step examples over the loop's wall time (the default run's time
includes fitting its probe head, as ``train_task`` reports it).

Usage::

    python bench/single_task.py --json bench/results/single_task_nine.json              # all nine, resumable
    python bench/single_task.py --tasks amazon --json bench/results/single_task_nine.json  # one task
    python bench/single_task.py --tasks ag_news --max-train 64 --max-test 64 --epochs 1 --default-epochs 1
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

from _common import NOISE_NOTE, environment, ratio, setup_torch, table, write_json

NINE = ["ag_news", "amazon", "yelp", "dbpedia", "yahoo", "sst2", "trec", "banking77", "clinc150"]


def paired_bootstrap(a: list[int], b: list[int], *, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% interval of mean(a) - mean(b) in points, resampling test examples (paired: one index draws both)."""
    rng = random.Random(seed)
    n = len(a)
    diffs = sorted(100 * sum(a[i] - b[i] for i in idx) / n
                   for idx in ([rng.randrange(n) for _ in range(n)] for _ in range(resamples)))
    return diffs[int(0.025 * resamples)], diffs[int(0.975 * resamples) - 1]


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=NINE)
    p.add_argument("--max-train", type=int, default=1000)
    p.add_argument("--max-test", type=int, default=500)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=float, default=2.0, help="epochs of the like-for-like and peft runs")
    p.add_argument("--lr", type=float, default=5e-4, help="learning rate of the like-for-like and peft runs")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--default-epochs", type=float, default=None,
                   help="override TrainConfig().epochs in the adaptbank-default run (only for quick checks)")
    p.add_argument("--bank-reserved", type=int, default=2,
                   help="layers kept free of experts in the adaptbank-default run, as a bank does (router features)")
    p.add_argument("--skip-peft", action="store_true")
    p.add_argument("--skip-default", action="store_true", help="skip the adaptbank-defaults run")
    p.add_argument("--skip-logreg", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None, help="write the figures to this JSON file (tasks in it are kept: resumable)")
    p.add_argument("--redo", action="store_true", help="measure tasks again even when --json already has them")
    return p.parse_args()


def run_adaptbank(task: str, data, cfg, reserved: int = 0) -> dict:
    import torch

    from adaptbank import AdaptBankModel, LoRAConfig, load_backbone
    from adaptbank.training.evaluate import predict_task
    from adaptbank.training.loop import train_task

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    model = AdaptBankModel(load_backbone())
    model.reserved_layers = reserved  # the bank keeps layers 0..reserved-1 for its router's features
    torch.manual_seed(cfg.seed)
    model.add_task(task, LoRAConfig(rank=8, alpha=16.0, dropout=0.1, targets="qv"), data.labels)
    texts, labels = [e.text for e in data.train], [e.label for e in data.train]
    result = train_task(model, task, texts, labels, cfg)
    t0 = time.perf_counter()
    pred = predict_task(model, task, [e.text for e in data.test], max_length=cfg.max_length).argmax(1)
    eval_s = time.perf_counter() - t0
    correct = [int(p == e.label) for p, e in zip(pred.tolist(), data.test)]
    return {"accuracy": sum(correct) / len(correct), "correct": correct, "train_ex_per_s": result.examples_per_second, "train_seconds": result.seconds,
            "steps": result.steps, "probe_accuracy_train": result.probe_accuracy, "final_loss": result.losses[-1],
            "eval_ex_per_s": len(data.test) / eval_s,
            "trainable_params": sum(p.numel() for p in model.expert_parameters(task))}


def run_peft(task: str, data, cfg) -> dict:
    """peft LoRA + mean-pool head, trained with the same batches and schedule as ``train_task``."""
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from torch import nn
    from transformers import AutoModel, AutoTokenizer

    from adaptbank.core.backbone import DEFAULT_BACKBONE, resolve_backbone
    from adaptbank.data.tokens import batches, collate, tokenize

    where, _ = resolve_backbone(DEFAULT_BACKBONE)
    tokenizer = AutoTokenizer.from_pretrained(where)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    base = AutoModel.from_pretrained(where)
    torch.manual_seed(cfg.seed)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["query", "value"]))
    head = nn.Sequential(nn.Dropout(0.1), nn.Linear(base.config.hidden_size, len(data.labels)))
    pad = tokenizer.pad_token_id or 0
    dev = torch.device("cpu")

    def pooled(batch: dict) -> torch.Tensor:
        hidden = model(**batch).last_hidden_state  # (B, T, D)
        m = batch["attention_mask"].to(hidden.dtype)[..., None]
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)  # (B, D)

    ids = tokenize(tokenizer, [e.text for e in data.train], cfg.max_length)
    y_all = torch.tensor([e.label for e in data.train], dtype=torch.long)
    lora = [p for p in model.parameters() if p.requires_grad]
    params = lora + list(head.parameters())
    opt = torch.optim.AdamW([{"params": lora, "lr": cfg.lr}, {"params": list(head.parameters()), "lr": cfg.head_lr}],
                            weight_decay=cfg.weight_decay)
    per_epoch = math.ceil(len(ids) / cfg.batch_size)
    total = max(1, round(cfg.epochs * per_epoch))
    warm = int(cfg.warmup * total)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / max(1, warm) if s < warm else max(0.0, (total - s) / max(1, total - warm)))
    model.train()
    head.train()
    steps = seen = 0
    losses = []
    start = time.perf_counter()
    for epoch in range(math.ceil(cfg.epochs)):
        for chunk in batches(ids, cfg.batch_size, shuffle=True, seed=cfg.seed * 1000 + epoch):
            if steps >= total:
                break
            batch = collate([ids[i] for i in chunk], pad, dev)
            loss = F.cross_entropy(head(pooled(batch)), y_all[chunk])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            sched.step()
            steps += 1
            seen += len(chunk)
            losses.append(loss.item())
    seconds = time.perf_counter() - start
    model.eval()
    head.eval()
    test_ids = tokenize(tokenizer, [e.text for e in data.test], cfg.max_length)
    y_test = torch.tensor([e.label for e in data.test])
    pred = torch.empty(len(test_ids), dtype=torch.long)
    t0 = time.perf_counter()
    with torch.no_grad():
        for chunk in batches(test_ids, 64, shuffle=False):
            pred[chunk] = head(pooled(collate([test_ids[i] for i in chunk], pad, dev))).argmax(1)
    eval_s = time.perf_counter() - t0
    return {"accuracy": int((pred == y_test).sum()) / len(y_test), "correct": (pred == y_test).int().tolist(),
            "train_ex_per_s": seen / seconds,
            "train_seconds": seconds, "steps": steps, "final_loss": losses[-1],
            "eval_ex_per_s": len(test_ids) / eval_s, "trainable_params": sum(p.numel() for p in lora)}


def run_logreg(task: str, data, max_length: int, seed: int) -> dict:
    """LogisticRegression on the frozen backbone's mask-aware mean-pooled last hidden state."""
    import torch
    from sklearn.linear_model import LogisticRegression
    from transformers import AutoModel, AutoTokenizer

    from adaptbank.core.backbone import DEFAULT_BACKBONE, resolve_backbone
    from adaptbank.data.tokens import batches, collate, tokenize

    where, _ = resolve_backbone(DEFAULT_BACKBONE)
    tokenizer = AutoTokenizer.from_pretrained(where)
    model = AutoModel.from_pretrained(where).eval()
    pad = tokenizer.pad_token_id or 0

    @torch.no_grad()
    def feats(texts: list[str]) -> torch.Tensor:
        ids = tokenize(tokenizer, texts, max_length)
        out = torch.empty(len(ids), model.config.hidden_size)
        for chunk in batches(ids, 64, shuffle=False):
            b = collate([ids[i] for i in chunk], pad, torch.device("cpu"))
            h = model(**b).last_hidden_state
            m = b["attention_mask"].to(h.dtype)[..., None]
            out[chunk] = (h * m).sum(1) / m.sum(1).clamp(min=1.0)
        return out

    t0 = time.perf_counter()
    x_train, x_test = feats([e.text for e in data.train]), feats([e.text for e in data.test])
    feat_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    clf = LogisticRegression(max_iter=2000, random_state=seed).fit(x_train.numpy(), [e.label for e in data.train])
    fit_s = time.perf_counter() - t0
    hits = clf.predict(x_test.numpy()) == [e.label for e in data.test]
    return {"accuracy": float(hits.mean()), "correct": [int(h) for h in hits], "feature_seconds": feat_s,
            "fit_seconds": fit_s}


def brief(r: dict) -> dict:
    """A result without its per-example list, for the log."""
    return {k: v for k, v in r.items() if k != "correct"}


def pct(x: float | None) -> float | None:
    return None if x is None else 100 * x


def diff(a: float | None, b: float | None) -> float | None:
    """a - b in percentage points."""
    return None if a is None or b is None else 100 * (a - b)


def main() -> None:
    args = parse()
    setup_torch(args.threads)
    from adaptbank import TrainConfig
    from adaptbank.data.load import load_task

    default_cfg = TrainConfig(seed=args.seed, max_length=args.max_length,
                              **({"epochs": args.default_epochs} if args.default_epochs else {}))
    like_cfg = TrainConfig(epochs=args.epochs, lr=args.lr, head_lr=args.lr, probe_init=False, seed=args.seed,
                           max_length=args.max_length, batch_size=args.batch_size)
    print(f"adaptbank default: {default_cfg}\nlike-for-like (and peft): {like_cfg}\n")
    previous = json.loads(Path(args.json).read_text()) if args.json and Path(args.json).is_file() else {}
    out = {"env": environment(args.threads), "default_config": default_cfg.to_dict(),
           "like_for_like_config": like_cfg.to_dict(), "tasks": previous.get("tasks", {})}
    rows = []
    for task in args.tasks:
        if task in out["tasks"] and not args.redo:  # resumable: a task already measured is kept
            res = out["tasks"][task]
            print(f"== {task}: kept from {args.json}", flush=True)
        else:
            data = load_task(task, max_train=args.max_train, max_test=args.max_test, seed=args.seed)
            print(f"== {task}: {len(data.labels)} classes, {len(data.train)} train / {len(data.test)} test", flush=True)
            res = {"default": None, "like": None, "peft": None, "logreg": None}
            if not args.skip_default:
                res["default"] = run_adaptbank(task, data, default_cfg, reserved=args.bank_reserved)
                print(f"   adaptbank default       {brief(res['default'])}", flush=True)
            res["like"] = run_adaptbank(task, data, like_cfg)
            print(f"   adaptbank like-for-like {brief(res['like'])}", flush=True)
            if not args.skip_peft:
                res["peft"] = run_peft(task, data, like_cfg)
                print(f"   peft                    {brief(res['peft'])}", flush=True)
            if not args.skip_logreg:
                res["logreg"] = run_logreg(task, data, args.max_length, args.seed)
                print(f"   frozen LogReg           {brief(res['logreg'])}", flush=True)
            res |= {"n_train": len(data.train), "n_test": len(data.test), "classes": len(data.labels)}

        def g(k: str, f: str, res: dict = res) -> float | None:
            return None if res.get(k) is None else res[k][f]

        peers = [k for k in ("peft", "logreg") if res.get(k) is not None]
        best = max(peers, key=lambda k: res[k]["accuracy"]) if peers else None
        gap = diff(g("default", "accuracy"), g(best, "accuracy")) if best else None
        interval = (paired_bootstrap(res["default"]["correct"], res[best]["correct"])
                    if best and res.get("default") and "correct" in res["default"] else None)
        res["ratios"] = {
            "like_minus_peft_points": diff(g("like", "accuracy"), g("peft", "accuracy")),
            "default_minus_peft_points": diff(g("default", "accuracy"), g("peft", "accuracy")),
            "default_minus_logreg_points": diff(g("default", "accuracy"), g("logreg", "accuracy")),
            "best_peer": best, "default_minus_best_peer_points": gap, "default_minus_best_peer_95ci": interval,
            "like_train_speed_over_peft": ratio(g("like", "train_ex_per_s"), g("peft", "train_ex_per_s")),
            "like_eval_speed_over_peft": ratio(g("like", "eval_ex_per_s"), g("peft", "eval_ex_per_s")),
        }
        out["tasks"][task] = res
        write_json(args.json, out, quiet=True)
        r = res["ratios"]
        ci = "" if interval is None else f"[{interval[0]:+.1f}, {interval[1]:+.1f}]"
        rows.append([task, pct(g("default", "accuracy")), pct(g("like", "accuracy")), pct(g("peft", "accuracy")),
                     pct(g("logreg", "accuracy")), best, gap, ci, r["like_minus_peft_points"],
                     r["like_train_speed_over_peft"]])
    print()
    print(f"ab default = as `adaptbank add-task` trains it: TrainConfig() and no experts in layers "
          f"0..{args.bank_reserved - 1} (the router's); like4like = peft's settings, experts in every layer")
    print(table(["task", "ab default", "ab like4like", "peft", "LogReg", "best peer", "default - best (pts)",
                 "95% paired bootstrap", "like - peft (pts)", "like/peft train ex/s"], rows))
    print(f"\naccuracy in %; {NOISE_NOTE}")
    write_json(args.json, out)


if __name__ == "__main__":
    main()
