"""Continual-learning runs: run specs, strategies (the bank and its baselines), the resumable loop, CLI.

    RunSpec (runspec.py) ──run_sequence (loop.py)──> RUN_DIR/result.json ──report.py──> md / html / json
                               │
                               └── Strategy (strategies.py): bank, shared-a, seq-lora, seq-full, ewc,
                                   replay, olora, joint; trained by the one loop of training.loop

Public names load lazily (PEP 562), so ``adaptbank.continual.commands`` and ``runspec`` import
without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS: dict[str, str] = {
    "RunSpec": "runspec",
    "StrategyOptions": "runspec",
    "STRATEGIES": "runspec",
    "load_run_spec": "runspec",
    "run_spec_from_toml": "runspec",
    "run_spec_from_dict": "runspec",
    "run_sequence": "loop",
    "Callback": "loop",
    "RunStart": "loop",
    "TaskStart": "loop",
    "StepEnd": "loop",
    "TaskEnd": "loop",
    "RunEnd": "loop",
    "Strategy": "strategies",
    "make_strategy": "strategies",
}

__all__ = ["Callback", "RunEnd", "RunSpec", "RunStart", "STRATEGIES", "StepEnd", "Strategy", "StrategyOptions",
           "TaskEnd", "TaskStart", "load_run_spec", "make_strategy", "run_sequence", "run_spec_from_dict",
           "run_spec_from_toml"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"adaptbank.continual.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'adaptbank.continual' has no attribute {name!r}")


if TYPE_CHECKING:  # pragma: no cover
    from adaptbank.continual.loop import Callback, RunEnd, RunStart, StepEnd, TaskEnd, TaskStart, run_sequence
    from adaptbank.continual.runspec import (
        STRATEGIES,
        RunSpec,
        StrategyOptions,
        load_run_spec,
        run_spec_from_dict,
        run_spec_from_toml,
    )
    from adaptbank.continual.strategies import Strategy, make_strategy
