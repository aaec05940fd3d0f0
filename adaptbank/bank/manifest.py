"""The bank manifest: its schema, its validation, and the errors and findings of the bank.

``BANK/manifest.json`` is the bank's single commit point (layout and write protocol: see
:mod:`adaptbank.bank.store`).  Schema :data:`SCHEMA_VERSION`::

    {"schema": 1, "adaptbank_version": "...", "created": "<iso time>", "generation": <int>,
     "base": {"name": str, "fingerprint": str, ...},           # the frozen base model, free-form JSON
     "tasks": [{"name", "dir": "tasks/<task>@<id>", "files", "shared": <group> | null, "created"}, ...],
     "shared": {"<group>": {"dir": "shared/<group>@<id>", "files", "tasks": [<task>, ...], "created"}},
     "router": null | {"dir": "router/<id>", "files", "expert_order": [<task>, ...], "created"},
     "meta": {...}}                                            # free-form JSON, e.g. run metrics

where every ``files`` maps a plain file name to ``{"size", "sha256", "mtime_ns"}``, and ``generation``
counts the commits (1 after ``create``, +1 per commit; banks made before it read as 0 until their next commit):
a long-lived reader compares it to notice a new bank version (``bank.snapshot``).  Everything here
is pure (no file access, no torch): the store and ``maintenance`` build on it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from adaptbank._atomic import TMP_PREFIX
from adaptbank._version import __version__
from adaptbank.core.config import validate_name

__all__ = [
    "SCHEMA_VERSION", "BankChangedError", "BankCorruptError", "BankError", "BankLockedError", "Check", "Problem",
    "TaskExistsError", "TaskNotFoundError",
]

SCHEMA_VERSION = 1
"""Manifest schema the store writes; banks with a larger ``schema`` are refused."""

Check = Literal["fast", "full", "none"]
"""How a read checks a file against the manifest: "fast" (size+mtime, sha256 when the mtime differs),
"full" (always sha256) or "none"."""
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

    def __init__(self, message: str, *, holder_pid: int | None = None) -> None:
        super().__init__(message)
        self.holder_pid = holder_pid
        """The pid the lock's holder recorded in ``BANK/.lock``, or None when it recorded none."""


class BankChangedError(BankError):
    """Writers committed during every attempt of a multi-file read (``bank.snapshot.read_consistent``)."""


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


def _is_name(value: object) -> bool:
    """True if ``value`` is a valid task/group/stem name (:func:`adaptbank.core.config.validate_name`)."""
    try:
        validate_name(value)
    except ValueError:
        return False
    return True


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


_ENCODER = json.JSONEncoder(allow_nan=False)  # one instance: json.dumps(..., allow_nan=False) builds one per call


def encode_manifest(m: dict[str, Any]) -> bytes:
    """``m`` as the bytes of ``manifest.json``: one line per top-level key, per task and per shared group.

    ``json.dumps`` with ``indent`` runs the pure-Python encoder (about 0.1 s for 1,000 tasks); encoding each
    entry compactly runs the C one, so a commit's cost stays small as the bank grows, and the file still
    reads (and diffs) one task per line.  ``json.loads`` of the result equals ``m``.
    """
    one = _ENCODER.encode

    def block(key: str) -> str:
        value = m[key]
        if isinstance(value, list) and key == "tasks":
            inner, ends = [one(v) for v in value], "[]"
        elif isinstance(value, dict) and key == "shared":
            inner, ends = [f"{one(k)}: {one(v)}" for k, v in value.items()], "{}"
        else:
            return f"{one(key)}: {one(value)}"
        if not inner:
            return f"{one(key)}: {ends}"
        body = ",\n  ".join(inner)
        return f"{one(key)}: {ends[0]}\n  {body}\n {ends[1]}"

    return ("{\n " + ",\n ".join(block(k) for k in m) + "\n}\n").encode()


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
            if not (_is_file_name(rel) and isinstance(rec, dict) and type(rec.get("size")) is int
                    and rec["size"] >= 0 and type(rec.get("mtime_ns")) is int
                    and isinstance(rec.get("sha256"), str) and _SHA_RE.match(rec["sha256"])):
                raise bad(f"{ctx}.files[{rel!r}] (a plain file name) must map to {{size, sha256, mtime_ns}}, "
                          f"got {rec!r:.200}")
        return entry

    if not isinstance(data, dict):
        raise bad(f"top level must be an object, got {type(data).__name__}")
    schema = data.get("schema")
    if type(schema) is not int or schema < 1:
        raise bad(f"'schema' must be a positive integer, got {schema!r:.100}")
    if schema > SCHEMA_VERSION:
        raise BankError(f"{where}: bank has schema {schema}, made by a newer adaptbank (this one reads "
                        f"schema <= {SCHEMA_VERSION}); upgrade adaptbank")
    data.setdefault("router", None)  # optional keys; the bank code indexes them directly
    data.setdefault("meta", {})
    if type(data.setdefault("generation", 0)) is not int or data["generation"] < 0:
        raise bad(f"'generation' must be a non-negative integer, got {data['generation']!r:.100}")
    base, tasks, shared, router = (data.get(k) for k in ("base", "tasks", "shared", "router"))
    if not (isinstance(base, dict) and isinstance(base.get("name"), str)
            and isinstance(base.get("fingerprint"), str)):
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
            raise bad(f"shared group {g!r}: name invalid or 'tasks' {members!r:.200} disagrees with the "
                      "task list")
    if router is not None:
        order = group(router, "router").get("expert_order")
        if not (isinstance(order, list) and all(isinstance(n, str) for n in order)):
            raise bad(f"router.expert_order must be a list of strings, got {order!r:.200}")
    return data


def _read_manifest_file(bank: Path, *, written: bytes | None = None) -> dict[str, Any]:
    """The committed ``manifest.json`` of the bank at ``bank``, read without a lock and validated.

    ``written``: bytes known valid (this process committed or validated them); when the file still holds
    exactly them, they are only parsed."""
    return manifest_from_bytes(read_manifest_bytes(bank), bank, known=written)


def manifest_from_bytes(raw: bytes, bank: Path, *, known: bytes | None = None) -> dict[str, Any]:
    """The manifest in ``raw``, the bytes of the ``manifest.json`` of the bank at ``bank``: validated, unless
    they equal ``known`` (bytes already committed or validated), which are only parsed (validating a manifest
    of 1,000 tasks costs more than parsing it)."""
    if known is not None and raw == known:
        return json.loads(raw)
    return _parse_manifest(raw, str(bank / _MANIFEST))


def read_manifest_bytes(bank: Path) -> bytes:
    """The bytes of the bank's ``manifest.json``; an error says when it is missing or unreadable."""
    mpath = bank / _MANIFEST
    try:
        return mpath.read_bytes()
    except FileNotFoundError:
        raise BankError(f"{bank}: not an adaptbank bank (no {_MANIFEST})") from None
    except OSError as exc:
        raise BankError(f"{mpath}: cannot read manifest: {exc}") from exc


def _parse_manifest(raw: bytes, where: str) -> dict[str, Any]:
    """The manifest in ``raw`` (the bytes of ``manifest.json`` at ``where``), validated."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise BankCorruptError(f"{where}: manifest is not valid JSON: {exc}", kind="manifest") from None
    try:
        return _check_manifest(data, where)
    except RecursionError:  # absurdly nested JSON values: repr() in the message recursed
        raise BankCorruptError(f"{where}: invalid manifest: nested too deeply", kind="manifest") from None


def _find_task(m: dict[str, Any], name: str, where: object) -> dict[str, Any]:
    """The entry of task ``name`` in manifest ``m``; ``TaskNotFoundError`` naming ``where`` (the bank)."""
    for t in m["tasks"]:
        if t["name"] == name:
            return t
    have = [t["name"] for t in m["tasks"]]
    raise TaskNotFoundError(f"{where}: no task {name!r} in the bank (has {len(have)}: {have[:20]})")


def _find_group(m: dict[str, Any], group: str, where: object) -> dict[str, Any]:
    """The entry of shared group ``group`` in manifest ``m``, else ``TaskNotFoundError``."""
    if group not in m["shared"]:
        raise TaskNotFoundError(f"{where}: no shared group {group!r} (has {sorted(m['shared'])[:20]})")
    return m["shared"][group]


def _check_task_write(m: dict[str, Any], where: object, name: str, shared: str | None, creating: bool,
                      replace: bool) -> None:
    """Refuse writing task ``name`` (using group ``shared``, ``creating`` it) into manifest ``m``."""
    if not replace and any(t["name"] == name for t in m["tasks"]):
        raise TaskExistsError(f"{where}: task {name!r} already exists; pass replace=True for a new version")
    if shared is None:
        return
    group = m["shared"].get(shared)
    if creating and group is not None and not (replace and set(group["tasks"]) <= {name}):
        raise BankError(f"{where}: shared group {shared!r} already exists (tasks {group['tasks']}); "
                        "pass shared without shared_files to join it")
    if not creating and group is None:
        raise BankError(f"{where}: shared group {shared!r} does not exist; pass shared_files to create it "
                        f"(existing groups: {sorted(m['shared'])})")


def _drop_member(m: dict[str, Any], group: str, name: str) -> list[str]:
    """Remove ``name`` from ``group``; drop the group (returning its dir) when it empties."""
    g = m["shared"][group]
    g["tasks"].remove(name)
    if g["tasks"]:
        return []
    del m["shared"][group]
    return [g["dir"]]


def _is_skeleton(p: Path) -> bool:
    """True for an empty dir, or one holding only what an interrupted ``create`` leaves behind."""
    for e in p.iterdir():
        if not (e.name == _LOCK or e.name.startswith(TMP_PREFIX)
                or (e.name in _AREAS and e.is_dir() and not any(e.iterdir()))):
            return False
    return True


class _CommittedError(BankError):
    """The manifest was replaced, but a later durability step failed: do not roll back."""
