"""adaptbank: one frozen transformer, a bank of per-task experts, a learned router, continual runs.

Rooms, by concern (each a package; see the README's design section):

* ``adaptbank.core``: configs, expert kinds, the adapted layer, injection, heads, the model;
* ``adaptbank.routing``: the gates-only routing state, the LDA router and its taps, token gates, prediction;
* ``adaptbank.data``: task specs (shipped inside the package), readers, tokenising and batching;
* ``adaptbank.training``: the one training loop, probes and evaluation;
* ``adaptbank.bank``: the on-disk bank (manifest, store, maintenance) and the facade that trains and stores;
* ``adaptbank.continual``: run specs, strategies, the resumable loop;
* ``adaptbank.report`` and ``adaptbank.metrics``: torch-free results and reports;
* ``adaptbank.cli``: the ``adaptbank`` command line.

The public names below load lazily (PEP 562), so torch-free modules such as ``adaptbank.metrics``
and ``adaptbank.report`` import without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from adaptbank._version import __version__

_EXPORTS: dict[str, str] = {
    "AdaptedLinear": "core.adapted",
    "AdaptBankModel": "core.model",
    "AdapterBank": "bank.facade",
    "AdapterConfig": "core.config",
    "Backbone": "core.backbone",
    "BitFitConfig": "core.config",
    "BitFitExpert": "core.experts",
    "CombinedConfig": "core.config",
    "ComposedExpert": "core.composed",
    "DEFAULT_BACKBONE": "core.backbone",
    "IA3Config": "core.config",
    "IA3Expert": "core.experts",
    "IA3InputExpert": "core.experts",
    "LoRAConfig": "core.config",
    "LoRAExpert": "core.experts",
    "ModelOutput": "core.model",
    "ParallelAdapterConfig": "core.config",
    "ParallelAdapterExpert": "core.experts",
    "RouterConfig": "core.config",
    "RoutingState": "routing.state",
    "SerialAdapterExpert": "core.experts",
    "TaskInfo": "core.model",
    "TrainConfig": "core.config",
    "inject": "core.inject",
    "iter_adapted": "core.inject",
    "load_backbone": "core.backbone",
    "resolve_targets": "core.inject",
    "AccuracyMatrix": "metrics",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"adaptbank.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'adaptbank' has no attribute {name!r}")


if TYPE_CHECKING:  # pragma: no cover
    from adaptbank.bank.facade import AdapterBank
    from adaptbank.core.adapted import AdaptedLinear
    from adaptbank.core.backbone import DEFAULT_BACKBONE, Backbone, load_backbone
    from adaptbank.core.composed import ComposedExpert
    from adaptbank.core.config import (
        AdapterConfig,
        BitFitConfig,
        CombinedConfig,
        IA3Config,
        LoRAConfig,
        ParallelAdapterConfig,
        RouterConfig,
        TrainConfig,
    )
    from adaptbank.core.experts import (
        BitFitExpert,
        IA3Expert,
        IA3InputExpert,
        LoRAExpert,
        ParallelAdapterExpert,
        SerialAdapterExpert,
    )
    from adaptbank.core.inject import inject, iter_adapted, resolve_targets
    from adaptbank.core.model import AdaptBankModel, ModelOutput, TaskInfo
    from adaptbank.metrics import AccuracyMatrix
    from adaptbank.routing.state import RoutingState
