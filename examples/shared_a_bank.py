"""An on-disk bank with shared-A / task-B LoRA: the second task of a group trains and stores only B.

Shows: ``AdapterBank.init`` on a backbone, two built-in tasks added to the shared-A group ``g``
(the first trains A and B, the second only its B against the frozen A), the bytes each task keeps on
disk next to the group's A (stored once, under ``shared/``), and ``bank.evaluate()`` reloading both
from disk. ``share_a="auto"`` would instead pick the group by how similar the tasks' inputs are.

Run from the repository root (the bundled all-MiniLM-L6-v2 by default, no download, CPU is fine)::

    PYTHONPATH=. python examples/shared_a_bank.py [--base MODEL_DIR] [--out DIR] [--max-train 120] [--epochs 1]
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


def main(argv: list[str] | None = None) -> dict[str, object]:
    p = argparse.ArgumentParser(description="A bank with shared-A / task-B LoRA.")
    p.add_argument("--base", default=DEFAULT_BACKBONE, help="backbone: a Hugging Face folder or the bundled MiniLM")
    p.add_argument("--out", type=Path, default=None, help="folder to create the bank in (default: a temp dir)")
    p.add_argument("--max-train", type=int, default=120)
    p.add_argument("--max-test", type=int, default=60)
    p.add_argument("--epochs", type=float, default=1)
    p.add_argument("--max-length", type=int, default=40)
    args = p.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="adaptbank-shared-a-"))

    bank = AdapterBank.init(out / "bank", base=args.base)
    train = TrainConfig(epochs=args.epochs, max_train=args.max_train, max_test=args.max_test,
                        max_length=args.max_length)
    results = [bank.add_task(task, LoRAConfig(), train, share_a="g") for task in ("weather", "reviews")]

    # A task's own files: adapter (its B only: the group's A lives under shared/), head, memory, config.
    group_a = sum(f["size"] for f in bank.store.manifest["shared"]["g"]["files"].values())
    sizes: dict[str, dict[str, int]] = {}
    for r in results:
        info = bank.info(r.name)
        sizes[r.name] = {"bytes_on_disk": info["bytes_on_disk"], "adapter": info["files"]["adapter.safetensors"]["size"]}
        print(f"{r.name}: group {r.shared_group!r} ({r.share_reason}); {r.trainable_params:,} trainable params; "
              f"{info['bytes_on_disk']:,} B on disk (adapter {sizes[r.name]['adapter']:,} B); "
              f"test accuracy {r.test_accuracy:.3f}")
    first, second = results[0].name, results[1].name
    # What adding each task cost: the first also wrote the group's A, the second wrote only its own files.
    cost = {first: sizes[first]["bytes_on_disk"] + group_a, second: sizes[second]["bytes_on_disk"]}
    print(f"shared A of group 'g': {group_a:,} B, stored once; adding {first} cost {cost[first]:,} B, "
          f"adding {second} {cost[second]:,} B ({cost[second] / cost[first]:.2f}x)")

    accuracy = bank.evaluate()  # reloads every task from disk, oracle routing (true task id)
    print("bank.evaluate():", {k: round(v, 3) for k, v in accuracy.items()})
    return {"bank": str(bank.path), "sizes": sizes, "shared_a_bytes": group_a, "added_bytes": cost,
            "trainable_params": {r.name: r.trainable_params for r in results},
            "groups": {r.name: r.shared_group for r in results}, "accuracy": accuracy}


if __name__ == "__main__":
    main()
