"""Seeds are passed, not set globally: one helper draws from a seed inside a block and leaves the
global RNG exactly as it was (``torch.random.fork_rng``), so library calls never change a caller's
random stream."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["seeded"]


@contextlib.contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """Inside the block, torch's CPU RNG starts from ``seed``; afterwards the global state is restored.
    ``None`` leaves the RNG alone (the block draws from the caller's stream)."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
