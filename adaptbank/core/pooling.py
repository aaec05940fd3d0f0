"""Pooling of hidden states into one vector per sequence: the masked mean (encoders) or the last real
token (decoders). One place, used by the model's features, the router's taps and the frozen pass.

Letters in shape comments: B batch, T tokens, D hidden size.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

__all__ = ["Pooling", "mean_pool", "last_token", "pool"]

Pooling = Literal["mean", "last"]


def mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """Masked mean over tokens: ``(B, T, D), (B, T) -> (B, D)``."""
    m = mask.to(hidden.dtype)[..., None]  # (B, T, 1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)  # (B, D)


def last_token(hidden: Tensor, mask: Tensor) -> Tensor:
    """The hidden state of each row's last real token (right padding): ``(B, T, D), (B, T) -> (B, D)``."""
    last = mask.long().sum(1).clamp(min=1) - 1  # (B,)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, D)


def pool(hidden: Tensor, mask: Tensor, how: Pooling = "mean") -> Tensor:
    """``mean_pool`` or ``last_token``."""
    return mean_pool(hidden, mask) if how == "mean" else last_token(hidden, mask)
