"""adaptbank: one frozen transformer, a bank of per-task experts, a learned router, continual runs."""

from __future__ import annotations

__version__ = "0.1.0"

from .adapted import AdaptedLinear
from .backbone import DEFAULT_BACKBONE, Backbone, load_backbone
from .config import AdapterConfig, LoRAConfig, ParallelAdapterConfig, TrainConfig
from .experts import LoRAExpert, ParallelAdapterExpert, SerialAdapterExpert
from .inject import inject, iter_adapted, resolve_targets
from .model import AdaptBankModel, TaskInfo
from .routing import RoutingState

__all__ = [
    "__version__",
    "AdaptedLinear",
    "AdaptBankModel",
    "AdapterConfig",
    "Backbone",
    "DEFAULT_BACKBONE",
    "LoRAConfig",
    "LoRAExpert",
    "ParallelAdapterConfig",
    "ParallelAdapterExpert",
    "RoutingState",
    "SerialAdapterExpert",
    "TaskInfo",
    "TrainConfig",
    "inject",
    "iter_adapted",
    "load_backbone",
    "resolve_targets",
]
