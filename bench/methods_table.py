"""The README's methods tables from ``bench/methods.py``'s JSON (accuracy) and ``bench/train_speed.py``'s
(training-step speed, quiet machine): one row per task and method, adaptbank beside its peer(s) and full
fine-tuning; with ``--seeds`` (the same runs under other seeds) each cell that has them also shows the
mean over seeds and the adaptbank - peer difference of the means.

Usage::

    python bench/methods_table.py bench/results/methods.json [--seeds S1.json S2.json] [--speed bench/results/train_speed.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

ORDER = ["lora", "adapter", "parallel-adapter", "bitfit", "ia3", "prompt", "prefix", "ptuning-v2"]
NAMES = {"lora": "LoRA", "adapter": "serial adapter", "parallel-adapter": "parallel adapter", "bitfit": "BitFit",
         "ia3": "(IA)^3", "prompt": "prompt tuning", "prefix": "prefix tuning", "ptuning-v2": "P-tuning v2",
         "lora-all": "LoRA all-linear", "full-ft": "full fine-tuning"}


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def accuracies(runs: list[dict[str, Any]], task: str, method: str, impl: str) -> list[float]:
    """The accuracy of (task, method, impl) in every run that has it (seed 0 first)."""
    return [r[task][method][impl]["accuracy"] for r in runs
            if "accuracy" in r.get(task, {}).get(method, {}).get(impl, {})]


def cell(values: list[float]) -> str:
    if len(values) < 2:
        return pct(values[0]) if values else "-"
    return f"{pct(values[0])} (mean {len(values)}: {pct(statistics.mean(values))} ± {100 * statistics.stdev(values):.1f})"


def accuracy_table(runs: list[dict[str, Any]]) -> None:
    print("| task | method | trainable % | adaptbank | peer(s) | adaptbank - peer | full FT | rel. full FT | disk KiB |")
    print("|---|---|---:|---:|---|---:|---:|---:|---:|")
    for task, methods in runs[0].items():
        full = methods.get("full-ft", {}).get("transformers", {}).get("accuracy")
        for method in ORDER:
            ab = methods.get(method, {}).get("adaptbank", {})
            if "accuracy" not in ab:
                continue
            peers = [k for k, v in methods[method].items() if k != "adaptbank" and "accuracy" in v]
            diffs = []
            for k in peers:
                a, b = accuracies(runs, task, method, "adaptbank"), accuracies(runs, task, method, k)
                n = min(len(a), len(b))
                d = f"{100 * (a[0] - b[0]):+.1f}"
                if n > 1:
                    d += f" (mean {n}: {100 * (statistics.mean(a[:n]) - statistics.mean(b[:n])):+.1f})"
                diffs.append(d)
            rel = "-" if full is None else f"{ab['accuracy'] / full:.3f}"
            print(f"| {task} | {NAMES[method]} | {ab['trainable_pct']:.3g} | {cell(accuracies(runs, task, method, 'adaptbank'))} | "
                  + ", ".join(f"{k} {cell(accuracies(runs, task, method, k))}" for k in peers) + " | "
                  + (", ".join(diffs) or "-") + f" | {pct(full)} | {rel} | {ab['disk_bytes'] / 1024:.0f} |")


def speed_table(speed: dict[str, Any]) -> None:
    env = speed["env"]
    print(f"\ntraining step, {speed['task']} batches of {speed['batch_size']}, {speed['steps']} steps x {speed['rounds']} "
          f"rounds, median; load average at start {env['loadavg_at_start'][0]:.2f}")
    print("| method | peer | adaptbank ms/step | peer ms/step | adaptbank / peer speed | control-normalised |")
    print("|---|---|---:|---:|---:|---:|")
    for method, r in speed["runs"].items():
        ms, peer = r["ms_per_step"], r["peer"]
        norm = r.get("control_normalised_ratio")
        print(f"| {NAMES.get(method, method)} | {peer} | {ms['adaptbank']:.1f} | {ms[peer]:.1f} | {r['speed_ratio']:.2f}x | "
              + ("-" if norm is None else f"{norm:.2f}x") + " |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json")
    p.add_argument("--seeds", nargs="*", default=[], help="methods.py JSONs of the same runs under other seeds")
    p.add_argument("--speed", default=None, help="a train_speed.py JSON (quiet machine)")
    args = p.parse_args()
    runs = [json.loads(Path(f).read_text())["runs"] for f in [args.json, *args.seeds]]
    accuracy_table(runs)
    if args.speed:
        speed_table(json.loads(Path(args.speed).read_text()))


if __name__ == "__main__":
    main()
