"""Text to model inputs: tokenising, batching by length, and padding a batch.

Letters in shape comments: B batch, T tokens.

The collator pads on the right with the tokenizer's pad id and builds the attention mask; it works on
plain id lists, so the tiny test models (which have no tokenizer) and the real ones share it. It gives
what ``transformers.DataCollatorWithPadding`` gives for right padding, without needing a tokenizer
object per batch.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["tokenize", "tokenize_checked", "collate", "batches", "pad_id"]


def tokenize(tokenizer: object, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids per text, truncated to ``max_length``, unpadded (padding happens per batch)."""
    enc = tokenizer(list(texts), truncation=True, max_length=max_length)  # type: ignore[operator]
    return enc["input_ids"]


def tokenize_checked(tokenizer: object, texts: Sequence[str], max_length: int) -> tuple[list[list[int]], list[bool]]:
    """Token ids truncated to ``max_length`` and, per text, whether truncation cut it. An empty
    text is a ``ValueError`` naming its position."""
    for i, t in enumerate(texts):
        if not isinstance(t, str) or not t.strip():
            raise ValueError(f"input {i + 1} is empty; every input needs some text")
    ids = tokenize(tokenizer, texts, max_length)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = tokenizer(list(texts), truncation=False, add_special_tokens=True)["input_ids"]  # type: ignore[operator]
    return ids, [len(f) > len(i) for f, i in zip(full, ids)]


def pad_id(tokenizer: object) -> int:
    """The tokenizer's pad id (0 when it has none, as the tiny config-built models)."""
    pad = getattr(tokenizer, "pad_token_id", None)
    return int(pad) if pad is not None else 0


def collate(ids: Sequence[list[int]], pad: int, device: torch.device | str = "cpu") -> dict[str, Tensor]:
    """Right-padded ``input_ids (B, T)`` and ``attention_mask (B, T)`` on ``device``."""
    width = max(1, max(len(x) for x in ids))
    input_ids = torch.full((len(ids), width), pad, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(ids), width), dtype=torch.long)  # (B, T)
    for i, x in enumerate(ids):
        input_ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        mask[i, : len(x)] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": mask.to(device)}


def batches(ids: Sequence[list[int]], batch_size: int, *, shuffle: bool, seed: int = 0) -> list[list[int]]:
    """Index batches. Shuffled batches are grouped by length within windows of 50 batches, which
    cuts padding without ordering the whole epoch; unshuffled ones are sorted by length."""
    order = list(range(len(ids)))
    if shuffle:
        random.Random(seed).shuffle(order)
        window = batch_size * 50
        order = [i for s in range(0, len(order), window)
                 for i in sorted(order[s: s + window], key=lambda j: len(ids[j]))]
        chunks = [order[s: s + batch_size] for s in range(0, len(order), batch_size)]
        random.Random(seed + 1).shuffle(chunks)
        return chunks
    order.sort(key=lambda j: len(ids[j]))
    return [order[s: s + batch_size] for s in range(0, len(order), batch_size)]
