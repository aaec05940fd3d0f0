"""A task's tensors out of and into an ``AdaptBankModel``: the ``export_task``/``import_task`` of the model.

A task is stored as ``{"adapter": {key: tensor}, "head": {...}}`` (``head`` empty for a generation task) with keys free of the task name, so
files are portable between banks and names:

* a linear expert (LoRA, adapters, BitFit, (IA)^3): ``<layer path>.<tensor>``, e.g.
  ``encoder.layer.1.attention.self.query.A`` (a shared A is exported by its group, ``export_shared``);
* a prompt or prefix: ``prompt`` or ``prefix.key``/``prefix.value`` (a prefix collapsed, never its MLP);
* a combined method (``CombinedConfig``): each part's keys as above behind ``<part index>.<kind>.``, e.g.
  ``0.lora.encoder.layer.1.attention.self.query.A``, ``1.adapter.encoder.layer.1.output.dense.down.weight``,
  ``0.prefix.prefix.key``; the index keeps two parts of one kind (on disjoint layers) apart.

Loading checks every key and shape against a freshly created task before any tensor is copied.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from adaptbank.core.composed import expert_parts
from adaptbank.core.config import CombinedConfig, MethodConfig
from adaptbank.core.heads import HeadKind
from adaptbank.core.inject import iter_adapted, submodule
from adaptbank.core.records import TaskInfo, load_checked

if TYPE_CHECKING:
    from adaptbank.core.model import AdaptBankModel

__all__ = ["export_task", "export_shared", "import_task", "load_adapter"]


def export_task(model: AdaptBankModel, name: str) -> dict[str, dict[str, Tensor]]:
    """``{"adapter": {key: t}, "head": {...}}`` of task ``name`` (keys: see the module docstring)."""
    method = model._info(name).method
    adapter: dict[str, Tensor] = {}
    for path, layer in model.layers_of(name).items():
        for label, part in expert_parts(layer.experts[name]):  # type: ignore[arg-type]
            state = part.state_dict() if label else layer.expert_state(name)  # a shared A left out
            adapter |= {f"{label}.{path}.{k}" if label else f"{path}.{k}": v.detach().clone() for k, v in state.items()}
    if name in model.virtual:
        i = method.virtual_part if isinstance(method, CombinedConfig) else None
        label = "" if i is None else f"{i}.{method.parts[i].kind}."  # type: ignore[union-attr]
        adapter |= {label + k: v for k, v in model.virtual.state_of(name).items()}
    head = ({k: v.detach().clone() for k, v in model.heads[name].linear.state_dict().items()}
            if name in model.heads else {})  # a generation task uses the shared, frozen LM head: nothing to store
    return {"adapter": adapter, "head": head}


def export_shared(model: AdaptBankModel, group: str) -> dict[str, Tensor]:
    """The shared A of ``group`` in every layer: ``{"<path>.A": (r, I)}``."""
    return {f"{p}.A": layer.shared_A[group].detach().clone() for p, layer in iter_adapted(model.backbone)
            if group in layer.shared_A}


def import_task(model: AdaptBankModel, name: str, method: MethodConfig, labels: Sequence[str],
                files: dict[str, dict[str, Tensor]], *, shared_group: str | None = None,
                shared: dict[str, Tensor] | None = None, head: HeadKind = "classification") -> TaskInfo:
    """Add task ``name`` (with a ``head`` head) and load its tensors; any missing key, extra key or shape
    mismatch is an error naming the layer and both shapes, and leaves the model without the task."""
    info = model.add_task(name, method, labels, shared_group=shared_group, head=head)
    model.virtual.collapse(name)  # stored prefixes are plain tensors, never the training-time MLP
    try:
        expected = export_task(model, name)
        if shared_group is not None and info.owns_shared:
            if shared is None:
                raise ValueError(f"task {name!r} is the first of shared-A group {shared_group!r} "
                                 "but no shared A tensors were given")
            load_checked(export_shared(model, shared_group), shared, f"shared A of group {shared_group!r}",
                         lambda k, v: _set_shared(model, shared_group, k, v))
        for part in ("adapter", "head"):
            load_checked(expected[part], files.get(part, {}), f"{part} of task {name!r}",
                         lambda k, v, part=part: _set_tensor(model, name, part, k, v))
    except Exception:
        model.remove_task(name)
        raise
    return info


def load_adapter(model: AdaptBankModel, name: str, adapter: dict[str, Tensor], *, source: str) -> None:
    """Overwrite the expert tensors of task ``name`` (already added) with ``adapter``, the stored expert of
    task ``source`` (``add-task --init-from``): every key and shape is checked against ``name``'s own
    export before anything is copied; the head is left alone (its labels are the new task's)."""
    load_checked(export_task(model, name)["adapter"], adapter, f"expert of task {source!r} (to start {name!r} from)",
                 lambda k, v: _set_tensor(model, name, "adapter", k, v))


def _set_tensor(model: AdaptBankModel, name: str, part: str, key: str, value: Tensor) -> None:
    """Copy ``value`` into tensor ``key`` (checked against the export by ``load_checked``) of task ``name``."""
    info = model.tasks[name]
    if part == "head":
        target = model.heads[name].linear.get_parameter(key)
    else:
        index = None
        if isinstance(info.method, CombinedConfig):
            index, _, key = key.split(".", 2)  # "<i>.<kind>.<key of the part>"
            if int(index) == info.method.virtual_part:
                return model.virtual.set_tensor(name, key, value)
        elif name in model.virtual:
            return model.virtual.set_tensor(name, key, value)
        path = next(p for p in info.paths if key.startswith(p + "."))
        expert = submodule(model.backbone, path).experts[name]
        if index is not None:
            expert = expert.parts[index]
        target = expert.get_parameter(key[len(path) + 1:])
    with torch.no_grad():
        target.copy_(value)


def _set_shared(model: AdaptBankModel, group: str, key: str, value: Tensor) -> None:
    path = key[: -len(".A")]
    with torch.no_grad():
        submodule(model.backbone, path).shared_A[group].copy_(value)
