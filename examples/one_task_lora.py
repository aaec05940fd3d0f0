"""One task with LoRA through the Python API, no bank directory involved.

Shows: wrapping a frozen backbone in ``AdaptBankModel``, adding a LoRA expert and a head for the
built-in generated ``weather`` task, test accuracy before and after ``train_task``, one forward that
returns a ``ModelOutput``, ``merge()`` / ``unmerge()`` (fold the LoRA into the base weights and back)
giving the same logits, and the expert saved as a portable folder.

Run from the repository root (the bundled all-MiniLM-L6-v2 by default, no download, CPU is fine)::

    PYTHONPATH=. python examples/one_task_lora.py [--base MODEL_DIR] [--out DIR] [--max-train 200] [--epochs 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from adaptbank import AdaptBankModel, LoRAConfig, TrainConfig, load_backbone
from adaptbank.bank.expert_io import save_expert
from adaptbank.core.backbone import DEFAULT_BACKBONE
from adaptbank.data.load import load_task
from adaptbank.training.evaluate import evaluate
from adaptbank.training.loop import train_task


def main(argv: list[str] | None = None) -> dict[str, object]:
    p = argparse.ArgumentParser(description="One LoRA task through the Python API.")
    p.add_argument("--base", default=DEFAULT_BACKBONE, help="backbone: a Hugging Face folder or the bundled MiniLM")
    p.add_argument("--out", type=Path, default=None, help="folder for the saved expert (default: a temp dir)")
    p.add_argument("--max-train", type=int, default=200)
    p.add_argument("--max-test", type=int, default=100)
    p.add_argument("--epochs", type=float, default=2)
    p.add_argument("--max-length", type=int, default=48)
    args = p.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="adaptbank-one-task-"))

    # Data: a built-in generated task; Example(text, label) lists and the label names.
    data = load_task("weather", max_train=args.max_train, max_test=args.max_test, seed=0)
    texts, labels = [e.text for e in data.test], [e.label for e in data.test]

    # The backbone stays frozen; add_task wraps its q and v projections with a rank-8 LoRA expert.
    model = AdaptBankModel(load_backbone(args.base))
    model.add_task("weather", LoRAConfig(rank=8), data.labels, seed=0)
    before = evaluate(model, "weather", texts, labels, max_length=args.max_length)  # random head: about chance

    cfg = TrainConfig(epochs=args.epochs, max_length=args.max_length, seed=0)
    result = train_task(model, "weather", [e.text for e in data.train], [e.label for e in data.train], cfg)
    after = evaluate(model, "weather", texts, labels, max_length=args.max_length)
    print(f"weather ({len(data.labels)} classes, {len(data.train)} train / {len(texts)} test): accuracy "
          f"{before:.3f} before -> {after:.3f} after {result.steps} steps in {result.seconds:.1f}s "
          f"(probe-initialised head on train: {result.probe_accuracy:.3f})")

    # One forward: logits (B, C), the pooled features (B, D) and the task that scored each row.
    enc = model.tokenizer(texts[:4], padding=True, truncation=True, max_length=args.max_length, return_tensors="pt")
    with torch.no_grad():
        output = model(enc["input_ids"], enc["attention_mask"], task="weather")
        model.merge("weather")  # LoRA folded into the base weights: inference costs what the base costs
        merged = model(enc["input_ids"], enc["attention_mask"], task="weather").logits
        model.unmerge()
        unmerged = model(enc["input_ids"], enc["attention_mask"], task="weather").logits
    diff = max(float((merged - output.logits).abs().max()), float((unmerged - output.logits).abs().max()))
    print(f"ModelOutput: logits {tuple(output.logits.shape)}, pooled {tuple(output.pooled.shape)}, tasks {output.tasks}")
    print(f"predicted: {[data.labels[i] for i in output.logits.argmax(1).tolist()]}")
    print(f"merge/unmerge: max |logit difference| {diff:.2e}")

    folder = save_expert(model, "weather", out / "weather", replace=True)  # adapter, head, adapter_config.json
    print(f"expert saved to {folder}")
    return {"before": before, "after": after, "probe_accuracy": result.probe_accuracy, "steps": result.steps,
            "logits_shape": tuple(output.logits.shape), "tasks": output.tasks, "merge_max_diff": diff,
            "expert_dir": str(folder)}


if __name__ == "__main__":
    main()
