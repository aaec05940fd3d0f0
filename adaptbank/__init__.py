"""adaptbank: one frozen transformer, a bank of per-task experts, a learned router, continual runs.

The public names below load lazily (PEP 562), so torch-free modules such as ``adaptbank.metrics``
and ``adaptbank.report`` import without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

_EXPORTS: dict[str, str] = {
    "AdaptedLinear": "adapted",
    "AdaptBankModel": "model",
    "AdapterConfig": "config",
    "Backbone": "backbone",
    "DEFAULT_BACKBONE": "backbone",
    "LoRAConfig": "config",
    "LoRAExpert": "experts",
    "ParallelAdapterConfig": "config",
    "ParallelAdapterExpert": "experts",
    "RoutingState": "routing",
    "SerialAdapterExpert": "experts",
    "TaskInfo": "model",
    "TrainConfig": "config",
    "inject": "inject",
    "iter_adapted": "inject",
    "load_backbone": "backbone",
    "resolve_targets": "inject",
    "AccuracyMatrix": "metrics",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'adaptbank' has no attribute {name!r}")


if TYPE_CHECKING:  # pragma: no cover
    from .adapted import AdaptedLinear
    from .backbone import DEFAULT_BACKBONE, Backbone, load_backbone
    from .config import AdapterConfig, LoRAConfig, ParallelAdapterConfig, TrainConfig
    from .experts import LoRAExpert, ParallelAdapterExpert, SerialAdapterExpert
    from .inject import inject, iter_adapted, resolve_targets
    from .metrics import AccuracyMatrix
    from .model import AdaptBankModel, TaskInfo
    from .routing import RoutingState
