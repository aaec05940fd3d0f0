"""Frozen, validated configuration dataclasses.

Every config is ``@dataclass(frozen=True, kw_only=True)``, validated in ``__post_init__`` (errors
name the bad value, the CLI flag and what is allowed), serialised with ``to_dict``/``from_dict``, and
``from_dict`` rejects unknown keys with the closest valid one. Each field is documented once, by the
attribute docstring under it.

A combination of methods in one task (:class:`CombinedConfig`, kind ``"lora+adapter"``: the parts'
kinds joined by ``+``) is written in a run spec's ``[method]`` table as one sub-table per part, in
order, each with its own fields (``kind`` of a part may be left out: the combined kind names it)::

    [method]
    kind = "lora+adapter"       # LoRA on q and v, a serial adapter on the feed-forward output
    [[method.parts]]
    rank = 4
    [[method.parts]]
    bottleneck = 16

or inline, ``parts = [{rank = 4}, {bottleneck = 16}]``; ``kind = "bitfit+lora"`` alone gives every part
its defaults. That is also the ``to_dict`` form (``{"kind": ..., "parts": [part.to_dict(), ...]}``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, get_args

from adaptbank.core.config_base import (  # re-exported: the names every config user imports from here
    NAME_RULE,
    TARGET_PRESETS,
    Activation,
    _check_layers,
    _check_targets,
    _choice,
    _Config,
    _positive,
    check_keys,
    validate_name,
)
from adaptbank.core.settings import ROUTER_POOLS, RouterConfig, TrainConfig  # re-exported, as the rest

__all__ = [
    "NAME_RULE",
    "RouterConfig",
    "ROUTER_POOLS",
    "validate_name",
    "LoRAConfig",
    "AdapterConfig",
    "ParallelAdapterConfig",
    "BitFitConfig",
    "IA3Config",
    "PromptTuningConfig",
    "PrefixConfig",
    "PTuningV2Config",
    "METHOD_KINDS",
    "PartConfig",
    "CombinedConfig",
    "combined_kinds",
    "MethodConfig",
    "TrainConfig",
    "method_from_dict",
    "resolve_positions",
    "stored_method",
    "PrefixPositions",
    "check_keys",
    "TARGET_PRESETS",
]

@dataclass(frozen=True, kw_only=True)
class LoRAConfig(_Config):
    """LoRA (Hu et al. 2021): ``h = W x + (alpha / r) * B (A x)``."""

    kind: ClassVar[str] = "lora"
    rank: int = 8
    """Rank r of the update (--rank)."""
    alpha: float = 16.0
    """Scale numerator: the update is multiplied by alpha / r (--alpha)."""
    dropout: float = 0.1
    """Dropout on the expert's input x before A (--dropout)."""
    targets: str | tuple[str, ...] = "qv"
    """A preset (qv, attn, all-linear, v) or explicit module-name regexes (--targets)."""
    layers: tuple[int, ...] | None = None
    """Transformer layers the targets are kept in, by index (negative: from the top; peft's
    ``layers_to_transform``); None: every layer the router leaves free (--layers)."""

    def __post_init__(self) -> None:
        _positive("rank", "--rank", self.rank, integer=True)
        _positive("alpha", "--alpha", self.alpha)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1) (--dropout), got {self.dropout!r}")
        _check_targets(self.targets)
        _check_layers(self.layers)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


@dataclass(frozen=True, kw_only=True)
class AdapterConfig(_Config):
    """Serial bottleneck adapter (Houlsby et al. 2019; Pfeiffer et al. 2021): ``h + up(f(down(h)))``; by default
    (``pfeiffer-block``) where the ``adapters`` library's ``SeqBnConfig`` puts it: on a post-LN model after the
    feed-forward block's LayerNorm, ``LN(r + up(f(down(LN(r)))))`` (``core.block``)."""

    kind: ClassVar[str] = "adapter"
    bottleneck: int = 64
    """Hidden size m of the bottleneck (--rank sets it from the CLI)."""
    activation: Activation = "relu"
    """Non-linearity between down- and up-projection."""
    targets: str | tuple[str, ...] = "pfeiffer-block"
    """pfeiffer-block (the feed-forward block's normalised output on post-LN models, its output projection on
    pre-LN ones), pfeiffer (on the feed-forward output projection, before the residual sum) or houlsby (after
    the attention output and the feed-forward output projections)."""
    layers: tuple[int, ...] | None = None
    """Transformer layers the targets are kept in, by index (negative: from the top; peft's
    ``layers_to_transform``); None: every layer the router leaves free (--layers)."""

    def __post_init__(self) -> None:
        _positive("bottleneck", "--rank", self.bottleneck, integer=True)
        _choice("activation", "--activation", self.activation, get_args(Activation))
        _check_targets(self.targets)
        _check_layers(self.layers)


@dataclass(frozen=True, kw_only=True)
class ParallelAdapterConfig(_Config):
    """Parallel adapter (He et al. 2021): ``FFN(x) + s * up(f(down(x)))`` beside the whole feed-forward block
    (``ffn-block``, where He et al. put it), or ``W x + s * up(f(down(x)))`` beside one linear sub-layer."""

    kind: ClassVar[str] = "parallel-adapter"
    bottleneck: int = 64
    """Hidden size m of the bottleneck (--rank sets it from the CLI)."""
    scale: float = 4.0
    """Fixed scale s of the adapter branch (He et al. use 4)."""
    activation: Activation = "relu"
    """Non-linearity between down- and up-projection."""
    targets: str | tuple[str, ...] = "ffn-block"
    """What to run beside: ``ffn-block`` the whole feed-forward block (reading the block's input, added to
    its output), or linear sub-layers (``ffn``: the feed-forward output projection; any preset or pattern)."""
    layers: tuple[int, ...] | None = None
    """Transformer layers the targets are kept in, by index (negative: from the top; peft's
    ``layers_to_transform``); None: every layer the router leaves free (--layers)."""

    def __post_init__(self) -> None:
        _positive("bottleneck", "--rank", self.bottleneck, integer=True)
        _positive("scale", "--scale", self.scale)
        _choice("activation", "--activation", self.activation, get_args(Activation))
        _check_targets(self.targets)
        _check_layers(self.layers)


@dataclass(frozen=True, kw_only=True)
class BitFitConfig(_Config):
    """BitFit (Ben Zaken et al. 2021): only bias terms train, stored as deltas ``h + b_task``."""

    kind: ClassVar[str] = "bitfit"
    targets: str | tuple[str, ...] = "all-linear"
    """Linear sub-layers whose bias trains, as a delta over the frozen bias (--targets)."""
    layers: tuple[int, ...] | None = None
    """Transformer layers the targets are kept in, by index (negative: from the top; peft's
    ``layers_to_transform``); None: every layer the router leaves free (--layers)."""

    def __post_init__(self) -> None:
        _check_targets(self.targets)
        _check_layers(self.layers)


@dataclass(frozen=True, kw_only=True)
class IA3Config(_Config):
    """(IA)^3 (Liu et al. 2022): learned scaling vectors ``l * k``, ``l * v`` and ``W_out (l * f(W_in x))``."""

    kind: ClassVar[str] = "ia3"
    targets: str | tuple[str, ...] = "ia3"
    """Sub-layers whose output (keys, values) or input (the feed-forward output projection) is scaled (--targets)."""
    feedforward: str | tuple[str, ...] = "ffn"
    """Of the targets, those scaled on their input: the feed-forward's intermediate activation (peft's
    ``feedforward_modules``)."""
    layers: tuple[int, ...] | None = None
    """Transformer layers the targets are kept in, by index (negative: from the top; peft's
    ``layers_to_transform``); None: every layer the router leaves free (--layers)."""

    def __post_init__(self) -> None:
        _check_targets(self.targets)
        _check_layers(self.layers)
        _check_targets(self.feedforward)


PromptInit = Literal["random", "vocab", "labels"]


@dataclass(frozen=True, kw_only=True)
class PromptTuningConfig(_Config):
    """Prompt-Tuning (Lester et al. 2021): a soft prompt of ``prompt_length`` vectors before the input embeddings."""

    kind: ClassVar[str] = "prompt"
    prompt_length: int = 20
    """Soft-prompt vectors prepended to the input (--prompt-length)."""
    prompt_init: PromptInit = "vocab"
    """random (N(0, embedding std)), vocab (embeddings of sampled vocabulary tokens) or labels (the
    embeddings of the task's class-label names, repeated to the length) (--prompt-init)."""

    def __post_init__(self) -> None:
        _positive("prompt_length", "--prompt-length", self.prompt_length, integer=True)
        _choice("prompt_init", "--prompt-init", self.prompt_init, get_args(PromptInit))

    @property
    def targets(self) -> tuple[str, ...]:
        """No linear sub-layer is wrapped: the prompt acts on the input embeddings."""
        return ()


PrefixPositions = Literal["auto", "from-zero", "after-prefix"]


@dataclass(frozen=True, kw_only=True)
class PrefixConfig(_Config):
    """Prefix-Tuning (Li and Liang 2021): ``prefix_length`` trainable key/value vectors in every attention
    layer, produced in training by an MLP over a small embedding and collapsed to plain prefixes after."""

    kind: ClassVar[str] = "prefix"
    prefix_length: int = 20
    """Key/value prefix vectors per attention layer (--prefix-length)."""
    reparam_hidden: int = 512
    """Hidden width of the reparameterisation MLP used during training (0: none, i.e. P-Tuning v2)."""
    positions: PrefixPositions = "auto"
    """Position ids of the real tokens: from-zero (0..T-1, as without a prefix; the adapters library's
    choice), after-prefix (P..P+T-1, as after a cache of length P; peft's), or auto: from-zero on encoders,
    after-prefix on decoders, fixed when the task is created (--prefix-positions)."""

    def __post_init__(self) -> None:
        _positive("prefix_length", "--prefix-length", self.prefix_length, integer=True)
        _choice("positions", "--prefix-positions", self.positions, get_args(PrefixPositions))
        if not isinstance(self.reparam_hidden, int) or isinstance(self.reparam_hidden, bool) or self.reparam_hidden < 0:
            raise ValueError(f"reparam_hidden must be an integer >= 0, got {self.reparam_hidden!r}")

    @property
    def targets(self) -> tuple[str, ...]:
        """No linear sub-layer is wrapped: prefixes join the keys and values inside attention."""
        return ()


@dataclass(frozen=True, kw_only=True)
class PTuningV2Config(PrefixConfig):
    """P-Tuning v2 (Liu et al. 2022): deep prompts on the keys and values of every layer, trained directly
    (a prefix without the reparameterisation MLP)."""

    kind: ClassVar[str] = "ptuning-v2"
    reparam_hidden: int = 0
    """Always 0: P-Tuning v2 trains the prefixes directly."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.reparam_hidden != 0:
            raise ValueError(f"ptuning-v2 has no reparameterisation; reparam_hidden must be 0, got {self.reparam_hidden!r} "
                             "(use method 'prefix' for the MLP)")


PartConfig = (LoRAConfig | AdapterConfig | ParallelAdapterConfig | BitFitConfig | IA3Config | PromptTuningConfig
              | PrefixConfig | PTuningV2Config)
"""A config of one method kind: a task's whole method, or one part of a :class:`CombinedConfig`."""
_METHODS: dict[str, type[_Config]] = {c.kind: c for c in (LoRAConfig, AdapterConfig, ParallelAdapterConfig, BitFitConfig,
                                                          IA3Config, PromptTuningConfig, PrefixConfig, PTuningV2Config)}
METHOD_KINDS: tuple[str, ...] = tuple(_METHODS)
"""Every single ``--method`` value; a combination joins several with ``+`` (:func:`combined_kinds`)."""
_VIRTUAL = (PromptTuningConfig, PrefixConfig)


def combined_kinds(kind: str) -> tuple[str, ...]:
    """The part kinds of a combined kind such as ``"lora+adapter"``; ``ValueError`` naming an unknown or
    empty part and the allowed kinds."""
    if not isinstance(kind, str) or "+" not in kind:
        raise ValueError(f"a combined method kind joins part kinds with '+' (e.g. lora+adapter), got {kind!r}")
    names = tuple(kind.split("+"))
    for name in names:
        if name not in _METHODS:
            raise ValueError(f"unknown part kind {name!r} in method {kind!r} (--method); allowed part kinds: "
                             f"{', '.join(_METHODS)}, joined by '+'")
    return names


@dataclass(frozen=True, kw_only=True)
class CombinedConfig(_Config):
    """Several methods in one task (issue 11, item 6): each part acts where its own config says (its
    targets, or the input sequence for a prompt/prefix part) under the one task name, and the task is
    stored, loaded and routed as one. Where parts meet on one wrapped sub-layer they compose in the order
    of ``core.adapted``: input scaling, base, output scaling, additive deltas, serial adapter
    (``core.composed``). The kind is the parts' kinds joined by ``+``, e.g. ``lora+adapter``."""

    parts: tuple[PartConfig, ...] = ()
    """The methods combined, in order: at least two, at most one prompt/prefix kind ([method] parts)."""

    def __post_init__(self) -> None:
        if isinstance(self.parts, list):
            object.__setattr__(self, "parts", tuple(self.parts))
        if not isinstance(self.parts, tuple) or len(self.parts) < 2:
            raise ValueError(f"a combined method needs at least two parts, got {self.parts!r}")
        for i, part in enumerate(self.parts):
            if isinstance(part, CombinedConfig):
                raise ValueError(f"part {i} of a combined method is itself combined ({part.kind!r}); list its parts instead")
            if type(part) not in _METHODS.values():
                raise ValueError(f"part {i} of a combined method must be a method config of kind "
                                 f"{', '.join(_METHODS)}, got {part!r}")
        virtual = [i for i, part in enumerate(self.parts) if isinstance(part, _VIRTUAL)]
        if len(virtual) > 1:
            a, b = (self.parts[i].kind for i in virtual[:2])
            raise ValueError(f"parts {virtual[0]} ({a}) and {virtual[1]} ({b}) of method {self.kind!r} are both "
                             "prompt/prefix kinds; a task holds at most one (they would share the task's one "
                             "virtual-token slot)")

    @property  # type: ignore[misc]
    def kind(self) -> str:  # type: ignore[override]
        return "+".join(part.kind for part in self.parts)

    @property
    def virtual_part(self) -> int | None:
        """Index of the prompt/prefix part, or None."""
        return next((i for i, part in enumerate(self.parts) if isinstance(part, _VIRTUAL)), None)

    @property
    def linear_parts(self) -> dict[int, PartConfig]:
        """The parts that wrap linear sub-layers, by index."""
        return {i: part for i, part in enumerate(self.parts) if not isinstance(part, _VIRTUAL)}

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "parts": [part.to_dict() for part in self.parts]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CombinedConfig:  # type: ignore[override]
        """From ``{"kind": "a+b", "parts": [{...}, {...}]}``: either key may be left out (``kind`` alone
        gives default parts; a part without ``kind`` takes it from its place in ``kind``)."""
        check_keys(data, ["kind", "parts"], "a combined [method]")
        kind, parts = data.get("kind"), data.get("parts")
        names = combined_kinds(kind) if kind is not None else None
        if parts is None:
            if names is None:
                raise ValueError("a combined method needs kind = 'a+b' (e.g. lora+adapter) or a parts list")
            parts = [{} for _ in names]
        if not isinstance(parts, (list, tuple)) or not all(isinstance(p, dict) for p in parts):
            raise ValueError(f"parts of a combined method must be a list of tables, got {parts!r}")
        if names is not None and len(names) != len(parts):
            raise ValueError(f"method kind {kind!r} names {len(names)} parts but parts lists {len(parts)}")
        built = []
        for i, part in enumerate(parts):
            given = part.get("kind", names[i] if names else None)
            if names is not None and given != names[i]:
                raise ValueError(f"part {i} has kind {given!r} but method kind {kind!r} puts {names[i]!r} there")
            if given not in _METHODS:
                raise ValueError(f"part {i} of a combined method needs a kind from {', '.join(_METHODS)}, got {given!r}")
            try:
                built.append(_METHODS[given].from_dict({**part, "kind": given}))
            except ValueError as err:
                raise ValueError(f"part {i} ({given}): {err}") from None
        return cls(parts=tuple(built))  # type: ignore[arg-type]


MethodConfig = PartConfig | CombinedConfig
"""Any task's method: one kind, or a combination."""


def resolve_positions(method: MethodConfig, decoder: bool) -> MethodConfig:
    """``method`` with a prefix's ``positions="auto"`` made concrete: after-prefix on a decoder (``decoder``),
    from-zero on an encoder; other methods and concrete positions are returned unchanged."""
    if isinstance(method, CombinedConfig):
        parts = tuple(resolve_positions(p, decoder) for p in method.parts)
        return method if parts == method.parts else dataclasses.replace(method, parts=parts)  # type: ignore[arg-type]
    if isinstance(method, PrefixConfig) and method.positions == "auto":
        return dataclasses.replace(method, positions="after-prefix" if decoder else "from-zero")
    return method


def stored_method(data: dict[str, Any]) -> MethodConfig:
    """The method config of a stored expert: :func:`method_from_dict`, where a prefix stored without
    ``positions`` (written before the field existed) keeps the after-prefix positions it was
    trained with."""
    def legacy(part: Any) -> Any:
        if isinstance(part, dict) and part.get("kind") in ("prefix", "ptuning-v2") and "positions" not in part:
            return {**part, "positions": "after-prefix"}
        return part

    if isinstance(data, dict) and isinstance(data.get("parts"), list):
        data = {**data, "parts": [legacy(p) for p in data["parts"]]}
    return method_from_dict(legacy(data))


def method_from_dict(data: dict[str, Any]) -> MethodConfig:
    """Build a method config from its ``to_dict`` form; ``kind`` selects the class (a kind with ``+``,
    or a ``parts`` list, a :class:`CombinedConfig`)."""
    kind = data.get("kind")
    if (isinstance(kind, str) and "+" in kind) or "parts" in data:
        return CombinedConfig.from_dict(data)
    if kind not in _METHODS:
        raise ValueError(f"method kind must be one of {', '.join(_METHODS)} (--method), or several joined by '+' "
                         f"(e.g. lora+adapter), got {kind!r}")
    return _METHODS[kind].from_dict(data)  # type: ignore[return-value]
