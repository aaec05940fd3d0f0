"""Greedy decoding for generation tasks: the adapted decoder, the frozen shared LM head and the KV cache.

Letters in shape comments: B batch, T prompt tokens (padded), S tokens so far, D hidden size, V vocabulary,
E experts, k experts per row.

Greedy decoding (argmax at each step) of a decoder-only backbone ``f`` with the frozen shared LM head
``W`` (``Backbone.lm_head``)::

    h_1..h_T   = f(x_1..x_T)                      # prefill: the prompt, once, filling the KV cache
    y_1        = argmax_v (W h_T)_v
    y_{s+1}    = argmax_v (W f(y_s | cache))_v    # one token per step, the cache grows by one position
    stop at EOS (not returned) or after ``max_new_tokens``

The cache is the model's own (``cache=`` / ``out.cache``, a ``DynamicCache``); ``use_cache=False``
recomputes the whole sequence at every step instead (the reference the cache is tested against).

Prompts of different lengths are **left-padded**: every row's last prompt token sits at column T, so
one step appends one column for all rows. Position ids are ``cumsum(mask) - 1`` per row, so a row's
positions are those of its unpadded run, and the attention mask hides the padding: row i of a batch
decodes as row i alone (up to float rounding).

Gates are set **once**, before the prefill: one task (``task=``), a task per row (``task_ids=``), a
fixed set of experts summed with weight 1 for every row (``experts=``; none: the base model), or the
router's choice made from the prompt inside the prefill (``routed=True``: the router taps of
``routing.taps`` pool the prompt's embeddings and low layers and write the gates before the first layer
with experts runs). The decode steps never touch the :class:`~adaptbank.routing.state.RoutingState`, so
each row keeps its experts for the whole continuation; afterwards the state is reset (``off()``).

An encoder-decoder backbone (T5, ``config.is_encoder_decoder``) goes through the same entry point: the
prompt is the encoder's input, read once, and the decoder writes from ``decoder_start_token_id`` with its
own cache (:class:`~adaptbank.core.seq2seq.Seq2SeqSteps`; the routed choice is made in the encoder pass).
The two differ only in their decoding state, :class:`CausalSteps` or ``Seq2SeqSteps``; gates, the stop
rule and the returned :class:`Generation` are shared.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from adaptbank.core.model import AdaptBankModel
from adaptbank.core.seq2seq import Seq2SeqSteps, is_seq2seq

__all__ = ["Generation", "generate", "lm_logits", "position_limit", "left_pad", "CausalSteps"]


@dataclass
class Generation:
    """What one batched :func:`generate` call returns."""

    tokens: list[list[int]]
    """Per row, the generated token ids (EOS not included)."""
    tasks: tuple[str, ...]
    """Per row, the task it was generated under (routed: the expert with the largest weight)."""
    stopped: list[bool]
    """Per row, True when it ended with EOS, False when it hit the length limit."""
    index: Tensor | None = None
    """(B, k) the experts each row used, in the model's expert order (routed)."""
    weight: Tensor | None = None
    """(B, k) their weights (routed)."""
    scores: Tensor | None = None
    """(B, E) router scores in the router's expert order (routed)."""


def position_limit(model: AdaptBankModel) -> int | None:
    """The backbone's position limit (``n_positions`` / ``max_position_embeddings``), or None; None for an
    encoder-decoder (T5's relative position buckets have no limit: see ``core.seq2seq``)."""
    config = model.backbone.config
    if is_seq2seq(model):
        return None
    limit = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    return int(limit) if limit else None


def left_pad(prompts: Sequence[Sequence[int]], pad: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Left-padded ``input_ids (B, T)`` and ``attention_mask (B, T)``."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)  # (B, T)
    for i, p in enumerate(prompts):
        if len(p):
            ids[i, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
            mask[i, width - len(p):] = 1
    return ids.to(device), mask.to(device)


def lm_logits(model: AdaptBankModel, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor,
              cache: Any = None, *, use_cache: bool = False) -> tuple[Tensor, Any]:
    """Logits of the last position ``(B, V)`` under the current gates, and the updated cache."""
    out = model.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache=cache, use_cache=use_cache)
    return model.lm_head(out.last_hidden_state[:, -1]), out.cache if use_cache else None  # type: ignore[misc]


def _check(model: AdaptBankModel, prompts: Sequence[Sequence[int]], tasks: Sequence[str], routed: bool) -> None:
    """Refuse what cannot generate: no LM head, no or empty prompts, unknown or classification tasks."""
    if model.lm_head is None:
        raise ValueError(f"backbone {model.backbone_name!r} (model type {model.backbone.config.model_type!r}) has "
                         "no LM head; generation needs a decoder-only model with one, or T5")
    if not prompts:
        raise ValueError("no prompts to generate from")
    empty = [i for i, p in enumerate(prompts) if not len(p)]
    if empty:
        raise ValueError(f"prompt {empty[0]} has no tokens; every prompt needs at least one")
    names = list(model.tasks) if routed else list(dict.fromkeys(tasks))
    unknown = [t for t in names if t not in model.tasks]
    if unknown:
        raise KeyError(f"unknown task(s) {unknown}; the model holds: {', '.join(model.tasks) or 'none'}")
    cls = [t for t in names if model.tasks[t].head != "generation"]
    if cls:
        what = "routed generation needs every task of the model to be a generation task; " if routed else ""
        raise TypeError(f"{what}task(s) {cls} are classification tasks (a head of their own, no text output); "
                        "generation runs generation tasks only (load or name only those)")


@torch.no_grad()
def generate(model: AdaptBankModel, prompts: Sequence[Sequence[int]], *, task: str | None = None,
             task_ids: Sequence[str] | None = None, routed: bool = False, experts: Sequence[str] | None = None,
             max_new_tokens: int = 16, eos_token_id: int | None = None, pad_token_id: int | None = None,
             use_cache: bool = True) -> Generation:
    """Greedy continuations of ``prompts`` (token id lists of any lengths) in one batched call, under one
    task (``task``), a task per row (``task_ids``), the router (``routed``) or the experts ``experts`` on
    together with weight 1 each (O-LoRA's inference; ``experts=()`` is the base model); exactly one of the four.
    ``eos_token_id`` / ``pad_token_id`` default to the tokenizer's, else the config's. ``max_new_tokens``
    is cut to what the position limit leaves after the longest prompt."""
    if sum((task is not None, task_ids is not None, routed, experts is not None)) != 1:
        raise ValueError("pass exactly one of task=, task_ids=, routed=True or experts=")
    if task_ids is not None and len(task_ids) != len(prompts):
        raise ValueError(f"task_ids has {len(task_ids)} entries for {len(prompts)} prompts")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    rows = list(task_ids) if task_ids is not None else [task] * len(prompts) if task is not None else []
    _check(model, prompts, rows or list(experts or ()), routed)  # type: ignore[arg-type]
    longest, limit = max(len(p) for p in prompts), position_limit(model)
    if limit is not None:
        if longest >= limit:
            raise ValueError(f"a prompt of {longest} tokens leaves no room to generate within the model's "
                             f"{limit} positions; shorten it below {limit} tokens")
        max_new_tokens = min(max_new_tokens, limit - longest)
    eos = _first(eos_token_id, getattr(model.tokenizer, "eos_token_id", None), model.backbone.config.eos_token_id)
    pad = _first(pad_token_id, getattr(model.tokenizer, "pad_token_id", None), model.backbone.config.pad_token_id, 0)
    device = next(model.backbone.parameters()).device
    ids, mask = left_pad(prompts, pad or 0, device)  # (B, T), (B, T)
    steps = (Seq2SeqSteps if is_seq2seq(model) else CausalSteps)(model, ids, mask, use_cache)
    model.eval()
    scores = None
    try:
        if routed:
            if model.router is None:
                raise RuntimeError("no router attached; fit one (adaptbank router fit) or pass task ids")
            model.state.off()
            model.trace.open(mask)
            try:
                logits = steps.first()  # (B, V) the router chooses inside the prefill / the encoder pass
                scores = model.trace.scores
            finally:
                model.trace.close()
            if scores is None or model.state.index is None or model.state.weight is None:
                raise RuntimeError("the routed prefill did not reach the router's last tap")
            index, weight = model.state.index, model.state.weight  # (B, k), (B, k)
            top = index.gather(1, weight.argmax(1, keepdim=True))[:, 0]  # (B,)
            rows = [model.state.experts[int(i)] for i in top]
        else:
            index = weight = None
            if experts is not None:
                _fixed(model, list(experts), len(prompts), device)
                rows = ["+".join(experts)] * len(prompts)
            else:
                model.route(task=task) if task is not None else model.route(task_ids=rows)
            logits = steps.first()  # (B, V)
        out, done = _decode(steps, logits, max_new_tokens, eos)
    finally:
        model.state.off()
    return Generation(out, tuple(rows), done, index, weight, scores)  # type: ignore[arg-type]


def _fixed(model: AdaptBankModel, experts: list[str], b: int, device: torch.device) -> None:
    """Gates for ``experts`` on in every row with weight 1 each (none: the base model)."""
    if not experts:
        model.route()
        return
    order = {n: i for i, n in enumerate(model.state.experts)}
    index = torch.tensor([order[t] for t in experts], device=device).expand(b, len(experts))  # (B, E)
    model.route(index=index, weight=torch.ones(b, len(experts), device=device))  # (B, E) weight 1 each


def _first(*values: int | None) -> int | None:
    """The first value that is not None (a token id of 0 counts)."""
    return next((int(v) for v in values if v is not None), None)


class CausalSteps:
    """The decoding state of one :func:`generate` call on a decoder-only backbone: left-padded ids, their
    mask and positions, and the KV cache. :meth:`first` is the prefill, :meth:`next` one step; both
    return the last position's logits ``(B, V)`` under the gates as they are."""

    def __init__(self, model: AdaptBankModel, ids: Tensor, mask: Tensor, use_cache: bool) -> None:
        self.model, self.ids, self.mask, self.use_cache = model, ids, mask, use_cache  # (B, T), (B, T)
        self.pos = (mask.cumsum(1) - 1).clamp(min=0)  # (B, T) each row's positions start at 0 on its first real token
        self.cache: Any = None

    def first(self) -> Tensor:
        logits, self.cache = lm_logits(self.model, self.ids, self.mask, self.pos, use_cache=self.use_cache)  # (B, V)
        return logits

    def next(self, tokens: Tensor) -> Tensor:
        """Append ``tokens (B,)``: with the cache only they are computed, else the whole sequence again."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(tokens.shape[0], 1)], 1)  # (B, S + 1)
        self.pos = torch.cat([self.pos, self.pos[:, -1:] + 1], 1)  # (B, S + 1)
        if self.use_cache:
            logits, self.cache = lm_logits(self.model, tokens[:, None], self.mask, self.pos[:, -1:], self.cache,
                                           use_cache=True)  # (B, V)
            return logits
        self.ids = torch.cat([self.ids, tokens[:, None]], 1)  # (B, S + 1)
        return lm_logits(self.model, self.ids, self.mask, self.pos)[0]  # (B, V)


def _decode(steps: CausalSteps | Seq2SeqSteps, logits: Tensor, max_new_tokens: int,
            eos: int | None) -> tuple[list[list[int]], list[bool]]:
    """The decode steps after the first ``logits (B, V)``; the gates stay as the first step left them."""
    B = logits.shape[0]
    out: list[list[int]] = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool, device=logits.device)  # (B,)
    for step in range(max_new_tokens):
        nxt = logits.argmax(-1)  # (B,)
        ended = nxt == eos if eos is not None else torch.zeros_like(done)  # (B,)
        for b in (~done & ~ended).nonzero()[:, 0].tolist():
            out[b].append(int(nxt[b]))
        done |= ended
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        logits = steps.next(nxt)  # (B, V)
    return out, done.tolist()
