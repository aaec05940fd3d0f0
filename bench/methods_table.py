"""The README's methods table from ``bench/methods.py``'s JSON: one row per task and method, adaptbank beside
its peer(s) and full fine-tuning.

Usage::

    python bench/methods_table.py bench/results/methods.json [--speed bench/results/methods_speed.json]

``--speed`` takes the ex/s ratios from a run timed on a quiet machine (the accuracy JSON may come from a
loaded one); without it the ratios come from the accuracy run and are marked as such.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ORDER = ["lora", "adapter", "parallel-adapter", "bitfit", "ia3", "prompt", "prefix", "ptuning-v2"]
NAMES = {"lora": "LoRA", "adapter": "serial adapter", "parallel-adapter": "parallel adapter", "bitfit": "BitFit",
         "ia3": "(IA)^3", "prompt": "prompt tuning", "prefix": "prefix tuning", "ptuning-v2": "P-tuning v2"}


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json")
    p.add_argument("--speed", default=None)
    args = p.parse_args()
    runs = json.loads(Path(args.json).read_text())["runs"]
    speed = json.loads(Path(args.speed).read_text())["runs"] if args.speed else runs
    print("| task | method | trainable % | adaptbank | peer(s) | adaptbank - best peer | full FT | "
          "ex/s adaptbank / peer | disk KiB |")
    print("|---|---|---:|---:|---|---:|---:|---:|---:|")
    for task, methods in runs.items():
        full = methods.get("full-ft", {}).get("transformers", {}).get("accuracy")
        for method in ORDER:
            res = methods.get(method, {})
            ab = res.get("adaptbank", {})
            if "accuracy" not in ab:
                continue
            peers = {k: v for k, v in res.items() if k != "adaptbank" and "accuracy" in v}
            best = max((v["accuracy"] for v in peers.values()), default=None)
            timed = speed.get(task, {}).get(method, {})
            ratios = [f"{timed['adaptbank']['train_ex_per_s'] / v['train_ex_per_s']:.2f} ({k})"
                      for k, v in timed.items() if k != "adaptbank" and "train_ex_per_s" in v and "adaptbank" in timed]
            print(f"| {task} | {NAMES[method]} | {ab['trainable_pct']:.3g} | {pct(ab['accuracy'])} | "
                  + ", ".join(f"{k} {pct(v['accuracy'])}" for k, v in peers.items()) + " | "
                  + ("-" if best is None else f"{100 * (ab['accuracy'] - best):+.1f}") + f" | {pct(full)} | "
                  + (", ".join(ratios) or "-") + f" | {ab['disk_bytes'] / 1024:.0f} |")


if __name__ == "__main__":
    main()
