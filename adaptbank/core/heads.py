"""Task heads: what turns the backbone's output into a task's answer.

Two kinds are planned, and the bank, the router and the evaluator see a task, not a head type:

* ``classification`` (built): a per-task :class:`ClassificationHead` over pooled features, ``(B, D) -> (B, C)``;
* ``generation`` (not built yet): the backbone's frozen, shared LM head; loss on target tokens, greedy
  decoding with the KV cache. ``TaskInfo.head`` records the kind; ``HEAD_KINDS`` lists what exists.

Letters in shape comments: B batch, D hidden size, C classes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

__all__ = ["HEAD_KINDS", "ClassificationHead", "row_logits"]

HEAD_KINDS: tuple[str, ...] = ("classification",)
"""Head kinds a task can have today."""


class ClassificationHead(nn.Module):
    """Dropout then a linear map from pooled features (B, D) to class logits (B, C)."""

    def __init__(self, d: int, n_classes: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(d, n_classes)

    def forward(self, pooled: Tensor) -> Tensor:
        return self.linear(self.dropout(pooled))  # (B, C)


def row_logits(heads: Mapping[str, nn.Module], pooled: Tensor, rows: Sequence[str]) -> Tensor:
    """Row b scored by head ``heads[rows[b]]``: (B, C_max), padded with -inf beyond a head's classes."""
    width = max(heads[t].linear.out_features for t in set(rows))  # type: ignore[union-attr]
    out = pooled.new_full((pooled.shape[0], width), float("-inf"))  # (B, C_max)
    for t in dict.fromkeys(rows):
        idx = torch.tensor([b for b, r in enumerate(rows) if r == t], device=pooled.device)  # (b,)
        logits = heads[t](pooled[idx])  # (b, C_t)
        out[idx, : logits.shape[1]] = logits.to(out.dtype)
    return out
