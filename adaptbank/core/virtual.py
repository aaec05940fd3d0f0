"""Virtual-token experts: the per-task soft prompts (``core.prompts``) and key/value prefixes
(``core.prefix``) of a model, and the one backbone call that applies them per row.

Letters in shape comments: B batch, T tokens, D hidden size, L = P_max + T, k experts per row.

These experts wrap no linear layer: a prompt changes the input sequence, a prefix the keys and values
of every attention layer. :class:`VirtualExperts` keeps them name-keyed (``prompts[task]``,
``prefixes[task]``) and :meth:`VirtualExperts.encode` turns one batch, with a prompt/prefix task (or
None) per row, into the backbone's keyword arguments (``inputs_embeds``, ``cache``, ``position_ids``,
the extended mask), calls the backbone once and hands back the real tokens' hidden states ``(B, T, D)``.
Rows of linear-expert tasks (LoRA, adapters) ride in the same call with masked-out pad positions.

A row holds at most one virtual-token expert, at full strength: a prompt cannot be weighted or mixed
with another, so gates that give a prompt/prefix task a share of a row (top-k > 1, dense or per-token
gates) are refused by :func:`virtual_rows`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from adaptbank.core.config import MethodConfig, PrefixConfig, PromptTuningConfig
from adaptbank.core.prefix import PrefixExpert, prefix_cache, prefix_geometry
from adaptbank.core.prompts import (
    SoftPrompt,
    check_positions,
    init_prompt,
    position_limit,
    prepend,
    real_tokens,
)
from adaptbank.routing.state import RoutingState

__all__ = ["VirtualExperts", "is_virtual", "virtual_rows"]


def is_virtual(method: MethodConfig) -> bool:
    """True for the kinds that act on the input sequence or inside attention (no linear is wrapped)."""
    return isinstance(method, (PromptTuningConfig, PrefixConfig))


class VirtualExperts(nn.Module):
    """Soft prompts and prefixes keyed by task name, applied per row by :meth:`encode`."""

    def __init__(self) -> None:
        super().__init__()
        self.prompts = nn.ModuleDict()
        self.prefixes = nn.ModuleDict()

    def __contains__(self, name: object) -> bool:
        return name in self.prompts or name in self.prefixes

    def get(self, name: str) -> nn.Module:
        return self.prompts[name] if name in self.prompts else self.prefixes[name]

    def add(self, name: str, method: MethodConfig, encoder: nn.Module, labels: Sequence[str],
            tokenizer: object | None) -> nn.Module:
        """Create task ``name``'s prompt or prefix on the backbone's device and dtype."""
        embedding = encoder.get_input_embeddings()
        W = embedding.weight
        if isinstance(method, PromptTuningConfig):
            module: nn.Module = SoftPrompt(init_prompt(method, embedding, labels, tokenizer))
            self.prompts[name] = module.to(W.device, W.dtype)
        elif isinstance(method, PrefixConfig):
            layers, heads, head_dim = prefix_geometry(encoder.config)
            module = PrefixExpert(method, layers, heads * head_dim, W.shape[1]).to(W.device, W.dtype)
            self.prefixes[name] = module
        else:
            raise TypeError(f"{method.kind!r} is not a prompt or prefix method")
        return module

    def remove(self, name: str) -> None:
        (self.prompts if name in self.prompts else self.prefixes).pop(name)

    def collapse(self, name: str) -> None:
        """Fold a prefix's reparameterisation MLP into plain prefixes (no-op for prompts and P-tuning v2)."""
        if name in self.prefixes:
            self.prefixes[name].collapse()  # type: ignore[operator]

    def state_of(self, name: str) -> dict[str, Tensor]:
        """The stored tensors, keys free of the task name: ``prompt (P, D)`` or ``prefix.key``/``prefix.value
        (N, P, W)`` (a reparameterised prefix is evaluated, not stored as its MLP)."""
        if name in self.prompts:
            return {"prompt": self.prompts[name].prompt.detach().clone()}
        key, value = self.prefixes[name].kv()  # type: ignore[operator]
        return {"prefix.key": key.detach().clone(), "prefix.value": value.detach().clone()}

    def set_tensor(self, name: str, key: str, value: Tensor) -> None:
        """Copy ``value`` into ``key`` of a collapsed prefix or a prompt (see :meth:`state_of`)."""
        target = self.prompts[name].prompt if key == "prompt" else getattr(self.prefixes[name], key.split(".")[1])
        with torch.no_grad():
            target.copy_(value)

    def length(self, name: str) -> int:
        module = self.get(name)
        return module.length  # type: ignore[return-value]

    def positions_taken(self, name: str) -> int:
        """Positions task ``name``'s virtual tokens take before the real tokens: a prompt's length (it
        occupies the first positions), a prefix's with ``positions="after-prefix"``, else 0."""
        shifted = name in self.prompts or bool(self.prefixes[name].shift)
        return self.length(name) if shifted else 0

    def encode(self, encoder: nn.Module, input_ids: Tensor, attention_mask: Tensor, rows: Sequence[str | None],
               **extra: Tensor) -> Tensor:
        """Run ``encoder`` once with row i's prompt or prefix (``rows[i]``, None: neither) and return the
        hidden states of the real tokens ``(B, T, D)``."""
        B, T = input_ids.shape
        clash = sorted(k for k in ("token_type_ids", "position_ids", "inputs_embeds", "cache", "past_key_values")
                       if k in extra)
        if clash:
            raise ValueError(f"{', '.join(clash)} cannot be passed with prompt/prefix tasks (their length is T, "
                             f"the sequence they see is longer)")
        for name in dict.fromkeys(r for r in rows if r is not None):
            check_positions(f"task {name!r}", self.positions_taken(name), T, encoder.config)
        prompts = [self.prompts[r].prompt if r in self.prompts else None for r in rows]
        call: dict[str, object] = dict(extra)
        if any(p is not None for p in prompts):
            embeds = encoder.get_input_embeddings()(input_ids)  # (B, T, D)
            call["inputs_embeds"], mask, shift = prepend(embeds, attention_mask, prompts)  # (B, L, D), (B, L), (B,)
        else:
            call["input_ids"], mask = input_ids, attention_mask
            shift = torch.zeros(B, dtype=torch.long, device=input_ids.device)  # (B,)
        # once per task, not per row: a reparameterised prefix runs its MLP here (and its backward once)
        made = {r: self.prefixes[r].kv() for r in dict.fromkeys(rows) if r in self.prefixes}  # type: ignore[operator]
        kvs = [made.get(r) if r is not None else None for r in rows]
        if any(kv is not None for kv in kvs):
            from transformers import DynamicCache

            _, heads, head_dim = prefix_geometry(encoder.config)
            dtype = encoder.get_input_embeddings().weight.dtype
            layers, prefix_mask, lengths = prefix_cache(kvs, heads, head_dim, dtype)  # (B, P_max), (B,)
            shifted = torch.tensor([r in self.prefixes and bool(self.prefixes[r].shift) for r in rows],
                                   device=mask.device)  # (B,) after-prefix rows
            L = mask.shape[1]
            positions = (lengths * shifted)[:, None] + torch.arange(L, device=mask.device)[None]  # (B, L)
            limit = position_limit(encoder.config)
            call["position_ids"] = positions if limit is None else positions.clamp(max=limit - 1)  # pads only
            call["cache"] = DynamicCache(layers)
            mask = torch.cat([prefix_mask.to(mask.dtype), mask], 1)  # (B, P_max + L)
        out = encoder(attention_mask=mask, **call)
        return real_tokens(out.last_hidden_state, shift, T)  # (B, T, D)


def virtual_rows(state: RoutingState, virtual: VirtualExperts, batch: int) -> list[str | None] | None:
    """Each row's prompt/prefix task under the gates ``state`` (None where a row has none), or None when
    no row has one. Gates that mix a prompt/prefix task with other experts in a row are refused."""
    if state.active is not None:
        return [state.active] * batch if state.active in virtual else None
    if state.token and (len(virtual.prompts) or len(virtual.prefixes)):
        raise ValueError("token-level gates cannot apply prompt/prefix tasks (a prompt acts on the whole sequence); "
                         f"route them by task id. Tasks: {sorted(set(virtual.prompts) | set(virtual.prefixes))}")
    if state.index is None or not (set(state.experts) & (set(virtual.prompts) | set(virtual.prefixes))):
        return None
    index, weight = state.index, state.weight
    names = state.experts
    cols = torch.tensor([n in virtual for n in names], device=index.device)  # (E,)
    hit = cols[index]  # (B, k)
    if weight is not None and weight.dim() == 3:
        hit = hit & (weight != 0).any(1)
        if bool(hit.any()):
            raise ValueError("per-token gates cannot apply prompt/prefix tasks (a prompt acts on the whole "
                             f"sequence); route them by task id. Tasks: {sorted(set(virtual.prompts) | set(virtual.prefixes))}")
    elif weight is not None:
        hit = hit & (weight != 0)  # (B, k)
    if index.shape[1] > 1 and bool(hit.any()):
        b, j = (int(v) for v in hit.nonzero()[0])
        raise ValueError(f"row {b} gives prompt/prefix task {names[int(index[b, j])]!r} a share of a top-{index.shape[1]} "
                         "mixture; a prompt/prefix cannot be mixed with other experts in one row (use top_k=1 or task ids)")
    if weight is not None and bool((hit & (weight != 1)).any()):
        raise ValueError("a prompt/prefix task must have weight 1 in its row (it cannot be scaled); "
                         f"got weights {weight[hit].tolist()[:4]}")
    rows = [names[int(i)] if bool(h) else None for i, h in zip(index[:, 0], hit[:, 0])]
    return rows if any(r is not None for r in rows) else None
