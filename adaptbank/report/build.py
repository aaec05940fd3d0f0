"""Reports over finished (or running) continual-learning runs: JSON, Markdown, or one HTML page.

Reads only ``RUN_DIR/result.json`` (written by the continual runner) and never re-runs a model::

    result.json ──load_run──> run dict ──summarize_run──> summary ──build_report──> report
                                            (metrics.py)                    │
                                                   render_markdown / render_html / json.dumps

``result.json`` (schema 1) holds ``name, strategy, tasks, seed, backbone, config, config_changed,
oracle, routed, steps, finished``. ``oracle`` and ``routed`` are ``{"baseline": [...], "matrix":
[[...]]}``: accuracies with the true task's expert, and with the learned router's choice (``routed``
may be null). Metric definitions and references are in :mod:`adaptbank.metrics`.

The HTML page is self-contained: plots are PNG data URIs drawn with matplotlib's Agg canvas (no
pyplot global state), and every string from a run is escaped with ``html.escape``.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from adaptbank._atomic import atomic_write_bytes
from adaptbank.metrics import AccuracyMatrix, pct

__all__ = ["SCHEMA_VERSION", "load_run", "summarize_run", "build_report", "render_markdown", "render_html",
           "write_report"]  # fmt: skip

SCHEMA_VERSION = 1
"""The ``result.json`` schema version this module reads."""

REQUIRED_KEYS = ("schema", "name", "strategy", "tasks", "seed", "backbone", "config", "config_changed",
                 "oracle", "routed", "steps", "finished")  # fmt: skip
METRIC_KEYS = ("acc", "bwt", "fwt", "forgetting", "forgetting_last", "learning_accuracy")


def _matrix(block: object, tasks: Sequence[str], where: str) -> AccuracyMatrix:
    if not isinstance(block, Mapping) or "matrix" not in block:
        raise ValueError(f"{where} must be an object with keys 'matrix' and 'baseline', got {block!r}")
    extra = sorted(set(block) - {"matrix", "baseline"})
    if extra:
        raise ValueError(f"{where} has unknown key(s) {', '.join(extra)}; allowed: matrix, baseline")
    try:
        return AccuracyMatrix(tuple(tasks), block["matrix"], block.get("baseline"))
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from err


def _validate(run: Mapping[str, Any], source: str) -> None:
    """Raise ``ValueError`` prefixed with ``source`` for anything summarize_run cannot read."""
    if not isinstance(run, Mapping):
        raise ValueError(f"{source}: expected a JSON object at the top level, got {type(run).__name__}")
    if run.get("schema") != SCHEMA_VERSION:
        raise ValueError(
            f"{source}: schema {run.get('schema')!r} is not supported; expected {SCHEMA_VERSION}"
        )
    missing = [k for k in REQUIRED_KEYS if k not in run]
    if missing:
        raise ValueError(f"{source}: missing key(s) {', '.join(missing)}")
    tasks = run["tasks"]
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks):
        raise ValueError(f"{source}: 'tasks' must be a non-empty list of task names, got {tasks!r}")
    for key in ("config", "config_changed"):
        if not isinstance(run[key], Mapping):
            raise ValueError(f"{source}: {key!r} must be an object, got {run[key]!r}")
    oracle = _matrix(run["oracle"], tasks, f"{source}: oracle")
    if run["routed"] is not None:
        _matrix(run["routed"], tasks, f"{source}: routed")
    steps = run["steps"]
    if not isinstance(steps, list) or len(steps) > len(tasks):
        raise ValueError(f"{source}: 'steps' must be a list of at most {len(tasks)} objects, got {steps!r}")
    for i, step in enumerate(steps):
        if not isinstance(step, Mapping) or step.get("task") not in tasks:
            raise ValueError(f"{source}: steps[{i}] must be an object with 'task' in {tasks}, got {step!r}")
        for key in ("router_accuracy", "trainable_params", "bank_bytes", "seconds"):
            v = step.get(key)
            if v is not None and (
                isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
            ):
                raise ValueError(f"{source}: steps[{i}].{key} = {v!r} is not a finite number or null")
    if run["finished"] and not oracle.finished:
        raise ValueError(
            f"{source}: 'finished' is true but oracle.matrix has {len(oracle.rows)} of {len(tasks)} rows"
        )


def load_run(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate ``run_dir/result.json`` (``run_dir`` may also be the file itself).

    Raises ``FileNotFoundError`` naming the missing file, and ``ValueError`` naming the file plus the
    JSON line/column, an unsupported schema version, missing keys or malformed matrices.
    """
    path = Path(run_dir)
    file = path if path.is_file() else path / "result.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no such file; a run directory must contain result.json")
    try:
        run = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{file}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}") from err
    _validate(run, str(file))
    return run


def _block(block: AccuracyMatrix) -> dict[str, Any]:
    d = block.to_dict()
    return {"matrix": d["rows"], "baseline": d["baseline"], **block.summary()}


def summarize_run(run: Mapping[str, Any]) -> dict[str, Any]:
    """Metrics and bookkeeping for one run (a dict as returned by :func:`load_run`).

    Keys: name, strategy, tasks, seed, backbone, finished, matrix, baseline, acc, bwt, fwt, forgetting,
    forgetting_last, learning_accuracy (oracle routing), routed (same matrix/metric keys, or None),
    steps, total_seconds, trainable_params, bank_bytes (from the last step), config, config_changed.
    """
    _validate(run, f"run {run.get('name', '?')!r}" if isinstance(run, Mapping) else "run")
    tasks = run["tasks"]
    oracle = _matrix(run["oracle"], tasks, "oracle")
    routed = None if run["routed"] is None else _block(_matrix(run["routed"], tasks, "routed"))
    steps = [dict(s) for s in run["steps"]]
    seconds = [s["seconds"] for s in steps if s.get("seconds") is not None]
    last = steps[-1] if steps else {}
    return {
        "name": run["name"],
        "strategy": run["strategy"],
        "tasks": list(tasks),
        "seed": run["seed"],
        "backbone": run["backbone"],
        "finished": bool(run["finished"]),
        **_block(oracle),
        "routed": routed,
        "steps": steps,
        "total_seconds": math.fsum(seconds) if seconds else None,
        "trainable_params": last.get("trainable_params"),
        "bank_bytes": last.get("bank_bytes"),
        "config": dict(run["config"]),
        "config_changed": dict(run["config_changed"]),
    }


def build_report(run_dirs: Sequence[str | os.PathLike[str]]) -> dict[str, Any]:
    """One run: its summary. Several: ``{"runs": [summaries], "comparison": [one row per run]}``."""
    if isinstance(run_dirs, (str, os.PathLike)):
        run_dirs = [run_dirs]
    if len(run_dirs) == 0:
        raise ValueError("build_report needs at least one run directory")
    runs = [summarize_run(load_run(d)) for d in run_dirs]
    if len(runs) == 1:
        return runs[0]
    keys = ("name", "strategy", "acc", "bwt", "fwt", "forgetting")
    comparison = [
        {**{k: r[k] for k in keys}, "routed_acc": None if r["routed"] is None else r["routed"]["acc"],
         "trainable_params": r["trainable_params"], "bank_bytes": r["bank_bytes"], "seconds": r["total_seconds"]}
        for r in runs
    ]  # fmt: skip
    return {"runs": runs, "comparison": comparison}


def _runs(report: Mapping[str, Any]) -> tuple[list[Mapping[str, Any]], list[Mapping[str, Any]] | None]:
    if "runs" in report and "comparison" in report:
        return list(report["runs"]), list(report["comparison"])
    if "matrix" in report and "tasks" in report:
        return [report], None
    raise ValueError(f"not a report from build_report: keys {sorted(report)}")


def _bytes(n: float | None) -> str:
    if n is None:
        return "–"
    if abs(n) < 1024:
        return f"{n:.0f} B"
    exp = min(int(math.log(abs(n), 1024)), 3)  # 1 KiB, 2 MiB, 3 GiB
    return f"{n / 1024**exp:.1f} {('KiB', 'MiB', 'GiB')[exp - 1]}"


def _int(n: float | None) -> str:
    return "–" if n is None else f"{int(n):,}"


def _secs(s: float | None) -> str:
    return "–" if s is None else f"{s:.1f} s"


def _status(run: Mapping[str, Any]) -> str:
    return "finished" if run["finished"] else f"in progress ({len(run['matrix'])}/{len(run['tasks'])} tasks)"


def _changed(config_changed: Mapping[str, Any]) -> list[str]:
    """``{"epochs": [2, 1]}`` ([default, value]) -> ``["epochs = 1 (default 2)"]``."""
    out = []
    for key, v in config_changed.items():
        if isinstance(v, list) and len(v) == 2:
            out.append(f"{key} = {json.dumps(v[1])} (default {json.dumps(v[0])})")
        else:
            out.append(f"{key} = {json.dumps(v)}")
    return out


COMPARISON_HEAD = ("run", "strategy", "ACC %", "BWT %", "FWT %", "forgetting %", "routed ACC %",
                   "trainable params", "bank size", "time")  # fmt: skip


def _comparison_cells(row: Mapping[str, Any]) -> list[str]:
    return [str(row["name"]), str(row["strategy"]), pct(row["acc"]), pct(row["bwt"]), pct(row["fwt"]),
            pct(row["forgetting"]), pct(row["routed_acc"]), _int(row["trainable_params"]),
            _bytes(row["bank_bytes"]), _secs(row["seconds"])]  # fmt: skip


def _metric_rows(run: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    routed = run["routed"] or {}
    return [(k, pct(run[k]), pct(routed.get(k))) for k in METRIC_KEYS]


def _md(text: object) -> str:
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _md_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(_md(h) for h in head) + " |", "|" + "---|" * len(head)]
    return out + ["| " + " | ".join(_md(c) for c in r) + " |" for r in rows]


def render_markdown(report: Mapping[str, Any]) -> str:
    """Markdown: a comparison table (several runs), then per run the matrices and a metrics table."""
    runs, comparison = _runs(report)
    lines: list[str] = []
    if comparison is not None:
        lines += [
            "# Comparison",
            "",
            *_md_table(COMPARISON_HEAD, [_comparison_cells(r) for r in comparison]),
            "",
        ]
    for run in runs:
        lines += [f"# {_md(run['name'])}", "", f"strategy `{run['strategy']}`, seed {run['seed']}, "
                  f"backbone `{run['backbone']}`, {_status(run)}"]  # fmt: skip
        lines += [f"- changed: {_md(c)}" for c in _changed(run["config_changed"])] + [""]
        lines += ["## Accuracy % with the true task's expert (oracle)", "",
                  AccuracyMatrix(tuple(run["tasks"]), run["matrix"], run["baseline"]).to_markdown()]  # fmt: skip
        if run["routed"] is not None:
            routed = run["routed"]
            lines += ["## Accuracy % with the learned router", "",
                      AccuracyMatrix(tuple(run["tasks"]), routed["matrix"], routed["baseline"]).to_markdown()]  # fmt: skip
        lines += ["## Metrics (%)", "", *_md_table(("metric", "oracle", "routed"), _metric_rows(run)), ""]
        steps = [(s["task"], pct(s.get("router_accuracy")), _int(s.get("trainable_params")),
                  _bytes(s.get("bank_bytes")), _secs(s.get("seconds"))) for s in run["steps"]]  # fmt: skip
        if steps:
            head = ("task", "router accuracy %", "trainable params", "bank size", "time")
            lines += ["## Steps", "", *_md_table(head, steps), ""]
    return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------------------------------------------
# HTML: matplotlib figures (Agg canvas, no pyplot) embedded as base64 PNG data URIs.


def _png(fig: Any) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _plain(text: object) -> str:
    return str(text).replace("$", r"\$")  # matplotlib would parse "$...$" as mathtext


def _heatmap(tasks: Sequence[str], rows: Sequence[Sequence[float | None]], title: str) -> str:
    from matplotlib.figure import Figure

    n, t = len(rows), len(tasks)
    values = [[math.nan if v is None else v for v in row] for row in rows]  # NaN cells stay blank
    fig = Figure(figsize=(min(2.0 + 0.8 * t, 16.0), min(1.5 + 0.5 * n, 12.0)))
    ax = fig.add_subplot()
    im = ax.imshow(values, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    size = 9 if t <= 8 else 6
    for i, row in enumerate(rows):
        for j, v in enumerate(row):
            if v is not None:
                ax.text(j, i, f"{100 * v:.1f}", ha="center", va="center", fontsize=size,
                        color="black" if v > 0.6 else "white")  # fmt: skip
    ax.set_xticks(range(t), [_plain(x) for x in tasks], rotation=45, ha="right")
    ax.set_yticks(range(n), [f"after {_plain(x)}" for x in tasks[:n]])
    ax.set_xlabel("evaluated on")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="accuracy (fraction; cells in %)")
    return _png(fig)


def _curves(run: Mapping[str, Any]) -> str:
    from matplotlib.figure import Figure

    tasks, n = run["tasks"], len(run["matrix"])
    fig = Figure(figsize=(min(3.0 + 0.7 * n, 14.0), 4.0))
    ax = fig.add_subplot()
    colors = [f"C{j % 10}" for j in range(len(tasks))]
    for label, block, style in (("oracle", run, "-"), ("routed", run["routed"], "--")):
        if block is None:
            continue
        for j in range(n):  # a task's line starts at the step that learned it
            xs = list(range(j, n))
            ys = [block["matrix"][i][j] for i in xs]
            name = _plain(tasks[j]) + ("" if label == "oracle" else " (routed)")
            ax.plot(xs, ys, style, marker="o" if style == "-" else "x", color=colors[j], label=name)
    ax.set_xticks(range(n), [f"after {_plain(x)}" for x in tasks[:n]], rotation=45, ha="right")
    ax.set_ylim(0.0, 1.02)
    ax.set_ylabel("accuracy")
    ax.set_title(
        "Accuracy per task over the sequence" + (" (dashed: learned router)" if run["routed"] else "")
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return _png(fig)


def _html_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    th = "".join(f"<th>{html.escape(str(h))}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _matrix_table(tasks: Sequence[str], block: Mapping[str, Any]) -> str:
    rows = [[f"after {tasks[i]}", *(pct(v) for v in row)] for i, row in enumerate(block["matrix"])]
    if block["baseline"] is not None:
        rows.append(["baseline", *(pct(v) for v in block["baseline"])])
    return _html_table(["", *tasks], rows)


_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}
table{border-collapse:collapse;margin:.5em 0 1em}th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th:first-child,td:first-child{text-align:left}img{max-width:100%}.row{display:flex;flex-wrap:wrap;gap:1em}"""


def render_html(report: Mapping[str, Any]) -> str:
    """One self-contained HTML page: comparison table, then per run heatmaps, curves and tables."""
    runs, comparison = _runs(report)
    e = html.escape
    title = e(runs[0]["name"]) if comparison is None else f"{len(runs)} runs"
    parts = [f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>adaptbank report: {title}</title>",
             f"<style>{_CSS}</style></head><body><h1>adaptbank report: {title}</h1>"]  # fmt: skip
    if comparison is not None:
        parts += [
            "<h2>Comparison</h2>",
            _html_table(COMPARISON_HEAD, [_comparison_cells(r) for r in comparison]),
        ]
    for run in runs:
        tasks = run["tasks"]
        parts += [f"<h2>{e(str(run['name']))}</h2>",
                  f"<p>strategy <code>{e(str(run['strategy']))}</code>, seed {e(str(run['seed']))}, backbone "
                  f"<code>{e(str(run['backbone']))}</code>, {e(_status(run))}</p>"]  # fmt: skip
        changed = _changed(run["config_changed"])
        if changed:
            parts.append("<ul>" + "".join(f"<li>changed: {e(c)}</li>" for c in changed) + "</ul>")
        images = [_heatmap(tasks, run["matrix"], "Accuracy % (oracle task expert)")]
        if run["routed"] is not None:
            images.append(_heatmap(tasks, run["routed"]["matrix"], "Accuracy % (learned router)"))
        images.append(_curves(run))
        parts.append('<div class="row">' + "".join(f'<img src="{u}" alt="plot">' for u in images) + "</div>")
        parts += ["<h3>Metrics (%)</h3>", _html_table(("metric", "oracle", "routed"), _metric_rows(run))]
        parts += ["<h3>Accuracy % (oracle)</h3>", _matrix_table(tasks, run)]
        if run["routed"] is not None:
            parts += ["<h3>Accuracy % (learned router)</h3>", _matrix_table(tasks, run["routed"])]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_report(
    run_dirs: Sequence[str | os.PathLike[str]], fmt: Literal["md", "html", "json"], out: Path | None = None
) -> str:
    """Build and render a report; when ``out`` is given, also write it atomically (temp file + os.replace)."""
    renderers = {"md": render_markdown, "html": render_html,
                 "json": lambda r: json.dumps(r, indent=2, allow_nan=False) + "\n"}  # fmt: skip
    if fmt not in renderers:
        raise ValueError(f"fmt must be one of md, html, json, got {fmt!r}")
    text = renderers[fmt](build_report(run_dirs))
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out, text.encode("utf-8"))  # temp file in the same dir, fsync, os.replace
    return text
