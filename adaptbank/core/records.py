"""What the model knows of a task, what one forward returns, and two helpers for tensors the model
holds: a second module tree over the same frozen weights, and checked loading of a task's tensors.

Letters in shape comments: B batch, D hidden size, C classes, E experts, k experts per row.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from torch import Tensor, nn

from adaptbank.core.config import MethodConfig

__all__ = ["TaskInfo", "ModelOutput", "share_frozen", "load_checked"]


@dataclass(frozen=True)
class TaskInfo:
    """What the model knows of one task."""

    name: str
    method: MethodConfig
    labels: tuple[str, ...]
    paths: tuple[str, ...]
    """Module paths that hold this task's expert."""
    shared_group: str | None = None
    """Shared-A group of a LoRA task-B expert, or None."""
    owns_shared: bool = False
    """True for the group's first task, which trains the shared A."""
    head: Literal["classification", "generation"] = "classification"
    """The kind of task head (``core.heads``): a classification head of its own, or the shared LM head."""


@dataclass
class ModelOutput:
    """What one forward returns."""

    logits: Tensor
    """(B, C): each row scored by its task's head; rows of tasks with fewer classes than the widest are
    padded with -inf (so argmax and cross-entropy work on the padded tensor)."""
    tasks: tuple[str, ...]
    """The task whose head scored each row."""
    pooled: Tensor
    """(B, D) pooled features under the forward's gates."""
    index: Tensor | None = None
    """(B, k) the experts each row used, in the model's expert order (routed forwards)."""
    weight: Tensor | None = None
    """(B, k) their weights (routed forwards)."""
    scores: Tensor | None = None
    """(B, E) router scores in the router's expert order (routed forwards)."""


def share_frozen(module: nn.Module) -> nn.Module:
    """A new module tree whose parameters and buffers are the same tensor objects as ``module``'s.

    Injection rewrites the module tree (wrapping layers), so every model needs its own tree; the frozen
    weights, the bulk of the memory, need not be copied. Merging replaces a wrapped layer's weight with a
    new tensor (see ``AdaptedLinear.merge``), so a merge in one tree never shows in another."""
    memo = {id(t): t for t in itertools.chain(module.parameters(), module.buffers())}
    return copy.deepcopy(module, memo)


def load_checked(expected: dict[str, Tensor], given: dict[str, Tensor], what: str,
                 setter: Callable[[str, Tensor], None]) -> None:
    """Check ``given`` against ``expected`` (same keys, same shapes) and only then ``setter(key, value)``
    each tensor (cast to the expected dtype); a mismatch names the layer, the tensor and both shapes."""
    missing = sorted(set(expected) - set(given))
    extra = sorted(set(given) - set(expected))
    if missing or extra:
        raise ValueError(f"{what}: the file does not fit this model; missing keys {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}, unexpected keys {extra[:5]}{' ...' if len(extra) > 5 else ''}")
    for key, value in given.items():
        want = expected[key]
        if tuple(value.shape) != tuple(want.shape):
            layer, _, tensor = key.rpartition(".")
            raise ValueError(f"{what}: layer {layer or key!r} tensor {tensor!r} has shape {tuple(value.shape)} "
                             f"in the file but {tuple(want.shape)} in the model")
    for key, value in given.items():
        setter(key, value.to(expected[key].dtype))

