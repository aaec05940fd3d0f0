"""Soft prompts: Prompt-Tuning's per-task vectors before the input embeddings, and the per-row layout
that lets rows with different prompts (or none) share one batched forward.

Prompt-Tuning (Lester et al. 2021, https://arxiv.org/abs/2104.08691): a task owns ``P`` trainable
vectors ``Z (P, D)``; the frozen model reads ``[Z; E(x)]``, where ``E`` is its own token embedding,
and the attention mask gets ``P`` ones in front::

    inputs_embeds = concat(Z, E(x))      (P + T, D)    the backbone adds its position/type embeddings
    attention_mask = concat(1_P, m)       (P + T,)      over the whole sequence, as peft does

Pooling then reads the real tokens only (:func:`real_tokens` undoes the shift).

Letters in shape comments: B batch, T tokens, D hidden size, P prompt vectors, L = P_max + T.

In a batch whose rows carry prompts of different lengths (or no prompt), row i is laid out as
``[Z_i (P_i); E(x_i) (T); pad (P_max - P_i)]``: the real tokens keep the positions ``P_i .. P_i+T-1``
of row i's own single-task run and the extra pad sits at the end, masked, where no real token (causal
or bidirectional) attends to it. Left padding would leave masked-only query rows at the front.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from adaptbank.core.config import PromptTuningConfig

__all__ = ["SoftPrompt", "init_prompt", "position_limit", "check_positions", "prepend", "real_tokens"]


class SoftPrompt(nn.Module):
    """One task's soft prompt ``Z (P, D)``."""

    def __init__(self, prompt: Tensor) -> None:
        super().__init__()
        self.prompt = nn.Parameter(prompt.detach().clone())  # (P, D)

    @property
    def length(self) -> int:
        return int(self.prompt.shape[0])


def init_prompt(cfg: PromptTuningConfig, embedding: nn.Embedding, labels: Sequence[str],
                tokenizer: object | None) -> Tensor:
    """The initial ``Z (P, D)`` for ``cfg.prompt_init``, drawn from torch's current RNG:

    * ``random``: ``N(0, s^2)`` with ``s`` the standard deviation of the embedding matrix;
    * ``vocab``: the embeddings of ``P`` token ids sampled uniformly from the vocabulary (special tokens
      excluded when the tokenizer names them);
    * ``labels``: the embeddings of the tokenized class-label names, concatenated, then repeated or cut
      to ``P`` (Lester et al.'s class-label init)."""
    W = embedding.weight.detach()  # (V, D)
    P = cfg.prompt_length
    if cfg.prompt_init == "random":
        return torch.randn(P, W.shape[1], dtype=torch.float32).to(W) * W.float().std()  # (P, D)
    if cfg.prompt_init == "vocab":
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        allowed = torch.tensor([i for i in range(W.shape[0]) if i not in special])  # (V',)
        ids = allowed[torch.randint(len(allowed), (P,))]  # (P,)
        return W[ids.to(W.device)].clone()  # (P, D)
    if tokenizer is None:
        raise ValueError("prompt_init='labels' needs the backbone's tokenizer to embed the label names; this model "
                         "has none (use prompt_init='vocab' or 'random')")
    ids = [i for name in labels for i in tokenizer(name, add_special_tokens=False)["input_ids"]]  # type: ignore[operator]
    if not ids:
        raise ValueError(f"prompt_init='labels': the label names {list(labels)!r} tokenize to no tokens")
    ids = (ids * math.ceil(P / len(ids)))[:P]
    return W[torch.tensor(ids, device=W.device)].clone()  # (P, D)


def position_limit(config: object) -> int | None:
    """The number of positions a model with learned or bounded positions has (None: unbounded, as T5's
    relative positions)."""
    for attr in ("max_position_embeddings", "n_positions"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_positions(what: str, virtual: int, tokens: int, config: object) -> None:
    """Refuse ``virtual`` prompt/prefix positions plus ``tokens`` input tokens beyond the model's limit."""
    limit = position_limit(config)
    if limit is not None and virtual + tokens > limit:
        raise ValueError(f"{what}: {virtual} virtual tokens plus {tokens} input tokens need {virtual + tokens} positions, "
                         f"but the model has {limit}; use --max-length <= {limit - virtual} or a shorter prompt/prefix")


def prepend(embeds: Tensor, mask: Tensor, prompts: Sequence[Tensor | None]) -> tuple[Tensor, Tensor, Tensor]:
    """Row i becomes ``[Z_i; embeds_i; pad]`` (see the module docstring). Returns the embeddings
    ``(B, L, D)``, their mask ``(B, L)`` and each row's shift ``P_i (B,)``."""
    B, T, D = embeds.shape
    device = embeds.device
    lengths = torch.tensor([0 if p is None else p.shape[0] for p in prompts], device=device)  # (B,)
    Pm = int(lengths.max())
    L = Pm + T
    distinct = list({id(p): p for p in prompts if p is not None}.values())
    if len(distinct) == 1 and all(p is not None for p in prompts):  # one task's prompt on every row: no gathers
        z = distinct[0].to(embeds.dtype)  # (P, D)
        out = torch.cat([z.expand(B, Pm, D), embeds], 1)  # (B, P + T, D)
        return out, torch.cat([mask.new_ones(B, Pm), mask], 1), lengths  # (B, P + T)
    table = embeds.new_zeros(len(distinct) + 1, L, D)  # (U + 1, L, D); the last row: no prompt
    padded = [torch.cat([p.to(embeds.dtype), p.new_zeros(L - p.shape[0], D).to(embeds.dtype)]) for p in distinct]
    if padded:
        table = torch.cat([torch.stack(padded), embeds.new_zeros(1, L, D)])  # (U + 1, L, D)
    which = {id(p): i for i, p in enumerate(distinct)}
    row = torch.tensor([len(distinct) if p is None else which[id(p)] for p in prompts], device=device)  # (B,)
    j = torch.arange(L, device=device)  # (L,)
    tok = j[None] - lengths[:, None]  # (B, L) index into the real tokens
    is_tok = (tok >= 0) & (tok < T)  # (B, L)
    safe = tok.clamp(0, T - 1)  # (B, L)
    moved = embeds.gather(1, safe[..., None].expand(B, L, D))  # (B, L, D)
    out = torch.where(is_tok[..., None], moved, table[row])  # (B, L, D); prompt rows, then zeros at the end
    is_prompt = j[None] < lengths[:, None]  # (B, L)
    new_mask = torch.where(is_tok, mask.gather(1, safe), is_prompt.to(mask.dtype))  # (B, L)
    return out, new_mask, lengths


def real_tokens(hidden: Tensor, shift: Tensor, tokens: int) -> Tensor:
    """The hidden states of the real tokens: ``hidden[i, shift_i : shift_i + T]`` for each row, ``(B, T, D)``."""
    B, L, D = hidden.shape
    if L == tokens:  # no prompt in the batch (prefixes live in the cache): nothing precedes the real tokens
        return hidden  # (B, T, D)
    if bool((shift == shift[0]).all()):  # one prompt length for every row (one task): a view, no gather
        start = int(shift[0])
        return hidden[:, start:start + tokens]  # (B, T, D)
    idx = shift[:, None] + torch.arange(tokens, device=hidden.device)[None]  # (B, T)
    return hidden.gather(1, idx[..., None].expand(B, tokens, D))  # (B, T, D)
