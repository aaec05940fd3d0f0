"""``AdaptedBlock``: a whole feed-forward block wrapped (never subclassed) so that parallel adapters run
beside it, where He et al. (2021, https://arxiv.org/abs/2110.04366, section 3 and figure 3) put them::

    h = FFN(x) + s * up(f(down(x)))        x: the block's input (B, T, D), h: its output (B, T, D)

The adapters themselves live in ``self.beside``, an :class:`~adaptbank.core.adapted.AdaptedLinear` over a
:class:`~adaptbank.core.adapted.ZeroBase`: it returns the (routed, per-row mixed) sum of its experts'
deltas, so routing, stacking and the gathered path are the adapted layer's own. The block stays as
``self.block``, the same object; a path through it reads as if the wrapper were not there
(``transparent_child``; see ``core.inject.logical_modules``), so LoRA on ``...output.dense`` keeps its name
whether or not the block around it is wrapped.

Two call forms, by model family:

* ``output`` (GPT-2 ``mlp``, LLaMA ``mlp``, DistilBERT ``ffn``, T5 ``DenseReluDense``): the block maps
  ``x -> FFN(x)``; the wrapper returns ``block(x) + delta(x)``.
* ``residual`` (BERT-family ``*Output``): the block is called ``block(u, x)`` with ``u`` the intermediate
  activation and ``x`` the block's input, and computes ``LayerNorm(dropout(dense(u)) + x)``; the wrapper
  calls ``block(u, x + delta(x))``, which is ``LayerNorm(FFN(x) + delta(x) + x)``: the delta joins the
  block's output before the residual sum and LayerNorm, as in He et al. and the adapters library.

With no expert active ``delta`` is an exact zero, so the wrapped block's output is bit-identical.

**Serial adapters after a post-LN block** (residual form only; ``after``, preset ``pfeiffer-block``): the
placement of the ``adapters`` library's sequential bottleneck (``SeqBnConfig``: Pfeiffer et al. 2021,
https://arxiv.org/abs/2005.00247, with ``original_ln_before`` / ``original_ln_after``). With
``r = dropout(dense(u)) + x`` (the pre-LayerNorm residual sum; the parallel delta joins ``x`` first) and the
block's own LayerNorm ``LN``::

    y = LN(r)                    the block's usual output
    h = LN(r + up(f(down(y))))   the adapter reads the normalised output and joins before LN again

The adapters live in ``self.after``, an adapted layer over an
:class:`~adaptbank.core.adapted.IdentityBase` (it returns ``y + delta(y)``, or ``y`` itself when no expert is
active, in which case the block returns ``y`` unchanged: bit-identical, no second LayerNorm). A row of a
mixed batch without a serial expert gets ``r + (y - y) = r`` exactly, so ``LN(r) = y``.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

from adaptbank.core.adapted import AdaptedLinear, IdentityBase, ZeroBase
from adaptbank.routing.state import RoutingState

__all__ = ["AdaptedBlock", "BlockForm", "BESIDE", "AFTER"]

BlockForm = Literal["output", "residual"]
BESIDE = "beside"
"""Attribute (and path segment) of the block's adapted layer: a block target is ``<block path>.beside``."""
AFTER = "after"
"""Attribute (and path segment) of a residual-form block's serial adapted layer: ``<block path>.after``."""
_POST_LN = ("dense", "dropout", "LayerNorm")
"""What a residual-form (BERT-family ``*Output``) block holds: ``LayerNorm(dropout(dense(u)) + x)``."""


class AdaptedBlock(nn.Module):
    """A frozen feed-forward block plus, in ``beside``, the parallel adapters that run beside it."""

    transparent_child = "block"
    """The wrapped module's attribute name; fingerprints and paths look through it."""

    def __init__(self, block: nn.Module, width: int, state: RoutingState, form: BlockForm) -> None:
        super().__init__()
        if form not in ("output", "residual"):
            raise ValueError(f"block form must be 'output' or 'residual', got {form!r}")
        like = next(block.parameters())
        self.block = block
        self.beside = AdaptedLinear(ZeroBase(width, like=like), state)
        self.form = form
        self.after: AdaptedLinear | None = None
        if form == "residual":
            missing = [a for a in _POST_LN if not isinstance(getattr(block, a, None), nn.Module)]
            if missing:
                raise TypeError(f"a residual-form block computes LayerNorm(dropout(dense(u)) + x), but "
                                f"{type(block).__name__} has no {', '.join(missing)}")
            self.after = AdaptedLinear(IdentityBase(width, like=like), state)

    def forward(self, *args: object, **kwargs: object) -> object:
        if self.form == "residual":
            u, x = _residual_args(args, kwargs)
            x = x + self.beside(x)  # (B, T, D): the parallel delta joins the residual input
            if self.after is None or not len(self.after.experts):
                return self.block(u, x)  # (B, T, D)
            r = self.block.dropout(self.block.dense(u)) + x  # (B, T, D) the pre-LayerNorm residual sum
            y = self.block.LayerNorm(r)  # (B, T, D)
            z = self.after(y)  # (B, T, D): y + the serial adapters' delta, or y itself
            return y if z is y else self.block.LayerNorm(r + (z - y))  # (B, T, D)
        x = args[0] if args else next(iter(kwargs.values()))
        return self.block(*args, **kwargs) + self.beside(x)  # (B, T, D)

    def extra_repr(self) -> str:
        return f"form={self.form!r}"


def _residual_args(args: tuple[object, ...], kwargs: dict[str, object]) -> tuple[Tensor, Tensor]:
    """``(u, x)`` of a BERT-family output block called as ``block(hidden_states, input_tensor)``."""
    values = list(args) + [kwargs[k] for k in ("hidden_states", "input_tensor") if k in kwargs]
    if len(values) != 2:
        raise TypeError(f"a residual-form block takes (hidden_states, input_tensor); got {len(args)} positional "
                        f"and keywords {sorted(kwargs)}")
    return values[0], values[1]  # type: ignore[return-value]
