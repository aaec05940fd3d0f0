"""Report figures as PNG bytes, drawn on matplotlib's Agg canvas (no pyplot, so no global state).

Every function takes plain data (lists and dicts from a report) and returns the PNG file's bytes.
Values that are fractions in the report are drawn in percent, and every colour bar is labelled in
the cells' own unit ("accuracy (%)", "exact match (%)", "share of the task's examples (%)").
Strings from a run are passed through :func:`plain` so matplotlib never parses ``$...$`` as mathtext.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["plain", "heatmap", "heatmap_figure", "curves", "grouped_bars", "confusion", "error_split"]

_DPI = 100


def _png(fig: Any) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI, bbox_inches="tight", metadata={"Software": None})
    return buf.getvalue()


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(min(width, 16.0), min(height, 12.0)))


def plain(text: object) -> str:
    return str(text).replace("$", r"\$")  # matplotlib would parse "$...$" as mathtext


def heatmap(tasks: Sequence[str], rows: Sequence[Sequence[float | None]], title: str, unit: str = "accuracy") -> bytes:
    """``R`` in percent (cells and colour bar on the same 0-100 scale); unevaluated cells stay blank."""
    return _png(heatmap_figure(tasks, rows, title, unit))


def heatmap_figure(tasks: Sequence[str], rows: Sequence[Sequence[float | None]], title: str,
                   unit: str = "accuracy") -> Any:
    """The matplotlib ``Figure`` of :func:`heatmap` (axes 0: the matrix, axes 1: the colour bar)."""
    n, t = len(rows), len(tasks)
    values = [[math.nan if v is None else 100.0 * v for v in row] for row in rows]  # (n, t) percent
    fig = _figure(2.5 + 0.8 * t, 1.5 + 0.5 * n)
    ax = fig.add_subplot()
    im = ax.imshow(values, vmin=0.0, vmax=100.0, cmap="viridis", aspect="auto")
    size = 9 if t <= 8 else 6
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            if not math.isnan(v):
                ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=size,
                        color="black" if v > 60.0 else "white")  # fmt: skip
    ax.set_xticks(range(t), [plain(x) for x in tasks], rotation=45, ha="right")
    ax.set_yticks(range(n), [f"after {plain(x)}" for x in tasks[:n]])
    ax.set_xlabel("evaluated on")
    ax.set_title(plain(title))
    fig.colorbar(im, ax=ax, label=f"{unit} (%)")
    return fig


def curves(tasks: Sequence[str], oracle: Sequence[Sequence[float | None]],
           routed: Sequence[Sequence[float | None]] | None, unit: str = "accuracy") -> bytes:
    """One line per task from the step that learned it: ``R[i][j]`` for ``i >= j`` (dashed: routed)."""
    n = len(oracle)
    fig = _figure(3.0 + 0.7 * n, 4.0)
    ax = fig.add_subplot()
    for label, matrix, style in (("oracle", oracle, "-"), ("routed", routed, "--")):
        if matrix is None:
            continue
        for j in range(n):
            xs = list(range(j, n))
            ys = [100.0 * v if (v := matrix[i][j]) is not None else math.nan for i in xs]
            name = plain(tasks[j]) + ("" if label == "oracle" else " (routed)")
            ax.plot(xs, ys, style, marker="o" if style == "-" else "x", color=f"C{j % 10}", label=name)
    ax.set_xticks(range(n), [f"after {plain(x)}" for x in tasks[:n]], rotation=45, ha="right")
    ax.set_ylim(0.0, 102.0)
    ax.set_ylabel(f"{unit} (%)")
    ax.set_title(f"{unit.capitalize()} per task over the sequence" + (" (dashed: learned router)" if routed else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return _png(fig)


def grouped_bars(groups: Sequence[Mapping[str, Any]], metrics: Sequence[tuple[str, str]]) -> bytes:
    """One group of bars per metric, one bar per strategy: the mean over its runs, error bar = sd.

    ``groups`` as in the report (``{"strategy", "n", key: {"mean", "sd", "n"}}``); ``metrics`` are
    ``(key, label)`` pairs of fraction-valued metrics, drawn in percent. A single run has no error bar.
    """
    k, s = len(metrics), len(groups)
    fig = _figure(2.0 + 0.45 * k * max(s, 1), 4.0)
    ax = fig.add_subplot()
    width = 0.8 / max(s, 1)
    for gi, g in enumerate(groups):
        xs = [m + (gi - (s - 1) / 2) * width for m in range(k)]
        means = [100.0 * (g[key]["mean"] if g[key]["mean"] is not None else math.nan) for key, _ in metrics]
        ax.bar(xs, means, width, color=f"C{gi % 10}", label=f"{plain(g['label'])} (n={g['n']})")
        bars = [(x, m, 100.0 * g[key]["sd"]) for x, m, (key, _) in zip(xs, means, metrics, strict=True)
                if g[key]["sd"] is not None]  # a single run has no spread: no error bar at all
        if bars:
            bx, by, be = zip(*bars, strict=True)
            ax.errorbar(bx, by, yerr=be, fmt="none", ecolor="black", capsize=3, linewidth=1)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(range(k), [plain(label).replace(" (", "\n(") for _, label in metrics])
    ax.set_ylabel("% (mean ± sd over runs)")
    ax.set_title("Final-row metrics per strategy")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return _png(fig)


def confusion(tasks: Sequence[str], counts: Sequence[Sequence[int]]) -> bytes:
    """Router confusion: row = true task, column = routed expert; colour = share of the row (%), text = count."""
    t = len(tasks)
    shares = [[100.0 * c / sum(row) if sum(row) else math.nan for c in row] for row in counts]  # (t, t) percent
    fig = _figure(2.5 + 0.8 * t, 1.5 + 0.6 * t)
    ax = fig.add_subplot()
    im = ax.imshow(shares, vmin=0.0, vmax=100.0, cmap="Blues", aspect="auto")
    for i, row in enumerate(counts):
        for j, c in enumerate(row):
            share = shares[i][j]
            ax.text(j, i, f"{c}", ha="center", va="center", fontsize=9 if t <= 8 else 6,
                    color="white" if share > 60.0 else "black")  # fmt: skip
    ax.set_xticks(range(t), [plain(x) for x in tasks], rotation=45, ha="right")
    ax.set_yticks(range(t), [plain(x) for x in tasks])
    ax.set_xlabel("routed to expert")
    ax.set_ylabel("true task")
    ax.set_title("Router confusion (counts; final row)")
    fig.colorbar(im, ax=ax, label="share of the true task's examples (%)")
    return _png(fig)


_SPLIT = (("both_right", "both right", "#4c9a2a"), ("routing_errors", "routing error (oracle right)", "#e07b39"),
          ("routed_only_right", "routed right, oracle wrong", "#7aa6d6"),
          ("both_wrong", "expert error (both wrong)", "#b03a2e"))  # fmt: skip


def error_split(split: Sequence[Mapping[str, Any]]) -> bytes:
    """Stacked bars per task: the four outcomes of (oracle, routed) per test example, in % of examples."""
    tasks = [plain(s["task"]) for s in split]
    fig = _figure(6.5, 1.2 + 0.45 * len(split))
    ax = fig.add_subplot()
    left = [0.0] * len(split)
    for key, label, color in _SPLIT:
        widths = [100.0 * s[key] / s["n"] if s["n"] else 0.0 for s in split]
        ax.barh(tasks, widths, left=left, color=color, label=label)
        left = [a + b for a, b in zip(left, widths, strict=True)]
    ax.set_xlim(0.0, 100.0)
    ax.invert_yaxis()
    ax.set_xlabel("test examples (%)")
    ax.set_title("Routed vs oracle, per test example (final row)")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=2)
    return _png(fig)
