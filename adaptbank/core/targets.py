"""Which wrapped linears a method reaches in a model: its ``targets``, the router's reserved layers, ``layers``.

The ``target_paths``/``layer_paths`` of :class:`~adaptbank.core.model.AdaptBankModel`. A method's ``targets``
(a preset or module-name patterns, ``core.inject.resolve_targets``) select linears in the backbone; a
classification task on an encoder-decoder keeps the encoder's; the layers the router reads (below
``model.reserved_layers``) hold no experts; ``layers`` (LoRA, adapters, BitFit, (IA)^3) keeps the chosen
transformer layers, negative indices counting from the top. Errors name the layer or targets at fault.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from adaptbank.core.config import CombinedConfig, MethodConfig
from adaptbank.core.heads import HeadKind
from adaptbank.core.inject import resolve_targets
from adaptbank.routing.taps import layer_list

if TYPE_CHECKING:
    from adaptbank.core.model import AdaptBankModel

__all__ = ["layer_paths", "target_paths"]


def layer_paths(model: AdaptBankModel) -> list[str]:
    """Module paths of the (encoder's) transformer layers, bottom to top."""
    names = {id(m): n for n, m in model.backbone.named_modules()}
    return [names[id(m)] for m in layer_list(model.encoder)]


def target_paths(model: AdaptBankModel, method: MethodConfig, head: HeadKind = "classification") -> list[str]:
    """Module paths that ``method.targets`` (of a single kind) selects in ``model`` for a ``head`` task."""
    if isinstance(method, CombinedConfig):
        raise TypeError(f"a combined method ({method.kind!r}) has targets per part; pass a part")
    paths = resolve_targets(model.backbone, method.targets)
    seq2seq = model.encoder is not model.backbone
    if seq2seq and head == "classification":  # T5: a head reads the encoder only
        paths = [p for p in paths if p.startswith("encoder.")]
    layers = getattr(method, "layers", None)
    names = layer_paths(model) if model.reserved_layers or layers is not None else []
    if model.reserved_layers:
        reserved = tuple(f"{p}." for p in names[: model.reserved_layers])
        paths = [p for p in paths if not p.startswith(reserved)]
        if not paths:
            raise ValueError(f"targets {method.targets!r} select only layers below {model.reserved_layers}, which "
                             "are reserved for the router's features")
    if layers is not None:
        if seq2seq and head != "classification":
            raise ValueError("--layers indexes the encoder's layers; an encoder-decoder generation task also "
                             "adapts the decoder, so leave layers unset there")
        paths = _in_layers(paths, names, layers, model.reserved_layers, method.targets)
    return paths


def _in_layers(paths: list[str], names: list[str], layers: Sequence[int], reserved: int,
               targets: object) -> list[str]:
    """``paths`` inside the transformer layers ``layers`` of the layer paths ``names`` (negative: from the top);
    errors name a layer out of range or one of the ``reserved`` bottom layers that the router reads."""
    n = len(names)
    bad = [i for i in layers if not -n <= i < n]
    if bad:
        raise ValueError(f"layer {bad[0]} (--layers) is out of range: the base has {n} layers, 0..{n - 1} "
                         f"(or -{n}..-1 from the top)")
    keep = sorted({i % n for i in layers})
    low = [i for i in keep if i < reserved]
    if low:
        raise ValueError(f"layer {low[0]} (--layers) is one the router reads (layers 0..{reserved - 1} "
                         f"hold no experts); choose from {reserved}..{n - 1}")
    inside = tuple(f"{names[i]}." for i in keep)
    chosen = [p for p in paths if p.startswith(inside)]
    if not chosen:
        raise ValueError(f"targets {targets!r} select nothing in layers {keep} (--layers)")
    return chosen
