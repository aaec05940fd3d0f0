"""On-disk bank storage: named groups of tensors as safetensors files, JSON sidecars, one manifest.

The store knows nothing about models.  It keeps, for one frozen base model, *groups* of tensors
(``dict[str, Tensor]``, one safetensors file per *stem*) per task, optional shared groups, and a
router, with ``manifest.json`` as the single commit point::

    BANK/
      manifest.json                     # replaced atomically, last: the commit point
      .lock                             # fcntl.flock'ed by writers around the manifest update
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
import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Literal, TypeVar

if TYPE_CHECKING:  # torch and safetensors load lazily: listing a bank must not pay for importing torch
    import torch

from adaptbank._atomic import (
    TMP_PREFIX,
    atomic_write_bytes,
    exclusive_lock,
    file_digest,
    fsync_dir,
    hold_marker,
    marker_live,
)
from adaptbank._version import __version__

__all__ = [
    "SCHEMA_VERSION", "BankCorruptError", "BankError", "BankLockedError", "BankStore", "Problem",
    "TaskExistsError", "TaskNotFoundError",
]

SCHEMA_VERSION = 1
"""Manifest schema this module writes; banks with a larger ``schema`` are refused."""

Check = Literal["fast", "full", "none"]
RouterUpdate = Callable[[tuple[dict, dict[str, Any]] | None, list[str]], tuple[dict, dict[str, Any], list[str]] | None]
"""Called under the bank lock with the stored router ``(files, meta)`` (or None) and the bank's task
names after the change; returns the new ``(files, meta, expert_order)`` or None to leave it."""
_T = TypeVar("_T")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*\Z")  # no "." (task names key torch ModuleDicts)
_FILE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\Z")
_SHA_RE = re.compile(r"[0-9a-f]{64}\Z")
_MANIFEST, _LOCK, _PENDING = "manifest.json", ".lock", f"{TMP_PREFIX}pending-"
_AREAS = ("tasks", "shared", "router")
_WARNING_KINDS = frozenset({"temporary", "orphan", "stale"})


def _version() -> str:
    return __version__


class BankError(Exception):
    """Base of every bank failure; messages name the bank path, task, file and the problem."""


class BankCorruptError(BankError):
    """Bank contents disagree with the manifest, or the manifest itself is malformed."""

    def __init__(self, message: str, *, kind: str = "corrupt") -> None:
        super().__init__(message)
        self.kind = kind
        """Problem kind: missing, size, checksum, unreadable, escape, manifest or corrupt."""


class BankLockedError(BankError):
    """The writer lock could not be taken within the ``lock_timeout`` given to open/create."""


class TaskExistsError(BankError):
    """``write_task`` for a name already in the bank, without ``replace=True``."""


class TaskNotFoundError(BankError, KeyError):
    """No task (or shared group) of that name in the bank."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class Problem:
    """One finding of ``BankStore.verify``."""

    kind: str
    """missing|size|checksum|unreadable|extra|escape|manifest (errors); temporary|orphan|stale (warnings)."""
    path: str
    """Path relative to the bank root (as written in the manifest for escapes)."""
    message: str

    @property
    def is_error(self) -> bool:
        """False for warnings, i.e. leftovers that ``repair`` cleans or a stale router order."""
        return self.kind not in _WARNING_KINDS


def _validate_name(value: object, what: str = "task name") -> str:
    """Return ``value`` if it is a valid task/group/stem name, else raise ``ValueError``."""
    if not (isinstance(value, str) and len(value) <= 100 and _NAME_RE.match(value) and ".." not in value):
        raise ValueError(
            f"invalid {what} {value!r}: must be 1..100 characters matching "
            f"[A-Za-z0-9][A-Za-z0-9_-]* (no '.', '/' or '..')"
        )
    return value


def _is_name(value: object) -> bool:
    try:
        return _validate_name(value) is not None
    except ValueError:
        return False


def _is_file_name(value: object) -> bool:
    """A plain file name inside a bank directory: no separators, no '..'."""
    return isinstance(value, str) and len(value) <= 200 and bool(_FILE_RE.match(value)) and ".." not in value


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _dumps(obj: object, what: str) -> bytes:
    if not isinstance(obj, dict):
        raise TypeError(f"{what} must be a dict, got {type(obj).__name__}")
    try:
        return json.dumps(obj, indent=2, sort_keys=True, allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{what} must be JSON-serializable: {exc}") from exc


def _norm(reldir: str) -> str:
    return str(PurePosixPath(reldir))


def _groups(m: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(label, entry) for every manifest entry that owns a directory."""
    out = [(f"task {t['name']!r}", t) for t in m["tasks"]]
    out += [(f"shared group {g!r}", e) for g, e in m["shared"].items()]
    return out + ([("router", m["router"])] if m["router"] is not None else [])


def _check_manifest(data: object, where: str) -> dict[str, Any]:
    """Validate manifest structure and cross references; raise ``BankError`` on any deviation."""

    def bad(msg: str) -> BankCorruptError:
        return BankCorruptError(f"{where}: invalid manifest: {msg}", kind="manifest")

    def group(entry: object, ctx: str) -> dict[str, Any]:
        if not isinstance(entry, dict) or not isinstance(entry.get("dir"), str):
            raise bad(f"{ctx} must be an object with a string 'dir', got {entry!r:.200}")
        files = entry.get("files")
        if not isinstance(files, dict):
            raise bad(f"{ctx}.files must be an object, got {files!r:.200}")
        for rel, rec in files.items():
            if not (_is_file_name(rel) and isinstance(rec, dict) and type(rec.get("size")) is int and rec["size"] >= 0
                    and type(rec.get("mtime_ns")) is int and isinstance(rec.get("sha256"), str)
                    and _SHA_RE.match(rec["sha256"])):
                raise bad(f"{ctx}.files[{rel!r}] (a plain file name) must map to {{size, sha256, mtime_ns}}, got {rec!r:.200}")
        return entry

    if not isinstance(data, dict):
        raise bad(f"top level must be an object, got {type(data).__name__}")
    schema = data.get("schema")
    if type(schema) is not int or schema < 1:
        raise bad(f"'schema' must be a positive integer, got {schema!r:.100}")
    if schema > SCHEMA_VERSION:
        raise BankError(f"{where}: bank has schema {schema}, made by a newer adaptbank (this one reads "
                        f"schema <= {SCHEMA_VERSION}); upgrade adaptbank")
    data.setdefault("router", None)  # optional keys; the rest of the module indexes them directly
    data.setdefault("meta", {})
    base, tasks, shared, router = (data.get(k) for k in ("base", "tasks", "shared", "router"))
    if not (isinstance(base, dict) and isinstance(base.get("name"), str) and isinstance(base.get("fingerprint"), str)):
        raise bad(f"'base' must be an object with string 'name' and 'fingerprint', got {base!r:.200}")
    if not isinstance(tasks, list) or not isinstance(shared, dict) or not isinstance(data["meta"], dict):
        raise bad("'tasks' must be a list, 'shared' and 'meta' objects")
    names: set[str] = set()
    members_of: dict[str, list[str]] = {g: [] for g in shared}
    for i, t in enumerate(tasks):
        name: Any = group(t, f"tasks[{i}]").get("name")
        grp = t.setdefault("shared", None)
        if not _is_name(name) or name in names:
            raise bad(f"tasks[{i}].name {name!r:.100} is invalid or duplicated")
        if grp is not None and not (isinstance(grp, str) and grp in shared):
            raise bad(f"task {name!r} refers to unknown shared group {grp!r:.100}")
        names.add(name)
        if grp is not None:
            members_of[grp].append(name)
    for g, e in shared.items():
        members = group(e, f"shared[{g!r}]").get("tasks")
        if not (_is_name(g) and isinstance(members, list) and all(isinstance(n, str) for n in members)
                and sorted(members) == sorted(members_of[g])):
            raise bad(f"shared group {g!r}: name invalid or 'tasks' {members!r:.200} disagrees with the task list")
    if router is not None:
        order = group(router, "router").get("expert_order")
        if not (isinstance(order, list) and all(isinstance(n, str) for n in order)):
            raise bad(f"router.expert_order must be a list of strings, got {order!r:.200}")
    return data


class BankStore:
    """A bank directory: atomic, locked, checksummed storage of per-task tensor groups.

    Get one with :meth:`create` or :meth:`open`.  The manifest is cached; readers use the cache
    (and re-read it once if a file vanished under a concurrent replace), writers always re-read
    it under the lock.  Call :meth:`reload` to see other processes' commits.
    """

    def __init__(self, path: str | Path, manifest: dict[str, Any], *, lock_timeout: float | None = None) -> None:
        """Internal; use :meth:`create` or :meth:`open`."""
        self.path: Path = Path(path).absolute()
        self._root = self.path.resolve()
        self._manifest = manifest
        self.lock_timeout = lock_timeout
        """Seconds a writer waits for the lock before ``BankLockedError``; None waits forever."""

    def __repr__(self) -> str:
        return f"BankStore({str(self.path)!r}, tasks={len(self._manifest.get('tasks', []))})"

    # ------------------------------------------------------------------ open / create
    @classmethod
    def create(cls, path: str | Path, *, base: dict[str, Any], lock_timeout: float | None = None) -> BankStore:
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
            with store._locked():
                if (p / _MANIFEST).exists():
                    raise BankError(f"{p}: another process created a bank here concurrently")
                store._commit({"schema": SCHEMA_VERSION, "adaptbank_version": _version(), "created": _now(),
                               "base": base, "tasks": [], "shared": {}, "router": None, "meta": {}})
        except OSError as exc:
            raise BankError(f"{p}: cannot create bank: {exc}") from exc
        return store

    @classmethod
    def open(cls, path: str | Path, *, expect_base_fingerprint: str | None = None,
             lock_timeout: float | None = None) -> BankStore:
        """Open an existing bank; refuse a bad manifest, a newer schema or another base model."""
        store = cls(path, {}, lock_timeout=lock_timeout)
        store.reload()
        base = store._manifest["base"]
        if expect_base_fingerprint is not None and base["fingerprint"] != expect_base_fingerprint:
            raise BankError(f"{store.path}: bank was built for base model {base['name']!r} with fingerprint "
                            f"{base['fingerprint']!r}, but fingerprint {expect_base_fingerprint!r} was expected")
        return store

    def reload(self) -> None:
        """Re-read ``manifest.json`` (to see commits made by other processes)."""
        self._manifest = self._read_manifest()

    @property
    def manifest(self) -> dict[str, Any]:
        """A deep copy of the cached manifest (mutating it changes nothing)."""
        return copy.deepcopy(self._manifest)

    # ------------------------------------------------------------------ reading
    def tasks(self) -> list[str]:
        """Task names in insertion order (a replaced task keeps its position)."""
        return [t["name"] for t in self._manifest["tasks"]]

    def task_entry(self, name: str) -> dict[str, Any]:
        """A copy of the manifest entry of task ``name``."""
        return copy.deepcopy(self._task(name, self._manifest))

    def stems(self, name: str) -> list[str]:
        """Stems of the tensor files stored for task ``name``."""
        return sorted(r[: -len(".safetensors")] for r in self._task(name, self._manifest)["files"]
                      if r.endswith(".safetensors"))

    def read_config(self, name: str, *, check: Check = "fast") -> dict[str, Any]:
        """The JSON config stored with task ``name``."""
        label = f"task {name!r}"
        return self._fresh(lambda m: self._task(name, m), lambda e: self._load_json(e, "config.json", check, label))

    def read_tensors(self, name: str, stem: str, *, check: Check = "fast") -> dict[str, torch.Tensor]:
        """Tensors of file group ``stem`` of task ``name``.

        ``check``: "fast" compares size and mtime with the manifest and falls back to sha256 when
        the mtime differs; "full" always hashes; "none" trusts the file.
        """
        _validate_name(stem, "stem")
        label = f"task {name!r}"
        return self._fresh(lambda m: self._task(name, m), lambda e: self._load_tensors(e, stem, check, label))

    def read_shared(self, group: str, stem: str, *, check: Check = "fast") -> dict[str, torch.Tensor]:
        """Tensors of file group ``stem`` of shared group ``group``."""
        _validate_name(stem, "stem")
        label = f"shared group {group!r}"
        return self._fresh(lambda m: self._group(group, m), lambda e: self._load_tensors(e, stem, check, label))

    def read_router(self, *, check: Check = "fast") -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]] | None:
        """``(files, meta)`` as given to :meth:`write_router`, or None when no router is stored."""
        if self._manifest["router"] is None:
            return None

        def read(e: dict[str, Any]) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
            stems = [r[: -len(".safetensors")] for r in e["files"] if r.endswith(".safetensors")]
            files = {s: self._load_tensors(e, s, check, "router") for s in stems}
            return files, self._load_json(e, "router.json", check, "router")

        return self._fresh(self._router, read)

    def router_expert_order(self) -> list[str] | None:
        """Task names in the order the stored router's outputs refer to them."""
        r = self._manifest["router"]
        return None if r is None else list(r["expert_order"])

    def bytes_on_disk(self, name: str | None = None) -> int:
        """Bytes of task ``name``'s own files, or of everything referenced (plus the manifest)."""
        if name is not None:
            return sum(r["size"] for r in self._task(name, self._manifest)["files"].values())
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
        _validate_name(name)
        if shared is None and shared_files is not None:
            raise ValueError(f"task {name!r}: shared_files given without shared=<group name>")
        if shared is not None:
            _validate_name(shared, "shared group name")
        payload = self._encode(files, name)
        payload["config.json"] = _dumps(config, f"config of task {name!r}")
        spayload = self._encode(shared_files, shared) if shared is not None and shared_files is not None else None
        creating = spayload is not None
        # Early check without the lock so that a doomed write costs no I/O; re-checked under it.
        self._check_task_write(self._read_manifest(), name, shared, creating, replace)
        uid = uuid.uuid4().hex[:12]
        tdir, sdir = f"tasks/{name}@{uid}", f"shared/{shared}@{uid}"

        def apply(m: dict[str, Any], records: dict[str, dict[str, Any]]) -> list[str]:
            self._check_task_write(m, name, shared, creating, replace)
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
                    doomed += self._drop_member(m, old["shared"], name)
            if creating:
                m["shared"][shared] = {"dir": sdir, "files": records[sdir], "tasks": [name], "created": _now()}
            elif shared is not None and name not in m["shared"][shared]["tasks"]:
                m["shared"][shared]["tasks"].append(name)
            return doomed + self._apply_router(m, router, uid)

        new = {tdir: payload} | ({sdir: spayload} if spayload is not None else {})
        self._transaction(f"writing task {name!r}", uid, new, apply)

    def remove_task(self, name: str, *, router: RouterUpdate | None = None) -> None:
        """Remove task ``name``; its shared group goes too when it was the group's last task.
        ``router`` updates the router in the same commit."""
        _validate_name(name)
        uid = uuid.uuid4().hex[:12]

        def apply(m: dict[str, Any], _: dict[str, dict[str, Any]]) -> list[str]:
            old = self._task(name, m)
            m["tasks"].remove(old)
            doomed = [old["dir"]] + (self._drop_member(m, old["shared"], name) if old["shared"] else [])
            return doomed + self._apply_router(m, router, uid)

        self._transaction(f"removing task {name!r}", uid, {}, apply)

    def _apply_router(self, m: dict[str, Any], update: RouterUpdate | None, uid: str) -> list[str]:
        """Under the lock: compute the new router from the current one and write it as ``router/<uid>``
        into manifest ``m`` (not yet committed). Returns the superseded router dir."""
        if update is None:
            return []
        current = None
        if m["router"] is not None:
            e = m["router"]
            stems = [r[: -len(".safetensors")] for r in e["files"] if r.endswith(".safetensors")]
            current = ({st: self._load_tensors(e, st, "full", "router") for st in stems},
                       self._load_json(e, "router.json", "full", "router"))
        result = update(current, [t["name"] for t in m["tasks"]])
        if result is None:
            return []
        files, meta, order = result
        missing = sorted(set(order) - {t["name"] for t in m["tasks"]})
        if missing or len(set(order)) != len(order):
            raise BankError(f"{self.path}: router expert order {order} must name distinct bank tasks")
        payload = self._encode(files, "router")
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
        payload = self._encode(files, "router")
        payload["router.json"] = _dumps(meta, "router meta")
        order = [_validate_name(n, "expert_order entry") for n in expert_order]
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

    def update_manifest_field(self, key: str, value: Any) -> None:
        """Set ``manifest["meta"][key] = value`` (free-form JSON, e.g. run metrics); None deletes it."""
        if not isinstance(key, str) or not key:
            raise ValueError(f"meta key must be a non-empty string, got {key!r}")
        _dumps({key: value}, f"meta value for {key!r}")

        def apply(m: dict[str, Any], _: dict[str, dict[str, Any]]) -> list[str]:
            meta = m.setdefault("meta", {})
            if value is None:
                meta.pop(key, None)
            else:
                meta[key] = copy.deepcopy(value)
            return []

        self._transaction(f"updating meta {key!r}", "", {}, apply)

    # ------------------------------------------------------------------ maintenance
    def verify(self, *, full: bool = True) -> list[Problem]:
        """Check every referenced file (sha256 if ``full``, else size+mtime) and the directories.

        Errors: missing/size/checksum/unreadable/extra/escape/manifest.  Warnings (``is_error``
        False): leftover ``temporary`` files, ``orphan`` dirs (both cleaned by :meth:`repair`) and a
        ``stale`` router order naming removed tasks.
        """
        try:
            self.reload()
        except BankError as exc:
            return [Problem("manifest", _MANIFEST, str(exc))]
        m, problems = self._manifest, []
        for label, entry in _groups(m):
            problems += self._verify_group(label, entry, full)
        if m["router"] is not None:
            gone = sorted(set(m["router"]["expert_order"]) - set(self.tasks()))
            if gone:
                problems.append(Problem("stale", m["router"]["dir"], f"router expert_order names removed tasks {gone}"))
        referenced = {_norm(e["dir"]) for _, e in _groups(m)}
        for rel in self._scan():
            if PurePosixPath(rel).name.startswith(TMP_PREFIX):
                problems.append(Problem("temporary", rel, f"{self.path}: leftover temporary (or a write in "
                                        "progress); repair() removes it"))
            elif rel not in referenced:
                problems.append(Problem("orphan", rel, f"{self.path}: directory not referenced by the manifest "
                                        "(interrupted or superseded write); repair() removes it"))
        return problems

    def repair(self) -> list[str]:
        """Delete stale ``.tmp-*`` files and unreferenced dirs; return their bank-relative paths.

        Never touches files the manifest references, nor the new dirs of writes still in progress.
        """
        removed: list[str] = []
        try:
            with self._locked():
                self.reload()
                referenced = {_norm(e["dir"]) for _, e in _groups(self._manifest)}
                live = set()
                for marker in sorted(self.path.glob(f"{_PENDING}*")):
                    if marker_live(marker):
                        live.add(marker.name[len(_PENDING):])
                for rel in self._scan():
                    name = PurePosixPath(rel).name
                    if "/" not in rel:  # root temporary: spare only live pending markers
                        uid = name[len(_PENDING):] if name.startswith(_PENDING) else None
                    else:  # tasks/<x>@<uid>, shared/<g>@<uid>, router/<uid>
                        uid = name if rel.startswith("router/") else name.rpartition("@")[2]
                    if rel in referenced or uid in live:
                        continue
                    target = self.path / rel
                    if target.is_dir() and not target.is_symlink():
                        shutil.rmtree(target)
                    else:
                        target.unlink()
                    removed.append(rel)
                for _, entry in _groups(self._manifest):  # stale temporaries inside committed dirs
                    with contextlib.suppress(BankCorruptError, OSError):
                        d = self._inside(entry["dir"], "repair")
                        for n in sorted(os.listdir(d)):
                            if n.startswith(TMP_PREFIX) and n not in entry["files"]:
                                (d / n).unlink()
                                removed.append(f"{_norm(entry['dir'])}/{n}")
        except OSError as exc:
            raise BankError(f"{self.path}: repair failed: {exc}") from exc
        return removed

    # ------------------------------------------------------------------ internals
    def _read_manifest(self) -> dict[str, Any]:
        mpath = self.path / _MANIFEST
        try:
            raw = mpath.read_bytes()
        except FileNotFoundError:
            raise BankError(f"{self.path}: not an adaptbank bank (no {_MANIFEST})") from None
        except OSError as exc:
            raise BankError(f"{mpath}: cannot read manifest: {exc}") from exc
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            raise BankCorruptError(f"{mpath}: manifest is not valid JSON: {exc}", kind="manifest") from None
        try:
            return _check_manifest(data, str(mpath))
        except RecursionError:  # absurdly nested JSON values: repr() in the message recursed
            raise BankCorruptError(f"{mpath}: invalid manifest: nested too deeply", kind="manifest") from None

    def _task(self, name: str, m: dict[str, Any]) -> dict[str, Any]:
        for t in m["tasks"]:
            if t["name"] == name:
                return t
        have = [t["name"] for t in m["tasks"]]
        raise TaskNotFoundError(f"{self.path}: no task {name!r} in the bank (has {len(have)}: {have[:20]})")

    def _group(self, group: str, m: dict[str, Any]) -> dict[str, Any]:
        if group not in m["shared"]:
            raise TaskNotFoundError(f"{self.path}: no shared group {group!r} (has {sorted(m['shared'])[:20]})")
        return m["shared"][group]

    def _router(self, m: dict[str, Any]) -> dict[str, Any]:
        if m["router"] is None:
            raise BankError(f"{self.path}: the router was removed concurrently")
        return m["router"]

    def _fresh(self, lookup: Callable[[dict[str, Any]], dict[str, Any]], fn: Callable[[dict[str, Any]], _T]) -> _T:
        """Run ``fn(entry)``; if a file vanished because another process committed a newer version
        (and deleted the old dir), re-read the manifest and retry once on the new entry."""
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

    def _inside(self, rel: str, label: str) -> Path:
        """Bank path for manifest path ``rel``; refuse absolute, '..', NUL or outside-pointing links."""
        p = PurePosixPath(rel)
        if "\x00" in rel or p.is_absolute() or ".." in p.parts or not p.parts:
            raise BankCorruptError(f"{self.path}: {label}: manifest path {rel!r} escapes the bank "
                                   "(absolute, empty or '..')", kind="escape")
        full = self.path.joinpath(*p.parts)
        try:
            resolved = full.resolve()
        except (OSError, RuntimeError) as exc:
            raise BankCorruptError(f"{full}: {label}: cannot resolve path: {exc}", kind="escape") from exc
        if not resolved.is_relative_to(self._root):
            raise BankCorruptError(f"{full}: {label}: resolves to {resolved}, outside the bank {self._root} "
                                   "(symlink or tampered manifest)", kind="escape")
        return full

    def _checked_file(self, entry: dict[str, Any], rel: str, check: Check, label: str) -> Path:
        if check not in ("fast", "full", "none"):
            raise ValueError(f"check must be 'fast', 'full' or 'none', got {check!r}")
        path, rec = self._inside(f"{entry['dir']}/{rel}", label), entry["files"][rel]
        try:
            st = path.stat()
        except FileNotFoundError:
            raise BankCorruptError(f"{path}: {label}: file listed in the manifest is missing", kind="missing") from None
        except OSError as exc:
            raise BankCorruptError(f"{path}: {label}: cannot stat: {exc}", kind="unreadable") from exc
        if check == "none":
            return path
        if st.st_size != rec["size"]:
            raise BankCorruptError(f"{path}: {label}: size {st.st_size} differs from {rec['size']} in the "
                                   "manifest (truncated or modified)", kind="size")
        if check == "fast" and st.st_mtime_ns == rec["mtime_ns"]:
            return path
        try:
            digest = file_digest(path)
        except OSError as exc:
            raise BankCorruptError(f"{path}: {label}: cannot read: {exc}", kind="unreadable") from exc
        if digest != rec["sha256"]:
            raise BankCorruptError(f"{path}: {label}: sha256 {digest[:12]}... differs from {rec['sha256'][:12]}... "
                                   "in the manifest (file modified or corrupt)", kind="checksum")
        return path

    def _load_tensors(self, entry: dict[str, Any], stem: str, check: Check, label: str) -> dict[str, torch.Tensor]:
        rel = f"{stem}.safetensors"
        if rel not in entry["files"]:
            raise BankError(f"{self.path}: {label} has no tensor file {rel!r} (has {sorted(entry['files'])})")
        path = self._checked_file(entry, rel, check, label)
        try:
            from safetensors.torch import load_file

            return load_file(path)
        except Exception as exc:  # noqa: BLE001 - any parser failure means a corrupt file
            raise BankCorruptError(f"{path}: {label}: unreadable safetensors file: {exc}", kind="unreadable") from exc

    def _load_json(self, entry: dict[str, Any], rel: str, check: Check, label: str) -> dict[str, Any]:
        if rel not in entry["files"]:
            raise BankCorruptError(f"{self.path}: {label}: manifest lists no {rel!r}", kind="missing")
        path = self._checked_file(entry, rel, check, label)
        try:
            data = json.loads(path.read_bytes())
        except (OSError, ValueError, RecursionError) as exc:
            raise BankCorruptError(f"{path}: {label}: unreadable JSON: {exc}", kind="unreadable") from exc
        if not isinstance(data, dict):
            raise BankCorruptError(f"{path}: {label}: JSON is not an object", kind="unreadable")
        return data

    def _verify_group(self, label: str, entry: dict[str, Any], full: bool) -> list[Problem]:
        try:
            d = self._inside(entry["dir"], label)
            names = sorted(os.listdir(d))
        except BankCorruptError as exc:
            return [Problem(exc.kind, entry["dir"], str(exc))]
        except OSError as exc:
            return [Problem("missing", entry["dir"], f"{self.path}: {label}: directory unreadable or missing: {exc}")]
        problems = []
        for rel in entry["files"]:
            try:
                path = self._checked_file(entry, rel, "full" if full else "fast", label)
                if rel.endswith(".safetensors"):
                    from safetensors import safe_open

                    with safe_open(path, framework="pt") as fh:
                        fh.keys()
                elif rel.endswith(".json"):
                    json.loads(path.read_bytes())
            except BankCorruptError as exc:
                problems.append(Problem(exc.kind, f"{entry['dir']}/{rel}", str(exc)))
            except Exception as exc:  # noqa: BLE001 - parser/OS failure of a listed file
                problems.append(Problem("unreadable", f"{entry['dir']}/{rel}", f"{self.path}: {label}: {rel}: {exc}"))
        for n in names:
            if n not in entry["files"]:
                kind = "temporary" if n.startswith(TMP_PREFIX) else "extra"
                problems.append(Problem(kind, f"{_norm(entry['dir'])}/{n}", f"{self.path}: {label}: file {n!r} is "
                                        "not listed in the manifest"))
        return problems

    def _scan(self) -> list[str]:
        """Bank-relative names of root temporaries and of every entry in the area dirs."""
        out = sorted(n for n in os.listdir(self.path) if n.startswith(TMP_PREFIX))
        for area in _AREAS:
            if (self.path / area).is_dir():
                out += [f"{area}/{n}" for n in sorted(os.listdir(self.path / area))]
        return out

    def _check_task_write(self, m: dict[str, Any], name: str, shared: str | None, creating: bool, replace: bool) -> None:
        if not replace and any(t["name"] == name for t in m["tasks"]):
            raise TaskExistsError(f"{self.path}: task {name!r} already exists; pass replace=True for a new version")
        if shared is None:
            return
        group = m["shared"].get(shared)
        if creating and group is not None and not (replace and set(group["tasks"]) <= {name}):
            raise BankError(f"{self.path}: shared group {shared!r} already exists (tasks {group['tasks']}); "
                            "pass shared without shared_files to join it")
        if not creating and group is None:
            raise BankError(f"{self.path}: shared group {shared!r} does not exist; pass shared_files to create it "
                            f"(existing groups: {sorted(m['shared'])})")

    @staticmethod
    def _drop_member(m: dict[str, Any], group: str, name: str) -> list[str]:
        """Remove ``name`` from ``group``; drop the group (returning its dir) when it empties."""
        g = m["shared"][group]
        g["tasks"].remove(name)
        if g["tasks"]:
            return []
        del m["shared"][group]
        return [g["dir"]]

    def _encode(self, files: object, owner: str) -> dict[str, bytes]:
        """Serialize ``{stem: {key: Tensor}}`` to ``{"<stem>.safetensors": bytes}``."""
        import torch
        from safetensors.torch import save

        if not isinstance(files, dict):
            raise TypeError(f"files of {owner!r} must be a dict stem -> dict[str, Tensor], got {type(files).__name__}")
        out = {}
        for stem, tensors in files.items():
            _validate_name(stem, "stem")
            if not isinstance(tensors, dict):
                raise TypeError(f"{owner!r}/{stem}: expected dict[str, Tensor], got {type(tensors).__name__}")
            clean = {}
            for key, t in tensors.items():
                if not isinstance(key, str) or not key or not isinstance(t, torch.Tensor):
                    raise TypeError(f"{owner!r}/{stem}: entry {key!r} must map a non-empty str to a Tensor, "
                                    f"got {type(t).__name__}")
                # clone: safetensors refuses tensors that share storage (e.g. views of one weight)
                clean[key] = t.detach().to("cpu").contiguous().clone()
            meta = {"format": "pt", "adaptbank_version": _version(), "task": owner, "stem": stem}
            try:
                out[f"{stem}.safetensors"] = save(clean, metadata=meta)
            except Exception as exc:  # noqa: BLE001 - e.g. sparse or unsupported dtype
                raise ValueError(f"{owner!r}/{stem}: cannot serialize tensors: {exc}") from exc
        return out

    def _write_dir(self, reldir: str, payload: dict[str, bytes]) -> dict[str, dict[str, Any]]:
        """Create ``reldir`` holding ``payload`` durably; return the manifest file records."""
        d = self.path / reldir
        d.mkdir(parents=True)
        records = {}
        for rel, blob in payload.items():
            atomic_write_bytes(d / rel, blob, sync_dir=False)
            st = (d / rel).stat()
            records[rel] = {"size": st.st_size, "sha256": hashlib.sha256(blob).hexdigest(), "mtime_ns": st.st_mtime_ns}
        fsync_dir(d)
        fsync_dir(d.parent)
        return records

    def _commit(self, manifest: dict[str, Any]) -> None:
        """Replace manifest.json (the commit point). Caller holds the lock."""
        atomic_write_bytes(self.path / _MANIFEST, json.dumps(manifest, indent=1).encode(), sync_dir=False)
        self._manifest = manifest
        try:
            fsync_dir(self.path)
        except OSError as exc:
            raise _CommittedError(f"{self.path}: {_MANIFEST} was replaced (change committed) but fsyncing the "
                                  f"bank directory failed, so it may not survive a power loss: {exc}") from exc

    def _transaction(self, label: str, uid: str, new: dict[str, dict[str, bytes]],
                     apply: Callable[[dict[str, Any], dict[str, dict[str, Any]]], list[str]]) -> None:
        """Write ``new`` dirs unlocked, then apply+commit under the lock, then delete doomed dirs."""
        try:
            with self._pending(uid) if new else contextlib.nullcontext():
                try:
                    records = {reldir: self._write_dir(reldir, payload) for reldir, payload in new.items()}
                    with self._locked():
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
                        shutil.rmtree(self._inside(reldir, label), ignore_errors=True)
        except OSError as exc:
            raise BankError(f"{self.path}: {label} failed; the bank is unchanged: {exc}") from exc

    @contextlib.contextmanager
    def _pending(self, uid: str) -> Iterator[None]:
        """Hold a flock'ed ``.tmp-pending-<uid>`` marker so repair() spares this write's new dirs."""
        marker = self.path / f"{_PENDING}{uid}"
        with self._locked():  # repair() holds the lock, so it never sees a live marker unlocked
            fd = hold_marker(marker)
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                marker.unlink()
            os.close(fd)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """The writers' exclusive lock on BANK/.lock (waits ``lock_timeout`` s; None: forever)."""
        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(exclusive_lock(self.path / _LOCK, self.lock_timeout))
            except TimeoutError as exc:
                raise BankLockedError(f"{self.path}: another writer holds the bank lock: {exc}") from None
            yield


def _is_skeleton(p: Path) -> bool:
    """True for an empty dir, or one holding only what an interrupted ``create`` leaves behind."""
    for e in p.iterdir():
        if not (e.name == _LOCK or e.name.startswith(TMP_PREFIX)
                or (e.name in _AREAS and e.is_dir() and not any(e.iterdir()))):
            return False
    return True


class _CommittedError(BankError):
    """The manifest was replaced, but a later durability step failed: do not roll back."""
