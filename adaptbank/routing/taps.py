"""Router taps: the sequence router runs inside the one routed forward.

Letters in shape comments: B batch, T tokens, D hidden size, F router features, E experts, k top-k.

A :class:`RouterTap` wraps each of the transformer layers ``0 .. L-1`` (composition: the layer stays
as ``.layer``). During a routed forward the taps mean-pool the embeddings (tap 0's input) and each
tapped layer's output; the last tap concatenates the pools ``(B, F)``, ``F = (L + 1) D``, scores them
with the :class:`~adaptbank.routing.lda.LDARouter` and writes the gates into the model's
:class:`~adaptbank.routing.state.RoutingState` before layer ``L`` (the first with experts) runs.

The taps of one router share one :class:`RouterTrace`, an explicit object handed to them when the
router is attached (as the routing state is handed to the adapted layers): the model opens it with the
attention mask before a routed forward and reads the features, scores and gates back afterwards, and
returns them to its caller. Outside a routed forward (``trace.mask is None``) a tap is the bare layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from adaptbank.routing.lda import LDARouter, topk_gates
from adaptbank.routing.pools import pool_state
from adaptbank.routing.state import RoutingState

__all__ = ["RouterTrace", "RouterTap", "layer_list", "install_taps", "remove_taps"]


@dataclass(eq=False)
class RouterTrace:
    """One routed forward's router inputs and outputs: opened by the model, filled by the taps."""

    mask: Tensor | None = None
    """(B, T) attention mask of the routed forward in progress; None outside one."""
    features: list[Tensor] = field(default_factory=list)
    """The (B, D) pools collected so far (embeddings, then each tapped layer; ``router.pools`` per state)."""
    scores: Tensor | None = None
    """(B, E) router scores, in the router's expert order."""

    def open(self, mask: Tensor) -> None:
        self.mask, self.features, self.scores = mask, [], None

    def close(self) -> None:
        self.mask, self.features = None, []


def layer_list(model: nn.Module) -> nn.ModuleList:
    """The backbone's ModuleList of transformer layers (BERT ``encoder.layer``, GPT-2 ``h``, LLaMA
    ``layers``, T5 ``encoder.block``): the longest ModuleList not inside another one, the first one found
    on ties (a T5 block's own ``layer`` list of sub-layers sits inside ``block`` and is never chosen, even
    when it is the longer one, as in a one-layer T5)."""
    lists: list[nn.ModuleList] = []
    inner: set[int] = set()
    for m in model.modules():  # pre-order: an outer list comes before the lists inside it
        if isinstance(m, nn.ModuleList) and len(m) > 0 and id(m) not in inner:
            lists.append(m)
            inner.update(id(x) for x in m.modules() if x is not m)
    if not lists:
        raise ValueError(f"cannot find the layer list of {type(model).__name__}")
    return max(lists, key=len)


class RouterTap(nn.Module):
    """Wraps transformer layer ``i < L``: pools its input (layer 0) and output into the trace while a
    routed forward runs; the last tap runs the router and writes the gates."""

    transparent_child = "layer"
    """The wrapped module's attribute name; fingerprints look through it."""

    def __init__(self, layer: nn.Module, state: RoutingState, trace: RouterTrace, *, first: bool, last: bool) -> None:
        super().__init__()
        self.layer = layer
        self.state = state  # plain objects, not submodules
        self.trace = trace
        self.first, self.last = first, last
        self.router: LDARouter | None = None
        self.top_k, self.temperature = 1, 1.0
        self.to_model: Tensor | None = None
        """Router column e -> column of the model's expert order."""

    def forward(self, hidden: Tensor, *args: object, **kwargs: object) -> object:
        tr = self.trace
        if tr.mask is None or self.router is None:
            return self.layer(hidden, *args, **kwargs)
        pools = self.router.pools
        if self.first:
            tr.features = pool_state(hidden, tr.mask, pools)  # P x (B, D)
        out = self.layer(hidden, *args, **kwargs)
        h = out[0] if isinstance(out, tuple) else out  # (B, T, D)
        tr.features.extend(pool_state(h, tr.mask, pools))  # P x (B, D)
        if self.last:
            scores = self.router(torch.cat(tr.features, -1))  # (B, E)
            tr.scores = scores
            index, weight = topk_gates(scores, self.top_k, self.temperature)  # (B, k), (B, k)
            self.state.route(self.to_model[index], weight)  # type: ignore[index]
        return out


def install_taps(layers: nn.ModuleList, router: LDARouter, state: RoutingState, trace: RouterTrace, top_k: int,
                 temperature: float, to_model: Tensor) -> None:
    """Wrap layers ``0 .. router.layers - 1`` in taps (re-using taps already there); the last one runs
    ``router`` with ``top_k``/``temperature`` and maps its columns to the model's order by ``to_model``."""
    for i in range(router.layers):
        tap = layers[i] if isinstance(layers[i], RouterTap) else RouterTap(layers[i], state, trace, first=i == 0,
                                                                           last=False)
        tap.first, tap.last, tap.router = i == 0, i == router.layers - 1, router
        layers[i] = tap
    last = layers[router.layers - 1]
    last.top_k, last.temperature, last.to_model = top_k, temperature, to_model  # type: ignore[union-attr]


def remove_taps(layers: nn.ModuleList) -> None:
    """Put every tapped layer back as it was."""
    for i, layer in enumerate(layers):
        if isinstance(layer, RouterTap):
            layers[i] = layer.layer
