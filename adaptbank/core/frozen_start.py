"""Cached frozen layers: train from the first adapted layer on hidden states computed once.

Letters in shape comments: B batch, T tokens, D hidden size, L the first layer that holds an expert.

When every expert of a task sits in transformer layers ``>= L`` (the router keeps layers ``0 .. L-1``
free, and ``--layers`` may put the experts higher still), layers ``0 .. L-1`` compute the same hidden
states in every epoch. The bank's frozen pass already runs them once, for the probe head and the router's
statistics (``training.features.frozen_pass_states``); it can keep each example's ``(T_i, D)`` output of
layer ``L-1`` as well (:class:`CachedStates`). Training then runs only layers ``L ..`` on those: for the
duration of training (:func:`skipping`) each layer ``i < L`` is wrapped in a :class:`SkipLayer`, and while
a forward is fed cached states through the explicit :class:`StartFeed` (:func:`cached_features`), layer
``i < L-1`` passes its input through and layer ``L-1`` returns the fed states. Outside a fed forward the
wrapped layers run as they are.

Same results: the real tokens' states entering layer ``L`` are the cached ones (padding positions hold
zeros instead, which attention masks out and pooling never reads), so with dropout off
(``--no-train-dropout``) a cached run equals an uncached one up to float rounding
(``tests/test_frozen_start.py``). With dropout on, layers ``0 .. L-1`` run without dropout (as at
inference) and the layers above draw other dropout masks: the same training in distribution, not the
same numbers. The cache holds ``N x mean(T_i) x D`` floats (float32).

Families: the BERT family, DistilBERT, GPT-2 and the LLaMA-style decoders, whose layers take the hidden
states first and return them; T5 is refused (its first layer computes the relative position bias that the
others reuse).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from torch import Tensor, nn

from adaptbank.core.config import CombinedConfig, MethodConfig
from adaptbank.core.heads import HeadKind
from adaptbank.core.model import AdaptBankModel
from adaptbank.core.virtual import is_virtual
from adaptbank.routing.taps import layer_list

__all__ = ["CACHE_FAMILIES", "CachedStates", "StartFeed", "SkipLayer", "first_layer", "cache_refusal", "skipping",
           "cached_features", "pad_states"]

CACHE_FAMILIES = frozenset({"bert", "roberta", "xlm-roberta", "electra", "camembert", "distilbert", "gpt2", "llama",
                            "mistral", "qwen2", "qwen3"})
"""Model types whose layers can be skipped with cached states (see the module docstring)."""


@dataclass(frozen=True, eq=False)
class CachedStates:
    """The frozen hidden states entering layer ``layer`` (the output of layer ``layer - 1``), one per
    example, unpadded."""

    layer: int
    """L: the first layer that runs in training."""
    states: Sequence[Tensor]
    """Per example, (T_i, D) with T_i its token count."""


@dataclass(eq=False)
class StartFeed:
    """The states of the fed forward in progress (B, T, D); None outside one."""

    hidden: Tensor | None = None


class SkipLayer(nn.Module):
    """Wraps transformer layer ``i < L`` while a cached run trains: in a fed forward, the input passes
    through (``i < L-1``) or the fed states come out (``i = L-1``); otherwise the layer runs."""

    transparent_child = "layer"
    """The wrapped module's attribute name; module paths and fingerprints look through it."""

    def __init__(self, layer: nn.Module, feed: StartFeed, *, last: bool) -> None:
        super().__init__()
        self.layer = layer
        self.feed = feed  # a plain object, not a submodule
        self.last = last

    def forward(self, hidden: Tensor, *args: object, **kwargs: object) -> object:
        fed = self.feed.hidden
        if fed is None:
            return self.layer(hidden, *args, **kwargs)
        return fed.to(hidden.dtype) if self.last else hidden  # (B, T, D)


def first_layer(model: AdaptBankModel, method: MethodConfig, head: HeadKind = "classification") -> int:
    """The lowest transformer layer a task of ``method`` would hold an expert in on ``model`` (0 for a prompt
    or prefix, which acts from the input on, and for a target outside every layer)."""
    parts = method.parts if isinstance(method, CombinedConfig) else (method,)
    if any(is_virtual(p) for p in parts):
        return 0
    names = [f"{n}." for n in model.layer_paths()]
    paths = [p for part in parts for p in model.target_paths(part, head)]
    return min(next((i for i, n in enumerate(names) if p.startswith(n)), 0) for p in paths)


def cache_refusal(model: AdaptBankModel, method: MethodConfig, head: HeadKind, world: int) -> str | None:
    """Why a task of ``method`` cannot train on cached frozen layers here, or None when it can."""
    family = getattr(model.backbone.config, "model_type", None)
    if family not in CACHE_FAMILIES:
        return f"model type {family!r} is not one whose layers can be skipped ({', '.join(sorted(CACHE_FAMILIES))})"
    if head != "classification":
        return "generation tasks train without the cache so far"
    if world > 1:
        return f"a distributed add-task (WORLD_SIZE={world}) trains without the cache so far"
    if first_layer(model, method, head) < 1:
        return f"method {method.kind!r} acts from layer 0 on (a prompt or prefix reaches every layer), so no layer is frozen below it"
    return None


@contextmanager
def skipping(model: AdaptBankModel, layer: int) -> Iterator[StartFeed]:
    """Wrap layers ``0 .. layer-1`` of ``model``'s encoder in :class:`SkipLayer` s sharing one
    :class:`StartFeed` (yielded); they are put back as they were on exit."""
    layers = layer_list(model.encoder)
    if not 1 <= layer < len(layers):
        raise ValueError(f"a cached run starts at a layer in 1..{len(layers) - 1}, got {layer}")
    feed = StartFeed()
    for i in range(layer):
        layers[i] = SkipLayer(layers[i], feed, last=i == layer - 1)
    try:
        yield feed
    finally:
        for i in range(layer):
            layers[i] = layers[i].layer  # type: ignore[union-attr]


def pad_states(states: Sequence[Tensor], width: int) -> Tensor:
    """Right-pad per-row states (T_i, D) with zeros to (B, width, D), as ``data.tokens.collate`` pads ids."""
    out = states[0].new_zeros((len(states), width, states[0].shape[-1]))  # (B, T, D)
    for b, s in enumerate(states):
        out[b, : s.shape[0]] = s
    return out


def cached_features(model: AdaptBankModel, task: str, feed: StartFeed) -> Callable[[dict[str, Tensor]], Tensor]:
    """``features(batch) -> (B, D)`` with task ``task``'s expert on every row, run from the cached states
    ``batch["start_hidden"]`` (B, T, D) through ``feed`` (inside :func:`skipping`)."""

    def features(batch: dict[str, Tensor]) -> Tensor:
        hidden, ids = batch["start_hidden"], batch["input_ids"]
        if hidden.shape[:2] != ids.shape:
            raise ValueError(f"cached states {tuple(hidden.shape)} do not fit the batch's ids {tuple(ids.shape)}")
        model.route(task=task)
        feed.hidden = hidden
        try:
            return model.features(ids, batch["attention_mask"])  # (B, D)
        finally:
            feed.hidden = None

    return features
