"""Save and load one task's expert and head outside a bank, peft-style, as a portable folder.

    DIR/adapter.safetensors   the expert; keys "<module path>.<tensor>", free of the task name
    DIR/head.safetensors      the classification head
    DIR/shared_A.safetensors  the shared A, for a task-B expert of a shared-A group (so the folder stands alone)
    DIR/adapter_config.json   method config, labels, shared group, base model name + fingerprint, adaptbank version

The folder appears whole or not at all: :func:`save_expert` writes every file into a temporary
sibling ``.tmp-<name>-<id>`` (each fsynced), then renames it into place, so a crash or an error
midway never leaves a half folder under ``DIR``.  An existing non-empty ``DIR`` is refused unless
``replace=True``; then the old folder is renamed aside, the new one renamed in, and the old deleted.

An expert folder may come from anyone, so loading refuses a folder without its config, a config
that is not the expected JSON object, a file that is a symlink out of the folder, and safetensors
files whose header fails :func:`adaptbank._tensorfile.check_safetensors` (forged sizes, header
bombs, unexpected dtypes or keys), all before a tensor is read.  It then checks every tensor's
shape against the model (an error names the layer and both shapes) and, unless
``check_base=False``, that the base model's fingerprint matches the one the expert was trained on
(a weight-only quantised base, see :mod:`adaptbank.core.quantize`, has another fingerprint than its
full-precision original, and the error says which quantisation each side has).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from adaptbank._atomic import atomic_write_bytes, write_folder
from adaptbank._tensorfile import check_safetensors
from adaptbank._version import __version__
from adaptbank.core.config import stored_method
from adaptbank.core.model import AdaptBankModel, TaskInfo
from adaptbank.core.quantize import quantization_of

__all__ = ["save_expert", "load_expert"]

_CONFIG = "adapter_config.json"
_MAX_CONFIG = 1 << 20


def _write_files(model: AdaptBankModel, name: str, folder: Path) -> None:
    """Every file of task ``name``'s expert folder into ``folder`` (which exists and is empty)."""
    from safetensors.torch import save

    info = model.tasks[name]
    meta = {"format": "pt", "adaptbank_version": __version__}
    files = model.export_task(name)
    if info.shared_group is not None:
        files["shared_A"] = model.export_shared(info.shared_group)
    for stem, tensors in files.items():
        blob = save({k: v.contiguous() for k, v in tensors.items()}, metadata=meta)
        atomic_write_bytes(folder / f"{stem}.safetensors", blob, sync_dir=False)
    config: dict[str, Any] = {"adaptbank_version": __version__, "task": name, "method": info.method.to_dict(),
                              "labels": list(info.labels), "shared_group": info.shared_group,
                              "base": {"name": model.backbone_name, "fingerprint": model.base_fingerprint(),
                                       "quantize": quantization_of(model.backbone)}}
    atomic_write_bytes(folder / _CONFIG, json.dumps(config, indent=2).encode(), sync_dir=False)


def save_expert(model: AdaptBankModel, name: str, directory: str | Path, *, replace: bool = False) -> Path:
    """Write task ``name``'s expert, head and config as the folder ``directory``, atomically.

    ``directory`` must not exist or be empty, unless ``replace=True`` (then the old folder is replaced
    whole).  On any failure ``directory`` is as it was and no temporary is left behind."""
    if name not in model.tasks:
        raise KeyError(f"unknown task {name!r}; the model holds: {', '.join(model.tasks) or 'none'}")
    return write_folder(directory, lambda folder: _write_files(model, name, folder), replace=replace)


def _read_config(src: Path) -> dict[str, Any]:
    path = src / _CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{src} holds no {_CONFIG}; not a saved adaptbank expert (or an incomplete one)")
    if path.stat().st_size > _MAX_CONFIG:
        raise ValueError(f"{path}: {path.stat().st_size} bytes, larger than any expert config ({_MAX_CONFIG})")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        raise ValueError(f"{path}: invalid JSON: {err}") from None
    if not (isinstance(config, dict) and isinstance(config.get("task"), str) and isinstance(config.get("method"), dict)
            and isinstance(config.get("labels"), list) and isinstance(config.get("base", {}), dict)
            and isinstance(config.get("shared_group"), (str, type(None)))):
        raise ValueError(f"{path}: expected an object with 'task' (str), 'method' (object), 'labels' (list), "
                         "'base' (object) and 'shared_group' (str or null)")
    return config


def _tensor_file(src: Path, stem: str) -> Path:
    """``src/<stem>.safetensors`` once it exists inside ``src`` and its header passes the checks."""
    path = src / f"{stem}.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; the expert folder {src} is incomplete")
    if not Path(os.path.realpath(path)).is_relative_to(os.path.realpath(src)):
        raise ValueError(f"{path}: resolves to {os.path.realpath(path)}, outside the expert folder {src}")
    check_safetensors(path)
    return path


def _held(kind: object) -> str:
    return f"{kind!s:.20}-quantised" if kind else "full-precision (not quantised)"


def load_expert(model: AdaptBankModel, directory: str | Path, *, name: str | None = None,
                check_base: bool = True) -> TaskInfo:
    """Add the expert saved in ``directory`` to ``model`` as task ``name`` (default: its saved name)."""
    from safetensors.torch import load_file

    src = Path(directory)
    config = _read_config(src)
    base = config.get("base", {})
    if check_base and base.get("fingerprint") not in (None, model.base_fingerprint()):
        theirs, ours = base.get("quantize"), quantization_of(model.backbone)
        quant = f"; the expert was trained on a {_held(theirs)} base, this model's is {_held(ours)}" if theirs != ours else ""
        raise ValueError(f"{src} was trained on base {base.get('name')!r} (fingerprint {base.get('fingerprint')}), "
                         f"not on this model's base (fingerprint {model.base_fingerprint()}){quant}; pass "
                         "check_base=False to load it anyway")
    group = config.get("shared_group")
    stems = ["adapter", "head"] + (["shared_A"] if group and group not in model.shared_groups else [])
    paths = {stem: _tensor_file(src, stem) for stem in stems}  # every file checked before any is read
    files = {stem: load_file(paths[stem]) for stem in ("adapter", "head")}
    shared = load_file(paths["shared_A"]) if "shared_A" in paths else None
    return model.import_task(name or config["task"], stored_method(config["method"]), config["labels"], files,
                             shared_group=group, shared=shared)
