"""Reports over finished (or running) continual-learning runs: JSON, Markdown, or one HTML page.

Reads only ``RUN_DIR/result.json`` (written by the continual runner) and never re-runs a model::

    result.json ──load_run──> run dict ──summarize_run──> summary ──build_report──> report
                                            (metrics.py)                    │
                          tables.render_markdown / html.render_html / json.dumps; export: PNG, JSON, CSV

``result.json`` (schema 1) holds ``name, strategy, tasks, seed, backbone, config, config_changed,
oracle, routed, steps, finished``. ``oracle`` and ``routed`` are ``{"baseline": [...], "matrix":
[[...]]}``: accuracies with the true task's expert, and with the learned router's choice (``routed``
may be null). Metric definitions and references are in :mod:`adaptbank.metrics`.

Optional keys (absent or null: the report says "not recorded"; present: validated, then rendered):

- ``"metric"``: ``"accuracy"`` (default) or ``"exact_match"`` (generation runs): the cells' unit, used
  in every table title and colour bar.
- ``"notes"``: a list of strings, shown under the run's heading.
- ``"steps"[i]["learned_hits"]``: task i's per-example hits in row i (R[i][i]), as in ``hits``; with the
  final row's ``hits`` they give BWT a 95% paired bootstrap interval (``bwt_interval``), shown beside BWT.
- ``"steps"[i]["peak_memory_bytes"]``: peak memory while learning and evaluating task i, in bytes (a
  finite number >= 0 or null); shown in the cost-per-task table. ``train_steps`` and ``final_loss``
  (written by the runner) are shown too.
- ``"router_confusion"``: ``{"tasks": [t_0, ..., t_k], "counts": [[c_00, ..., c_0k], ...]}`` for the
  final row: ``counts[a][b]`` = number of test examples of task ``tasks[a]`` that the router sent to
  the expert of ``tasks[b]``. ``tasks`` are unique names from the run's ``tasks``; ``counts`` is a
  square matrix of non-negative integers of that size.
- ``"router_matrix"``: ``[[r_00, null, ...], [r_10, r_11, null, ...], ...]``, one row per step like
  the accuracy matrices: ``r_ij`` is the router's task-identification accuracy on task j's test
  examples after task i was added (null for j > i). Summarised as router forgetting (RWalk's
  definition over this matrix) and the first task's identification when added and at the end.
- ``"hits"``: ``{"oracle": {task: [h_0, h_1, ...]}, "routed": {task: [...]} | null}`` for the final
  row: ``h_n`` is 1 when test example n of ``task`` was answered correctly (classification: the
  predicted label; generation: exact match), else 0, in the test set's order. Every task in
  ``routed`` must be in ``oracle`` with a vector of the same length. Used for the routed-vs-oracle
  error split and for the paired bootstrap between runs (:mod:`adaptbank.report.stats`).

A report over several runs adds ``groups`` (mean ± sd per strategy over its runs: runs of one
strategy over different orders or seeds) and ``differences`` (each run against the first one: a
paired bootstrap of the final-row ACC difference, when both carry ``hits`` for the same examples).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from adaptbank._atomic import atomic_write_bytes
from adaptbank.metrics import (
    AccuracyMatrix,
    average_accuracy,
    check_matrix,
    forgetting,
    forgetting_last,
    forgetting_per_task,
)
from adaptbank.report.export import data_files, replace_dir
from adaptbank.report.html import render_html, report_figures
from adaptbank.report.stats import error_split, mean_sd, paired_bootstrap
from adaptbank.report.tables import METRIC_KEYS, render_markdown

__all__ = ["SCHEMA_VERSION", "load_run", "summarize_run", "build_report", "render_markdown", "render_html",
           "write_report", "METRIC_KEYS"]  # fmt: skip

SCHEMA_VERSION = 1
"""The ``result.json`` schema version this module reads."""

REQUIRED_KEYS = ("schema", "name", "strategy", "tasks", "seed", "backbone", "config", "config_changed",
                 "oracle", "routed", "steps", "finished")  # fmt: skip
METRICS = ("accuracy", "exact_match")
STEP_NUMBERS = ("router_accuracy", "trainable_params", "bank_bytes", "seconds", "peak_memory_bytes")


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


def _hit_vectors(block: object, tasks: Sequence[str], where: str) -> dict[str, list[int]]:
    if not isinstance(block, Mapping) or not block:
        raise ValueError(f"{where} must be a non-empty object {{task: [0/1 per test example]}}, got {block!r}")
    out = {}
    for task, hits in block.items():
        if task not in tasks:
            raise ValueError(f"{where} names task {task!r}, which is not in the run's tasks {list(tasks)}")
        if not isinstance(hits, list) or not hits or not all(h in (0, 1) and not isinstance(h, float) for h in hits):
            raise ValueError(f"{where}.{task} must be a non-empty list of 0/1 (or true/false) per test example")
        out[task] = [int(h) for h in hits]
    return out


def _validate_optional(run: Mapping[str, Any], tasks: Sequence[str], source: str) -> None:
    """The optional keys of the module docstring, when present and not null."""
    if run.get("metric") is not None and run["metric"] not in METRICS:
        raise ValueError(f"{source}: 'metric' = {run['metric']!r}; allowed: {', '.join(METRICS)}")
    notes = run.get("notes")
    if notes is not None and (not isinstance(notes, list) or not all(isinstance(n, str) for n in notes)):
        raise ValueError(f"{source}: 'notes' must be a list of strings, got {notes!r}")
    conf = run.get("router_confusion")
    if conf is not None:
        where = f"{source}: router_confusion"
        if not isinstance(conf, Mapping) or set(conf) != {"tasks", "counts"}:
            raise ValueError(f"{where} must be an object with exactly the keys 'tasks' and 'counts', got {conf!r}")
        names, counts = conf["tasks"], conf["counts"]
        if (not isinstance(names, list) or not names or len(set(names)) != len(names)
                or not all(isinstance(t, str) and t in tasks for t in names)):
            raise ValueError(f"{where}.tasks must be unique names from the run's tasks {list(tasks)}, got {names!r}")
        k = len(names)
        if not (isinstance(counts, list) and len(counts) == k and all(
                isinstance(row, list) and len(row) == k and all(
                    isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in row) for row in counts)):
            raise ValueError(f"{where}.counts must be a {k}x{k} matrix of non-negative integers "
                             f"(rows: true task, columns: routed expert), got {counts!r}")
    if run.get("router_matrix") is not None:
        rows = check_matrix(run["router_matrix"], len(tasks), f"{source}: router_matrix")
        if len(rows) != len(run["oracle"]["matrix"]):
            raise ValueError(f"{source}: router_matrix has {len(rows)} rows but the oracle matrix "
                             f"{len(run['oracle']['matrix'])}; one row per step")
    hits = run.get("hits")
    if hits is not None:
        where = f"{source}: hits"
        if not isinstance(hits, Mapping) or "oracle" not in hits or set(hits) - {"oracle", "routed"}:
            raise ValueError(f"{where} must be an object with key 'oracle' and optionally 'routed', got keys "
                             f"{sorted(hits) if isinstance(hits, Mapping) else hits!r}")
        oracle = _hit_vectors(hits["oracle"], tasks, f"{where}.oracle")
        if hits.get("routed") is not None:
            for task, vec in _hit_vectors(hits["routed"], tasks, f"{where}.routed").items():
                if len(oracle.get(task, ())) != len(vec):
                    raise ValueError(f"{where}.routed.{task} has {len(vec)} hits but hits.oracle.{task} has "
                                     f"{len(oracle.get(task, ()))}; both must cover the same test examples")


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
        for key in STEP_NUMBERS:
            v = step.get(key)
            if v is not None and (
                isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
            ):
                raise ValueError(f"{source}: steps[{i}].{key} = {v!r} is not a finite number or null")
    _validate_optional(run, tasks, source)
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


def _hits(run: Mapping[str, Any]) -> dict[str, Any] | None:
    hits = run.get("hits")
    if hits is None:
        return None
    return {"oracle": {t: [int(h) for h in v] for t, v in hits["oracle"].items()},
            "routed": None if hits.get("routed") is None else {t: [int(h) for h in v] for t, v in hits["routed"].items()}}


def summarize_run(run: Mapping[str, Any]) -> dict[str, Any]:
    """Metrics and bookkeeping for one run (a dict as returned by :func:`load_run`).

    Keys: name, strategy, tasks, seed, backbone, finished, matrix, baseline, acc, bwt, fwt, forgetting,
    forgetting_last, learning_accuracy (oracle routing), routed (same matrix/metric keys, or None),
    steps, total_seconds, trainable_params (the most any step trained: joint trains once, in step 0),
    bank_bytes (from the last step), config, config_changed;
    metric ("accuracy" | "exact_match"), notes, peak_memory_bytes (max over steps, or None),
    router_confusion, hits (as in result.json, or None), error_split (per task in ``hits.routed``:
    ``{"task", "n", "both_right", "routing_errors", "routed_only_right", "both_wrong"}``, or None) and
    router (``{"matrix", "acc", "forgetting", "drops", "forgetting_last", "first_task": [when added, now]}``: the
    router's task identification over the steps, or None when not recorded), bwt_interval (``[lo, hi]``,
    the 95% paired bootstrap of BWT over test examples, or None: see :func:`_bwt_interval`).
    """
    _validate(run, f"run {run.get('name', '?')!r}" if isinstance(run, Mapping) else "run")
    tasks = run["tasks"]
    oracle = _matrix(run["oracle"], tasks, "oracle")
    routed = None if run["routed"] is None else _block(_matrix(run["routed"], tasks, "routed"))
    steps = [dict(s) for s in run["steps"]]
    seconds = [s["seconds"] for s in steps if s.get("seconds") is not None]
    peaks = [s["peak_memory_bytes"] for s in steps if s.get("peak_memory_bytes") is not None]
    params = [s["trainable_params"] for s in steps if s.get("trainable_params") is not None]
    last = steps[-1] if steps else {}
    hits = _hits(run)
    split = None
    if hits is not None and hits["routed"] is not None:
        split = [{"task": t, **error_split(hits["oracle"][t], hits["routed"][t])} for t in tasks if t in hits["routed"]]
    conf = run.get("router_confusion")
    bwt_ci = _bwt_interval(steps, hits, len(run["oracle"]["matrix"]))
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
        "trainable_params": max(params) if params else None,
        "bank_bytes": last.get("bank_bytes"),
        "config": dict(run["config"]),
        "config_changed": dict(run["config_changed"]),
        "metric": run.get("metric") or "accuracy",
        "notes": list(run.get("notes") or []),
        "peak_memory_bytes": max(peaks) if peaks else None,
        "router_confusion": None if conf is None else {"tasks": list(conf["tasks"]), "counts": [list(r) for r in conf["counts"]]},
        "hits": hits,
        "error_split": split,
        "router": _router_block(run.get("router_matrix")),
        "bwt_interval": bwt_ci,
    }


def _bwt_interval(steps: Sequence[Mapping[str, Any]], hits: Mapping[str, Any] | None, rows: int) -> list[float] | None:
    """95% paired bootstrap interval ``[lo, hi]`` of the oracle BWT over test examples: per task j < t, the
    final row's hits against the hits of row j (``steps[j]["learned_hits"]``, R[j][j] per example), resampled
    within each task (:func:`adaptbank.report.stats.paired_bootstrap`); None when a vector is missing (runs
    written before the runner kept them) or fewer than two rows exist."""
    if hits is None or rows < 2 or len(steps) < rows - 1:
        return None
    final, learned = {}, {}
    for step in steps[: rows - 1]:
        task, vec = step.get("task"), step.get("learned_hits")
        if not isinstance(vec, list) or task not in hits["oracle"] or len(vec) != len(hits["oracle"][task]):
            return None
        if not all(h in (0, 1) and not isinstance(h, (bool, float)) for h in vec):
            raise ValueError(f"steps: learned_hits of task {task!r} must be 0/1 integers")
        final[task], learned[task] = hits["oracle"][task], vec
    _, lo, hi = paired_bootstrap(final, learned)
    return [lo, hi]


def _router_block(matrix: Sequence[Sequence[float | None]] | None) -> dict[str, Any] | None:
    """Router task identification over the steps: the matrix, its final-row mean, forgetting (the drop
    from each earlier task's best identification to the last row's) and the first task's figures."""
    if matrix is None:
        return None
    rows = [list(r) for r in matrix]
    return {"matrix": rows, "acc": average_accuracy(rows), "forgetting": forgetting(rows),
            "drops": forgetting_per_task(rows),
            "forgetting_last": forgetting_last(rows), "first_task": [rows[0][0], rows[-1][0]]}


GROUP_KEYS = ("acc", "bwt", "fwt", "forgetting", "forgetting_last", "learning_accuracy", "routed_acc",
              "trainable_params", "bank_bytes", "seconds", "peak_memory_bytes")  # fmt: skip


SETTING_KEYS: tuple[str, ...] = ("backbone", "strategy", "method", "train", "options")
"""The parts of a run's config that make its setting; runs that differ only elsewhere (task order, seed,
evaluation modes, task specs) are one group."""


def _leaves(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping):
        return {k: v for key, sub in value.items() for k, v in _leaves(sub, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): value}


def _setting(run: Mapping[str, Any]) -> dict[str, Any]:
    config = run.get("config") or {}
    return _leaves({"strategy": run["strategy"], **{k: config.get(k) for k in SETTING_KEYS if k != "strategy"}})


def _groups(runs: Sequence[Mapping[str, Any]], comparison: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Runs of one strategy and one setting (different orders or seeds) as one group: mean, sample sd and
    count per key. The first setting of a strategy is labelled by the strategy; a later one by the strategy
    and what differs from that first one (``seq-lora (train.probe_init=false, train.head_lr=0.0005)``)."""
    settings = [_setting(r) for r in runs]
    order: dict[str, list[int]] = {}
    for i, setting in enumerate(settings):
        order.setdefault(json.dumps(setting, sort_keys=True, default=str), []).append(i)
    first: dict[str, dict[str, Any]] = {}
    out = []
    for idx in order.values():
        strategy, setting = str(runs[idx[0]]["strategy"]), settings[idx[0]]
        ref = first.setdefault(strategy, setting)
        diff = [f"{k}={json.dumps(v)}" for k, v in setting.items() if ref.get(k) != v]
        diff += [f"{k} unset" for k in ref if k not in setting]
        label = strategy if not diff else f"{strategy} ({', '.join(diff)})"
        rows = [{**comparison[i], "forgetting_last": runs[i]["forgetting_last"],
                 "learning_accuracy": runs[i]["learning_accuracy"],
                 "peak_memory_bytes": runs[i].get("peak_memory_bytes")} for i in idx]  # fmt: skip
        group: dict[str, Any] = {"strategy": strategy, "label": label, "n": len(idx),
                                 "runs": [runs[i]["name"] for i in idx]}
        for key in GROUP_KEYS:
            mean, sd, n = mean_sd([row[key] for row in rows])
            group[key] = {"mean": mean, "sd": sd, "n": n}
        out.append(group)
    return out


def _differences(runs: Sequence[Mapping[str, Any]], n: int = 10_000) -> list[dict[str, Any]]:
    """Each run against the first: paired bootstrap of final-row ACC (oracle; routed when both have it)."""
    ref = runs[0]
    out = []
    for run in runs[1:]:
        for kind in ("oracle", "routed"):
            a, b = (run.get("hits") or {}).get(kind), (ref.get("hits") or {}).get(kind)
            row: dict[str, Any] = {"run": run["name"], "reference": ref["name"], "kind": kind, "diff": None,
                                   "lo": None, "hi": None, "n_examples": None, "reason": None}
            if kind == "routed" and (run["routed"] is None or ref["routed"] is None):
                continue  # no routed evaluation on one side: nothing to compare
            if not (run["finished"] and ref["finished"]):
                row["reason"] = "a run is unfinished: its last row is not after the last task; not compared"
            elif a is None or b is None:
                row["reason"] = f"per-example hits not recorded ({kind})"
            elif set(a) != set(b) or any(len(a[t]) != len(b[t]) for t in a):
                row["reason"] = "hits cover different tasks or test sets; not paired"
            else:
                row["diff"], row["lo"], row["hi"] = paired_bootstrap(a, b, n=n, seed=0)
                row["n_examples"] = sum(len(v) for v in a.values())
            out.append(row)
    return out


def _unique_names(runs: list[dict[str, Any]], run_dirs: Sequence[str | os.PathLike[str]]) -> None:
    """Runs that share a name (one spec run with several strategies) get their folder's name beside it:
    ``standard5-order1 (bank-order1)``; ``#k`` (position from 1) if that is not enough."""
    names = [r["name"] for r in runs]
    for i, r in enumerate(runs):
        if names.count(r["name"]) > 1:
            path = Path(run_dirs[i])
            r["name"] = f"{r['name']} ({(path.parent if path.name == 'result.json' else path).name})"
    names = [r["name"] for r in runs]
    for i, r in enumerate(runs):
        if names.count(names[i]) > 1:
            r["name"] = f"{names[i]} #{i + 1}"


def build_report(run_dirs: Sequence[str | os.PathLike[str]]) -> dict[str, Any]:
    """One run: its summary. Several: ``{"runs": [summaries], "comparison": [one row per run], "groups":
    [mean ± sd per strategy], "differences": [paired bootstrap against the first run]}``; runs that
    share a name are told apart by their folder's name (``name (folder)``)."""
    if isinstance(run_dirs, (str, os.PathLike)):
        run_dirs = [run_dirs]
    if len(run_dirs) == 0:
        raise ValueError("build_report needs at least one run directory")
    runs = [summarize_run(load_run(d)) for d in run_dirs]
    if len(runs) == 1:
        return runs[0]
    _unique_names(runs, run_dirs)
    keys = ("name", "strategy", "acc", "bwt", "fwt", "forgetting")
    comparison = [
        {**{k: r[k] for k in keys}, "routed_acc": None if r["routed"] is None else r["routed"]["acc"],
         "trainable_params": r["trainable_params"], "bank_bytes": r["bank_bytes"], "seconds": r["total_seconds"],
         "bwt_interval": r["bwt_interval"]}
        for r in runs
    ]  # fmt: skip
    return {"runs": runs, "comparison": comparison, "groups": _groups(runs, comparison),
            "differences": _differences(runs)}


def _json(report: Mapping[str, Any]) -> str:
    return json.dumps(report, indent=2, allow_nan=False) + "\n"


def write_report(
    run_dirs: Sequence[str | os.PathLike[str]], fmt: Literal["md", "html", "json"], out: Path | None = None
) -> str:
    """Build and render a report; when ``out`` is given, also write it atomically (temp file + os.replace).

    For ``fmt="html"`` with ``out``, two folders go beside the page: ``<stem>_figures/`` with every
    figure as a PNG (names in :mod:`adaptbank.report.html`) and ``<stem>_data/`` with the report as
    JSON and CSV (:mod:`adaptbank.report.export`). Everything is rendered before anything is written.
    """
    if fmt not in ("md", "html", "json"):
        raise ValueError(f"fmt must be one of md, html, json, got {fmt!r}")
    report = build_report(run_dirs)
    figures = report_figures(report) if fmt == "html" else []
    text = {"md": render_markdown, "json": _json}[fmt](report) if fmt != "html" else render_html(report, figures)
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        if fmt == "html":
            replace_dir(out.with_name(out.stem + "_figures"), {f.name: f.png for f in figures})
            replace_dir(out.with_name(out.stem + "_data"), data_files(report))
        atomic_write_bytes(out, text.encode("utf-8"))  # temp file in the same dir, fsync, os.replace
    return text
