"""Table rows and the Markdown rendering of a report (see :mod:`adaptbank.report.build` for its keys).

Every table exists once here, as a header and a list of string rows; Markdown (below) and HTML
(:mod:`adaptbank.report.html`) only differ in how they draw them. Percent cells use
:func:`adaptbank.metrics.pct`; a missing value is "–".
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from adaptbank.metrics import AccuracyMatrix, pct

__all__ = ["METRIC_KEYS", "COMPARISON_HEAD", "split_report", "unit_name", "comparison_rows", "metric_rows",
           "steps_table", "cost_table", "groups_table", "differences_table", "confusion_table",
           "router_table", "router_summary", "error_split_table", "status", "changed", "render_markdown"]  # fmt: skip

METRIC_KEYS = ("acc", "bwt", "fwt", "forgetting", "forgetting_last", "learning_accuracy")
Table = tuple[Sequence[str], list[list[str]]]
NOT_RECORDED = "not recorded in result.json"


def split_report(report: Mapping[str, Any]) -> tuple[list[Mapping[str, Any]], list[Mapping[str, Any]] | None]:
    """``(runs, comparison rows)`` of a report; the rows are None for a single-run report."""
    if "runs" in report and "comparison" in report:
        return list(report["runs"]), list(report["comparison"])
    if "matrix" in report and "tasks" in report:
        return [report], None
    raise ValueError(f"not a report from build_report: keys {sorted(report)}")


def unit_name(run: Mapping[str, Any]) -> str:
    """What the matrix cells hold: "accuracy" or "exact match" (generation runs)."""
    return "exact match" if run.get("metric") == "exact_match" else "accuracy"


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "–"
    if abs(n) < 1024:
        return f"{n:.0f} B"
    exp = min(int(math.log(abs(n), 1024)), 3)  # 1 KiB, 2 MiB, 3 GiB
    return f"{n / 1024**exp:.1f} {('KiB', 'MiB', 'GiB')[exp - 1]}"


def fmt_int(n: float | None) -> str:
    return "–" if n is None else f"{int(round(n)):,}"


def fmt_secs(s: float | None) -> str:
    return "–" if s is None else f"{s:.1f} s"


def status(run: Mapping[str, Any]) -> str:
    return "finished" if run["finished"] else f"in progress ({len(run['matrix'])}/{len(run['tasks'])} tasks)"


def changed(config_changed: Mapping[str, Any]) -> list[str]:
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


def bwt_cell(r: Mapping[str, Any]) -> str:
    """BWT in percent, with its 95% paired bootstrap interval when the run has one: ``-3.3 [-4.1, -2.5]``."""
    ci = r.get("bwt_interval")
    return pct(r["bwt"]) if not ci else f"{pct(r['bwt'])} [{pct(ci[0])}, {pct(ci[1])}]"


def comparison_rows(comparison: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    return [[str(r["name"]), str(r["strategy"]), pct(r["acc"]), bwt_cell(r), pct(r["fwt"]),
             pct(r["forgetting"]), pct(r["routed_acc"]), fmt_int(r["trainable_params"]),
             fmt_bytes(r["bank_bytes"]), fmt_secs(r["seconds"])] for r in comparison]  # fmt: skip


METRIC_DEFINITIONS = {
    "acc": "mean_j R[t][j] (GEM)",
    "bwt": "mean_{j<t} R[t][j] - R[j][j] (GEM)",
    "fwt": "mean_{j>=1} R[j-1][j] - b[j] (GEM)",
    "forgetting": "mean_{j<t} max_{l<t} R[l][j] - R[t][j] (max-based; Chaudhry et al. 2018)",
    "forgetting_last": "mean_{j<t} R[j][j] - R[t][j] (first-minus-last; avalanche's forgetting)",
    "learning_accuracy": "mean_j R[j][j] (Riemer et al. 2019)",
}


def metric_rows(run: Mapping[str, Any]) -> list[list[str]]:
    """One row per metric: oracle, routed, and its definition (as in :mod:`adaptbank.metrics`)."""
    routed = run["routed"] or {}
    return [[k, pct(run[k]), pct(routed.get(k)), METRIC_DEFINITIONS[k]] for k in METRIC_KEYS]


def steps_table(run: Mapping[str, Any]) -> Table:
    rows = [[str(s["task"]), pct(s.get("router_accuracy")), fmt_int(s.get("trainable_params")),
             fmt_bytes(s.get("bank_bytes")), fmt_secs(s.get("seconds"))] for s in run["steps"]]  # fmt: skip
    return ("task", "router accuracy %", "trainable params", "bank size", "time"), rows


def cost_table(run: Mapping[str, Any]) -> Table:
    """Cost per task: time (and cumulative), trainable parameters, bank bytes, peak memory, train steps."""
    rows, total = [], 0.0
    for s in run["steps"]:
        total += s.get("seconds") or 0.0
        rows.append([str(s["task"]), fmt_secs(s.get("seconds")), fmt_secs(total), fmt_int(s.get("trainable_params")),
                     fmt_bytes(s.get("bank_bytes")), fmt_bytes(s.get("peak_memory_bytes")),
                     fmt_int(s.get("train_steps"))])  # fmt: skip
    return ("task", "time", "cumulative time", "trainable params", "bank bytes", "peak memory", "train steps"), rows


def _pm(cell: Mapping[str, Any], fmt: Any) -> str:
    mean, sd = cell["mean"], cell["sd"]
    if mean is None:
        return "–"
    return fmt(mean) if sd is None else f"{fmt(mean)} ± {fmt(sd)}"


GROUP_COLUMNS = (("acc", "ACC %", pct), ("bwt", "BWT %", pct), ("fwt", "FWT %", pct),
                 ("forgetting", "forgetting %", pct), ("forgetting_last", "forgetting (first-last) %", pct),
                 ("routed_acc", "routed ACC %", pct), ("trainable_params", "trainable params", fmt_int),
                 ("bank_bytes", "bank size", fmt_bytes), ("seconds", "time", fmt_secs),
                 ("peak_memory_bytes", "peak memory", fmt_bytes))  # fmt: skip


def groups_table(groups: Sequence[Mapping[str, Any]]) -> Table:
    """Mean ± sample sd (ddof 1) over the runs of each strategy and setting (orders or seeds)."""
    head = ("strategy", "runs", *(label for _, label, _ in GROUP_COLUMNS))
    rows = [[str(g["label"]), str(g["n"]), *(_pm(g[key], f) for key, _, f in GROUP_COLUMNS)] for g in groups]
    return head, rows


def differences_table(differences: Sequence[Mapping[str, Any]]) -> Table:
    """Paired bootstrap of the final-row ACC difference against the reference run."""
    rows = []
    for d in differences:
        if d["diff"] is None:
            rows.append([str(d["run"]), str(d["reference"]), str(d["kind"]), "–", "–", str(d["reason"])])
            continue
        lo, hi = d["lo"], d["hi"]
        verdict = "better" if lo > 0 else "worse" if hi < 0 else "no clear difference"
        rows.append([str(d["run"]), str(d["reference"]), str(d["kind"]), pct(d["diff"]),
                     f"[{pct(lo)}, {pct(hi)}]", f"{verdict} ({d['n_examples']} paired examples)"])
    return ("run", "vs", "routing", "Δ ACC %", "95% interval", "verdict"), rows


def confusion_table(confusion: Mapping[str, Any]) -> Table:
    tasks = confusion["tasks"]
    rows = []
    for t, counts in zip(tasks, confusion["counts"], strict=True):
        n = sum(counts)
        rows.append([str(t), *(str(c) for c in counts), str(n), pct(counts[tasks.index(t)] / n if n else None)])
    return ("true task \\ routed to", *map(str, tasks), "examples", "routed right %"), rows


def router_table(tasks: Sequence[str], router: Mapping[str, Any]) -> Table:
    """The router's task identification % after each step (rows) on each task (columns), then each
    earlier task's drop from its best to the last row (the forgetting the summary line averages)."""
    matrix = router["matrix"]
    rows = [[f"after {tasks[i]}", *(pct(v) for v in row)] for i, row in enumerate(matrix)]
    drops = list(router["drops"])  # one per earlier task (metrics.forgetting_per_task)
    drop = [pct(drops[j]) if j < len(drops) else "–" for j in range(len(tasks))]
    return ("", *tasks), [*rows, ["drop from best", *drop]]


def router_summary(router: Mapping[str, Any]) -> str:
    first = router["first_task"]
    return (f"final-row mean {pct(router['acc'])}%, forgetting {pct(router['forgetting'])} points "
            f"(first-minus-last {pct(router['forgetting_last'])}); first task {pct(first[0])}% when added, "
            f"{pct(first[1])}% now")


def error_split_table(split: Sequence[Mapping[str, Any]]) -> Table:
    """Per task: both right; routing errors (oracle right, routed wrong); routed only right; both wrong."""
    rows = [[str(s["task"]), str(s["n"]), str(s["both_right"]), str(s["routing_errors"]),
             str(s["routed_only_right"]), str(s["both_wrong"])] for s in split]  # fmt: skip
    return ("task", "examples", "both right", "routing errors (oracle right, routed wrong)",
            "routed right, oracle wrong", "expert errors (both wrong)"), rows  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# Markdown


def _md(text: object) -> str:
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def md_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(_md(h) for h in head) + " |", "|" + "---|" * len(head)]
    return out + ["| " + " | ".join(_md(c) for c in r) + " |" for r in rows]


def _md_section(title: str, table: Table | None, missing: str = NOT_RECORDED) -> list[str]:
    if table is None:
        return [f"## {title}", "", f"_{missing}_", ""]
    return [f"## {title}", "", *md_table(*table), ""]


def render_markdown(report: Mapping[str, Any]) -> str:
    """Markdown: comparison, spread and bootstrap tables (several runs), then per run its matrices,
    metrics, router diagnostics, steps and cost per task."""
    runs, comparison = split_report(report)
    lines: list[str] = []
    if comparison is not None:
        lines += ["# Comparison", "", *md_table(COMPARISON_HEAD, comparison_rows(comparison)), ""]
        if any(g["n"] > 1 for g in report.get("groups", ())):
            lines += ["## Mean ± sd over runs of one strategy and setting (orders or seeds; sd with ddof 1)", "",
                      *md_table(*groups_table(report["groups"])), ""]  # fmt: skip
        if report.get("differences"):
            lines += ["## Paired bootstrap of Δ ACC (final row, 10,000 resamples of the test examples)", "",
                      *md_table(*differences_table(report["differences"])), ""]  # fmt: skip
    for run in runs:
        unit = unit_name(run)
        lines += [f"# {_md(run['name'])}", "", f"strategy `{run['strategy']}`, seed {run['seed']}, "
                  f"backbone `{run['backbone']}`, {status(run)}"]  # fmt: skip
        lines += [f"- changed: {_md(c)}" for c in changed(run["config_changed"])]
        lines += [f"- note: {_md(n)}" for n in run.get("notes") or ()] + [""]
        lines += [f"## {unit.capitalize()} % with the true task's expert (oracle)", "",
                  AccuracyMatrix(tuple(run["tasks"]), run["matrix"], run["baseline"]).to_markdown()]  # fmt: skip
        if run["routed"] is not None:
            routed = run["routed"]
            lines += [f"## {unit.capitalize()} % with the learned router", "",
                      AccuracyMatrix(tuple(run["tasks"]), routed["matrix"], routed["baseline"]).to_markdown()]  # fmt: skip
        lines += ["## Metrics (%)", "", *md_table(("metric", "oracle", "routed", "definition"), metric_rows(run)), ""]
        if run["routed"] is not None:
            conf, router = run.get("router_confusion"), run.get("router")
            lines += _md_section("Router task identification % after each task", None if router is None
                                 else router_table(run["tasks"], router))
            if router is not None:
                lines[-1:] = [f"_{router_summary(router)}_", ""]
            lines += _md_section("Router confusion (final row; counts)", None if conf is None else confusion_table(conf))
            split = run.get("error_split")
            lines += _md_section("Routed-vs-oracle error split (final row; test examples)",
                                 None if split is None else error_split_table(split))  # fmt: skip
        if run["steps"]:
            lines += ["## Steps", "", *md_table(*steps_table(run)), ""]
            lines += ["## Cost per task", "", *md_table(*cost_table(run)), ""]
    return "\n".join(lines).rstrip() + "\n"
