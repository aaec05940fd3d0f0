"""Encoder-decoder (T5) generation: the encoder reads the prompt once, the decoder writes the answer one
token at a time through the frozen shared LM head ``W`` (``Backbone.lm_head``), with the decoder's KV cache.

Letters in shape comments: B batch, T prompt tokens (padded), S decoder tokens so far, D hidden size,
V vocabulary, N target tokens of a batch.

Greedy decoding (``core.generate`` calls :class:`Seq2SeqSteps`; Raffel et al. 2020, T5,
https://arxiv.org/abs/1910.10683)::

    m       = enc(x_1..x_T)                          # once; the prompt's padding is masked (mask (B, T))
    y_0     = decoder_start_token_id
    y_{s+1} = argmax_v (W dec(y_0..y_s | m)_s)_v     # stop at EOS (not returned) or after max_new_tokens

With the cache (an ``EncoderDecoderCache`` the decoder makes on the first step) only ``y_s`` enters the
decoder at step s: each self-attention layer appends one key/value position to its cache, each
cross-attention layer computes its keys/values from ``m`` on the first step and reuses them after
(``is_updated``). ``use_cache=False`` recomputes the whole decoder sequence at every step (the reference
the cache is tested against); the encoder runs once either way. Every row's decoder sequence has the same
length (all start at ``y_0`` together), so the decoder needs no padding; the encoder's padding is masked
in its self-attention and in the decoder's cross-attention (``attention_mask``).

Training is teacher forcing with the target and its EOS as labels (:func:`seq2seq_loss`)::

    decoder input = [y_0, t_1 .. t_n]      labels = [t_1 .. t_n, EOS]
    L = -1/N * sum_{s : label_s != -100} log softmax(W dec(input_1..input_s | m)_s)_{label_s}

Gates are set once, before the encoder pass, and hold for the encoder and every decoder step: per row
(``task_ids``) or by the router, whose taps sit on the encoder's first layers (``layer_list(encoder)`` is
``encoder.block``), so it chooses from the prompt during the encoder pass, before the first encoder layer
with experts runs, and the decoder runs all its steps under that choice.

T5 has no position limit: its attention bias is over relative distances in buckets (distances past
``relative_attention_max_distance`` share the last bucket), so a prompt or target of any length runs. The
limit that applies is ``TrainConfig.max_length`` (``--max-length``) on both sides: a prompt keeps its last
``max_length`` tokens, and a longer target is refused (``training.generation.encode_pairs``): cut, it would
teach the model to stop early.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from adaptbank.core.model import AdaptBankModel

__all__ = ["is_seq2seq", "decoder_start", "decoder_states", "teacher_forcing", "seq2seq_loss", "Seq2SeqSteps"]


def is_seq2seq(model: AdaptBankModel) -> bool:
    """Whether the backbone is an encoder-decoder (``config.is_encoder_decoder``, T5)."""
    return bool(getattr(model.backbone.config, "is_encoder_decoder", False))


def decoder_start(model: AdaptBankModel) -> int:
    """``config.decoder_start_token_id`` (T5: the pad token, 0)."""
    start = getattr(model.backbone.config, "decoder_start_token_id", None)
    if start is None:
        raise ValueError(f"backbone {model.backbone_name!r} has no decoder_start_token_id in its config; an "
                         "encoder-decoder generates from it (T5 uses its pad token, 0): set it in config.json")
    return int(start)


def decoder_states(model: AdaptBankModel, memory: Tensor, mask: Tensor, decoder_ids: Tensor, cache: Any = None,
                   *, use_cache: bool = False) -> tuple[Tensor, Any]:
    """The decoder's hidden states ``(B, S, D)`` for ``decoder_ids (B, S)`` over the encoder states
    ``memory (B, T, D)`` with their ``mask (B, T)``, under the current gates, and the updated cache. The
    decoder's causal mask is its own; right-padded ``decoder_ids`` need no mask of theirs, since no
    real position attends to a later (padding) one."""
    out = model.backbone(attention_mask=mask, encoder_outputs=(memory,), decoder_input_ids=decoder_ids,
                         cache=cache, use_cache=use_cache)
    return out.last_hidden_state, out.cache if use_cache else None  # (B, S, D)


def teacher_forcing(targets: Sequence[Sequence[int]], start: int, pad: int,
                    device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """``decoder input (B, S)`` = ``[start] + target[:-1]`` and ``labels (B, S)`` = ``target``, right-padded
    (with ``pad`` and -100); each target ends with its EOS."""
    width = max(len(t) for t in targets)
    ids = torch.full((len(targets), width), pad, dtype=torch.long)  # (B, S)
    labels = torch.full((len(targets), width), -100, dtype=torch.long)  # (B, S)
    for b, t in enumerate(targets):
        ids[b, : len(t)] = torch.tensor([start, *t[:-1]], dtype=torch.long)
        labels[b, : len(t)] = torch.tensor(list(t), dtype=torch.long)
    return ids.to(device), labels.to(device)


def seq2seq_loss(model: AdaptBankModel, memory: Tensor, mask: Tensor, targets: Sequence[Sequence[int]]) -> Tensor:
    """Mean cross-entropy of the target tokens (each target with its EOS) given the encoder states
    ``memory (B, T, D)`` of the prompts and their ``mask (B, T)`` (see the module docstring)."""
    pad = model.backbone.config.pad_token_id
    ids, labels = teacher_forcing(targets, decoder_start(model), 0 if pad is None else int(pad), memory.device)
    hidden, _ = decoder_states(model, memory, mask, ids)  # (B, S, D)
    b, s = (labels != -100).nonzero(as_tuple=True)  # (N,), (N,)
    logits = model.lm_head(hidden[b, s])  # type: ignore[misc]  # (N, V)
    return F.cross_entropy(logits.float(), labels[b, s])


class Seq2SeqSteps:
    """The decoding state of one :func:`~adaptbank.core.generate.generate` call on an encoder-decoder:
    :meth:`first` runs the encoder on the prompts and the decoder's first step, :meth:`next` one more
    step; both return the last position's logits ``(B, V)`` under the gates as they are."""

    def __init__(self, model: AdaptBankModel, ids: Tensor, mask: Tensor, use_cache: bool) -> None:
        self.model, self.ids, self.mask, self.use_cache = model, ids, mask, use_cache  # (B, T), (B, T)
        self.memory: Tensor | None = None
        """(B, T, D) the encoder's states of the prompts, after :meth:`first`."""
        self.decoded = torch.full((ids.shape[0], 1), decoder_start(model), dtype=torch.long, device=ids.device)
        """(B, S) the decoder's input so far: the start token, then the tokens chosen."""
        self.cache: Any = None

    def first(self) -> Tensor:
        """The encoder pass (a routed one chooses the experts here) and the decoder's first step."""
        self.memory = self.model.encoder(input_ids=self.ids, attention_mask=self.mask).last_hidden_state  # (B, T, D)
        return self._logits(self.decoded)

    def next(self, tokens: Tensor) -> Tensor:
        """Append ``tokens (B,)`` and step the decoder: with the cache it reads only them."""
        self.decoded = torch.cat([self.decoded, tokens[:, None]], 1)  # (B, S + 1)
        return self._logits(tokens[:, None] if self.use_cache else self.decoded)

    def _logits(self, decoder_ids: Tensor) -> Tensor:
        assert self.memory is not None, "first() runs the encoder before any decoder step"
        hidden, self.cache = decoder_states(self.model, self.memory, self.mask, decoder_ids, self.cache,
                                            use_cache=self.use_cache)  # (B, S', D)
        return self.model.lm_head(hidden[:, -1])  # type: ignore[misc]  # (B, V)
