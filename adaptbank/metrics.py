"""Continual-learning metrics over an accuracy matrix, and router diagnostics. Pure Python, no torch.

The accuracy matrix ``R`` has one row per task learned so far and one column per task in the sequence::

              task 0    task 1    task 2          R[i][j] = accuracy (a fraction in [0, 1]) on task j,
    after 0 [ R[0][0]   R[0][1]   R[0][2] ]                 measured after training task i
    after 1 [ R[1][0]   R[1][1]   R[1][2] ]       b[j]    = accuracy on task j before any training
    after 2 [ R[2][0]   R[2][1]   R[2][2] ]                 (the "baseline" row)

While a run is in progress ``R`` has ``n_rows <= T`` rows of length ``T``; the current step is
``t = n_rows - 1`` and every metric uses the rows present. Entries above the diagonal (tasks not yet
learned) may be ``None`` when the runner did not evaluate them; only FWT needs them.

Definitions (with ``t`` the current step; sums over an empty range give 0.0):

- ACC  = 1/(t+1) * sum_{j<=t} R[t][j]                    Lopez-Paz & Ranzato 2017 (GEM), arXiv:1706.08840
- BWT  = 1/t * sum_{j<t} (R[t][j] - R[j][j])              GEM
- FWT  = 1/t * sum_{j=1..t} (R[j-1][j] - b[j])            GEM
- forgetting      = 1/t * sum_{j<t} (max_{l in [j, t-1]} R[l][j] - R[t][j])
                                                          Chaudhry et al. 2018 (RWalk), arXiv:1801.10112
- forgetting_last = 1/t * sum_{j<t} (R[j][j] - R[t][j])   avalanche ``evaluation/functional.py``
- learning accuracy = 1/(t+1) * sum_{j<=t} R[j][j]        Riemer et al. 2019 (MER), arXiv:1810.11910

``forgetting`` (the best earlier value minus the current one) is the headline forgetting number;
``forgetting_last`` (value right after learning minus current) equals ``-BWT`` and is kept for
comparison with avalanche. Because the max includes ``R[j][j]``, ``forgetting >= forgetting_last``.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "pct",
    "AccuracyMatrix",
    "average_accuracy",
    "check_matrix",
    "backward_transfer",
    "forward_transfer",
    "forgetting",
    "forgetting_last",
    "forgetting_per_task",
    "learning_accuracy",
    "gate_entropy",
    "expert_usage",
    "confusion_table",
]

Matrix = Sequence[Sequence[float | None]]
Rows = tuple[tuple[float | None, ...], ...]


def _number(value: object, where: str) -> float:
    """Return ``value`` as a float in [0, 1], or raise naming ``where`` and the value."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where} = {value!r} is not a number; accuracies are floats in [0, 1]")
    v = float(value)
    if math.isnan(v):
        raise ValueError(f"{where} is NaN; accuracies are floats in [0, 1]")
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"{where} = {value!r} is outside [0, 1]; accuracies are fractions, not percent")
    return v


def _check_rows(R: Matrix, n_tasks: int | None = None, name: str = "R") -> Rows:
    """Validate ``R`` (see the module docstring) and return it as a tuple of float tuples."""
    if isinstance(R, (str, bytes)) or not isinstance(R, Sequence):
        raise ValueError(f"{name} must be a sequence of rows, got {type(R).__name__}")
    if len(R) == 0:
        raise ValueError(f"{name} is empty; it needs at least one row (accuracies after the first task)")
    for i, row in enumerate(R):
        if isinstance(row, (str, bytes)) or not isinstance(row, Sequence):
            raise ValueError(f"{name}[{i}] must be a sequence of accuracies, got {row!r}")
    if n_tasks is None:
        n_tasks = len(R[0])
        if n_tasks == 0:
            raise ValueError(f"{name}[0] is empty; each row needs one accuracy per task")
    if len(R) > n_tasks:
        raise ValueError(
            f"{name} has {len(R)} rows but only {n_tasks} tasks; there is at most one row per task"
        )
    rows: list[tuple[float | None, ...]] = []
    for i, row in enumerate(R):
        if len(row) != n_tasks:
            raise ValueError(
                f"{name}[{i}] has {len(row)} entries, expected {n_tasks} (one per task); rows are ragged"
            )
        out: list[float | None] = []
        for j, v in enumerate(row):
            if v is None and j > i:
                out.append(None)  # a task not yet learned that was not evaluated
            elif v is None:
                raise ValueError(
                    f"{name}[{i}][{j}] is None; only tasks not yet learned (j > i) may be missing"
                )
            else:
                out.append(_number(v, f"{name}[{i}][{j}]"))
        rows.append(tuple(out))
    return tuple(rows)


def check_matrix(R: Matrix, n_tasks: int, name: str = "R") -> Rows:
    """``R`` validated as an accuracy matrix over ``n_tasks`` tasks (values in [0, 1], None only for j > i);
    the error names ``name``, the cell and what is allowed."""
    return _check_rows(R, n_tasks, name)


def _check_baseline(baseline: Sequence[float], n_tasks: int) -> tuple[float, ...]:
    if isinstance(baseline, (str, bytes)) or not isinstance(baseline, Sequence):
        raise ValueError(f"baseline must be a sequence of accuracies, got {baseline!r}")
    if len(baseline) != n_tasks:
        raise ValueError(f"baseline has {len(baseline)} entries, expected {n_tasks} (one per task)")
    return tuple(_number(v, f"baseline[{j}]") for j, v in enumerate(baseline))


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values) if values else 0.0


def average_accuracy(R: Matrix, step: int | None = None) -> float:
    """ACC at step ``t``: ``1/(t+1) * sum_{j<=t} R[t][j]`` (Lopez-Paz & Ranzato 2017, GEM).

    ``step`` defaults to the last row present (``t = n_rows - 1``); it must name a row of ``R``.
    """
    rows = _check_rows(R)
    t = len(rows) - 1 if step is None else step
    if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < len(rows):
        raise ValueError(f"step must be an integer in [0, {len(rows) - 1}] (a row of R), got {step!r}")
    return _mean([rows[t][j] for j in range(t + 1)])  # type: ignore[misc]  # j <= t is never None


def backward_transfer(R: Matrix) -> float:
    """BWT = ``1/t * sum_{j<t} (R[t][j] - R[j][j])`` (GEM); 0.0 when ``t == 0``. Negative means forgetting."""
    rows = _check_rows(R)
    t = len(rows) - 1
    return _mean([rows[t][j] - rows[j][j] for j in range(t)])  # type: ignore[operator]


def forward_transfer(R: Matrix, baseline: Sequence[float]) -> float:
    """FWT = ``1/t * sum_{j=1..t} (R[j-1][j] - b[j])`` (GEM); 0.0 when ``t == 0``.

    Accuracy on task j just before learning it, relative to the untrained model ``b[j]``. Needs the
    entries ``R[j-1][j]`` just above the diagonal to have been evaluated.
    """
    rows = _check_rows(R)
    b = _check_baseline(baseline, len(rows[0]))
    t = len(rows) - 1
    diffs = []
    for j in range(1, t + 1):
        before = rows[j - 1][j]
        if before is None:
            raise ValueError(f"R[{j - 1}][{j}] is None; FWT needs accuracy on task {j} before it is learned")
        diffs.append(before - b[j])
    return _mean(diffs)


def forgetting(R: Matrix) -> float:
    """Forgetting (Chaudhry et al. 2018, RWalk): ``mean_{j<t} (max_{l in [j, t-1]} R[l][j] - R[t][j])``.

    The drop from the best accuracy a task ever had (after it was learned) to now; 0.0 when ``t == 0``.
    Can be negative when a task is now better than ever before.
    """
    return _mean(forgetting_per_task(R))


def forgetting_per_task(R: Matrix) -> list[float]:
    """Each earlier task's drop ``max_{l in [j, t-1]} R[l][j] - R[t][j]`` for ``j < t`` (what
    :func:`forgetting` averages); empty when ``t == 0``."""
    rows = _check_rows(R)
    t = len(rows) - 1
    return [max(rows[i][j] for i in range(j, t)) - rows[t][j] for j in range(t)]  # type: ignore[type-var, operator, misc]


def forgetting_last(R: Matrix) -> float:
    """First-minus-last forgetting (avalanche): ``mean_{j<t} (R[j][j] - R[t][j])``; 0.0 when ``t == 0``.

    Equals ``-backward_transfer(R)``.
    """
    rows = _check_rows(R)
    t = len(rows) - 1
    return _mean([rows[j][j] - rows[t][j] for j in range(t)])  # type: ignore[operator]


def learning_accuracy(R: Matrix) -> float:
    """Learning accuracy: ``mean_{j<=t} R[j][j]``, accuracy on each task right after learning it."""
    rows = _check_rows(R)
    return _mean([rows[j][j] for j in range(len(rows))])  # type: ignore[misc]


def pct(v: float | None, *, unit: str = "", missing: str = "–") -> str:
    """``100 v`` with one decimal (``0.912`` -> ``"91.2"``, with ``unit="%"`` ``"91.2%"``), ``missing`` for
    None; float noise such as -1e-17 never prints as ``"-0.0"``. The one percent format of tables and logs."""
    if v is None:
        return missing
    s = f"{100.0 * v:.1f}"
    return ("0.0" if s == "-0.0" else s) + unit


def _md_cell(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


@dataclass(frozen=True)
class AccuracyMatrix:
    """Task names, the rows of ``R`` (see the module docstring) and an optional baseline row."""

    tasks: tuple[str, ...]
    """Task names in training order; column j of every row is ``tasks[j]``."""
    rows: tuple[tuple[float | None, ...], ...]
    """``rows[i][j]`` = accuracy on ``tasks[j]`` after training ``tasks[i]``; up to ``len(tasks)`` rows."""
    baseline: tuple[float, ...] | None = None
    """Accuracy of the untrained model on each task; needed for FWT."""

    def __post_init__(self) -> None:
        tasks = self.tasks
        if isinstance(tasks, (str, bytes)) or not isinstance(tasks, Sequence) or len(tasks) == 0:
            raise ValueError(f"tasks must be a non-empty sequence of task names, got {tasks!r}")
        for j, name in enumerate(tasks):
            if not isinstance(name, str) or not name:
                raise ValueError(f"tasks[{j}] = {name!r} is not a non-empty string")
        dupes = sorted({n for n in tasks if list(tasks).count(n) > 1})
        if dupes:
            raise ValueError(f"task names must be unique; repeated: {', '.join(dupes)}")
        # Frozen: normalise lists (e.g. from JSON) to tuples through object.__setattr__.
        object.__setattr__(self, "tasks", tuple(tasks))
        object.__setattr__(self, "rows", _check_rows(self.rows, len(tasks)))
        if self.baseline is not None:
            object.__setattr__(self, "baseline", _check_baseline(self.baseline, len(tasks)))

    @property
    def step(self) -> int:
        """Current step ``t = n_rows - 1`` (index of the last task learned)."""
        return len(self.rows) - 1

    @property
    def finished(self) -> bool:
        """True when there is one row per task."""
        return len(self.rows) == len(self.tasks)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict with keys ``tasks``, ``rows``, ``baseline``."""
        return {
            "tasks": list(self.tasks),
            "rows": [list(r) for r in self.rows],
            "baseline": None if self.baseline is None else list(self.baseline),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AccuracyMatrix:
        """Inverse of :meth:`to_dict`; unknown keys are rejected by name, missing ones too."""
        if not isinstance(data, Mapping):
            raise ValueError(f"AccuracyMatrix.from_dict needs a mapping, got {type(data).__name__}")
        allowed = ("tasks", "rows", "baseline")
        for key in data:
            if key not in allowed:
                close = difflib.get_close_matches(str(key), allowed, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ValueError(f"unknown key {key!r} in AccuracyMatrix{hint} allowed: {', '.join(allowed)}")
        missing = [k for k in ("tasks", "rows") if k not in data]
        if missing:
            raise ValueError(f"AccuracyMatrix is missing key(s): {', '.join(missing)}")
        return cls(tasks=data["tasks"], rows=data["rows"], baseline=data.get("baseline"))

    def summary(self) -> dict[str, float | None]:
        """All metrics at the current step. ``fwt`` is None without a baseline or unevaluated ``R[j-1][j]``."""
        fwt = None
        if self.baseline is not None and all(
            self.rows[j - 1][j] is not None for j in range(1, len(self.rows))
        ):
            fwt = forward_transfer(self.rows, self.baseline)
        return {
            "acc": average_accuracy(self.rows),
            "bwt": backward_transfer(self.rows),
            "fwt": fwt,
            "forgetting": forgetting(self.rows),
            "forgetting_last": forgetting_last(self.rows),
            "learning_accuracy": learning_accuracy(self.rows),
        }

    def to_markdown(self) -> str:
        """The matrix as a Markdown table in percent with one decimal; "–" marks unevaluated entries."""
        names = [_md_cell(t) for t in self.tasks]
        lines = ["| | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
        for i, row in enumerate(self.rows):
            lines.append(f"| after {names[i]} | " + " | ".join(pct(v) for v in row) + " |")
        if self.baseline is not None:
            lines.append("| baseline | " + " | ".join(pct(v) for v in self.baseline) + " |")
        return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------
# Router diagnostics: pure functions over logged gates and routing decisions.


def gate_entropy(gates: Sequence[Sequence[float]], *, normalize: bool = False) -> float:
    """Mean Shannon entropy (nats) of gate rows: ``1/N * sum_n -sum_e g[n][e] * ln g[n][e]`` (0 ln 0 = 0).

    Each row is one example's gate distribution over E experts (non-negative, summing to 1 within
    1e-3). 0 means every example picks one expert; ``ln E`` means uniform mixing. With
    ``normalize=True`` each row's entropy is divided by ``ln E``, giving values in [0, 1].
    """
    if isinstance(gates, (str, bytes)) or not isinstance(gates, Sequence) or len(gates) == 0:
        raise ValueError(f"gates must be a non-empty sequence of gate rows, got {gates!r}")
    total = []
    n_experts = -1
    for n, row in enumerate(gates):
        if isinstance(row, (str, bytes)) or not isinstance(row, Sequence) or len(row) == 0:
            raise ValueError(f"gates[{n}] must be a non-empty sequence of gate values, got {row!r}")
        n_experts = len(row) if n == 0 else n_experts
        if len(row) != n_experts:
            raise ValueError(f"gates[{n}] has {len(row)} entries, expected {n_experts} (one per expert)")
        for e, g in enumerate(row):
            if isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g) or g < 0:
                raise ValueError(f"gates[{n}][{e}] = {g!r}; gates must be finite and >= 0")
        s = math.fsum(row)
        if abs(s - 1.0) > 1e-3:
            raise ValueError(f"gates[{n}] sums to {s!r}; each row must be a distribution summing to 1")
        h = -math.fsum(g * math.log(g) for g in row if g > 0)
        if normalize:
            h = h / math.log(n_experts) if n_experts > 1 else 0.0
        total.append(max(h, 0.0))  # rounding can give -0.0 or -1e-17 for one-hot rows
    return _mean(total)


def expert_usage(chosen: Sequence[str], experts: Sequence[str]) -> dict[str, float]:
    """Fraction of examples routed to each expert: ``usage[e] = #{n : chosen[n] == e} / N``.

    Keys follow the order of ``experts`` (experts never chosen get 0.0); an unknown name is an error.
    """
    if isinstance(experts, str) or len(experts) == 0 or len(set(experts)) != len(experts):
        raise ValueError(f"experts must be a non-empty sequence of unique names, got {experts!r}")
    if isinstance(chosen, str) or len(chosen) == 0:
        raise ValueError(f"chosen must be a non-empty sequence of expert names, got {chosen!r}")
    counts = dict.fromkeys(experts, 0)
    for n, name in enumerate(chosen):
        if name not in counts:
            raise ValueError(
                f"chosen[{n}] = {name!r} is not an expert; allowed: {', '.join(map(str, experts))}"
            )
        counts[name] += 1
    return {e: c / len(chosen) for e, c in counts.items()}


def confusion_table(
    true: Sequence[str], pred: Sequence[str], labels: Sequence[str] | None = None
) -> dict[str, dict[str, int]]:
    """Counts ``table[t][p] = #{n : true[n] == t and pred[n] == p}`` (rows true, columns predicted).

    Typically true task vs routed expert. ``labels`` fixes the order and the allowed names (defaults to
    the sorted union of ``true`` and ``pred``); every label gets a full row, zeros included.
    """
    if isinstance(true, str) or isinstance(pred, str):
        raise ValueError("true and pred must be sequences of labels, not a single string")
    if len(true) != len(pred):
        raise ValueError(
            f"true has {len(true)} labels but pred has {len(pred)}; they must be the same length"
        )
    names = sorted(set(true) | set(pred)) if labels is None else list(labels)
    if len(set(names)) != len(names):
        raise ValueError(f"labels must be unique, got {names!r}")
    table = {t: dict.fromkeys(names, 0) for t in names}
    for n, (t, p) in enumerate(zip(true, pred, strict=True)):
        for which, v in (("true", t), ("pred", p)):
            if v not in table:
                raise ValueError(f"{which}[{n}] = {v!r} is not in labels: {', '.join(map(str, names))}")
        table[t][p] += 1
    return table
