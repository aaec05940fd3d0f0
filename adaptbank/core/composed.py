"""Several expert parts of one task on one wrapped sub-layer: the layer side of a combined method
(``core.config.CombinedConfig``, e.g. ``bitfit+lora`` with both parts on q and v).

Letters in shape comments: B batch, T tokens, I input features, O output features.

A layer keeps one expert per task name (``AdaptedLinear.experts[name]``); for a combined task that
expert is a :class:`ComposedExpert` holding the parts that target this layer, keyed by their index in
the combination (``parts["0"]``, ``parts["1"]``). It applies them in the side order of ``core.adapted``
(``core.experts.SIDES``), which is the order the gathered path applies the kinds' stacks::

    x_b = x * l_in                       pre:    (IA)^3 input scale
    h   = l_out * base(x_b)              scale:  (IA)^3 output scale
    h   = h + delta_lora(x) + b_task     input:  LoRA, parallel adapter, BitFit (all read the unscaled x)
    h   = h + up(f(down(h)))             output: serial adapter

On the gathered (mixed-batch) path the layer stacks each part with the experts of other tasks of the
same kind (:func:`expert_parts`), so a row of a combined task gets exactly its single-task output:
each stack holds at most one row per task, which is why one task may hold **at most one part of each
expert class per layer** (:func:`check_composable`). Two LoRAs on one layer would be one LoRA of the
summed rank, and two serial adapters, or two scales, would need an order (or a product) that a stack
of one row per task cannot express; such a combination is refused naming both parts and the layer.

Merge folds the parts one after another in the same order (``W' = diag(l_out) W diag(l_in) + s B A``,
``b' = l_out * b + b_task``); it needs every part to be mergeable (LoRA, BitFit, (IA)^3).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from adaptbank.core.experts import SIDES, Expert

__all__ = ["ComposedExpert", "check_composable", "expert_parts"]


def check_composable(parts: Sequence[tuple[int, str, type[Expert]]], where: str, method: str) -> None:
    """Refuse two parts ``(index, kind, expert class)`` of combined method ``method`` that would put two
    experts of one class on the layer at ``where``."""
    seen: dict[type[Expert], tuple[int, str]] = {}
    for i, kind, cls in parts:
        if cls in seen:
            j, other = seen[cls]
            raise ValueError(f"parts {j} ({other}) and {i} ({kind}) of method {method!r} both put a {cls.__name__} "
                             f"on layer {where}; a task holds at most one expert of each class per layer (give the "
                             "parts disjoint targets, or use one part of that kind)")
        seen[cls] = (i, kind)


class ComposedExpert(Expert):
    """The parts of one combined task on one layer, applied in side order (see the module docstring)."""

    def __init__(self, parts: dict[int, Expert], kinds: dict[int, str]) -> None:
        super().__init__()
        check_composable([(i, kinds[i], type(e)) for i, e in parts.items()], "this layer", "+".join(kinds.values()))
        order = sorted(parts, key=lambda i: (SIDES.index(parts[i].side), i))
        self.parts = nn.ModuleDict({str(i): parts[i] for i in order})
        self.kinds = {str(i): kinds[i] for i in order}
        """Part index -> method kind (``lora``, ``adapter``, ...), in side order."""

    def before(self, x: Tensor) -> Tensor:
        for part in self.parts.values():
            x = part.before(x)  # (B, T, I); the identity except for pre parts
        return x

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        for part in self.parts.values():
            h = part(x, h)  # (B, T, O); a pre part's forward is the identity
        return h

    def merged(self, weight: Tensor, bias: Tensor | None, *, transposed: bool) -> tuple[Tensor | None, Tensor | None]:
        """Each part folded into the result of the ones before it, in side order; a part that cannot be
        merged raises ``TypeError`` naming it before anything is returned."""
        for i, part in self.parts.items():
            if type(part).merged is Expert.merged:
                raise TypeError(f"part {i} ({self.kinds[i]}, {type(part).__name__}) cannot be merged into the "
                                "base weights")
        W, b = weight, bias
        new_w = new_b = False
        for part in self.parts.values():
            w2, b2 = part.merged(W, b, transposed=transposed)
            if w2 is not None:
                W, new_w = w2, True
            if b2 is not None:
                b, new_b = b2, True
        return (W if new_w else None), (b if new_b else None)


def expert_parts(expert: Expert) -> list[tuple[str, Expert]]:
    """The single experts inside a layer's expert for one task, with a label: ``[("", expert)]`` for a
    plain one, ``[("<i>.<kind>", part), ...]`` for a :class:`ComposedExpert` (its storage-key prefix)."""
    if isinstance(expert, ComposedExpert):
        return [(f"{i}.{expert.kinds[i]}", part) for i, part in expert.parts.items()]  # type: ignore[misc]
    return [("", expert)]
