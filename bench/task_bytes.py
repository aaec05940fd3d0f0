"""Bytes on disk per task for every method, file by file, on the bundled MiniLM.

One bank (router layers 0-1, experts in layers 2-5), one real task (``--task``, ag_news: 4 classes) added
once per method with a token training run (``--steps`` optimiser steps: the bytes do not depend on how
long it trains) over ``--max-train`` texts, which set the size of the router memory (the factor R of the
task's router features has at most min(N, F) rows). Printed per task: the expert's tensors
(``adapter.safetensors``), the head, the router memory, the config, the total, the trainable
parameters, and bytes per trainable parameter. The second task of a shared-A group stores only its B.

Usage::

    python bench/task_bytes.py --json bench/results/task_bytes.json
    python bench/task_bytes.py --quick        # 32 texts
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from _common import environment, setup_torch, table, write_json


def methods() -> dict[str, Any]:
    from adaptbank.core.config import (
        AdapterConfig,
        BitFitConfig,
        CombinedConfig,
        IA3Config,
        LoRAConfig,
        ParallelAdapterConfig,
        PrefixConfig,
        PromptTuningConfig,
        PTuningV2Config,
    )

    return {"LoRA q+v r8": LoRAConfig(), "LoRA all-linear r8": LoRAConfig(targets="all-linear"),
            "LoRA q+v r8, shared-A 2nd task": LoRAConfig(), "serial adapter m64": AdapterConfig(),
            "parallel adapter m64": ParallelAdapterConfig(), "BitFit": BitFitConfig(), "(IA)^3": IA3Config(),
            "prompt P20": PromptTuningConfig(), "prefix P20": PrefixConfig(), "P-tuning v2 P20": PTuningV2Config(),
            "lora+adapter": CombinedConfig(parts=(LoRAConfig(), AdapterConfig()))}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="ag_news")
    p.add_argument("--max-train", type=int, default=1000)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    p.add_argument("--quick", action="store_true", help="32 training texts")
    return p.parse_args()


def main() -> None:
    args = parse()
    if args.quick:
        args.max_train = 32
    setup_torch(args.threads)
    from adaptbank.bank.facade import AdapterBank
    from adaptbank.core.config import TrainConfig

    out: dict[str, Any] = {}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        bank = AdapterBank.init(Path(tmp) / "bank")
        # epochs such that the run takes --steps optimiser steps of 16 rows
        train = TrainConfig(max_train=args.max_train, max_test=8, epochs=args.steps * 16 / args.max_train)
        for i, (label, method) in enumerate(methods().items()):
            name = f"m{i}"
            if "shared-A 2nd" in label:
                bank.add_task(args.task, method, train, name=f"{name}-first", share_a="group")
            r = bank.add_task(args.task, method, train, name=name, share_a="group" if "shared-A" in label else None)
            entry = next(e for e in bank.store.manifest["tasks"] if e["name"] == name)
            files = {Path(f).stem: v["size"] for f, v in entry["files"].items()}
            total = sum(files.values())
            out[label] = {"files": files, "total": total, "trainable_params": r.trainable_params}
            rows.append([label, files.get("adapter", 0), files.get("head", 0), files.get("memory", 0),
                         files.get("config", 0), total, r.trainable_params,
                         files.get("adapter", 0) / max(1, r.trainable_params)])
            print(f"{label}: {total:,} bytes", flush=True)
        shared = bank.store.section("shared")
    print()
    print(table(["method", "expert bytes", "head", "router memory", "config", "total", "trainable params (expert)",
                 "expert bytes / param"], rows))
    print(f"\nrouter memory from {args.max_train} training texts; the shared-A group's A is stored once, under "
          f"shared/ ({len(shared)} group)")
    write_json(args.json, {"environment": environment(args.threads), "args": vars(args), "tasks": out})


if __name__ == "__main__":
    main()
