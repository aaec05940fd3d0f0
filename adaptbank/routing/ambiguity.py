"""Which tasks the router cannot tell apart, and where the routed-vs-oracle gap comes from.

Two tasks are **ambiguous** for the router when their inputs overlap: the mean router probability the
test texts of each put on the other task, averaged over both directions (``overlap``; 0 for tasks the
router separates, up to 0.5 for inputs it cannot tell apart), is at least :data:`AMBIGUOUS_PAIR`, or
their test sets share a text (after case and whitespace folding). A movie-review sentence asked for
polarity (sst2) or for subjectivity is the typical case: the same text belongs to both, so no router
can be right on it without the task id.

The **gap split** of one task's routed evaluation takes its test examples' outcomes, ``(oracle hit,
routed hit, routed task, routed to a right task)``, and splits ``routed - oracle`` exactly::

    routed = oracle - loss_ambiguous - loss_other - loss_mixing + gain

``loss_ambiguous`` / ``loss_other``: the oracle is right but the router sent the example to a wrong
task, of an ambiguous pair with the true task or not; ``loss_mixing``: the router chose a right task
(the true one or one with the same label list) but the routed answer still differs from the oracle's
(mixed heads, top-k > 1); ``gain``: routed right where the oracle is wrong. ``expert_error = 1 -
oracle`` is the part no router fixes. All are fractions of the task's test examples.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["AMBIGUOUS_AT", "AMBIGUOUS_PAIR", "ambiguous_pairs", "gap_split"]

AMBIGUOUS_AT = 0.2
"""One input is ambiguous when the router's runner-up task holds at least this probability (``predict``)."""

AMBIGUOUS_PAIR = 0.05
"""Overlap at which a task pair counts as ambiguous (both directions' mean router probability)."""

_SHOWN = 0.01
"""Pairs below this overlap and without a shared text are left out of the list (they are noise)."""


def _fold(text: str) -> str:
    return " ".join(text.lower().split())


def ambiguous_pairs(mass: Mapping[str, Mapping[str, float]], texts: Mapping[str, Sequence[str]]) -> list[dict[str, Any]]:
    """Task pairs by overlap, largest first: ``{"tasks": [a, b], "overlap", "shared_texts", "ambiguous"}``.

    ``mass[a][b]``: the mean router probability task ``a``'s test texts put on task ``b``; ``texts[a]``:
    those texts. Only evaluated tasks form pairs; one direction stands for both when the other task was
    not evaluated. Pairs with overlap under 1% and no shared text are not listed."""
    names = list(mass)
    folded = {t: {_fold(x) for x in texts.get(t, ())} for t in names}
    out = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            ways = [mass[a].get(b, 0.0), mass[b].get(a, 0.0)]
            overlap = sum(ways) / 2
            shared = len(folded[a] & folded[b])
            if overlap >= _SHOWN or shared:
                out.append({"tasks": [a, b], "overlap": overlap, "shared_texts": shared,
                            "ambiguous": overlap >= AMBIGUOUS_PAIR or shared > 0})
    return sorted(out, key=lambda p: (-p["overlap"], -p["shared_texts"], p["tasks"]))


def gap_split(outcomes: Sequence[tuple[int, int, str, bool]], task: str,
              pairs: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """The module docstring's split for one task's ``outcomes`` ``(oracle hit, routed hit, routed task,
    routed to a right task)``, given the pairs of :func:`ambiguous_pairs`."""
    if not outcomes:
        raise ValueError(f"task {task!r}: no test outcomes to split")
    ambiguous = {p["tasks"][1] if p["tasks"][0] == task else p["tasks"][0]
                 for p in pairs if p["ambiguous"] and task in p["tasks"]}
    n = len(outcomes)
    count = {"loss_ambiguous": 0, "loss_other": 0, "loss_mixing": 0, "gain": 0}
    for oracle, routed, chosen, right_task in outcomes:
        if oracle and not routed:
            key = "loss_mixing" if right_task else ("loss_ambiguous" if chosen in ambiguous else "loss_other")
            count[key] += 1
        elif routed and not oracle:
            count["gain"] += 1
    oracle_acc = sum(o for o, _, _, _ in outcomes) / n
    return {"oracle": oracle_acc, "routed": sum(r for _, r, _, _ in outcomes) / n, "expert_error": 1.0 - oracle_acc,
            **{k: v / n for k, v in count.items()}}
