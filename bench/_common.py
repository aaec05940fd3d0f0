"""Helpers shared by the benchmark scripts: thread setup, timing, tables and JSON output.

Every script measures adaptbank and its peer in the same process, one after the other, on the same
inputs; ratios of figures measured side by side are what to compare across machines.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

warnings.filterwarnings("ignore", category=FutureWarning)
REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def setup_torch(threads: int) -> None:
    """Fix torch's intra-op threads (2 by default: the machines are shared)."""
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set once in this process
        pass


def environment(threads: int) -> dict[str, Any]:
    import peft
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "threads": threads, "cpu_count": os.cpu_count(),
            "loadavg_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "argv": sys.argv}


QUIET = 1.5
"""Load average (1 minute) below which a start counts as quiet."""


def announce_load() -> bool:
    """Print the load average at the start of a timing run and whether it counts as quiet (below
    :data:`QUIET`; figures from a start that is not quiet are not results); returns that verdict."""
    load = os.getloadavg()
    quiet = load[0] < QUIET
    print(f"load average at start: {load} ({'quiet' if quiet else 'NOT QUIET: these figures are not results'})",
          flush=True)
    return quiet


def median_time(fn: Callable[[], object], *, repeats: int, warmup: int = 1) -> tuple[float, list[float]]:
    """Median wall seconds of ``fn`` over ``repeats`` calls after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain, aligned text table (markdown-compatible)."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def _fmt(x: object) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if x != x:
            return "nan"
        if abs(x) >= 100:
            return f"{x:.1f}"
        if abs(x) >= 1:
            return f"{x:.2f}"
        return f"{x:.3f}"
    return str(x)


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def write_json(path: str | None, data: dict[str, Any], *, quiet: bool = False) -> None:
    """Write ``data`` to ``path`` atomically (temp file, then rename), so a killed run keeps the last."""
    if not path:
        return
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, out)
    if not quiet:
        print(f"\nwrote {out}")


NOISE_NOTE = ("note: wall-clock figures from a shared machine are noisy; compare the ratios measured side by side "
              "in this run, and re-run on a quiet machine before quoting absolute numbers.")


def interleaved(fns: dict, repeats: int, warmup: int) -> dict[str, float]:
    """Median seconds per variant, timing them round-robin after ``warmup`` rounds, so machine noise
    hits every variant alike. Round r starts at variant ``r mod V`` (a rotation), so every variant takes
    every place in the order: in a fixed order the first variant ran 3-4% slower than the same forward
    later in the round (measured: two copies of the base model, first and last, with merged and
    unmerged LoRA between them)."""
    import statistics
    import time

    for _ in range(warmup):
        for fn in fns.values():
            fn()
    names = list(fns)
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(repeats):
        for k in names[r % len(names):] + names[: r % len(names)]:
            t0 = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}
