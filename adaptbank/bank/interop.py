"""A bank's tasks out to, and in from, the formats of the ecosystem: peft adapter folders and merged
transformers checkpoints. The translation lives in ``bank.peft_io`` and ``bank.merged_export``; this
module loads the task from the bank, writes folders whole or not at all (``_atomic.write_folder``), and
commits an imported task through the bank's store like ``AdapterBank.add_task`` does.

Both export folders also carry the task's classification head, so a task makes the round trip::

    DIR/adaptbank_head.safetensors   weight (C, D), bias (C,): logits = W pool(h) + b
    DIR/adaptbank_head.json          labels, pooling (mean | last), hidden size, method, base, and the
                                     task's spec and training settings (what routing it again needs)

An imported task is routed like any other: its router memory (``bank.router_memory``) comes from the
frozen lower layers over its spec's training inputs, and the router is refitted in the same commit.
Its head comes from the folder's head file, or else is fitted as a logistic-regression probe on the
pooled features of the imported expert, frozen (``training.features.probe_head``), over the same inputs.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from adaptbank._atomic import atomic_write_bytes, write_folder
from adaptbank._tensorfile import check_safetensors
from adaptbank._version import __version__
from adaptbank.bank import router_memory
from adaptbank.bank.facade import AdapterBank
from adaptbank.bank.merged_export import write_merged
from adaptbank.bank.peft_io import PeftFormatError, from_peft, read_peft_dir, to_peft, write_peft_dir
from adaptbank.bank.store import TaskExistsError
from adaptbank.bank.task_config import task_config
from adaptbank.core.backbone import DEFAULT_ALIASES, DEFAULT_BACKBONE
from adaptbank.core.config import TrainConfig
from adaptbank.core.model import AdaptBankModel
from adaptbank.core.quantize import quantization_of
from adaptbank.data.load import load_task
from adaptbank.data.specs import TaskSpec, load_task_spec, validate_task_name
from adaptbank.data.tokens import tokenize
from adaptbank.training.evaluate import evaluate
from adaptbank.training.features import encode, frozen_pass, probe_head, task_features

__all__ = ["HEAD_FILE", "HEAD_META", "ImportResult", "export_peft", "export_merged", "import_peft", "read_head"]

HEAD_FILE = "adaptbank_head.safetensors"
HEAD_META = "adaptbank_head.json"


@dataclass(frozen=True)
class ImportResult:
    """What :func:`import_peft` did."""

    name: str
    method: str
    head: str
    """``file`` (the folder's head file) or ``probe`` (fitted on the spec's training split)."""
    test_accuracy: float
    n_train: int
    n_test: int


# ----------------------------------------------------------------------------- export
def export_peft(bank: AdapterBank, task: str, out: str | Path, *, replace: bool = False) -> Path:
    """Write task ``task`` as a peft adapter folder (``bank.peft_io.to_peft``) plus its head file."""
    model = bank.load([task])
    name = DEFAULT_BACKBONE if bank.base["name"] in DEFAULT_ALIASES else bank.base["name"]  # a name peft users can load
    adapter = to_peft(model, task, base_name=name)  # refused before anything is written

    def fill(folder: Path) -> None:
        write_peft_dir(adapter, folder)
        _write_head(bank, model, task, folder)

    return write_folder(out, fill, replace=replace)


def export_merged(bank: AdapterBank, task: str, out: str | Path, *, replace: bool = False) -> Path:
    """Write task ``task`` merged into the base weights as a transformers checkpoint plus its head file (a
    quantised base is dequantised; see ``bank.merged_export``)."""
    model = bank.load([task])

    def fill(folder: Path) -> None:
        write_merged(model, task, folder)
        _write_head(bank, model, task, folder)

    return write_folder(out, fill, replace=replace)


def _write_head(bank: AdapterBank, model: AdaptBankModel, task: str, folder: Path) -> None:
    from safetensors.torch import save

    info, cfg = model.tasks[task], bank.store.read_config(task)
    head = model.export_task(task)["head"]
    atomic_write_bytes(folder / HEAD_FILE, save({k: v.contiguous() for k, v in head.items()},
                                                metadata={"format": "pt"}), sync_dir=False)
    meta = {"format": "adaptbank-head", "adaptbank_version": __version__, "task": task, "labels": list(info.labels),
            "pooling": model.pooling, "hidden_size": model.hidden_size, "method": info.method.to_dict(),
            "base": {"name": bank.base["name"], "fingerprint": bank.base["fingerprint"],
                     "quantize": quantization_of(model.backbone)},
            "spec": cfg.get("spec"), "train": cfg.get("train"), "metrics": {"test_accuracy": cfg["metrics"].get("test_accuracy")}}
    atomic_write_bytes(folder / HEAD_META, json.dumps(meta, indent=2).encode(), sync_dir=False)


def read_head(src: str | Path) -> tuple[dict[str, Any], dict[str, Tensor]] | None:
    """The head file pair in ``src`` (its JSON and its tensors), or None when ``src`` has no head file."""
    from safetensors.torch import load_file

    src = Path(src)
    if not (src / HEAD_FILE).exists() and not (src / HEAD_META).exists():
        return None
    for f in (HEAD_FILE, HEAD_META):
        if not (src / f).is_file():
            raise FileNotFoundError(f"{src} has one half of the head: {f} is missing")
    try:
        meta = json.loads((src / HEAD_META).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        raise ValueError(f"{src / HEAD_META}: invalid JSON: {err}") from None
    if not (isinstance(meta, dict) and isinstance(meta.get("labels"), list) and len(meta["labels"]) >= 2
            and all(isinstance(x, str) for x in meta["labels"])):
        raise ValueError(f"{src / HEAD_META}: expected an object with 'labels', a list of at least 2 strings")
    check_safetensors(src / HEAD_FILE, keys=("weight", "bias"))
    return meta, load_file(src / HEAD_FILE)


# ----------------------------------------------------------------------------- import
def import_peft(bank: AdapterBank, src: str | Path, name: str, *, spec: TaskSpec | str | Path | None = None,
                train: TrainConfig | dict[str, Any] | None = None, allow_other_base: bool = False,
                log: Callable[[str], None] | None = None) -> ImportResult:
    """Add the peft adapter in folder ``src`` to ``bank`` as task ``name``, stored in adaptbank's format.

    The head comes from ``src``'s head file or, without one, is fitted on ``spec``'s training split over
    the frozen imported expert; the task's router memory is computed over the same inputs (``spec``, else
    the spec the head file carries) and the router refitted in the commit. Every check runs before the
    one atomic commit: on any error the bank is unchanged. ``train`` (data sizes, seed, max length) defaults
    to the settings the head file carries, else ``TrainConfig()``; a dict changes only the fields it names."""
    say = log or (lambda _msg: None)
    name = validate_task_name(name)
    if name in bank.tasks():
        raise TaskExistsError(f"task {name!r} already exists in bank {bank.path}; remove it first or import under "
                              "another --task name")
    src = Path(src)
    adapter = read_peft_dir(src)
    head = read_head(src)
    _check_base_name(bank, adapter.config.get("base_model_name_or_path"), allow_other_base)
    model = bank.new_model()
    method, tensors = from_peft(model, adapter)
    if spec is None and head is not None and isinstance(head[0].get("spec"), dict):
        spec = TaskSpec.from_dict(head[0]["spec"])
    if spec is None:
        need = "to fit its head on and to route it by" if head is None else "to route it by (its router memory)"
        raise ValueError(f"importing {src} needs the task's training data {need}: pass --spec SPEC"
                         + ("" if head is not None else f" ({src} holds no {HEAD_FILE})"))
    spec = spec if isinstance(spec, TaskSpec) else load_task_spec(spec)
    if not isinstance(train, TrainConfig):
        stored = head[0].get("train") if head is not None else None
        train = TrainConfig.from_dict({**(stored if isinstance(stored, dict) else {}), **(train or {})})
    data = load_task(spec, max_train=train.max_train, max_test=train.max_test, seed=train.seed)
    labels = list(data.labels)
    if head is not None and list(head[0]["labels"]) != labels:
        raise ValueError(f"the head in {src} has labels {head[0]['labels']} but spec {spec.name!r} gives {labels}")
    C, D = len(labels), model.hidden_size
    head_tensors = head[1] if head is not None else {"weight": torch.zeros(C, D), "bias": torch.zeros(C)}  # the probe's to fill
    model.import_task(name, method, labels, {"adapter": tensors, "head": head_tensors})
    model.check_length(name, train.max_length)
    say(f"{name}: {adapter.config['peft_type']} adapter read as adaptbank {method.kind}")
    ids = tokenize(model.tokenizer, [e.text for e in data.train], train.max_length)
    _, router_feats = frozen_pass(model, ids, router_layers=bank.router_layers, pools=bank.router_pools)  # (N, F)
    if head is None:
        feats = encode(model, ids, task_features(model, name))  # (N, D) under the frozen imported expert
        probe_head(model.heads[name], feats, [e.label for e in data.train], seed=train.seed, c=train.probe_c)
        say(f"{name}: head fitted as a probe on {len(ids)} training examples")
    acc = evaluate(model, name, [e.text for e in data.test], [e.label for e in data.test], max_length=train.max_length)
    files = model.export_task(name)
    files["memory"] = memory = router_memory.task_memory(router_feats, bank.router_config.replay)
    metrics = {"test_accuracy": acc, "n_train": len(data.train), "n_test": len(data.test), "probe_accuracy": None,
               "trainable_params": sum(p.numel() for p in model.expert_parameters(name)),
               "head_params": sum(p.numel() for p in model.heads[name].parameters()), "steps": 0}
    config = task_config(name, spec, method, train, data, group=None, owns=False, parent=None, reason=None,
                         init_from=None, metrics=metrics)
    config["imported_from"] = {"format": "peft", "path": str(src.absolute()), "peft_type": adapter.config["peft_type"],
                               "peft_version": adapter.config.get("peft_version"),
                               "base_model_name_or_path": adapter.config.get("base_model_name_or_path"),
                               "head": "file" if head is not None else "probe"}
    bank.store.write_task(name, files, config, router=bank._router_update(
        add=(name, router_memory.memory_stats(memory)), add_kept=memory.get("replay")))
    bank.store.reload()
    return ImportResult(name=name, method=method.kind, head="file" if head is not None else "probe",
                        test_accuracy=acc, n_train=len(data.train), n_test=len(data.test))


def _check_base_name(bank: AdapterBank, theirs: object, allow: bool) -> None:
    """Refuse an adapter whose ``base_model_name_or_path`` names another model than the bank's base. Names
    agree when equal, when their last path components agree (a hub id and a local copy), or when both
    resolve to one folder; an empty name says nothing and passes (the module shapes are checked anyway)."""
    if allow or not isinstance(theirs, str) or not theirs.strip():
        return
    ours = [str(bank.base["name"]), str(bank.base.get("path") or bank.base["name"])]
    if bank.base["name"] in DEFAULT_ALIASES:
        ours.append(DEFAULT_BACKBONE)
    last = lambda s: s.rstrip("/").rsplit("/", 1)[-1].lower()  # noqa: E731
    same = any(theirs == o or last(theirs) == last(o) for o in ours)
    if not same and Path(theirs).exists():
        same = any(Path(o).exists() and Path(theirs).resolve() == Path(o).resolve() for o in ours)
    if not same:
        raise PeftFormatError(f"the adapter was made for base {theirs!r}, but bank {bank.path} holds base "
                              f"{bank.base['name']!r}; an adapter of another base computes garbage even where the "
                              "shapes agree. If the two are one model under different names, pass --allow-other-base")
