"""``AdaptedLinear``: a frozen linear sub-layer wrapped (never subclassed) with name-keyed experts.

Letters in shape comments: B batch, T tokens, I input features, O output features, E experts in
the model's expert order, k experts per example.

The wrapped module stays as ``self.base``, the same object, untouched: ``nn.Linear`` (weight
``(O, I)``) or GPT-2's ``Conv1D`` (weight ``(I, O)``). Experts live in ``self.experts``, a
``ModuleDict`` keyed by task name; a shared-A LoRA group keeps its A once per layer in
``self.shared_A[group]`` and every task-B expert of the group holds that same Parameter.

Forward reads the model's :class:`~adaptbank.routing.state.RoutingState`:

* one active expert for the batch: ``h + expert(x)`` directly (the cost of one expert);
* per-example (or per-token) experts: every expert group is stacked once into padded tensors over
  the expert order, and the k selected experts are gathered per example and applied in two batched
  matmuls, so a forward costs what the selected experts cost, not what the bank holds (the Punica /
  S-LoRA gathered matmul). Stacks of frozen experts are cached and rebuilt only when the expert set
  or a parameter changes (``Tensor._version`` counts in-place updates).

Several kinds may share one layer (LoRA and (IA)^3 on v, a serial adapter and (IA)^3 on the
feed-forward output, BitFit everywhere). Per forward the layer applies them by side
(``core.experts.SIDES``), each mixed over the row's k experts with its weights w::

    x_b = x * (1 + sum_k w_k (l_k - 1))           pre:    (IA)^3 input scales
    h   = base(x_b)                                one base matmul
    h   = h * (1 + sum_k w_k (l_k - 1))           scale:  (IA)^3 output scales, on the base output (bias
                                                           included), as peft does
    h   = h + sum_k w_k delta_k(x)                input:  LoRA, parallel adapters and BitFit read the
                                                           unscaled x, so their deltas do not depend on
                                                           another expert's scale
    h   = h + sum_k w_k up_k(f(down_k(h)))        output: serial adapters read h after all the above

A row with one expert (k = 1, w = 1) therefore gets exactly its single-task output: every other kind's
term is the identity (a zero shift, a zero delta). The single-expert path computes
``expert(x, base(expert.before(x)))``. A combined task (``lora+adapter``, ``bitfit+lora``) holds a
``core.composed.ComposedExpert`` per layer whose parts apply in this same order, and join their kinds'
stacks on the gathered path (at most one part of each expert class per layer and task).

Merge folds one LoRA, BitFit or (IA)^3 expert (or a composition of them) into the base weight and bias, computed in fp32, and is
recorded in ``self.merged``; a second merge, or a merge while rows mix experts, is refused. The merged
weight and bias are new tensors and the original objects are kept aside (a bias that was None stays
None after ``unmerge``), so ``unmerge`` restores them exactly and a merge never writes into frozen
weights that another model may share (``core.records.share_frozen``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from adaptbank.core.composed import ComposedExpert, expert_parts
from adaptbank.core.config import AdapterConfig, BitFitConfig, IA3Config, LoRAConfig, ParallelAdapterConfig
from adaptbank.core.experts import SIDES, Expert, LoRAExpert, Stack, make_expert
from adaptbank.routing.state import RoutingState

__all__ = ["AdaptedLinear", "ZeroBase", "IdentityBase", "is_adaptable", "linear_shape"]

try:  # GPT-2 family projections
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers always ships it today
    Conv1D = ()  # type: ignore[assignment,misc]


def is_adaptable(module: nn.Module) -> bool:
    """True for the layer types an expert can wrap: ``nn.Linear``, GPT-2's ``Conv1D``, a quantised linear."""
    return isinstance(module, nn.Linear) or (bool(Conv1D) and isinstance(module, Conv1D)) or _is_quantized(module)


class ZeroBase(nn.Module):
    """The base of an adapted layer that runs beside a whole block (``core.block.AdaptedBlock``) rather
    than beside one linear: ``x (B, T, D) -> 0 (B, T, D)``, so the layer returns its experts' delta alone.
    It holds no parameters; an empty buffer carries the device and dtype (``.weight``) experts are made in."""

    def __init__(self, width: int, *, like: Tensor) -> None:
        super().__init__()
        self.in_features = self.out_features = width
        self.register_buffer("anchor", like.new_zeros(0), persistent=False)
        self.bias = None

    @property
    def weight(self) -> Tensor:
        return self.anchor

    def forward(self, x: Tensor) -> Tensor:
        return x.new_zeros(*x.shape[:-1], self.out_features)  # (B, T, D)


class IdentityBase(ZeroBase):
    """The base of the adapted layer that runs after a whole post-LN block (``AdaptedBlock.after``):
    ``y (B, T, D) -> y``, the same tensor object, so serial adapters on it return ``y + delta(y)`` and a
    forward with no expert active returns ``y`` itself (which the block tests with ``is``)."""

    def forward(self, x: Tensor) -> Tensor:
        return x  # (B, T, D)


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """``(d_in, d_out)`` of a Linear, Conv1D, quantised linear or :class:`ZeroBase`."""
    if isinstance(module, (nn.Linear, ZeroBase)):
        return module.in_features, module.out_features
    if bool(Conv1D) and isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    if _is_quantized(module):
        return module.in_features, module.out_features
    raise TypeError(f"can only adapt nn.Linear or Conv1D, got {type(module).__name__}")


def _is_quantized(module: nn.Module) -> bool:
    """A weight-only quantised linear (``core.quantize.QuantizedLinear``, which sits above this module, so
    it is recognised by its methods): computes ``x W^T + b`` with ``W = dequantized_weight()`` ``(O, I)``,
    and merges a delta by ``requantized(delta)``, a new layer (see ``_merge_weight``)."""
    return callable(getattr(module, "dequantized_weight", None)) and callable(getattr(module, "requantized", None))


class AdaptedLinear(nn.Module):
    """A frozen Linear/Conv1D plus experts keyed by task name, mixed by the shared routing state."""

    transparent_child = "base"
    """The wrapped module's attribute name; fingerprints look through it."""

    def __init__(self, base: nn.Module, state: RoutingState) -> None:
        super().__init__()
        self.d_in, self.d_out = linear_shape(base)
        self.base = base
        self.experts = nn.ModuleDict()
        self.shared_A = nn.ParameterDict()
        self.state = state  # a plain object: not registered as a submodule
        self.merged: str | None = None
        self._unmerged: tuple[nn.Parameter, nn.Parameter | None] | nn.Module | None = None
        """The base weight and bias objects as they were before ``merge`` (merged ones are new tensors);
        for a quantised base the whole layer."""
        self.token_gate: nn.Linear | None = None
        """Token-level router gate ``(E, I)`` over the model's expert order (see ``routing.token``)."""
        self.gate_probs: Tensor | None = None
        """``(B, T, E)`` probabilities of the token gate in the last token-gated forward: an output of that
        forward, read back by ``routing.token`` (None before one)."""
        self._stack_key: tuple[object, ...] | None = None
        self._stacks: list[tuple[type[Expert], Stack]] = []
        self._stack_params: list[nn.Parameter] = []

    @property
    def weight(self) -> Tensor:
        """The base weight: model code such as T5's reads ``.weight`` of the layers it calls."""
        return self.base.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base.bias

    # ----------------------------------------------------------------------------- experts
    def add_expert(self, name: str, cfg: LoRAConfig | AdapterConfig | ParallelAdapterConfig | BitFitConfig | IA3Config,
                   *, shared_group: str | None = None, feedforward: bool = False) -> Expert:
        """Create the expert for task ``name``; ``shared_group`` makes a LoRA task-B expert;
        ``feedforward`` makes an (IA)^3 expert scale this layer's input instead of its output."""
        if name in self.experts:
            raise KeyError(f"expert {name!r} already exists in this layer")
        self._check_beside(cfg)
        shared = None
        if shared_group is not None:
            if not isinstance(cfg, LoRAConfig):
                raise ValueError(f"--share-a works with LoRA only, not {cfg.kind!r}")
            if shared_group not in self.shared_A:
                first = LoRAExpert(self.d_in, self.d_out, cfg)  # Kaiming-initialised A for the group
                self.shared_A[shared_group] = first.A
            shared = self.shared_A[shared_group]
        expert = make_expert(self.d_in, self.d_out, cfg, shared_A=shared, feedforward=feedforward)
        expert.to(device=self.base.weight.device, dtype=self.base.weight.dtype)
        if shared is not None:
            expert.A = shared  # keep the one object after .to()
        self.experts[name] = expert
        self._stack_key = None
        return expert

    def add_parts(self, name: str, parts: dict[int, tuple[LoRAConfig | AdapterConfig | ParallelAdapterConfig | BitFitConfig
                                                        | IA3Config, bool]]) -> ComposedExpert:
        """Create combined task ``name``'s parts on this layer: ``{part index: (config, feedforward)}``, made
        in index order and held as one :class:`~adaptbank.core.composed.ComposedExpert`."""
        if name in self.experts:
            raise KeyError(f"expert {name!r} already exists in this layer")
        for cfg, _ in parts.values():
            self._check_beside(cfg)
        made = {i: make_expert(self.d_in, self.d_out, cfg, feedforward=ff) for i, (cfg, ff) in sorted(parts.items())}
        expert = ComposedExpert(made, {i: cfg.kind for i, (cfg, _) in parts.items()})
        self.experts[name] = expert.to(device=self.base.weight.device, dtype=self.base.weight.dtype)
        self._stack_key = None
        return expert

    def _check_beside(self, cfg: object) -> None:
        """Beside a whole block (a :class:`ZeroBase`) only a parallel adapter has a meaning, after one (an
        :class:`IdentityBase`) only a serial adapter."""
        if isinstance(self.base, IdentityBase):
            if not isinstance(cfg, AdapterConfig):
                raise ValueError(f"this layer runs after a whole feed-forward block's LayerNorm, where only a serial "
                                 f"adapter goes (targets pfeiffer-block); got {getattr(cfg, 'kind', cfg)!r}")
        elif isinstance(self.base, ZeroBase) and not isinstance(cfg, ParallelAdapterConfig):
            raise ValueError(f"this layer runs beside a whole feed-forward block, where only a parallel adapter "
                             f"goes (targets ffn-block); got {getattr(cfg, 'kind', cfg)!r}")

    def set_shared(self, group: str, A: Tensor) -> None:
        """Hold a shared A ``(r, I)`` for ``group`` (frozen), e.g. loaded from a bank."""
        if A.dim() != 2 or A.shape[1] != self.d_in:
            raise ValueError(f"shared A of group {group!r} has shape {tuple(A.shape)}, expected (r, {self.d_in})")
        weight = self.base.weight
        self.shared_A[group] = nn.Parameter(A.detach().clone().to(weight.device, weight.dtype), requires_grad=False)

    def remove_expert(self, name: str) -> None:
        if self.merged == name:
            raise RuntimeError(f"expert {name!r} is merged into the base weights; unmerge() first")
        expert = self.experts.pop(name)
        self._stack_key = None
        for group, A in list(self.shared_A.items()):
            users = [e for e in self.experts.values() if isinstance(e, LoRAExpert) and e.A is A]
            if isinstance(expert, LoRAExpert) and expert.A is A and not users:
                del self.shared_A[group]

    # ----------------------------------------------------------------------------- forward
    def forward(self, x: Tensor) -> Tensor:
        st = self.state
        if self.merged is not None:
            if st.active not in (None, self.merged) or st.mixing:
                raise RuntimeError(f"expert {self.merged!r} is merged into the base weights; "
                                   "unmerge() before routing to other experts")
            return self.base(x)  # (B, T, O)
        if st.active is not None:
            expert = self.experts[st.active] if st.active in self.experts else None
            if expert is None:
                return self.base(x)  # (B, T, O)
            return expert(x, self.base(expert.before(x)))  # (B, T, O)
        if st.token and self.token_gate is not None and len(self.experts):
            probs = self.token_gate(x).float().softmax(-1)  # (B, T, E)
            self.gate_probs = probs
            index = torch.arange(probs.shape[-1], device=x.device).expand(probs.shape[0], -1)  # (B, E)
            return self._mixed(x, index, probs.to(x.dtype))
        if st.index is None or len(self.experts) == 0:
            return self.base(x)  # (B, T, O)
        return self._mixed(x, st.index, st.weight.to(x.dtype))  # type: ignore[union-attr]

    def _mixed(self, x: Tensor, index: Tensor, weight: Tensor) -> Tensor:
        """Per-example experts ``index (B, k)`` weighted ``(B, k)`` or ``(B, T, k)``, side by side
        in the order of the module docstring."""
        stacks = self._current_stacks()
        xb = x
        for kind, stack in stacks:
            if kind.side == "pre":
                xb = kind.gathered_before(xb, stack, index, weight)  # (B, T, I)
        h = self.base(xb)  # (B, T, O)
        for kind, stack in stacks:
            h = kind.gathered(x, h, stack, index, weight)  # (B, T, O)
        return h

    def _current_stacks(self) -> list[tuple[type[Expert], Stack]]:
        """Stacks of every expert group over the expert order, cached while nothing changes.

        The cache key is the expert order, its version, and each expert parameter's identity,
        storage and in-place version counter: one pass over a flat list kept with the cache (walking
        the module tree on every forward cost 6 ms per layer with 512 experts). Under ``torch.compile``
        the stacks are built from the parameters on every call instead: the stacking becomes part of
        the traced graph (dynamo cannot trace the storage comparison, and the graph's guards already
        watch the parameters)."""
        if torch.compiler.is_compiling():
            return self._build_stacks(torch.is_grad_enabled())
        params = self._stack_params if self._stack_key is not None else list(self.experts.parameters())
        trains = torch.is_grad_enabled() and any(p.requires_grad for p in params)
        key = (self.state.version, self.state.experts, tuple((p._version, p.data_ptr()) for p in params))
        if not trains and key == self._stack_key:
            return self._stacks
        params = list(self.experts.parameters())
        trains = torch.is_grad_enabled() and any(p.requires_grad for p in params)
        stacks = self._build_stacks(trains)
        if not trains:
            key = (self.state.version, self.state.experts, tuple((p._version, p.data_ptr()) for p in params))
            self._stack_key, self._stacks, self._stack_params = key, stacks, params
        else:
            self._stack_key, self._stacks, self._stack_params = None, [], []
        return stacks

    def _build_stacks(self, trains: bool) -> list[tuple[type[Expert], Stack]]:
        """One stack per expert group over the expert order, in the docstring's side order."""
        groups: dict[tuple[object, ...], list[Expert | None]] = {}
        order = self.state.experts
        for i, name in enumerate(order):
            if name in self.experts:  # a combined task's parts join their kinds' stacks, one row each
                for _, e in expert_parts(self.experts[name]):  # type: ignore[arg-type]
                    groups.setdefault(e.group_key(), [None] * len(order))[i] = e
        stacks = []
        with torch.set_grad_enabled(trains):
            for members in groups.values():
                kind = type(next(m for m in members if m is not None))
                stacks.append((kind, kind.stack(members)))
        stacks.sort(key=lambda s: SIDES.index(s[0].side))  # pre, scale, input, output: see the docstring
        return stacks

    # ----------------------------------------------------------------------------- merge
    def merge(self, name: str) -> None:
        """Fold expert ``name`` (LoRA, BitFit or (IA)^3) into the base weight and bias (fp32 arithmetic)."""
        if self.merged is not None:
            raise RuntimeError(f"expert {self.merged!r} is already merged; unmerge() before merging {name!r}")
        if self.state.mixing:
            raise RuntimeError("cannot merge while gates mix several experts per example; route one task first")
        if name not in self.experts:
            raise KeyError(f"no expert {name!r} in this layer; it holds: {', '.join(self.experts) or 'none'}")
        self._merge_weight(name)
        self.merged = name

    def unmerge(self) -> None:
        """Put the original base weight and bias objects back (exactly); a no-op when nothing is merged."""
        if self.merged is None:
            return
        if isinstance(self._unmerged, nn.Module):  # a quantised base (see _merge_weight)
            self.base = self._unmerged
        else:
            self.base.weight, self.base.bias = self._unmerged  # type: ignore[misc]
        self._unmerged, self.merged = None, None

    def _merge_weight(self, name: str) -> None:
        expert: Expert = self.experts[name]  # type: ignore[assignment]
        if _is_quantized(self.base):  # dequantise, merge, re-quantise: a new layer; the old one kept aside whole
            W = self.base.dequantized_weight()  # (O, I)
            with torch.no_grad():
                weight, bias = expert.merged(W, self.base.bias, transposed=False)
                delta = torch.zeros_like(W, dtype=torch.float32) if weight is None else weight.float() - W.float()
            merged = self.base.requantized(delta)
            if bias is not None:
                merged.bias = nn.Parameter(bias.to(W.dtype), requires_grad=False)
            self._unmerged, self.base = self.base, merged
            return
        W, b = self.base.weight, self.base.bias
        with torch.no_grad():  # Conv1D stores (I, O)
            weight, bias = expert.merged(W, b, transposed=not isinstance(self.base, nn.Linear))
        self._unmerged = (W, b)
        if weight is not None:
            self.base.weight = nn.Parameter(weight.to(W.dtype), requires_grad=False)
        if bias is not None:
            self.base.bias = nn.Parameter(bias.to(W.dtype if b is None else b.dtype), requires_grad=False)

    # ----------------------------------------------------------------------------- state
    def expert_state(self, name: str) -> dict[str, Tensor]:
        """The tensors of expert ``name`` (a shared A excluded), keys free of the task name."""
        expert = self.experts[name]
        out = {k: v for k, v in expert.state_dict().items()}
        if isinstance(expert, LoRAExpert) and any(expert.A is A for A in self.shared_A.values()):
            out.pop("A")
        return out

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, d_out={self.d_out}, experts={list(self.experts)}, merged={self.merged!r}"
