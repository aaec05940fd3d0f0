"""The routing state: one explicit object that carries per-forward gates to every adapted layer.

``inject`` hands the same :class:`RoutingState` to every :class:`~adaptbank.core.adapted.AdaptedLinear`.
The model writes it before calling the unchanged Hugging Face model (during a routed forward the
router's last tap writes it, before the first layer with experts runs); adapted layers only read it.
It is a plain object, not an ``nn.Module``, so it never appears in the module tree. It holds gates and
nothing else.

Four forms, all read by the same layer code:

* ``active = "task"``: every row uses one expert (task-id routing for a whole batch, training);
* ``index (B, k)`` + ``weight (B, k)``: per example, the k experts it uses and their weights (a mixed
  batch of task ids is k = 1 with weight 1; a top-k router mixture is k > 1);
* ``index (B, k)`` + ``weight (B, T, k)``: per token weights;
* ``token = True``: each adapted layer's own token gate mixes all experts per token (``routing.token``).

Column numbers in ``index`` refer to ``experts``, the model's expert order.

Under gradient checkpointing the forward runs again during backward, so the state is never cleared
after a forward; it is overwritten by the next one (one forward per backward, as in peft).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["RoutingState"]


@dataclass(eq=False)
class RoutingState:
    """Gates for the current forward, shared by all adapted layers of one model. Gates only: what a
    routed forward computes besides them (router features, scores, token-gate probabilities) comes
    back to the caller as return values of the model."""

    experts: tuple[str, ...] = ()
    """Expert order: column j of ``index`` names ``experts[j]``."""
    active: str | None = None
    """One expert for the whole batch (fast path), or None."""
    index: Tensor | None = None
    """(B, k) long: the experts each example uses."""
    weight: Tensor | None = None
    """(B, k) or (B, T, k): their weights."""
    token: bool = False
    """Token-level gates: each adapted layer's own gate mixes all experts per token."""
    version: int = field(default=0)
    """Bumped whenever the set of experts changes; layers rebuild their stacks on a change."""

    def off(self) -> None:
        """No expert: the base model's output."""
        self.active, self.index, self.weight, self.token = None, None, None, False

    def use(self, name: str) -> None:
        """Every row of the batch uses expert ``name``."""
        if name not in self.experts:
            raise KeyError(f"unknown expert {name!r}; the model holds: {', '.join(self.experts) or 'none'}")
        self.active, self.index, self.weight, self.token = name, None, None, False

    def route(self, index: Tensor, weight: Tensor | None = None) -> None:
        """Per-example experts ``index (B, k)`` with ``weight (B, k)``/``(B, T, k)`` (ones if None)."""
        if index.dim() == 1:
            index = index[:, None]  # (B, 1)
        if weight is None:
            weight = torch.ones(index.shape, dtype=torch.float32, device=index.device)  # (B, k)
        if weight.dim() == 2 and weight.shape != index.shape:
            raise ValueError(f"weight shape {tuple(weight.shape)} does not match index shape {tuple(index.shape)}")
        if weight.dim() == 3 and (weight.shape[0], weight.shape[2]) != tuple(index.shape):
            raise ValueError(f"token weight shape {tuple(weight.shape)} does not match index {tuple(index.shape)}")
        self.active, self.index, self.weight, self.token = None, index.long(), weight, False

    def dense(self, gates: Tensor) -> None:
        """Dense gates over all experts: ``(B, E)`` per example or ``(B, T, E)`` per token."""
        n = len(self.experts)
        if gates.shape[-1] != n or gates.dim() not in (2, 3):
            raise ValueError(f"gates must be (B, {n}) or (B, T, {n}), got {tuple(gates.shape)}")
        index = torch.arange(n, device=gates.device).expand(gates.shape[0], n)  # (B, E)
        self.route(index, gates)

    def tokens(self) -> None:
        """Token-level gates for the next forward: every layer's gate decides per token."""
        self.off()
        self.token = True

    @property
    def mixing(self) -> bool:
        """True when rows may use different experts or several at once."""
        return self.index is not None or self.token
