"""The HTML report: one self-contained page (figures as PNG data URIs), every run string escaped.

:func:`report_figures` draws every figure of a report once, as ``Figure(name, caption, png, run)``;
:func:`render_html` embeds them, and ``write_report`` also writes them as files
(``<page stem>_figures/<name>``). Figure names are stable: ``comparison-bars.png`` and, per run,
``NN-<run name>-{heatmap-oracle, heatmap-routed, curves, router-confusion, error-split}.png`` (NN
the run's position from 01, the name reduced to ``[A-Za-z0-9._-]``).
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from adaptbank.metrics import pct
from adaptbank.report import figures as fig
from adaptbank.report.tables import (
    COMPARISON_HEAD,
    NOT_RECORDED,
    Table,
    changed,
    comparison_rows,
    confusion_table,
    cost_table,
    differences_table,
    error_split_table,
    groups_table,
    metric_rows,
    router_summary,
    router_table,
    split_report,
    status,
    steps_table,
    unit_name,
)

__all__ = ["Figure", "BAR_METRICS", "report_figures", "render_html"]

BAR_METRICS = (("acc", "ACC"), ("bwt", "BWT"), ("forgetting", "forgetting (max)"),
               ("forgetting_last", "forgetting (first-last)"), ("routed_acc", "routed ACC"))  # fmt: skip


@dataclass(frozen=True)
class Figure:
    name: str
    """File name, ``*.png``."""
    caption: str
    png: bytes
    run: int | None
    """Index of the run it belongs to; None for comparison figures."""


def _slug(i: int, name: str) -> str:
    return f"{i + 1:02d}-" + (re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "run")[:60]


def report_figures(report: Mapping[str, Any]) -> list[Figure]:
    """Every figure of ``report``: the grouped bars (several runs), then per run heatmaps, curves and
    (when recorded) the router's confusion matrix and the routed-vs-oracle error split."""
    runs, comparison = split_report(report)
    out: list[Figure] = []
    if comparison is not None and report.get("groups"):
        out.append(Figure("comparison-bars.png", "Final-row metrics per strategy: mean over its runs, "
                          "error bars one sample sd (no bar for a single run)",
                          fig.grouped_bars(report["groups"], BAR_METRICS), None))  # fmt: skip
    for i, run in enumerate(runs):
        slug, tasks, unit = _slug(i, str(run["name"])), run["tasks"], unit_name(run)
        out.append(Figure(f"{slug}-heatmap-oracle.png", f"{unit.capitalize()} % with the true task's expert",
                          fig.heatmap(tasks, run["matrix"], f"{unit.capitalize()} % (oracle task expert)", unit), i))
        routed = run["routed"]
        if routed is not None:
            out.append(Figure(f"{slug}-heatmap-routed.png", f"{unit.capitalize()} % with the learned router",
                              fig.heatmap(tasks, routed["matrix"], f"{unit.capitalize()} % (learned router)", unit), i))
        out.append(Figure(f"{slug}-curves.png", "Per-task curves",
                          fig.curves(tasks, run["matrix"], None if routed is None else routed["matrix"], unit), i))
        conf = run.get("router_confusion")
        if conf is not None:
            out.append(Figure(f"{slug}-router-confusion.png", "Router confusion (final row)",
                              fig.confusion(conf["tasks"], conf["counts"]), i))
        if run.get("error_split") is not None:
            out.append(Figure(f"{slug}-error-split.png", "Routed-vs-oracle error split (final row)",
                              fig.error_split(run["error_split"]), i))
    return out


def _table(table: Table) -> str:
    head, rows = table
    th = "".join(f"<th>{html.escape(str(h))}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _matrix_table(tasks: Sequence[str], block: Mapping[str, Any]) -> str:
    rows = [[f"after {tasks[i]}", *(pct(v) for v in row)] for i, row in enumerate(block["matrix"])]
    if block["baseline"] is not None:
        rows.append(["baseline", *(pct(v) for v in block["baseline"])])
    return _table((["", *tasks], rows))


def _img(f: Figure) -> str:
    uri = "data:image/png;base64," + base64.b64encode(f.png).decode("ascii")
    cap = html.escape(f.caption)
    return f'<figure><img src="{uri}" alt="{cap}" data-name="{html.escape(f.name)}"><figcaption>{cap}</figcaption></figure>'


def _missing(what: str) -> str:
    return f'<p class="missing">{html.escape(what)}: {NOT_RECORDED}</p>'


_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px}
table{border-collapse:collapse;margin:.5em 0 1em;font-size:.9em}th,td{border:1px solid #ccc;padding:.2em .45em;text-align:right}
th:first-child,td:first-child{text-align:left}td{white-space:nowrap}img{max-width:100%}
.row{display:flex;flex-wrap:wrap;gap:1em;align-items:flex-start}.row figure{max-width:calc(50% - .5em)}
figure{margin:0}figcaption{font-size:.85em;color:#555}.missing{color:#888;font-style:italic}"""


def render_html(report: Mapping[str, Any], figures: Sequence[Figure] | None = None) -> str:
    """One self-contained HTML page: comparison, spread and bootstrap tables, grouped bars, then per run
    heatmaps, curves, metrics, matrices, router diagnostics, steps and cost per task.

    ``figures`` defaults to :func:`report_figures` of ``report`` (pass them to draw them only once)."""
    runs, comparison = split_report(report)
    figs = report_figures(report) if figures is None else list(figures)
    e = html.escape
    title = e(runs[0]["name"]) if comparison is None else f"{len(runs)} runs"
    parts = [f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>adaptbank report: {title}</title>",
             f"<style>{_CSS}</style></head><body><h1>adaptbank report: {title}</h1>"]  # fmt: skip
    if comparison is not None:
        parts += ["<h2>Comparison</h2>", _table((COMPARISON_HEAD, comparison_rows(comparison)))]
        if any(g["n"] > 1 for g in report.get("groups", ())):
            parts += ["<h3>Mean ± sd over runs of one strategy and setting (orders or seeds; sd with ddof 1)</h3>",
                      _table(groups_table(report["groups"]))]  # fmt: skip
        if report.get("differences"):
            parts += ["<h3>Paired bootstrap of Δ ACC (final row, 10,000 resamples of the test examples)</h3>",
                      _table(differences_table(report["differences"]))]  # fmt: skip
        parts += [_img(f) for f in figs if f.run is None]
    for i, run in enumerate(runs):
        tasks, unit = run["tasks"], unit_name(run)
        parts += [f"<h2>{e(str(run['name']))}</h2>",
                  f"<p>strategy <code>{e(str(run['strategy']))}</code>, seed {e(str(run['seed']))}, backbone "
                  f"<code>{e(str(run['backbone']))}</code>, {e(status(run))}</p>"]  # fmt: skip
        items = [f"changed: {c}" for c in changed(run["config_changed"])] + [f"note: {n}" for n in run.get("notes") or ()]
        if items:
            parts.append("<ul>" + "".join(f"<li>{e(c)}</li>" for c in items) + "</ul>")
        parts.append('<div class="row">' + "".join(_img(f) for f in figs if f.run == i) + "</div>")
        parts += ["<h3>Metrics (%)</h3>", _table((("metric", "oracle", "routed", "definition"), metric_rows(run)))]
        parts += [f"<h3>{unit.capitalize()} % (oracle)</h3>", _matrix_table(tasks, run)]
        if run["routed"] is not None:
            parts += [f"<h3>{unit.capitalize()} % (learned router)</h3>", _matrix_table(tasks, run["routed"])]
            conf, split, router = run.get("router_confusion"), run.get("error_split"), run.get("router")
            parts += ["<h3>Router task identification % after each task</h3>",
                      _missing("router task identification per step") if router is None
                      else _table(router_table(tasks, router)) + f"<p>{e(router_summary(router))}</p>"]
            parts += ["<h3>Router confusion (final row; counts)</h3>",
                      _missing("router confusion") if conf is None else _table(confusion_table(conf)),
                      "<h3>Routed-vs-oracle error split (final row; test examples)</h3>",
                      _missing("per-example hits") if split is None else _table(error_split_table(split))]  # fmt: skip
        if run["steps"]:
            parts += ["<h3>Steps</h3>", _table(steps_table(run)), "<h3>Cost per task</h3>", _table(cost_table(run))]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
