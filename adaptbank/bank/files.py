"""The files inside one bank directory: checked reads and durable writes.

:class:`BankFiles` resolves manifest paths strictly inside the bank (no absolute paths, no '..', no
symlink pointing out, no symlink loop), checks a listed file against its manifest record (size and
mtime, or sha256), loads JSON files and safetensors files (each header checked first by
:func:`adaptbank._tensorfile.check_safetensors`: sizes, offsets, allowed dtypes, no unknown keys), and
writes a new directory durably (every file ``.tmp`` -> fsync -> replace, then fsync the directory and
its parent).  :func:`encode` turns ``{stem: {key: Tensor}}`` into safetensors bytes, refusing dtypes
the bank would not read back.  The manifest, locking and transactions are :mod:`adaptbank.bank.store`'s;
torch and safetensors are imported only when tensors are read or encoded.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch and safetensors load lazily: listing a bank must not pay for importing torch
    import torch

from adaptbank._atomic import atomic_write_bytes, file_digest, fsync_dir
from adaptbank._tensorfile import TensorFileError, check_safetensors
from adaptbank.bank.manifest import BankCorruptError, BankError, Check, _version
from adaptbank.core.config import validate_name

__all__ = ["BankFiles", "encode"]


class BankFiles:
    """Checked access to the files of the bank directory ``path`` (messages name the file)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        """The bank directory, absolute but not resolved (as the user named it)."""
        self.root = path.resolve()
        """The bank directory with symlinks resolved: every file the manifest lists must be inside it."""

    def inside(self, rel: str, label: str) -> Path:
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
        if not resolved.is_relative_to(self.root):
            raise BankCorruptError(f"{full}: {label}: resolves to {resolved}, outside the bank {self.root} "
                                   "(symlink or tampered manifest)", kind="escape")
        return full

    def checked_file(self, entry: dict[str, Any], rel: str, check: Check, label: str) -> Path:
        """Path of file ``rel`` of manifest ``entry``, after checking it as ``check`` says."""
        if check not in ("fast", "full", "none"):
            raise ValueError(f"check must be 'fast', 'full' or 'none', got {check!r}")
        path, rec = self.inside(f"{entry['dir']}/{rel}", label), entry["files"][rel]
        try:
            st = path.stat()
        except FileNotFoundError:
            raise BankCorruptError(f"{path}: {label}: file listed in the manifest is missing",
                                   kind="missing") from None
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
            raise _read_failed(path, label, "cannot read", exc) from exc
        if digest != rec["sha256"]:
            raise BankCorruptError(f"{path}: {label}: sha256 {digest[:12]}... differs from "
                                   f"{rec['sha256'][:12]}... in the manifest (file modified or corrupt)",
                                   kind="checksum")
        return path

    def load_tensors(self, entry: dict[str, Any], stem: str, check: Check,
                     label: str, keys: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """The tensors of ``<stem>.safetensors`` of manifest ``entry``, checked first; only ``keys`` when
        given (read lazily: the rest of the file is not loaded)."""
        rel = f"{stem}.safetensors"
        if rel not in entry["files"]:
            raise BankError(f"{self.path}: {label} has no tensor file {rel!r} (has {sorted(entry['files'])})")
        path = self.checked_file(entry, rel, check, label)
        try:  # the header first, by our own bounded parser: a forged file is refused before safetensors reads it
            check_safetensors(path)
        except TensorFileError as exc:
            raise _read_failed(path, label, "", exc) from None
        try:
            from safetensors import safe_open
            from safetensors.torch import load_file

            if keys is None:
                return load_file(path)
            with safe_open(path, framework="pt") as f:
                missing = sorted(set(keys) - set(f.keys()))
                if missing:
                    raise BankError(f"{path}: {label}: {stem}.safetensors has no tensor {missing[0]!r} (has "
                                    f"{sorted(f.keys())})")
                return {k: f.get_tensor(k) for k in keys}
        except BankError:
            raise
        except Exception as exc:  # noqa: BLE001 - any parser failure means a corrupt file
            raise _read_failed(path, label, "unreadable safetensors file", exc) from exc

    def load_json(self, entry: dict[str, Any], rel: str, check: Check, label: str) -> dict[str, Any]:
        """The JSON object in file ``rel`` of manifest ``entry``, checked first."""
        if rel not in entry["files"]:
            raise BankCorruptError(f"{self.path}: {label}: manifest lists no {rel!r}", kind="missing")
        path = self.checked_file(entry, rel, check, label)
        try:
            data = json.loads(path.read_bytes())
        except (OSError, ValueError, RecursionError) as exc:
            raise _read_failed(path, label, "unreadable JSON", exc) from exc
        if not isinstance(data, dict):
            raise BankCorruptError(f"{path}: {label}: JSON is not an object", kind="unreadable")
        return data

    def write_dir(self, reldir: str, payload: dict[str, bytes]) -> dict[str, dict[str, Any]]:
        """Create ``reldir`` holding ``payload`` durably; return the manifest file records."""
        d = self.path / reldir
        d.mkdir(parents=True)
        records = {}
        for rel, blob in payload.items():
            atomic_write_bytes(d / rel, blob, sync_dir=False)
            st = (d / rel).stat()
            records[rel] = {"size": st.st_size, "sha256": hashlib.sha256(blob).hexdigest(),
                            "mtime_ns": st.st_mtime_ns}
        fsync_dir(d)
        fsync_dir(d.parent)
        return records


def _read_failed(path: Path, label: str, what: str, exc: Exception) -> BankCorruptError:
    """A read of ``path`` that passed its check failed: kind "missing" when the file is gone by now, as when a
    writer deleted the directory its commit superseded between the check and the read (the store then re-reads
    the manifest, as for a file missing at the check), else "unreadable".  An open file stays readable after
    its deletion, so a read that opened the file never sees a torn one."""
    if not path.exists():
        return BankCorruptError(f"{path}: {label}: file listed in the manifest vanished while being read ({exc})",
                                kind="missing")
    return BankCorruptError(f"{path}: {label}: {what}: {exc}" if what else f"{label}: {exc}", kind="unreadable")


def encode(files: object, owner: str) -> dict[str, bytes]:
    """Serialize ``{stem: {key: Tensor}}`` to ``{"<stem>.safetensors": bytes}``."""
    import torch
    from safetensors.torch import save

    if not isinstance(files, dict):
        raise TypeError(f"files of {owner!r} must be a dict stem -> dict[str, Tensor], "
                        f"got {type(files).__name__}")
    out = {}
    for stem, tensors in files.items():
        validate_name(stem, "stem")
        if not isinstance(tensors, dict):
            raise TypeError(f"{owner!r}/{stem}: expected dict[str, Tensor], got {type(tensors).__name__}")
        clean = {}
        allowed = {torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64}  # _tensorfile.BANK_DTYPES
        for key, t in tensors.items():
            if not isinstance(key, str) or not key or not isinstance(t, torch.Tensor):
                raise TypeError(f"{owner!r}/{stem}: entry {key!r} must map a non-empty str to a Tensor, "
                                f"got {type(t).__name__}")
            if t.dtype not in allowed:  # the bank would refuse to read it back
                raise TypeError(f"{owner!r}/{stem}: tensor {key!r} has dtype {t.dtype}; the bank stores only "
                                "float32, float16, bfloat16, float64 and int64")
            # clone: safetensors refuses tensors that share storage (e.g. views of one weight)
            clean[key] = t.detach().to("cpu").contiguous().clone()
        meta = {"format": "pt", "adaptbank_version": _version(), "task": owner, "stem": stem}
        try:
            out[f"{stem}.safetensors"] = save(clean, metadata=meta)
        except Exception as exc:  # noqa: BLE001 - e.g. sparse or unsupported dtype
            raise ValueError(f"{owner!r}/{stem}: cannot serialize tensors: {exc}") from exc
    return out
