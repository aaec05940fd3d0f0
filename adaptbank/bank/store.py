"""On-disk bank storage: named groups of tensors as safetensors files, JSON sidecars, one manifest.

The store knows nothing about models.  It keeps, for one frozen base model, *groups* of tensors
(``dict[str, Tensor]``, one safetensors file per *stem*) per task, optional shared groups, and a
router, with ``manifest.json`` as the single commit point::

    BANK/
      manifest.json                     # replaced atomically, last: the commit point
      .lock                             # flock'ed by writers around the manifest update; holds the holder's pid
      tasks/<task>@<id>/<stem>.safetensors ... config.json     # immutable once committed
      shared/<group>@<id>/<stem>.safetensors                   # tensors shared by several tasks
      router/<id>/<stem>.safetensors + router.json

Write protocol (``write_task``, ``remove_task``, ``write_router``)::

    new dir <x>@<id> (unique, written WITHOUT the lock; every file: .tmp -> fsync -> replace)
      -> fsync dir -> [lock .lock] re-read manifest, check conflicts, replace manifest [unlock]
      -> delete superseded dirs

A task is therefore fully in the bank or absent; a crash leaves at most unreferenced dirs and
``.tmp-*`` files, which readers ignore, ``verify`` reports as warnings and ``repair`` deletes.
While a writer's new dir is not yet committed it holds a flock on ``BANK/.tmp-pending-<id>``;
``repair`` skips dirs whose marker is still locked, so it never deletes a write in progress.
Readers never lock: ``manifest.json`` is always complete, and committed dirs never change.
"""

from __future__ import annotations

import contextlib
import copy
import json
import shutil
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:  # torch and safetensors load lazily: listing a bank must not pay for importing torch
    import torch

from adaptbank._atomic import atomic_write_bytes, fsync_dir
from adaptbank.bank.files import BankFiles, encode
from adaptbank.bank.locks import pending_marker, writer_lock
from adaptbank.bank.manifest import (  # the errors and Problem are re-exported: callers import them from here
    _AREAS,
    _MANIFEST,
    SCHEMA_VERSION,
    BankCorruptError,
    BankError,
    BankLockedError,
    Check,
    Problem,
    TaskExistsError,
    TaskNotFoundError,
    _check_task_write,
    _CommittedError,
    _drop_member,
    _dumps,
    _find_group,
    _find_task,
    _groups,
    _is_skeleton,
    _now,
    _version,
    encode_manifest,
    manifest_from_bytes,
    read_manifest_bytes,
)
from adaptbank.core.config import validate_name

__all__ = [
    "DEFAULT_LOCK_TIMEOUT", "SCHEMA_VERSION", "BankCorruptError", "BankError", "BankLockedError", "BankStore", "Check", "Problem",
    "RouterUpdate", "TaskExistsError", "TaskNotFoundError",
]

RouterUpdate = Callable[[tuple[dict, dict[str, Any]] | None, list[str], Callable[[str, str], "dict[str, torch.Tensor]"]],
                        tuple[dict, dict[str, Any], list[str]] | None]
"""Called under the lock with the stored router ``(files, meta)`` (or None), the task names after the change and
``previous(task, stem)``, a task's tensors as committed before it; returns ``(files, meta, expert_order)`` or None."""
_T = TypeVar("_T")
DEFAULT_LOCK_TIMEOUT = 300.0
"""Seconds a writer waits for the bank lock by default: long enough for another add-task's commit, short
enough that a writer stuck behind a hung process fails, naming its pid, instead of waiting forever."""


class BankStore:
    """A bank directory: atomic, locked, checksummed storage of per-task tensor groups.

    Get one with :meth:`create` or :meth:`open`.  The manifest is cached; readers use the cache
    (and re-read it once if a file vanished under a concurrent replace), writers always re-read
    it under the lock.  Call :meth:`reload` to see other processes' commits.
    """

    def __init__(self, path: str | Path, manifest: dict[str, Any], *,
                 lock_timeout: float | None = DEFAULT_LOCK_TIMEOUT) -> None:
        """Internal; use :meth:`create` or :meth:`open`."""
        self.path: Path = Path(path).absolute()
        self._files = BankFiles(self.path)
        self._manifest = manifest
        self._written: bytes | None = None  # the manifest bytes this object last committed or validated (known valid)
        self._cached_raw: bytes | None = None  # the bytes self._manifest was parsed from or committed as
        self.lock_timeout = lock_timeout
        """Seconds a writer waits for the lock before ``BankLockedError``; None waits forever."""

    def __repr__(self) -> str:
        return f"BankStore({str(self.path)!r}, tasks={len(self._manifest.get('tasks', []))})"

    # ------------------------------------------------------------------ open / create
    @classmethod
    def create(cls, path: str | Path, *, base: dict[str, Any],
               lock_timeout: float | None = DEFAULT_LOCK_TIMEOUT) -> BankStore:
        """Create an empty bank at ``path`` (missing or empty dir) for the base model ``base``.

        ``base`` is free-form JSON but must hold string ``name`` and ``fingerprint``.
        """
        if not (isinstance(base, dict) and isinstance(base.get("name"), str) and isinstance(base.get("fingerprint"), str)):
            raise ValueError(f"base must be a dict with string 'name' and 'fingerprint', got {base!r:.200}")
        base = json.loads(_dumps(base, "base"))
        store = cls(path, {}, lock_timeout=lock_timeout)
        p = store.path
        if (p / _MANIFEST).exists():
            raise BankError(f"{p}: already an adaptbank bank; use BankStore.open")
        if p.exists() and (not p.is_dir() or not _is_skeleton(p)):
            raise BankError(f"{p}: exists and is not an empty directory; refusing to create a bank there")
        try:
            for area in _AREAS:
                (p / area).mkdir(parents=True, exist_ok=True)
            with writer_lock(store.path, store.lock_timeout):
                if (p / _MANIFEST).exists():
                    raise BankError(f"{p}: another process created a bank here concurrently")
                store._commit({"schema": SCHEMA_VERSION, "adaptbank_version": _version(), "created": _now(),
                               "base": base, "tasks": [], "shared": {}, "router": None, "meta": {}})
        except OSError as exc:
            raise BankError(f"{p}: cannot create bank: {exc}") from exc
        return store

    @classmethod
    def open(cls, path: str | Path, *, expect_base_fingerprint: str | None = None,
             lock_timeout: float | None = DEFAULT_LOCK_TIMEOUT) -> BankStore:
        """Open an existing bank; refuse a bad manifest, a newer schema or another base model."""
        store = cls(path, {}, lock_timeout=lock_timeout)
        store.reload()
        base = store._manifest["base"]
        if expect_base_fingerprint is not None and base["fingerprint"] != expect_base_fingerprint:
            raise BankError(f"{store.path}: bank was built for base model {base['name']!r} with fingerprint "
                            f"{base['fingerprint']!r}, but fingerprint {expect_base_fingerprint!r} was expected")
        return store

    def reload(self) -> None:
        """Re-read ``manifest.json`` (to see commits made by other processes); when it still holds the bytes
        the cached manifest came from, nothing is parsed (a manifest of 1,000 tasks takes 20 ms to parse)."""
        raw = read_manifest_bytes(self.path)
        if raw == self._cached_raw:
            return
        self._manifest = self._read_manifest(raw)
        self._cached_raw = raw

    @property
    def generation(self) -> int:
        """The cached manifest's commit count: it changes when :meth:`reload` sees another process's commit."""
        return int(self._manifest.get("generation", 0))

    @property
    def manifest(self) -> dict[str, Any]:
        """A deep copy of the cached manifest (mutating it changes nothing); O(tasks): for one section use
        :meth:`section`."""
        return copy.deepcopy(self._manifest)

    def section(self, key: str) -> Any:
        """A deep copy of one top-level section of the cached manifest (``"base"``, ``"shared"``, ...),
        without copying the task list: a bank of 1,000 tasks deep-copied its whole manifest on every
        ``AdapterBank.base`` read, 4x the time of loading one task."""
        return copy.deepcopy(self._manifest[key])

    # ------------------------------------------------------------------ reading
    def tasks(self) -> list[str]:
        """Task names in insertion order (a replaced task keeps its position)."""
        return [t["name"] for t in self._manifest["tasks"]]

    def task_entry(self, name: str) -> dict[str, Any]:
        """A copy of the manifest entry of task ``name``."""
        return copy.deepcopy(_find_task(self._manifest, name, self.path))

    def stems(self, name: str) -> list[str]:
        """Stems of the tensor files stored for task ``name``."""
        return sorted(r[: -len(".safetensors")] for r in _find_task(self._manifest, name, self.path)["files"]
                      if r.endswith(".safetensors"))

    def read_config(self, name: str, *, check: Check = "fast") -> dict[str, Any]:
        """The JSON config stored with task ``name``."""
        label = f"task {name!r}"
        return self._fresh(lambda m: _find_task(m, name, self.path),
                           lambda e: self._files.load_json(e, "config.json", check, label))

    def read_tensors(self, name: str, stem: str, *, check: Check = "fast",
                     keys: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Tensors of file group ``stem`` of task ``name`` (only ``keys`` when given).

        ``check``: "fast" compares size and mtime with the manifest and falls back to sha256 when
        the mtime differs; "full" always hashes; "none" trusts the file.
        """
        validate_name(stem, "stem")
        label = f"task {name!r}"
        return self._fresh(lambda m: _find_task(m, name, self.path),
                           lambda e: self._files.load_tensors(e, stem, check, label, keys))

    def read_shared(self, group: str, stem: str, *, check: Check = "fast") -> dict[str, torch.Tensor]:
        """Tensors of file group ``stem`` of shared group ``group``."""
        validate_name(stem, "stem")
        label = f"shared group {group!r}"
        return self._fresh(lambda m: _find_group(m, group, self.path),
                           lambda e: self._files.load_tensors(e, stem, check, label))

    def read_router(self, *, check: Check = "fast") -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]] | None:
        """``(files, meta)`` as given to :meth:`write_router`, or None when no router is stored."""
        if self._manifest["router"] is None:
            return None
        return self._fresh(self._router, lambda e: self._load_router(e, check))

    def _load_router(self, e: dict[str, Any], check: Check) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
        stems = [r[: -len(".safetensors")] for r in e["files"] if r.endswith(".safetensors")]
        files = {s: self._files.load_tensors(e, s, check, "router") for s in stems}
        return files, self._files.load_json(e, "router.json", check, "router")

    def router_expert_order(self) -> list[str] | None:
        """Task names in the order the stored router's outputs refer to them."""
        r = self._manifest["router"]
        return None if r is None else list(r["expert_order"])

    def bytes_on_disk(self, name: str | None = None) -> int:
        """Bytes of task ``name``'s own files, or of everything referenced (plus the manifest)."""
        if name is not None:
            return sum(r["size"] for r in _find_task(self._manifest, name, self.path)["files"].values())
        total = sum(r["size"] for _, e in _groups(self._manifest) for r in e["files"].values())
        return total + (self.path / _MANIFEST).stat().st_size

    # ------------------------------------------------------------------ writing
    def write_task(self, name: str, files: dict[str, dict[str, torch.Tensor]], config: dict[str, Any], *,
                   shared: str | None = None, shared_files: dict[str, dict[str, torch.Tensor]] | None = None,
                   replace: bool = False, router: RouterUpdate | None = None) -> None:
        """Store task ``name``: one safetensors file per stem in ``files`` plus ``config.json``.

        ``shared`` names a shared group the task uses: with ``shared_files`` the group is created
        (an error if it exists, unless it only served this task and ``replace`` is set), without
        it the group must exist.  ``replace=True`` commits a new version in a new directory and
        deletes the old one afterwards.  ``router`` updates the router in the same commit (see
        :data:`RouterUpdate`).  On failure the bank is unchanged.
        """
        validate_name(name)
        if shared is None and shared_files is not None:
            raise ValueError(f"task {name!r}: shared_files given without shared=<group name>")
        if shared is not None:
            validate_name(shared, "shared group name")
        payload = encode(files, name)
        payload["config.json"] = _dumps(config, f"config of task {name!r}")
        spayload = encode(shared_files, shared) if shared is not None and shared_files is not None else None
        creating = spayload is not None
        # Early check without the lock so that a doomed write costs no I/O; re-checked under it.  The cached
        # manifest first (no read per commit); only when it refuses, the committed one (it may be newer).
        try:
            _check_task_write(self._manifest, self.path, name, shared, creating, replace)
        except BankError:
            _check_task_write(self._read_manifest(), self.path, name, shared, creating, replace)
        uid = uuid.uuid4().hex[:12]
        tdir, sdir = f"tasks/{name}@{uid}", f"shared/{shared}@{uid}"

        def apply(m: dict[str, Any], records: dict[str, dict[str, Any]]) -> list[str]:
            _check_task_write(m, self.path, name, shared, creating, replace)
            before = list(m["tasks"])
            entry = {"name": name, "dir": tdir, "files": records[tdir], "shared": shared, "created": _now()}
            idx = next((i for i, t in enumerate(m["tasks"]) if t["name"] == name), None)
            doomed: list[str] = []
            if idx is None:
                m["tasks"].append(entry)
            else:
                old = m["tasks"][idx]
                m["tasks"][idx] = entry
                doomed.append(old["dir"])
                if old["shared"] is not None and (old["shared"] != shared or creating):
                    doomed += _drop_member(m, old["shared"], name)
            if creating:
                m["shared"][shared] = {"dir": sdir, "files": records[sdir], "tasks": [name], "created": _now()}
            elif shared is not None and name not in m["shared"][shared]["tasks"]:
                m["shared"][shared]["tasks"].append(name)
            return doomed + self._apply_router(m, router, uid, before)

        new = {tdir: payload} | ({sdir: spayload} if spayload is not None else {})
        self._transaction(f"writing task {name!r}", uid, new, apply)

    def remove_task(self, name: str, *, router: RouterUpdate | None = None) -> None:
        """Remove task ``name``; its shared group goes too when it was the group's last task.
        ``router`` updates the router in the same commit."""
        validate_name(name)
        uid = uuid.uuid4().hex[:12]

        def apply(m: dict[str, Any], _: dict[str, dict[str, Any]]) -> list[str]:
            old = _find_task(m, name, self.path)
            m["tasks"].remove(old)
            doomed = [old["dir"]] + (_drop_member(m, old["shared"], name) if old["shared"] else [])
            return doomed + self._apply_router(m, router, uid, [*m["tasks"], old])

        self._transaction(f"removing task {name!r}", uid, {}, apply)

    def _apply_router(self, m: dict[str, Any], update: RouterUpdate | None, uid: str,
                      before: list[dict[str, Any]]) -> list[str]:
        """Under the lock: compute the new router from the current one (``before``: the task entries before the
        change) and write it as ``router/<uid>`` into manifest ``m`` (not committed). Returns the superseded dir."""
        if update is None:
            return []
        current = None if m["router"] is None else self._load_router(m["router"], "full")

        def previous(task: str, stem: str) -> dict[str, torch.Tensor]:
            entry = _find_task({"tasks": before}, task, self.path)
            return self._files.load_tensors(entry, validate_name(stem, "stem"), "full", f"task {task!r}")

        result = update(current, [t["name"] for t in m["tasks"]], previous)
        if result is None:
            return []
        files, meta, order = result
        missing = sorted(set(order) - {t["name"] for t in m["tasks"]})
        if missing or len(set(order)) != len(order):
            raise BankError(f"{self.path}: router expert order {order} must name distinct bank tasks")
        payload = encode(files, "router")
        payload["router.json"] = _dumps(meta, "router meta")
        rdir = f"router/{uid}"
        try:
            records = self._write_dir(rdir, payload)
        except BaseException:
            shutil.rmtree(self.path / rdir, ignore_errors=True)
            raise
        doomed = [m["router"]["dir"]] if m["router"] is not None else []
        m["router"] = {"dir": rdir, "files": records, "expert_order": list(order), "created": _now()}
        return doomed

    def write_router(self, files: dict[str, dict[str, torch.Tensor]], meta: dict[str, Any],
                     expert_order: list[str]) -> None:
        """Store (replace) the router; ``expert_order`` lists the bank tasks its outputs map to."""
        payload = encode(files, "router")
        payload["router.json"] = _dumps(meta, "router meta")
        order = [validate_name(n, "expert_order entry") for n in expert_order]
        if len(set(order)) != len(order):
            raise ValueError(f"expert_order {order!r} contains duplicates")
        uid = uuid.uuid4().hex[:12]
        rdir = f"router/{uid}"

        def apply(m: dict[str, Any], records: dict[str, dict[str, Any]]) -> list[str]:
            missing = sorted(set(order) - {t["name"] for t in m["tasks"]})
            if missing:
                raise BankError(f"{self.path}: router expert_order names tasks not in the bank: {missing}")
            doomed = [m["router"]["dir"]] if m["router"] is not None else []
            m["router"] = {"dir": rdir, "files": records[rdir], "expert_order": order, "created": _now()}
            return doomed

        self._transaction("writing the router", uid, {rdir: payload}, apply)

    # ------------------------------------------------------------------ maintenance
    def verify(self, *, full: bool = True) -> list[Problem]:
        """Check every referenced file and directory; see :func:`adaptbank.bank.maintenance.verify`.  Errors:
        missing/size/checksum/unreadable/extra/escape/manifest.  Warnings (``is_error`` False): leftover
        ``temporary`` files, ``orphan`` dirs (both cleaned by :meth:`repair`), a ``stale`` router order."""
        from adaptbank.bank import maintenance

        return maintenance.verify(self, full=full)

    def repair(self) -> list[str]:
        """Delete stale ``.tmp-*`` files and unreferenced dirs; return their bank-relative paths.  Never touches
        files the manifest references, nor new dirs of writes in progress (:func:`adaptbank.bank.maintenance.repair`)."""
        from adaptbank.bank import maintenance

        return maintenance.repair(self)

    # ------------------------------------------------------------------ internals
    def _read_manifest(self, raw: bytes | None = None) -> dict[str, Any]:
        """The committed manifest (``raw``: its bytes, already read), validated unless it is byte for byte
        the one this object last saw valid; its bytes become the ones known valid."""
        raw = read_manifest_bytes(self.path) if raw is None else raw
        manifest = manifest_from_bytes(raw, self.path, known=self._written)
        self._written = raw
        return manifest

    def _router(self, m: dict[str, Any]) -> dict[str, Any]:
        if m["router"] is None:
            raise BankError(f"{self.path}: the router was removed concurrently")
        return m["router"]

    def _fresh(self, lookup: Callable[[dict[str, Any]], dict[str, Any]], fn: Callable[[dict[str, Any]], _T]) -> _T:
        """Run ``fn(entry)``; if a file vanished because another process committed a newer version
        (and deleted the old dir), re-read the manifest and retry once on the new entry.  Reads of several
        files that must agree run under ``bank.snapshot.read_consistent``, which notices that re-read."""
        entry = lookup(self._manifest)
        try:
            return fn(entry)
        except BankCorruptError as exc:
            if exc.kind != "missing":
                raise
            self.reload()
            fresh = lookup(self._manifest)
            if fresh["dir"] == entry["dir"]:
                raise
            return fn(fresh)

    def _write_dir(self, reldir: str, payload: dict[str, bytes]) -> dict[str, dict[str, Any]]:
        """Create ``reldir`` holding ``payload`` durably; return the manifest file records."""
        return self._files.write_dir(reldir, payload)

    def _commit(self, manifest: dict[str, Any]) -> None:
        """Replace manifest.json (the commit point), one generation up. Caller holds the lock."""
        manifest["generation"] = manifest.get("generation", 0) + 1
        raw = encode_manifest(manifest)
        atomic_write_bytes(self.path / _MANIFEST, raw, sync_dir=False)
        self._manifest, self._written, self._cached_raw = manifest, raw, raw
        try:
            fsync_dir(self.path)
        except OSError as exc:
            raise _CommittedError(f"{self.path}: {_MANIFEST} was replaced (change committed) but fsyncing the "
                                  f"bank directory failed, so it may not survive a power loss: {exc}") from exc

    def _transaction(self, label: str, uid: str, new: dict[str, dict[str, bytes]],
                     apply: Callable[[dict[str, Any], dict[str, dict[str, Any]]], list[str]]) -> None:
        """Write ``new`` dirs unlocked, then apply+commit under the lock, then delete doomed dirs."""
        try:
            with pending_marker(self.path, uid, self.lock_timeout) if new else contextlib.nullcontext():
                try:
                    records = {reldir: self._write_dir(reldir, payload) for reldir, payload in new.items()}
                    with writer_lock(self.path, self.lock_timeout):
                        m = self._read_manifest()
                        doomed = apply(m, records)
                        self._commit(m)
                except _CommittedError:
                    raise
                except BaseException:
                    for reldir in new:
                        shutil.rmtree(self.path / reldir, ignore_errors=True)
                    raise
            for reldir in doomed:  # a failure here only leaves an orphan for repair()
                parts = PurePosixPath(reldir).parts  # a tampered manifest must not get "tasks" deleted
                with contextlib.suppress(BankCorruptError):
                    if len(parts) == 2 and parts[0] in _AREAS:
                        shutil.rmtree(self._files.inside(reldir, label), ignore_errors=True)
        except OSError as exc:
            raise BankError(f"{self.path}: {label} failed; the bank is unchanged: {exc}") from exc
