"""Task heads: what turns the backbone's output into a task's answer.

Two kinds are planned, and the bank, the router and the evaluator see a task, not a head type:

* ``classification`` (built): a per-task :class:`ClassificationHead` over pooled features, ``(B, D) -> (B, C)``;
* ``generation``: the backbone's frozen, shared LM head (``Backbone.lm_head``, no per-task parameters); loss
  on the target tokens (``training.generation``), greedy decoding with the KV cache (``core.generate``), on
  a decoder-only backbone or an encoder-decoder (T5: ``core.seq2seq``).

``TaskInfo.head`` records the kind; ``HEAD_KINDS`` lists what exists.

Letters in shape comments: B batch, D hidden size, C classes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor, nn

from adaptbank.core.config import CombinedConfig, MethodConfig, PrefixConfig, PromptTuningConfig

if TYPE_CHECKING:
    from adaptbank.core.model import AdaptBankModel

__all__ = ["HEAD_KINDS", "HeadKind", "ClassificationHead", "row_logits", "check_head", "check_classifying"]

HeadKind = Literal["classification", "generation"]

HEAD_KINDS: tuple[str, ...] = ("classification", "generation")
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


def check_head(model: AdaptBankModel, name: str, method: MethodConfig, labels: Sequence[str], head: str) -> None:
    """Refuse a task ``name`` the model cannot hold with a ``head`` head: an unknown kind, a classification
    task with fewer than 2 labels, a generation task on a backbone without an LM head (an encoder), on an
    encoder-decoder without a ``decoder_start_token_id``, or with a prompt/prefix expert (those enter as
    extra positions, which the KV-cache decoding does not carry)."""
    if head not in HEAD_KINDS:
        raise ValueError(f"task {name!r}: unknown head kind {head!r}; allowed: {list(HEAD_KINDS)}")
    if head == "classification":
        if len(labels) < 2:
            raise ValueError(f"task {name!r} needs at least 2 labels, got {list(labels)!r}")
        return
    if model.lm_head is None:
        kind = model.backbone.config.model_type
        raise ValueError(f"task {name!r} is a generation task, but backbone {model.backbone_name!r} (model type "
                         f"{kind!r}) has no LM head; generation needs a decoder-only model with one (gpt2, llama, "
                         "mistral, qwen2, qwen3 with tied embeddings or an lm_head.weight in its checkpoint) "
                         "or the encoder-decoder t5")
    config = model.backbone.config
    if getattr(config, "is_encoder_decoder", False) and getattr(config, "decoder_start_token_id", None) is None:
        raise ValueError(f"task {name!r} is a generation task, but backbone {model.backbone_name!r} has no "
                         "decoder_start_token_id in its config; its decoder starts from it (T5: the pad token, 0)")
    parts = method.parts if isinstance(method, CombinedConfig) else (method,)
    virtual = [p.kind for p in parts if isinstance(p, (PromptTuningConfig, PrefixConfig))]
    if virtual:
        raise ValueError(f"task {name!r}: a generation task takes linear experts only (lora, adapter, "
                         f"parallel-adapter, bitfit, ia3 and combinations of those), not {virtual[0]!r}")


def check_classifying(model: AdaptBankModel, tasks: Sequence[str]) -> None:
    """Refuse a classification forward over rows of generation tasks (they have no head to score with)."""
    gen = sorted({t for t in tasks if t in model.tasks and model.tasks[t].head == "generation"})
    if gen:
        raise TypeError(f"task(s) {gen} are generation tasks with no classification head; generate text with "
                        "adaptbank.core.generate.generate (or `adaptbank predict`) instead")
