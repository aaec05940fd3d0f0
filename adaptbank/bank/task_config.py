"""A stored task's ``config.json``: what was trained, how, on what, and how well.

Written by :meth:`adaptbank.bank.facade.AdapterBank.add_task` beside the task's tensors, in the same
commit; read by ``adaptbank show`` / ``info``, routing, export and the continual runner::

    {"adaptbank_version", "name", "type", "head": "classification" | "generation",
     "method": {...MethodConfig.to_dict()}, "spec": {...TaskSpec.to_dict()}, "labels": [...],
     "parent": <task> | null,                      # lineage (--parent, or the --init-from source)
     "init_from": null | {"task": <task> | null, "distance": float | null, "reason": str},
     "created": "<iso time>", "shared_group": <group> | null, "owns_shared": bool,
     "share_reason": str | null, "train": {...TrainConfig.to_dict()}, "metrics": {...}}
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from adaptbank._version import __version__
from adaptbank.core.config import MethodConfig, TrainConfig
from adaptbank.data.load import TaskData
from adaptbank.data.specs import TaskSpec

__all__ = ["task_config"]


def task_config(name: str, spec: TaskSpec, method: MethodConfig, train: TrainConfig, data: TaskData, *,
                group: str | None, owns: bool, parent: str | None, reason: str | None,
                init_from: dict[str, Any] | None, metrics: dict[str, Any]) -> dict[str, Any]:
    """The config of task ``name`` as stored (keys: see the module docstring)."""
    return {"adaptbank_version": __version__, "name": name, "type": spec.type, "head": spec.head,
            "method": method.to_dict(), "spec": spec.to_dict(), "labels": list(data.labels), "parent": parent,
            "init_from": init_from, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "shared_group": group, "owns_shared": owns, "share_reason": reason, "train": train.to_dict(),
            "metrics": metrics}
