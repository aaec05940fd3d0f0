"""Task experts: small modules that add a learned change to one wrapped linear sub-layer.

Letters used in shape comments: B batch, T tokens, I input features, O output features, E experts
stacked for a layer, k experts selected per example, r LoRA rank, m bottleneck width.

Every expert kind honours one contract, so the router can mix any of them:

* ``expert(x, base(expert.before(x))) -> h'`` is the single-expert path. ``x`` is the wrapped layer's
  input ``(B, T, I)`` and ``h`` its output ``(B, T, O)``; the expert returns ``h`` with its own change.
  ``before`` is the identity except for ``pre`` experts, which change the input of the base matmul.
* ``Kind.stack(experts)`` packs a list of experts (``None`` for "no expert here") into padded
  tensors, and ``Kind.gathered(x, h, stack, index, weight)`` (``Kind.gathered_before(x, ...)`` for
  ``pre`` kinds) applies, per example, the k experts named by ``index (B, k)`` weighted by
  ``weight (B, k)`` or per token ``(B, T, k)``: one gather and at most two batched matmuls whatever
  the number of experts held, with no Python loop over experts. The gathered path applies no expert
  dropout; it is the path for inference and for training routers over frozen experts.
* ``expert.merged(W, b, transposed=...)`` folds the expert into a linear layer's weight and bias
  (LoRA, BitFit, (IA)^3); the bottleneck adapters cannot be folded and raise ``TypeError``.

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
* :class:`BitFitExpert` (Ben Zaken et al. 2021, https://arxiv.org/abs/2106.10199)::

      h' = h + b_task                   b_task: (O,) zero; a layer without a base bias gets the delta alone

* :class:`IA3Expert` and :class:`IA3InputExpert` ((IA)^3, Liu et al. 2022, https://arxiv.org/abs/2205.05638)::

      h' = l * h = l * (W x + b)        keys and values: the base output, bias included, is scaled (as peft)
      h' = W (l * x) + b                the feed-forward output projection: its input is scaled, before the
                                        base matmul (one matmul, not a second one)        l: ones

Each kind says where it acts by ``side``, and a layer applies the sides in this order (see
``core.adapted``): ``pre`` (scale x) -> base -> ``scale`` (scale the base output) -> ``input`` (add a
delta that reads x) -> ``output`` (add a delta that reads h). Mixed per example, a multiplicative kind
applies the weighted scale ``1 + sum_k w_k (l_k - 1)`` once, an additive kind the weighted sum of its
deltas ``sum_k w_k delta_k``.

Up-projections, B and bias deltas start at zero and scales at one, so a new expert leaves the model's
outputs bit-identical.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adaptbank.core.config import AdapterConfig, BitFitConfig, IA3Config, LoRAConfig, ParallelAdapterConfig

__all__ = ["Expert", "LoRAExpert", "ParallelAdapterExpert", "SerialAdapterExpert", "BitFitExpert", "IA3Expert",
           "IA3InputExpert", "Stack", "SIDES", "expert_class", "make_expert"]

SIDES: tuple[str, ...] = ("pre", "scale", "input", "output")
"""Where an expert acts, in the order a layer applies them (see the module docstring)."""



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
    """One of :data:`SIDES`: ``pre`` experts change x before the base matmul, ``scale`` experts scale
    the base output, ``input`` experts add a delta read from x, ``output`` experts one read from h."""

    def group_key(self) -> tuple[object, ...]:
        """Experts with equal keys can be stacked together in one gathered matmul."""
        return (type(self),)

    def before(self, x: Tensor) -> Tensor:
        """The input the base layer sees: ``x`` itself except for ``pre`` experts."""
        return x

    @classmethod
    def stack(cls, experts: Sequence[Expert | None]) -> Stack:
        raise NotImplementedError

    @staticmethod
    def gathered(x: Tensor, h: Tensor, stack: Stack, index: Tensor, weight: Tensor) -> Tensor:
        raise NotImplementedError

    @staticmethod
    def gathered_before(x: Tensor, stack: Stack, index: Tensor, weight: Tensor) -> Tensor:
        """The per-example input of the base layer (``pre`` kinds only)."""
        return x

    def merged(self, weight: Tensor, bias: Tensor | None, *, transposed: bool) -> tuple[Tensor | None, Tensor | None]:
        """The base ``weight`` and ``bias`` with this expert folded in, as new fp32 tensors (None: that
        tensor is unchanged); ``transposed`` for a weight stored ``(I, O)`` (GPT-2's Conv1D). Kinds that
        cannot be folded into a linear layer (the bottleneck adapters) raise ``TypeError``."""
        raise TypeError(f"{type(self).__name__} cannot be merged into the base weights")


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
        """``h + s (x A^T) B^T`` as one ``addmm`` over the flattened tokens: the base output is read once and
        no ``(B, T, O)`` temporary is made; without autograd it accumulates into ``h`` in place (``h`` is the
        wrapped layer's fresh output, or an earlier part's, owned by this forward)."""
        z = self.dropout(x) @ self.A.T  # (B, T, r)
        flat, zf = h.reshape(-1, h.shape[-1]), z.reshape(-1, z.shape[-1])  # (B*T, O), (B*T, r)
        if torch.is_grad_enabled():
            return torch.addmm(flat, zf, self.B.T, alpha=self.scaling).view(h.shape)  # (B, T, O)
        return flat.addmm_(zf, self.B.T, alpha=self.scaling).view(h.shape)  # (B, T, O)

    def delta_weight(self) -> Tensor:
        """The dense update ``(alpha/r) B A`` of shape (O, I), in fp32 (used by merge only)."""
        return (self.B.float() @ self.A.float()) * self.scaling  # (O, I)

    def merged(self, weight: Tensor, bias: Tensor | None, *, transposed: bool) -> tuple[Tensor | None, Tensor | None]:
        """``W + (alpha/r) B A``; the bias is unchanged."""
        delta = self.delta_weight()  # (O, I) fp32
        return weight.float() + (delta.T if transposed else delta), None  # (O, I) or Conv1D's (I, O)

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
        delta = torch.einsum("btkr,bkor->bto", z, stack["B"][index]).reshape(h.shape)  # (B, T, O)
        return h + delta if torch.is_grad_enabled() else h.add_(delta)  # in place: h is this forward's own


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


class BitFitExpert(Expert):
    """A task bias delta ``h + delta`` (O,), zero at first; stored apart from the frozen base bias."""

    side: ClassVar[str] = "input"  # additive; it reads neither x nor h

    def __init__(self, d_in: int, d_out: int, cfg: BitFitConfig) -> None:
        super().__init__()
        self.delta = nn.Parameter(torch.zeros(d_out))  # (O,)

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        return h + self.delta  # (B, T, O)

    def merged(self, weight: Tensor, bias: Tensor | None, *, transposed: bool) -> tuple[Tensor | None, Tensor | None]:
        """``b + delta``; a layer without a bias gets the delta as its bias."""
        delta = self.delta.float()  # (O,)
        return None, delta.clone() if bias is None else bias.float() + delta

    @classmethod
    def stack(cls, experts: Sequence[Expert | None]) -> Stack:
        ref = next(e for e in experts if isinstance(e, BitFitExpert))
        delta = ref.delta.new_zeros(len(experts), ref.delta.shape[0])  # (E, O)
        for i, e in enumerate(experts):
            if isinstance(e, BitFitExpert):
                delta[i] = e.delta
        return Stack({"delta": delta})

    @staticmethod
    def gathered(x: Tensor, h: Tensor, stack: Stack, index: Tensor, weight: Tensor) -> Tensor:
        delta = torch.einsum("btk,bko->bto", _weights(weight), stack["delta"][index])  # (B, 1|T, O)
        return (_flat(h) + delta).reshape(h.shape)


class _Scaling(Expert):
    """A learned vector ``l`` (ones at first) that multiplies a layer's output or input."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(width))  # (O,) or (I,)

    @classmethod
    def stack(cls, experts: Sequence[Expert | None]) -> Stack:
        """``l - 1`` per expert, zero (scale one) for rows of other experts: a weighted sum stays exact."""
        ref = next(e for e in experts if isinstance(e, _Scaling))
        shift = ref.scale.new_zeros(len(experts), ref.scale.shape[0])  # (E, O|I)
        for i, e in enumerate(experts):
            if isinstance(e, _Scaling):
                shift[i] = e.scale - 1
        return Stack({"shift": shift})

    @staticmethod
    def _gathered_scale(stack: Stack, index: Tensor, weight: Tensor) -> Tensor:
        """``1 + sum_k w_k (l_k - 1)``: one scale per example (or token), applied once."""
        return 1 + torch.einsum("btk,bkd->btd", _weights(weight), stack["shift"][index])  # (B, 1|T, O|I)


class IA3Expert(_Scaling):
    """(IA)^3 on a layer's output (keys, values): ``l * (W x + b)``, bias included as in peft."""

    side: ClassVar[str] = "scale"

    def __init__(self, d_in: int, d_out: int, cfg: IA3Config) -> None:
        super().__init__(d_out)

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        return h * self.scale  # (B, T, O)

    def merged(self, weight: Tensor, bias: Tensor | None, *, transposed: bool) -> tuple[Tensor | None, Tensor | None]:
        """``W' = diag(l) W`` and ``b' = l * b``."""
        s = self.scale.float()  # (O,)
        w = weight.float() * (s[None, :] if transposed else s[:, None])  # (I, O) or (O, I)
        return w, None if bias is None else bias.float() * s

    @staticmethod
    def gathered(x: Tensor, h: Tensor, stack: Stack, index: Tensor, weight: Tensor) -> Tensor:
        return (_flat(h) * _Scaling._gathered_scale(stack, index, weight)).reshape(h.shape)  # (B, T, O)


class IA3InputExpert(_Scaling):
    """(IA)^3 on the feed-forward output projection: ``W (l * x) + b``, the input scaled before the
    base matmul (the intermediate activation ``f(W_in x)`` of the paper)."""

    side: ClassVar[str] = "pre"

    def __init__(self, d_in: int, d_out: int, cfg: IA3Config) -> None:
        super().__init__(d_in)

    def before(self, x: Tensor) -> Tensor:
        return x * self.scale  # (B, T, I)

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        return h  # the work is done in ``before``

    def merged(self, weight: Tensor, bias: Tensor | None, *, transposed: bool) -> tuple[Tensor | None, Tensor | None]:
        """``W' = W diag(l)``; the bias is unchanged."""
        s = self.scale.float()  # (I,)
        return weight.float() * (s[:, None] if transposed else s[None, :]), None  # (I, O) or (O, I)

    @staticmethod
    def gathered(x: Tensor, h: Tensor, stack: Stack, index: Tensor, weight: Tensor) -> Tensor:
        return h

    @staticmethod
    def gathered_before(x: Tensor, stack: Stack, index: Tensor, weight: Tensor) -> Tensor:
        return (_flat(x) * _Scaling._gathered_scale(stack, index, weight)).reshape(x.shape)  # (B, T, I)


def expert_class(cfg: LoRAConfig | AdapterConfig | ParallelAdapterConfig | BitFitConfig | IA3Config, *,
                 feedforward: bool = False) -> type[Expert]:
    """The expert class for ``cfg.kind``; ``feedforward`` puts an (IA)^3 scale on the layer's input."""
    if isinstance(cfg, IA3Config):
        return IA3InputExpert if feedforward else IA3Expert
    if feedforward:
        raise ValueError(f"feedforward (input) scaling is only for ia3 experts, not {cfg.kind!r}")
    kinds: dict[type, type[Expert]] = {LoRAConfig: LoRAExpert, BitFitConfig: BitFitExpert,
                                       AdapterConfig: SerialAdapterExpert, ParallelAdapterConfig: ParallelAdapterExpert}
    if type(cfg) not in kinds:
        raise TypeError(f"no linear expert for method config {cfg!r}")
    return kinds[type(cfg)]


def make_expert(d_in: int, d_out: int, cfg: LoRAConfig | AdapterConfig | ParallelAdapterConfig | BitFitConfig | IA3Config,
                *, shared_A: nn.Parameter | None = None, feedforward: bool = False) -> Expert:
    """A new expert of :func:`expert_class`; ``shared_A`` makes a LoRA task-B expert."""
    cls = expert_class(cfg, feedforward=feedforward)
    if shared_A is not None:
        if cls is not LoRAExpert:
            raise ValueError(f"a shared A is only for LoRA experts, not {cfg.kind!r}")
        return LoRAExpert(d_in, d_out, cfg, shared_A=shared_A)  # type: ignore[arg-type]
    return cls(d_in, d_out, cfg)  # type: ignore[call-arg]
