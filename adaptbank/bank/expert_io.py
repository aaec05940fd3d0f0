"""Save and load one task's expert and head outside a bank, peft-style, as a portable folder.

    DIR/adapter.safetensors   the expert; keys "<module path>.<tensor>", free of the task name
    DIR/head.safetensors      the classification head
    DIR/shared_A.safetensors  the shared A, for a task-B expert of a shared-A group (so the folder stands alone)
    DIR/adapter_config.json   method config, labels, shared group, base model name + fingerprint, adaptbank version

Loading checks every tensor's shape against the model (an error names the layer and both shapes) and,
unless ``check_base=False``, that the base model's fingerprint matches the one the expert was trained on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from adaptbank._atomic import atomic_write_bytes
from adaptbank._version import __version__
from adaptbank.core.config import method_from_dict
from adaptbank.core.model import AdaptBankModel, TaskInfo

__all__ = ["save_expert", "load_expert"]

_CONFIG = "adapter_config.json"


def save_expert(model: AdaptBankModel, name: str, directory: str | Path) -> Path:
    """Write task ``name``'s expert, head and config to ``directory`` (created; files replaced atomically)."""
    from safetensors.torch import save

    info = model.tasks.get(name)
    if info is None:
        raise KeyError(f"unknown task {name!r}; the model holds: {', '.join(model.tasks) or 'none'}")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", "adaptbank_version": __version__}
    files = model.export_task(name)
    if info.shared_group is not None:
        files["shared_A"] = model.export_shared(info.shared_group)
    for stem, tensors in files.items():
        atomic_write_bytes(out / f"{stem}.safetensors", save({k: v.contiguous() for k, v in tensors.items()}, metadata=meta))
    config: dict[str, Any] = {"adaptbank_version": __version__, "task": name, "method": info.method.to_dict(),
                              "labels": list(info.labels), "shared_group": info.shared_group,
                              "base": {"name": model.backbone_name, "fingerprint": model.base_fingerprint()}}
    atomic_write_bytes(out / _CONFIG, json.dumps(config, indent=2).encode())
    return out


def load_expert(model: AdaptBankModel, directory: str | Path, *, name: str | None = None,
                check_base: bool = True) -> TaskInfo:
    """Add the expert saved in ``directory`` to ``model`` as task ``name`` (default: its saved name)."""
    from safetensors.torch import load_file

    src = Path(directory)
    if not (src / _CONFIG).is_file():
        raise FileNotFoundError(f"{src} holds no {_CONFIG}; not a saved adaptbank expert")
    try:
        config = json.loads((src / _CONFIG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{src / _CONFIG}: invalid JSON: {err}") from None
    base = config.get("base", {})
    if check_base and base.get("fingerprint") not in (None, model.base_fingerprint()):
        raise ValueError(f"{src} was trained on base {base.get('name')!r} (fingerprint {base.get('fingerprint')}), "
                         f"not on this model's base (fingerprint {model.base_fingerprint()}); pass "
                         "check_base=False to load it anyway")
    files = {stem: load_file(src / f"{stem}.safetensors") for stem in ("adapter", "head")}
    group = config.get("shared_group")
    shared = load_file(src / "shared_A.safetensors") if group and group not in model.shared_groups else None
    return model.import_task(name or config["task"], method_from_dict(config["method"]), config["labels"], files,
                             shared_group=group, shared=shared)
