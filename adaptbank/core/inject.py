"""Find target sub-layers of a Hugging Face model by preset or pattern, and wrap them.

Presets name roles (q, k, v, o, ffn_in, ffn_out); each model family maps roles to module-name
regexes, matched against the full dotted module path with ``re.search``. Families: BERT, RoBERTa,
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
from adaptbank.core.composed import check_composable
from adaptbank.core.config import CombinedConfig, IA3Config, MethodConfig
from adaptbank.core.experts import expert_class
from adaptbank.routing.state import RoutingState

__all__ = ["PRESET_ROLES", "FAMILY_ROLES", "resolve_targets", "inject", "add_experts", "add_parts", "iter_adapted",
           "family_of"]

PRESET_ROLES: dict[str, tuple[str, ...]] = {
    "qv": ("q", "v"),
    "attn": ("q", "k", "v", "o"),
    "all-linear": ("q", "k", "v", "o", "ffn_in", "ffn_out"),
    "v": ("v",),
    "houlsby": ("o", "ffn_out"),
    "pfeiffer": ("ffn_out",),
    "ffn": ("ffn_out",),
    "ia3": ("k", "v", "ffn_out"),
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


def family_of(model: nn.Module) -> str | None:
    """The model family (``config.model_type``) when adaptbank knows its module names."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return model_type if model_type in FAMILY_ROLES else None


def _candidates(model: nn.Module) -> list[str]:
    """Adaptable module names with layer numbers folded, e.g. ``encoder.layer.*.attention.self.query``."""
    names = {re.sub(r"\.\d+\.", ".*.", n) for n, m in model.named_modules() if _plain_adaptable(m)}
    return sorted(names)


def _plain_adaptable(module: nn.Module) -> bool:
    return is_adaptable(module) and not isinstance(module, AdaptedLinear)


def resolve_targets(model: nn.Module, targets: str | tuple[str, ...] | list[str]) -> list[str]:
    """Full module paths selected by a preset name or explicit regex patterns.

    Raises ``ValueError`` for an unknown preset, a family without presets, or a pattern that matches
    no linear layer, listing what the model offers.
    """
    paths = {n for n, m in model.named_modules() if is_adaptable(m)}
    # A module already wrapped is found by its own path: its .base child is not a new target.
    paths = {p[: -len(".base")] if p.endswith(".base") and _is_wrapped(model, p) else p for p in paths}
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


def _is_wrapped(model: nn.Module, base_path: str) -> bool:
    parent = model.get_submodule(base_path[: -len(".base")])
    return isinstance(parent, AdaptedLinear)


def _natural_key(path: str) -> list[object]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]


def inject(model: nn.Module, paths: list[str], state: RoutingState) -> dict[str, AdaptedLinear]:
    """Wrap each module at ``paths`` in an :class:`AdaptedLinear` sharing ``state`` (idempotent).

    Returns the wrapped layers by path. The wrapped module object is kept as ``.base``.
    """
    out: dict[str, AdaptedLinear] = {}
    for path in paths:
        module = model.get_submodule(path)
        if isinstance(module, AdaptedLinear):
            out[path] = module
            continue
        if not is_adaptable(module):
            raise TypeError(f"{path} is a {type(module).__name__}; only nn.Linear and Conv1D can be adapted")
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        wrapped = AdaptedLinear(module, state)
        setattr(parent, child, wrapped)
        out[path] = wrapped
    return out


def iter_adapted(model: nn.Module) -> Iterator[tuple[str, AdaptedLinear]]:
    """Every wrapped layer of ``model`` with its path."""
    for name, module in model.named_modules():
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
