"""A report's data as files: JSON and CSV for spreadsheets and plotting scripts, and the folder writer.

``data_files(report)`` returns ``{file name: bytes}``:

- ``report.json``      the report dict itself (what ``--format json`` prints)
- ``metrics.csv``      one row per run: name, strategy, seed, finished, metric, the six metrics for
                       oracle routing and ``routed_*`` for the learned router, trainable_params,
                       bank_bytes, total_seconds, peak_memory_bytes
- ``matrices.csv``     long form, one row per cell: run, routing (oracle | routed), after (the task
                       just learned, or "baseline"), task, value (a fraction; empty when not evaluated)
- ``steps.csv``        one row per run and step with every key the runner wrote in ``steps`` but the per-example
                       ``learned_hits`` (in ``report.json``)
- ``groups.csv``       (several runs) strategy, n, and ``<metric>_mean`` / ``<metric>_sd`` per metric
- ``differences.csv``  (several runs) the paired-bootstrap rows: run, reference, kind, diff, lo, hi,
                       n_examples, reason

:func:`replace_dir` writes such a dict as a folder in one step: into a fresh temporary sibling,
then renamed over the old folder, so a failure leaves the previous folder (or none) in place.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from adaptbank.report.tables import METRIC_KEYS, split_report

__all__ = ["data_files", "replace_dir"]


def _csv(head: Sequence[str], rows: Sequence[Sequence[Any]]) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(head)
    w.writerows([["" if v is None else v for v in r] for r in rows])
    return buf.getvalue().encode("utf-8")


def _matrix_rows(name: str, routing: str, tasks: Sequence[str], block: Mapping[str, Any]) -> list[list[Any]]:
    rows = [[name, routing, tasks[i], t, v] for i, row in enumerate(block["matrix"]) for t, v in zip(tasks, row, strict=True)]
    if block.get("baseline") is not None:
        rows += [[name, routing, "baseline", t, v] for t, v in zip(tasks, block["baseline"], strict=True)]
    return rows


def data_files(report: Mapping[str, Any]) -> dict[str, bytes]:
    """The report's data as JSON and CSV files (see the module docstring)."""
    runs, comparison = split_report(report)
    files = {"report.json": (json.dumps(report, indent=2, allow_nan=False) + "\n").encode("utf-8")}
    head = ["name", "strategy", "seed", "finished", "metric", *METRIC_KEYS, *(f"routed_{k}" for k in METRIC_KEYS),
            "trainable_params", "bank_bytes", "total_seconds", "peak_memory_bytes"]
    rows = []
    for r in runs:
        routed = r["routed"] or {}
        rows.append([r["name"], r["strategy"], r["seed"], r["finished"], r.get("metric", "accuracy"),
                     *(r[k] for k in METRIC_KEYS), *(routed.get(k) for k in METRIC_KEYS), r["trainable_params"],
                     r["bank_bytes"], r["total_seconds"], r.get("peak_memory_bytes")])  # fmt: skip
    files["metrics.csv"] = _csv(head, rows)
    cells: list[list[Any]] = []
    for r in runs:
        cells += _matrix_rows(r["name"], "oracle", r["tasks"], r)
        if r["routed"] is not None:
            cells += _matrix_rows(r["name"], "routed", r["tasks"], r["routed"])
    files["matrices.csv"] = _csv(["run", "routing", "after", "task", "value"], cells)
    keys: list[str] = []
    for r in runs:
        keys += [k for s in r["steps"] for k in s if k not in keys and k != "learned_hits"]  # per example: in report.json
    files["steps.csv"] = _csv(["run", *keys], [[r["name"], *(s.get(k) for k in keys)] for r in runs for s in r["steps"]])
    if comparison is not None:
        groups = report.get("groups") or []
        metric_keys = [k for k in (groups[0] if groups else {}) if k not in ("strategy", "label", "n", "runs")]
        files["groups.csv"] = _csv(["strategy", "label", "n", *(f"{k}_{s}" for k in metric_keys for s in ("mean", "sd"))],
                                   [[g["strategy"], g["label"], g["n"],
                                     *(g[k][s] for k in metric_keys for s in ("mean", "sd"))]
                                    for g in groups])  # fmt: skip
        diff_keys = ["run", "reference", "kind", "diff", "lo", "hi", "n_examples", "reason"]
        files["differences.csv"] = _csv(diff_keys, [[d.get(k) for k in diff_keys] for d in report.get("differences") or []])
    return files


def replace_dir(target: Path, files: Mapping[str, bytes]) -> None:
    """Make ``target`` a folder holding exactly ``files`` (flat names), swapped in by rename."""
    target = Path(target)
    for name in files:
        if "/" in name or "\\" in name or name in ("", ".", ".."):
            raise ValueError(f"file name {name!r} must be a plain name without a folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        for name, data in files.items():
            with open(tmp / name, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        if target.exists() and not target.is_dir():
            raise ValueError(f"{target} exists and is not a folder; remove it or write the report elsewhere")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
        os.replace(target, old / "d")
    try:
        os.replace(tmp, target)
    except BaseException:
        if old is not None:
            os.replace(old / "d", target)  # put the previous folder back
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
