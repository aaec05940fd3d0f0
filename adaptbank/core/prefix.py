"""Key/value prefixes inside attention: Prefix-Tuning and P-Tuning v2.

Prefix-Tuning (Li and Liang 2021, https://arxiv.org/abs/2101.00190): every attention layer l reads
``P`` extra key and value vectors per head before the real tokens' own::

    K_l' = [Pk_l; K_l]    V_l' = [Pv_l; V_l]    attention over P + T keys; the mask gets P ones in front

During training the prefixes come from an MLP reparameterisation (the paper's, as peft's
``prefix_projection``)::

    [Pk; Pv] = W2 tanh(W1 E + b1) + b2     E (P, D), W1 (h, D), W2 (layers * 2 * W, h)

and after training :meth:`PrefixExpert.collapse` evaluates it once and keeps the plain prefixes, which
are what is stored and what inference uses. P-Tuning v2 (Liu et al. 2022, https://arxiv.org/abs/2110.07602)
trains the same prefixes directly (``reparam_hidden = 0``).

Letters in shape comments: B batch, T tokens, D hidden size, P prefix vectors, H key/value heads,
d head size, W = H d the key/value width (D unless grouped-query attention), N layers.

The prefixes enter the unchanged Hugging Face model as a pre-filled ``DynamicCache`` (what peft does):
each attention layer's ``cache.update`` concatenates them before its own keys and values, which it
has already rotated (LLaMA), so the prefix keys carry no rotation, as in peft. The real tokens take
explicit ``position_ids`` per row: ``0 .. T - 1`` with ``positions="from-zero"`` (as without a
prefix, the adapters library's choice; the default on encoders, where shifting BERT's learned
absolute positions by P cost 2-4 points on trec in bench/methods.py --validation), or
``P_i .. P_i + T - 1`` with ``"after-prefix"`` (as after a cache of length ``P_i``: peft's
numerics, the default on decoders). Rows of one batch with different prefix lengths (or none) pad the prefix to the longest,
masked, so each row equals its own single-task run.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from adaptbank.core.config import PrefixConfig

__all__ = ["PREFIX_FAMILIES", "prefix_geometry", "PrefixExpert", "prefix_cache"]

PREFIX_FAMILIES: tuple[str, ...] = ("bert", "gpt2", "llama")
"""Model families whose attention layers take a pre-filled cache of prefix keys and values (checked
against peft's PrefixTuning numerics in tests/test_methods_prompt.py)."""


def prefix_geometry(config: object) -> tuple[int, int, int]:
    """``(layers N, key/value heads H, head size d)`` of a supported model; other families are refused."""
    family = getattr(config, "model_type", type(config).__name__)
    if family not in PREFIX_FAMILIES:
        raise ValueError(f"prefix/P-tuning v2 experts do not support model family {family!r}; supported: "
                         f"{', '.join(PREFIX_FAMILIES)} (prompt tuning works on every family)")
    get = lambda *names: next(getattr(config, n) for n in names if getattr(config, n, None) is not None)  # noqa: E731
    layers = int(get("num_hidden_layers", "n_layer"))
    heads = int(get("num_attention_heads", "n_head"))
    hidden = int(get("hidden_size", "n_embd"))
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    return layers, kv_heads, head_dim


class PrefixExpert(nn.Module):
    """One task's prefixes: ``key``/``value (N, P, W)``, or while reparameterised the MLP that makes them."""

    def __init__(self, cfg: PrefixConfig, layers: int, width: int, d_model: int) -> None:
        super().__init__()
        if cfg.positions not in ("from-zero", "after-prefix"):
            raise ValueError(f"a prefix expert needs concrete positions (from-zero or after-prefix), got "
                             f"{cfg.positions!r}; AdaptBankModel.add_task resolves 'auto' (config.resolve_positions)")
        self.layers, self.length, self.width = layers, cfg.prefix_length, width
        self.shift = cfg.positions == "after-prefix"
        """Whether the real tokens' positions start after the prefix (P) rather than at 0."""
        P = cfg.prefix_length
        if cfg.reparam_hidden > 0:
            self.embedding = nn.Parameter(torch.randn(P, d_model))  # (P, D), nn.Embedding's N(0, 1) as in peft
            self.mlp: nn.Sequential | None = nn.Sequential(
                nn.Linear(d_model, cfg.reparam_hidden), nn.Tanh(), nn.Linear(cfg.reparam_hidden, layers * 2 * width))
        else:
            self.mlp = None
            kv = torch.randn(P, layers, 2, width)  # (P, N, 2, W), peft's N(0, 1) embedding of P x (N 2 W)
            self.key = nn.Parameter(kv[:, :, 0].transpose(0, 1).contiguous())  # (N, P, W)
            self.value = nn.Parameter(kv[:, :, 1].transpose(0, 1).contiguous())  # (N, P, W)

    @property
    def reparameterised(self) -> bool:
        return self.mlp is not None

    def kv(self) -> tuple[Tensor, Tensor]:
        """The prefixes ``(key (N, P, W), value (N, P, W))``; through the MLP while reparameterised."""
        if self.mlp is None:
            return self.key, self.value
        out = self.mlp(self.embedding).view(self.length, self.layers, 2, self.width)  # (P, N, 2, W)
        return out[:, :, 0].transpose(0, 1), out[:, :, 1].transpose(0, 1)  # (N, P, W) each

    @torch.no_grad()
    def collapse(self) -> None:
        """Replace the MLP by the prefixes it produces now (a no-op once collapsed)."""
        if self.mlp is None:
            return
        key, value = self.kv()
        del self.embedding
        self.mlp = None
        self.key = nn.Parameter(key.contiguous())  # (N, P, W)
        self.value = nn.Parameter(value.contiguous())  # (N, P, W)


def prefix_cache(rows: Sequence[tuple[Tensor, Tensor] | None], heads: int, head_dim: int,
                 dtype: torch.dtype) -> tuple[list[tuple[Tensor, Tensor]], Tensor, Tensor]:
    """Per-layer ``(key, value)`` cache entries ``(B, H, P_max, d)`` for rows with prefixes ``(N, P_i, W)``
    or None, the prefix mask ``(B, P_max)`` and each row's prefix length ``P_i (B,)``."""
    ref = next(r for r in rows if r is not None)[0]
    device, (N, _, W) = ref.device, ref.shape
    lengths = torch.tensor([0 if r is None else r[0].shape[1] for r in rows], device=device)  # (B,)
    Pm = int(lengths.max())
    distinct = list({id(r[0]): r for r in rows if r is not None}.values())
    B = len(rows)
    # per layer by unbind, not key[n]: the backward of N selects writes N zero-filled copies of the whole
    # (N, B, H, P, d) stack, unbind's is one stack of the per-layer gradients
    if len(distinct) == 1 and all(r is not None for r in rows):  # one task's prefix on every row: broadcast it
        k, v = (t.to(dtype).view(N, Pm, heads, head_dim).transpose(1, 2) for t in distinct[0])  # (N, H, P, d)
        mask = torch.ones(B, Pm, dtype=torch.bool, device=device)  # (B, P)
        return [(kn.expand(B, heads, Pm, head_dim), vn.expand(B, heads, Pm, head_dim))  # (B, H, P, d) each
                for kn, vn in zip(k.unbind(0), v.unbind(0), strict=True)], mask, lengths
    pad = lambda t: torch.cat([t, t.new_zeros(N, Pm - t.shape[1], W)], 1).to(dtype)  # noqa: E731 (N, P_max, W)
    table_k = torch.stack([pad(k) for k, _ in distinct] + [ref.new_zeros(N, Pm, W).to(dtype)])  # (U + 1, N, P_max, W)
    table_v = torch.stack([pad(v) for _, v in distinct] + [ref.new_zeros(N, Pm, W).to(dtype)])  # (U + 1, N, P_max, W)
    which = {id(r[0]): i for i, r in enumerate(distinct)}
    row = torch.tensor([len(distinct) if r is None else which[id(r[0])] for r in rows], device=device)  # (B,)
    key = table_k[row].view(B, N, Pm, heads, head_dim).permute(1, 0, 3, 2, 4)  # (N, B, H, P_max, d)
    value = table_v[row].view(B, N, Pm, heads, head_dim).permute(1, 0, 3, 2, 4)  # (N, B, H, P_max, d)
    mask = torch.arange(Pm, device=device)[None] < lengths[:, None]  # (B, P_max)
    return list(zip(key.unbind(0), value.unbind(0), strict=True)), mask, lengths
