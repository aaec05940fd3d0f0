"""LoRA on a weight-only quantised MiniLM (QLoRA style) against LoRA on the fp32 MiniLM (issue 11, item 7).

The bundled all-MiniLM-L6-v2 (``load_backbone()``) is loaded twice: as it is (fp32) and with the
linear layers of its transformer layers quantised (``--kind nf4`` by default; ``int8`` also works,
see ``adaptbank.core.quantize``). On each, one LoRA expert (q and v, r=8, alpha 16, dropout 0.1)
and head are trained on the same task (sst2 from the shared data: ``ADAPTBANK_DATA``, default
``../shared/data``) with ``train_task`` and the same ``TrainConfig``: the same seed, so the same
expert initialisation, the same shuffled batches, the same schedule. Only the frozen base differs.

Printed per base: test accuracy, the bytes of the frozen linear weights (fp32: their tensors; the
quantised base: the stored codes and scales), their ratio, and the train seconds (shared machine:
noisy; the accuracies and bytes are what this measures).

Usage::

    python bench/quantized_base.py --json bench/results/quantized_base.json     # 1,000 train / 500 test
    python bench/quantized_base.py --max-train 32 --max-test 32 --epochs 1       # a quick check
"""

from __future__ import annotations

import argparse
import time

from _common import environment, ratio, setup_torch, table, write_json


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="sst2")
    p.add_argument("--kind", default="nf4", choices=["nf4", "int8"])
    p.add_argument("--max-train", type=int, default=1000)
    p.add_argument("--max-test", type=int, default=500)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--epochs", type=float, default=None, help="override TrainConfig().epochs (quick checks)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None, help="write the figures to this JSON file")
    return p.parse_args()


def linear_weight_bytes(model) -> int:
    """Bytes of the weights of every nn.Linear / Conv1D in the transformer layers (fp32 base)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    from adaptbank.routing.taps import layer_list

    return sum(m.weight.numel() * m.weight.element_size() for m in layer_list(model).modules()
               if isinstance(m, (torch.nn.Linear, Conv1D)))


def run(kind: str | None, data, cfg) -> dict:
    from adaptbank import AdaptBankModel, LoRAConfig, load_backbone
    from adaptbank.core.quantize import quantize_backbone
    from adaptbank.training.evaluate import evaluate
    from adaptbank.training.loop import train_task

    backbone = load_backbone()
    full = linear_weight_bytes(backbone.model)
    report = quantize_backbone(backbone.model, kind) if kind else None
    model = AdaptBankModel(backbone)
    model.add_task(data.spec.name, LoRAConfig(rank=8, alpha=16.0, dropout=0.1, targets="qv"), data.labels, seed=cfg.seed)
    t0 = time.perf_counter()
    result = train_task(model, data.spec.name, [e.text for e in data.train], [e.label for e in data.train], cfg)
    seconds = time.perf_counter() - t0
    acc = evaluate(model, data.spec.name, [e.text for e in data.test], [e.label for e in data.test],
                   max_length=cfg.max_length)
    out = {"base": kind or "fp32", "accuracy": acc, "frozen_linear_bytes": report.quantized_bytes if report else full,
           "fp32_linear_bytes": full, "train_seconds": seconds, "steps": result.steps,
           "final_loss": result.losses[-1] if result.losses else None}
    if report is not None:
        assert report.full_bytes == full, (report.full_bytes, full)
        out |= {"quantized_layers": len(report.layers), "weight_rel_error": report.weight_rel_error}
    return out


def main() -> None:
    args = parse()
    setup_torch(args.threads)
    from adaptbank import TrainConfig
    from adaptbank.data.load import load_task

    cfg = TrainConfig(seed=args.seed, max_length=args.max_length, max_train=args.max_train, max_test=args.max_test,
                      **({"epochs": args.epochs} if args.epochs else {}))
    data = load_task(args.task, max_train=args.max_train, max_test=args.max_test, seed=args.seed)
    print(f"{args.task}: {len(data.train)} train / {len(data.test)} test, {len(data.labels)} classes; {cfg}\n", flush=True)
    runs = []
    for kind in (None, args.kind):
        runs.append(run(kind, data, cfg))
        r = runs[-1]
        print(f"  {r['base']:>5}: accuracy {100 * r['accuracy']:.1f}%, frozen linear weights "
              f"{r['frozen_linear_bytes'] / 2**20:.2f} MiB, {r['train_seconds']:.0f} s", flush=True)
    fp32, quant = runs
    rows = [[r["base"], 100 * r["accuracy"], r["frozen_linear_bytes"] / 2**20,
             ratio(fp32["frozen_linear_bytes"], r["frozen_linear_bytes"]), r["train_seconds"]] for r in runs]
    print()
    print(table(["base", "accuracy %", "frozen linear MiB", "x smaller than fp32", "train s"], rows))
    print(f"\n{args.kind} - fp32: {100 * (quant['accuracy'] - fp32['accuracy']):+.1f} points; frozen linear weights "
          f"{ratio(fp32['frozen_linear_bytes'], quant['frozen_linear_bytes']):.2f}x smaller "
          f"(dequantised weights' relative error {quant['weight_rel_error']:.3f})")
    write_json(args.json, {"env": environment(args.threads), "config": cfg.to_dict(), "task": args.task,
                           "n_train": len(data.train), "n_test": len(data.test), "runs": runs})


if __name__ == "__main__":
    main()
