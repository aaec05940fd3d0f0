"""Task experts: small modules that add a learned change to one wrapped linear sub-layer.

Letters used in shape comments: B batch, T tokens, I input features, O output features, E experts
stacked for a layer, k experts selected per example, r LoRA rank, m bottleneck width.

Every expert kind honours one contract, so the router can mix any of them:

* ``expert(x, h) -> h'`` is the single-expert path. ``x`` is the wrapped layer's input ``(B, T, I)``
  and ``h`` its output ``(B, T, O)``; the expert returns ``h`` plus its own change.
* ``Kind.stack(experts)`` packs a list of experts (``None`` for "no expert here") into padded
  tensors, and ``Kind.gathered(x, h, stack, index, weight)`` applies, per example, the k experts named
  by ``index (B, k)`` weighted by ``weight (B, k)`` or per token ``(B, T, k)``: two batched matmuls
  whatever the number of experts held, with no Python loop over experts. The gathered path applies
  no expert dropout; it is the path for inference and for training routers over frozen experts.

Kinds:

* :class:`LoRAExpert` (Hu et al. 2021, https://arxiv.org/abs/2106.09685)::

      h' = h + (alpha / r) * (dropout(x) @ A^T) @ B^T       A: (r, I) Kaiming-uniform, B: (O, r) zero

  The dense ``O x I`` update is never formed in the forward; only ``merge`` builds it.
* :class:`ParallelAdapterExpert` (He et al. 2021, https://arxiv.org/abs/2110.04366)::

      h' = h + s * up(f(down(x)))       beside the wrapped sub-layer, reading its input x

* :class:`SerialAdapterExpert` (Houlsby et al. 2019, https://arxiv.org/abs/1902.00751; Pfeiffer et
  al. 2021, https://arxiv.org/abs/2005.00247)::

      h' = h + up(f(down(h)))           after the wrapped output projection, residual

  It sits on the projection's output, before the block's dropout and LayerNorm, which differs
  slightly from the hook placement of the adapters library.

Up-projections and B start at zero, so a new expert leaves the model's outputs bit-identical.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adaptbank.core.config import AdapterConfig, LoRAConfig, ParallelAdapterConfig

__all__ = ["Expert", "LoRAExpert", "ParallelAdapterExpert", "SerialAdapterExpert", "Stack"]



@dataclass
class Stack:
    """Padded tensors of E experts of one group, ready for the gathered path."""

    tensors: dict[str, Tensor]
    activation: str = field(default="")

    def __getitem__(self, key: str) -> Tensor:
        return self.tensors[key]

_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}


def _flat(x: Tensor) -> Tensor:
    """View ``(B, ..., D)`` as ``(B, T, D)``; a 2-D input gets T = 1."""
    return x.reshape(x.shape[0], -1, x.shape[-1])


def _weights(weight: Tensor) -> Tensor:
    """Per-example ``(B, k)`` weights broadcast as ``(B, 1, k)``; per-token ``(B, T, k)`` stay."""
    return weight[:, None, :] if weight.dim() == 2 else weight


class Expert(nn.Module):
    """Base of all expert kinds: the shared contract, no parameters of its own."""

    side: ClassVar[str] = "input"
    """``input`` experts read the layer input x; ``output`` experts read the layer output h."""

    def group_key(self) -> tuple[object, ...]:
        """Experts with equal keys can be stacked together in one gathered matmul."""
        return (type(self),)

    @classmethod
    def stack(cls, experts: Sequence[Expert | None]) -> Stack:
        raise NotImplementedError

    @staticmethod
    def gathered(x: Tensor, h: Tensor, stack: Stack, index: Tensor, weight: Tensor) -> Tensor:
        raise NotImplementedError


class LoRAExpert(Expert):
    """Low-rank update ``(alpha/r) * B A`` applied as ``(x A^T) B^T``.

    ``shared_A`` makes this a task-B expert of a shared-A group (HydraLoRA's asymmetric variant,
    Tian et al. 2024): the same Parameter object is held by every expert of the group in this layer.
    """

    def __init__(self, d_in: int, d_out: int, cfg: LoRAConfig, *, shared_A: nn.Parameter | None = None) -> None:
        super().__init__()
        self.rank = cfg.rank
        self.scaling = cfg.scaling
        if shared_A is not None:
            if tuple(shared_A.shape) != (cfg.rank, d_in):
                raise ValueError(f"shared A has shape {tuple(shared_A.shape)}, expected {(cfg.rank, d_in)}")
            self.A = shared_A
        else:
            self.A = nn.Parameter(torch.empty(cfg.rank, d_in))  # (r, I)
            nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.B = nn.Parameter(torch.zeros(d_out, cfg.rank))  # (O, r)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        z = self.dropout(x) @ self.A.T  # (B, T, r)
        return h + (z @ self.B.T) * self.scaling  # (B, T, O)

    def delta_weight(self) -> Tensor:
        """The dense update ``(alpha/r) B A`` of shape (O, I), in fp32 (used by merge only)."""
        return (self.B.float() @ self.A.float()) * self.scaling  # (O, I)

    @classmethod
    def stack(cls, experts: Sequence[Expert | None]) -> Stack:
        ref = next(e for e in experts if isinstance(e, LoRAExpert))
        r = max(e.rank for e in experts if isinstance(e, LoRAExpert))
        A = ref.A.new_zeros(len(experts), r, ref.A.shape[1])  # (E, r, I)
        B = ref.B.new_zeros(len(experts), ref.B.shape[0], r)  # (E, O, r)
        for i, e in enumerate(experts):
            if isinstance(e, LoRAExpert):
                A[i, : e.rank] = e.A
                B[i, :, : e.rank] = e.B * e.scaling  # scaling folded in once, not per forward
        return Stack({"A": A, "B": B})

    @staticmethod
    def gathered(x: Tensor, h: Tensor, stack: Stack, index: Tensor, weight: Tensor) -> Tensor:
        xf = _flat(x)  # (B, T, I)
        z = torch.einsum("bti,bkri->btkr", xf, stack["A"][index])  # (B, T, k, r)
        z = z * _weights(weight)[..., None]  # (B, T, k, r)
        delta = torch.einsum("btkr,bkor->bto", z, stack["B"][index])  # (B, T, O)
        return h + delta.reshape(h.shape)


class _Bottleneck(Expert):
    """down (m x d_in) -> activation -> up (d_out x m); up starts at zero."""

    def __init__(self, d_in: int, d_out: int, bottleneck: int, activation: str, scale: float) -> None:
        super().__init__()
        self.down = nn.Linear(d_in, bottleneck)  # (m, I)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        self.up = nn.Linear(bottleneck, d_out)  # (O, m)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.activation = activation
        self.scale = scale

    def group_key(self) -> tuple[object, ...]:
        return (type(self), self.activation)

    def delta(self, u: Tensor) -> Tensor:
        return self.up(_ACTIVATIONS[self.activation](self.down(u))) * self.scale  # (B, T, O)

    @classmethod
    def stack(cls, experts: Sequence[Expert | None]) -> Stack:
        ref = next(e for e in experts if isinstance(e, _Bottleneck))
        m = max(e.down.out_features for e in experts if isinstance(e, _Bottleneck))
        E, d_in, d_out = len(experts), ref.down.in_features, ref.up.out_features
        t = {
            "down": ref.down.weight.new_zeros(E, m, d_in),  # (E, m, I)
            "down_b": ref.down.weight.new_zeros(E, m),  # (E, m); zero rows stay zero: f(0) = 0
            "up": ref.up.weight.new_zeros(E, d_out, m),  # (E, O, m)
            "up_b": ref.up.weight.new_zeros(E, d_out),  # (E, O)
        }
        for i, e in enumerate(experts):
            if isinstance(e, _Bottleneck):
                w = e.down.out_features
                t["down"][i, :w] = e.down.weight
                t["down_b"][i, :w] = e.down.bias
                t["up"][i, :, :w] = e.up.weight * e.scale
                t["up_b"][i] = e.up.bias * e.scale
        return Stack(t, ref.activation)

    @staticmethod
    def _gathered_delta(u: Tensor, stack: Stack, index: Tensor, weight: Tensor) -> Tensor:
        act = _ACTIVATIONS[stack.activation]
        uf = _flat(u)  # (B, T, I)
        z = torch.einsum("bti,bkmi->btkm", uf, stack["down"][index])  # (B, T, k, m)
        z = act(z + stack["down_b"][index][:, None])  # (B, T, k, m)
        w = _weights(weight)  # (B, 1|T, k)
        delta = torch.einsum("btkm,bkom->bto", z * w[..., None], stack["up"][index])  # (B, T, O)
        delta = delta + torch.einsum("btk,bko->bto", w, stack["up_b"][index])  # (B, T, O)
        return delta


class ParallelAdapterExpert(_Bottleneck):
    """Bottleneck beside the wrapped sub-layer: ``h + s * up(f(down(x)))``."""

    side: ClassVar[str] = "input"

    def __init__(self, d_in: int, d_out: int, cfg: ParallelAdapterConfig) -> None:
        super().__init__(d_in, d_out, cfg.bottleneck, cfg.activation, cfg.scale)

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        return h + self.delta(x)

    @staticmethod
    def gathered(x: Tensor, h: Tensor, stack: Stack, index: Tensor, weight: Tensor) -> Tensor:
        return h + _Bottleneck._gathered_delta(x, stack, index, weight).reshape(h.shape)


class SerialAdapterExpert(_Bottleneck):
    """Bottleneck after the wrapped output projection, with a residual: ``h + up(f(down(h)))``."""

    side: ClassVar[str] = "output"

    def __init__(self, d_in: int, d_out: int, cfg: AdapterConfig) -> None:
        super().__init__(d_out, d_out, cfg.bottleneck, cfg.activation, 1.0)

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        return h + self.delta(h)

    @staticmethod
    def gathered(x: Tensor, h: Tensor, stack: Stack, index: Tensor, weight: Tensor) -> Tensor:
        return h + _Bottleneck._gathered_delta(h, stack, index, weight).reshape(h.shape)


def make_expert(d_in: int, d_out: int, cfg: LoRAConfig | AdapterConfig | ParallelAdapterConfig,
                *, shared_A: nn.Parameter | None = None) -> Expert:
    """The expert class for ``cfg.kind``."""
    if isinstance(cfg, LoRAConfig):
        return LoRAExpert(d_in, d_out, cfg, shared_A=shared_A)
    if shared_A is not None:
        raise ValueError(f"a shared A is only for LoRA experts, not {cfg.kind!r}")
    if isinstance(cfg, AdapterConfig):
        return SerialAdapterExpert(d_in, d_out, cfg)
    if isinstance(cfg, ParallelAdapterConfig):
        return ParallelAdapterExpert(d_in, d_out, cfg)
    raise TypeError(f"unknown method config {cfg!r}")
