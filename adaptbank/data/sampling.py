"""Deterministic, class-covering subsets of a split (``max_train`` / ``max_test``)."""

from __future__ import annotations

import random
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from adaptbank.data.load import Example

__all__ = ["subsample"]


def subsample(examples: Iterable[Example], n: int | None, seed: int = 0) -> list[Example]:
    """Deterministic subset of ``n`` examples that keeps every class present when ``n`` allows.

    Shuffles with ``random.Random(seed)``, takes the first example of each class (in shuffled order),
    then fills up with the rest of the shuffled order, so class shares stay roughly proportional.
    ``n=None`` (or ``n >= len``) returns all examples in their original order.
    """
    examples = list(examples)
    if n is None or n >= len(examples):
        return examples
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    chosen: list[int] = []
    seen: set[int] = set()
    for i in order:
        if examples[i].label not in seen:
            seen.add(examples[i].label)
            chosen.append(i)
    if len(chosen) > n:  # fewer slots than classes: plain shuffled prefix
        chosen = order[:n]
    else:
        picked = set(chosen)
        chosen += [i for i in order if i not in picked][: n - len(chosen)]
    rank = {i: r for r, i in enumerate(order)}
    return [examples[i] for i in sorted(chosen, key=rank.__getitem__)]
