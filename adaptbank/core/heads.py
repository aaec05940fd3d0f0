"""Task heads: what turns the backbone's output into a task's answer.

Two kinds are planned, and the bank, the router and the evaluator see a task, not a head type:

* ``classification`` (built): a per-task :class:`ClassificationHead` over pooled features, ``(B, D) -> (B, C)``;
* ``generation`` (not built yet): the backbone's frozen, shared LM head; loss on target tokens, greedy
  decoding with the KV cache. ``TaskInfo.head`` records the kind; ``HEAD_KINDS`` lists what exists.

Letters in shape comments: B batch, D hidden size, C classes.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["HEAD_KINDS", "ClassificationHead"]

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
