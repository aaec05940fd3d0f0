"""Bank maintenance: ``verify`` (an integrity audit) and ``repair`` (deleting crash leftovers).

A crash during a write (see the write protocol in :mod:`adaptbank.bank.store`) leaves at most
unreferenced directories and ``.tmp-*`` files.  :func:`verify` checks every file the manifest
references (sha256, or size+mtime) and reports those leftovers as warnings; :func:`repair` deletes
them under the writers' lock, sparing the new directories of writes still in progress (their
``BANK/.tmp-pending-<id>`` marker is still flock'ed).  ``BankStore.verify``/``BankStore.repair``
call these; torch is imported only to open safetensors files.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from adaptbank._atomic import TMP_PREFIX, marker_live
from adaptbank.bank.locks import writer_lock
from adaptbank.bank.manifest import (
    _AREAS,
    _MANIFEST,
    _PENDING,
    BankCorruptError,
    BankError,
    Problem,
    _groups,
    _norm,
)

if TYPE_CHECKING:  # the store calls in here; only its type is needed
    from adaptbank.bank.files import BankFiles
    from adaptbank.bank.store import BankStore

__all__ = ["repair", "verify"]


def verify(store: BankStore, *, full: bool = True) -> list[Problem]:
    """Check every referenced file (sha256 if ``full``, else size+mtime) and the directories.

    Errors: missing/size/checksum/unreadable/extra/escape/manifest.  Warnings (``is_error``
    False): leftover ``temporary`` files, ``orphan`` dirs (both cleaned by :func:`repair`) and a
    ``stale`` router order naming removed tasks.
    """
    try:
        store.reload()
    except BankError as exc:
        return [Problem("manifest", _MANIFEST, str(exc))]
    m, problems = store._manifest, []
    for label, entry in _groups(m):
        problems += _verify_group(store._files, label, entry, full)
    if m["router"] is not None:
        gone = sorted(set(m["router"]["expert_order"]) - set(store.tasks()))
        if gone:
            problems.append(Problem("stale", m["router"]["dir"],
                                    f"router expert_order names removed tasks {gone}"))
    referenced = {_norm(e["dir"]) for _, e in _groups(m)}
    for rel in _scan(store.path):
        if PurePosixPath(rel).name.startswith(TMP_PREFIX):
            problems.append(Problem("temporary", rel, f"{store.path}: leftover temporary (or a write in "
                                    "progress); repair() removes it"))
        elif rel not in referenced:
            problems.append(Problem("orphan", rel, f"{store.path}: directory not referenced by the manifest "
                                    "(interrupted or superseded write); repair() removes it"))
    return problems


def repair(store: BankStore) -> list[str]:
    """Delete stale ``.tmp-*`` files and unreferenced dirs; return their bank-relative paths.

    Never touches files the manifest references, nor the new dirs of writes still in progress.
    """
    removed: list[str] = []
    try:
        with writer_lock(store.path, store.lock_timeout):
            store.reload()
            referenced = {_norm(e["dir"]) for _, e in _groups(store._manifest)}
            live = set()
            for marker in sorted(store.path.glob(f"{_PENDING}*")):
                if marker_live(marker):
                    live.add(marker.name[len(_PENDING):])
            for rel in _scan(store.path):
                name = PurePosixPath(rel).name
                if "/" not in rel:  # root temporary: spare only live pending markers
                    uid = name[len(_PENDING):] if name.startswith(_PENDING) else None
                else:  # tasks/<x>@<uid>, shared/<g>@<uid>, router/<uid>
                    uid = name if rel.startswith("router/") else name.rpartition("@")[2]
                if rel in referenced or uid in live:
                    continue
                target = store.path / rel
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                else:
                    target.unlink()
                removed.append(rel)
            for _, entry in _groups(store._manifest):  # stale temporaries inside committed dirs
                with contextlib.suppress(BankCorruptError, OSError):
                    d = store._files.inside(entry["dir"], "repair")
                    for n in sorted(os.listdir(d)):
                        if n.startswith(TMP_PREFIX) and n not in entry["files"]:
                            (d / n).unlink()
                            removed.append(f"{_norm(entry['dir'])}/{n}")
    except OSError as exc:
        raise BankError(f"{store.path}: repair failed: {exc}") from exc
    return removed


def _verify_group(files: BankFiles, label: str, entry: dict[str, Any], full: bool) -> list[Problem]:
    """Problems of one manifest entry's directory: its listed files, and files it does not list."""
    try:
        d = files.inside(entry["dir"], label)
        names = sorted(os.listdir(d))
    except BankCorruptError as exc:
        return [Problem(exc.kind, entry["dir"], str(exc))]
    except OSError as exc:
        return [Problem("missing", entry["dir"],
                        f"{files.path}: {label}: directory unreadable or missing: {exc}")]
    problems = []
    for rel in entry["files"]:
        try:
            path = files.checked_file(entry, rel, "full" if full else "fast", label)
            if rel.endswith(".safetensors"):
                from safetensors import safe_open

                with safe_open(path, framework="pt") as fh:
                    fh.keys()
            elif rel.endswith(".json"):
                json.loads(path.read_bytes())
        except BankCorruptError as exc:
            problems.append(Problem(exc.kind, f"{entry['dir']}/{rel}", str(exc)))
        except Exception as exc:  # noqa: BLE001 - parser/OS failure of a listed file
            problems.append(Problem("unreadable", f"{entry['dir']}/{rel}",
                                    f"{files.path}: {label}: {rel}: {exc}"))
    for n in names:
        if n not in entry["files"]:
            kind = "temporary" if n.startswith(TMP_PREFIX) else "extra"
            problems.append(Problem(kind, f"{_norm(entry['dir'])}/{n}",
                                    f"{files.path}: {label}: file {n!r} is not listed in the manifest"))
    return problems


def _scan(path: Path) -> list[str]:
    """Bank-relative names of root temporaries and of every entry in the area dirs of bank ``path``."""
    out = sorted(n for n in os.listdir(path) if n.startswith(TMP_PREFIX))
    for area in _AREAS:
        if (path / area).is_dir():
            out += [f"{area}/{n}" for n in sorted(os.listdir(path / area))]
    return out
