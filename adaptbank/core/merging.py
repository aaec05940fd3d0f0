"""Folding one task into the base weights and back: the ``merge``/``unmerge`` of ``AdaptBankModel``.

LoRA adds ``alpha/r * A @ B`` to the weight (Hu et al. 2021, eq. 3), (IA)^3 scales the weight's output rows
(Liu et al. 2022), BitFit adds its bias delta (Ben Zaken et al. 2021); each layer's rule lives in
``AdaptedLinear.merge``, which also keeps what ``unmerge`` restores. A combination merges when all its parts
can; prompts, prefixes (they act outside the weights) and bottleneck adapters (not linear) cannot. A failure
part-way unmerges the layers already merged, so the model is as before.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from adaptbank.core.adapted import AdaptedLinear
from adaptbank.core.config import BitFitConfig, CombinedConfig, IA3Config, LoRAConfig
from adaptbank.core.virtual import is_virtual

if TYPE_CHECKING:
    from adaptbank.core.model import AdaptBankModel

__all__ = ["merge", "unmerge"]


def merge(model: AdaptBankModel, name: str) -> None:
    """Fold task ``name`` into ``model``'s base weights and route every row to it."""
    info = model._info(name)
    if model.merged is not None:
        raise RuntimeError(f"task {model.merged!r} is already merged; unmerge() before merging {name!r}")
    parts = info.method.parts if isinstance(info.method, CombinedConfig) else (info.method,)
    bad = next((p for p in parts if not isinstance(p, (LoRAConfig, BitFitConfig, IA3Config))), None)
    if bad is not None and bad is info.method:
        raise TypeError(f"only LoRA, bitfit and ia3 tasks can be merged; {name!r} uses {info.method.kind!r}")
    if bad is not None:
        why = "a prompt/prefix acts outside the weights" if is_virtual(bad) else "a bottleneck is not linear"
        raise TypeError(f"only LoRA, bitfit and ia3 tasks, or combinations of only those, can be merged; task "
                        f"{name!r} uses {info.method.kind!r}, whose {bad.kind} part cannot be folded ({why})")
    if model.state.mixing:
        raise RuntimeError("cannot merge while gates mix several experts per example; route one task first")
    done: list[AdaptedLinear] = []
    try:
        for layer in model.layers_of(name).values():
            layer.merge(name)
            done.append(layer)
    except Exception:
        for layer in done:
            layer.unmerge()
        raise
    model.merged = name
    model.state.use(name)


def unmerge(model: AdaptBankModel) -> None:
    """Restore ``model``'s base weights; a no-op when nothing is merged."""
    if model.merged is None:
        return
    for layer in model.layers_of(model.merged).values():
        layer.unmerge()
    model.merged = None
