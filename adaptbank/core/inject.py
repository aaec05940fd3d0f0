"""Find target sub-layers of a Hugging Face model by preset or pattern, and wrap them.

Presets name roles (q, k, v, o, ffn_in, ffn_out, ffn_block, ffn_after); each model family maps roles to
module-name regexes, matched against the full dotted module path with ``re.search``. ``ffn_block`` is the
whole feed-forward block, whose target is ``<block>.beside`` (a ``core.block.AdaptedBlock``'s adapted layer,
made when the block is first targeted); only parallel adapters go there. ``ffn_after`` is where the
``adapters`` library puts its sequential bottleneck (``pfeiffer-block``): on a post-LN (BERT-family) block
``<block>.after``, after the block's LayerNorm (see ``core.block``); on the other families, whose FFN output
joins the residual stream unnormalised, the FFN output projection itself (the ``pfeiffer`` sub-layer).

Paths are *logical*: a wrapper (adapted layer, adapted block, router tap) names the module it wraps by
``transparent_child`` and is looked through, so a sub-layer keeps its path whatever wraps it
(:func:`logical_modules`, :func:`submodule`). Families: BERT, RoBERTa,
XLM-R, ELECTRA (and MiniLM, which is a BERT), DistilBERT, GPT-2, LLaMA-style decoders (LLaMA,
Mistral, Qwen2, SmolLM2), and T5.

GPT-2 fuses q, k and v in one ``c_attn`` Conv1D, so ``qv`` and ``v`` target that whole projection
there (the update reaches k too), as peft does.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

from torch import nn

from adaptbank.core.adapted import AdaptedLinear, is_adaptable
from adaptbank.core.block import AFTER, BESIDE, AdaptedBlock, BlockForm
from adaptbank.core.composed import check_composable
from adaptbank.core.config import CombinedConfig, IA3Config, MethodConfig
from adaptbank.core.experts import expert_class
from adaptbank.routing.state import RoutingState

__all__ = ["PRESET_ROLES", "FAMILY_ROLES", "FAMILY_BLOCKS", "resolve_targets", "inject", "add_experts", "add_parts",
           "iter_adapted", "family_of", "logical_modules", "submodule"]

PRESET_ROLES: dict[str, tuple[str, ...]] = {
    "qv": ("q", "v"),
    "attn": ("q", "k", "v", "o"),
    "all-linear": ("q", "k", "v", "o", "ffn_in", "ffn_out"),
    "v": ("v",),
    "houlsby": ("o", "ffn_out"),
    "pfeiffer": ("ffn_out",),
    "pfeiffer-block": ("ffn_after",),
    "ffn": ("ffn_out",),
    "ia3": ("k", "v", "ffn_out"),
    "ffn-block": ("ffn_block",),
}

_BERT = {
    "q": r"attention\.self\.query$", "k": r"attention\.self\.key$", "v": r"attention\.self\.value$",
    "o": r"attention\.output\.dense$", "ffn_in": r"intermediate\.dense$", "ffn_out": r"layer\.\d+\.output\.dense$",
}
_LLAMA = {
    "q": r"self_attn\.q_proj$", "k": r"self_attn\.k_proj$", "v": r"self_attn\.v_proj$",
    "o": r"self_attn\.o_proj$", "ffn_in": r"mlp\.(gate|up)_proj$", "ffn_out": r"mlp\.down_proj$",
}
FAMILY_ROLES: dict[str, dict[str, str]] = {
    "bert": _BERT, "roberta": _BERT, "xlm-roberta": _BERT, "electra": _BERT, "camembert": _BERT,
    "distilbert": {
        "q": r"attention\.q_lin$", "k": r"attention\.k_lin$", "v": r"attention\.v_lin$",
        "o": r"attention\.out_lin$", "ffn_in": r"ffn\.lin1$", "ffn_out": r"ffn\.lin2$",
    },
    "gpt2": {
        "q": r"attn\.c_attn$", "k": r"attn\.c_attn$", "v": r"attn\.c_attn$",
        "o": r"attn\.c_proj$", "ffn_in": r"mlp\.c_fc$", "ffn_out": r"mlp\.c_proj$",
    },
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "qwen3": _LLAMA,
    "t5": {
        "q": r"Attention\.q$", "k": r"Attention\.k$", "v": r"Attention\.v$", "o": r"Attention\.o$",
        "ffn_in": r"DenseReluDense\.wi(_0|_1)?$", "ffn_out": r"DenseReluDense\.wo$",
    },
}


_BERT_BLOCK: tuple[str, BlockForm] = (r"layer\.\d+\.output$", "residual")
_LLAMA_BLOCK: tuple[str, BlockForm] = (r"layers\.\d+\.mlp$", "output")
FAMILY_BLOCKS: dict[str, tuple[str, BlockForm]] = {
    "bert": _BERT_BLOCK, "roberta": _BERT_BLOCK, "xlm-roberta": _BERT_BLOCK, "electra": _BERT_BLOCK,
    "camembert": _BERT_BLOCK, "distilbert": (r"layer\.\d+\.ffn$", "output"), "gpt2": (r"h\.\d+\.mlp$", "output"),
    "llama": _LLAMA_BLOCK, "mistral": _LLAMA_BLOCK, "qwen2": _LLAMA_BLOCK, "qwen3": _LLAMA_BLOCK,
    "t5": (r"DenseReluDense$", "output"),
}
"""Per family: the regex of its feed-forward blocks and how a block is called (see ``core.block``)."""
for _family, (_pattern, _form) in FAMILY_BLOCKS.items():
    FAMILY_ROLES[_family]["ffn_block"] = _pattern.removesuffix("$") + rf"\.{BESIDE}$"
    FAMILY_ROLES[_family]["ffn_after"] = (_pattern.removesuffix("$") + rf"\.{AFTER}$" if _form == "residual"
                                          else FAMILY_ROLES[_family]["ffn_out"])
del _family, _pattern, _form


def logical_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every module by its logical path: a wrapper's ``transparent_child`` shares the wrapper's path
    (``x.base.weight`` reads ``x.weight``), and the outermost module of a path is the one kept."""
    out: dict[str, nn.Module] = {}

    def walk(module: nn.Module, prefix: str) -> None:
        out.setdefault(prefix, module)
        through = getattr(module, "transparent_child", None)
        for name, child in module.named_children():
            walk(child, prefix if name == through else f"{prefix}.{name}" if prefix else name)

    walk(model, "")
    return out


def submodule(model: nn.Module, path: str) -> nn.Module:
    """The module at logical ``path`` (see :func:`logical_modules`); wrappers on the way are looked through."""
    module = model
    for part in path.split(".") if path else []:
        module = _child(module, part, path)
    return module


def _child(module: nn.Module, part: str, path: str) -> nn.Module:
    owner = _owner(module, part)
    if owner is None:
        raise AttributeError(f"{type(module).__name__} has no submodule {part!r} (looking up {path!r})")
    return owner._modules[part]  # type: ignore[return-value]


def _owner(module: nn.Module, part: str) -> nn.Module | None:
    """The module that holds child ``part``: ``module`` itself or, through wrappers, the module it wraps."""
    while part not in module._modules:
        through = getattr(module, "transparent_child", None)
        if through is None:
            return None
        module = getattr(module, through)
    return module


def family_of(model: nn.Module) -> str | None:
    """The model family (``config.model_type``) when adaptbank knows its module names."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return model_type if model_type in FAMILY_ROLES else None


def _candidates(model: nn.Module) -> list[str]:
    """Adaptable module names with layer numbers folded, e.g. ``encoder.layer.*.attention.self.query``."""
    return sorted({re.sub(r"\.\d+\.", ".*.", p) for p in _target_paths(model)})


def _target_paths(model: nn.Module) -> set[str]:
    """Logical paths an expert can go on: every linear (wrapped or not) and ``<block>.beside`` of every
    feed-forward block of a known family (wrapped or not)."""
    modules = logical_modules(model)
    paths = {p for p, m in modules.items() if is_adaptable(m) or isinstance(m, AdaptedLinear)}
    family = family_of(model)
    if family in FAMILY_BLOCKS:
        block, form = re.compile(FAMILY_BLOCKS[family][0]), FAMILY_BLOCKS[family][1]
        paths |= {f"{p}.{child}" for p in modules if block.search(p)
                  for child in ((BESIDE, AFTER) if form == "residual" else (BESIDE,))}
    return paths


def resolve_targets(model: nn.Module, targets: str | tuple[str, ...] | list[str]) -> list[str]:
    """Full module paths selected by a preset name or explicit regex patterns.

    Raises ``ValueError`` for an unknown preset, a family without presets, or a pattern that matches
    no linear layer, listing what the model offers.
    """
    paths = _target_paths(model)
    if isinstance(targets, str):
        if targets not in PRESET_ROLES:
            raise ValueError(f"unknown target preset {targets!r}; allowed: {', '.join(PRESET_ROLES)} "
                             "or explicit module-name patterns")
        family = family_of(model)
        if family is None:
            model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
            raise ValueError(f"no target presets for model type {model_type!r} (known: {', '.join(sorted(FAMILY_ROLES))}); "
                             f"give module-name patterns instead, e.g. one of: {', '.join(_candidates(model)[:12])}")
        patterns = [FAMILY_ROLES[family][role] for role in PRESET_ROLES[targets]]
    else:
        patterns = list(targets)
    chosen: set[str] = set()
    for pattern in patterns:
        try:
            regex = re.compile(pattern)
        except re.error as err:
            raise ValueError(f"invalid target pattern {pattern!r}: {err}") from None
        hits = {p for p in paths if regex.search(p)}
        if not hits:
            raise ValueError(f"target pattern {pattern!r} matches no linear layer (presets: "
                             f"{', '.join(PRESET_ROLES)}); the model offers: {', '.join(_candidates(model))}")
        chosen |= hits
    return sorted(chosen, key=_natural_key)


def _natural_key(path: str) -> list[object]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]


def inject(model: nn.Module, paths: list[str], state: RoutingState) -> dict[str, AdaptedLinear]:
    """Wrap each module at logical ``paths`` in an :class:`AdaptedLinear` sharing ``state`` (idempotent);
    a path ``<block>.beside`` wraps the feed-forward block in an :class:`~adaptbank.core.block.AdaptedBlock`
    and gives its ``beside`` layer.

    Returns the wrapped layers by path. The wrapped module object is kept as ``.base`` (``.block``).
    """
    out: dict[str, AdaptedLinear] = {}
    for path in paths:
        parent_path, _, child = path.rpartition(".")
        if child in (BESIDE, AFTER) and not isinstance(submodule(model, parent_path), AdaptedBlock):
            _wrap_block(model, parent_path, state)
        module = submodule(model, path)
        if isinstance(module, AdaptedLinear):
            out[path] = module
            continue
        if not is_adaptable(module):
            raise TypeError(f"{path} is a {type(module).__name__}; only nn.Linear and Conv1D can be adapted")
        wrapped = AdaptedLinear(module, state)
        _replace(model, path, wrapped)
        out[path] = wrapped
    return out


def _wrap_block(model: nn.Module, path: str, state: RoutingState) -> None:
    family = family_of(model)
    if family not in FAMILY_BLOCKS or not re.search(FAMILY_BLOCKS[family][0], path):
        raise TypeError(f"{path} is not a feed-forward block adaptbank knows (families: {', '.join(FAMILY_BLOCKS)})")
    width = getattr(getattr(model, "config", None), "hidden_size", None)
    if not isinstance(width, int):
        raise TypeError(f"cannot tell the hidden size of {type(model).__name__} for the block at {path}")
    _replace(model, path, AdaptedBlock(submodule(model, path), width, state, FAMILY_BLOCKS[family][1]))


def _replace(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    owner = _owner(submodule(model, parent_path), child)
    assert owner is not None, path
    setattr(owner, child, module)


def iter_adapted(model: nn.Module) -> Iterator[tuple[str, AdaptedLinear]]:
    """Every wrapped layer of ``model`` with its logical path."""
    for name, module in logical_modules(model).items():
        if isinstance(module, AdaptedLinear):
            yield name, module


def add_experts(model: nn.Module, paths: list[str], state: RoutingState, name: str, method: MethodConfig, *,
                shared_group: str | None = None, training: bool = False) -> dict[str, AdaptedLinear]:
    """Wrap ``paths`` (see :func:`inject`) and give each wrapped layer task ``name``'s expert of
    ``method``, in train mode when ``training``. An (IA)^3 expert scales its layer's input where the path
    is also one of ``method.feedforward`` (peft's ``feedforward_modules``), its output elsewhere. On any
    error the experts added so far are removed again."""
    feedforward = set(resolve_targets(model, method.feedforward)) & set(paths) if isinstance(method, IA3Config) else set()
    return _fill(inject(model, paths, state), name, training,
                 lambda path, layer: layer.add_expert(name, method, shared_group=shared_group,  # type: ignore[arg-type]
                                                      feedforward=path in feedforward))


def add_parts(model: nn.Module, paths: dict[int, list[str]], state: RoutingState, name: str, method: CombinedConfig, *,
              training: bool = False) -> dict[str, AdaptedLinear]:
    """Combined task ``name``'s linear parts: part ``i`` on ``paths[i]``; each wrapped layer gets one
    ``ComposedExpert`` of the parts that target it. Every layer is checked (``check_composable``) before
    any expert is made; on any error the experts added so far are removed again."""
    per_layer: dict[str, dict[int, tuple[object, bool]]] = {}
    for i, part_paths in sorted(paths.items()):
        cfg = method.parts[i]
        feedforward = set(resolve_targets(model, cfg.feedforward)) if isinstance(cfg, IA3Config) else set()
        for path in part_paths:
            per_layer.setdefault(path, {})[i] = (cfg, path in feedforward)
    for path, parts in per_layer.items():
        check_composable([(i, method.parts[i].kind, expert_class(cfg, feedforward=ff))  # type: ignore[arg-type]
                          for i, (cfg, ff) in parts.items()], path, method.kind)
    return _fill(inject(model, sorted(per_layer, key=_natural_key), state), name, training,
                 lambda path, layer: layer.add_parts(name, per_layer[path]))  # type: ignore[arg-type]


def _fill(layers: dict[str, AdaptedLinear], name: str, training: bool,
          add: Callable[[str, AdaptedLinear], nn.Module]) -> dict[str, AdaptedLinear]:
    """Give every wrapped layer task ``name``'s expert by ``add(path, layer)`` (in train mode when
    ``training``); on any error the experts added so far are removed again, and the error is raised."""
    try:
        for path, layer in layers.items():
            add(path, layer).train(training)
    except Exception:
        for layer in layers.values():
            if name in layer.experts:
                layer.remove_expert(name)
        raise
    return layers
