"""The router's per-layer pools: which summaries of each read hidden state make up its features.

Letters in shape comments: B batch, T tokens, D hidden size, P pools, F router features.

Each hidden state the router reads (the embeddings and layers ``0 .. L-1``) is summarised over its
real tokens by each pool of ``pools``, layer-major: ``F = (L + 1) * P * D``, the features of hidden
state ``h`` being ``[pool_1(h), .., pool_P(h)]``.

- ``mean``: ``sum_t m_t h_t / sum_t m_t`` (today's router; the default, ``pools = ("mean",)``).
- ``rms``: ``sqrt(sum_t m_t h_t^2 / sum_t m_t)``, per dimension: the second moment, which tells a text whose
  tokens spread widely along a direction from one whose tokens sit near its mean.

Both come from hidden states the routed forward computes anyway (costing ``2 B T D`` more per read
state, against ``~24 B T D^2`` for one layer), so the router still runs inside the one forward.
Measured on the nine shared tasks (``bench/routing_quality.py``, LDA, shrinkage 0.1): routed/oracle
96.7% -> 97.0% with 500 train texts per task and 97.0% -> 97.7% with 2,000; the memory of a task's
scatter factor grows with F (at most ``2 F^2`` bytes, 10.6 MB for MiniLM with ``("mean", "rms")``
against 2.7 MB).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from adaptbank.core.config import ROUTER_POOLS
from adaptbank.core.pooling import mean_pool

__all__ = ["ROUTER_POOLS", "check_pools", "pool_state", "router_features", "feature_dim"]

def check_pools(pools: Sequence[str]) -> tuple[str, ...]:
    """``pools`` as a tuple, in :data:`ROUTER_POOLS` order; an error names a bad or repeated pool."""
    pools = tuple(pools)
    bad = [p for p in pools if p not in ROUTER_POOLS]
    if bad or not pools or len(set(pools)) != len(pools):
        raise ValueError(f"router pools must be distinct names from {list(ROUTER_POOLS)}, at least one, "
                         f"got {list(pools)}")
    return tuple(p for p in ROUTER_POOLS if p in pools)


def pool_state(hidden: Tensor, mask: Tensor, pools: Sequence[str]) -> list[Tensor]:
    """The pools of one hidden state ``(B, T, D)`` over its real tokens ``mask`` (B, T): P tensors (B, D)."""
    out = []
    mean = mean_pool(hidden, mask)  # (B, D)
    for p in pools:
        if p == "mean":
            out.append(mean)
        else:  # rms
            out.append(mean_pool(hidden * hidden, mask).clamp(min=0).sqrt())  # (B, D)
    return out


def router_features(states: Sequence[Tensor], mask: Tensor, pools: Sequence[str] = ("mean",)) -> Tensor:
    """Router features ``(B, F)`` of the read hidden states ``states`` (each (B, T, D)), layer-major."""
    return torch.cat([x for h in states for x in pool_state(h, mask, pools)], -1)  # (B, (L + 1) P D)


def feature_dim(layers: int, hidden: int, pools: Sequence[str] = ("mean",)) -> int:
    """``F = (layers + 1) * len(pools) * hidden``."""
    return (layers + 1) * len(pools) * hidden

