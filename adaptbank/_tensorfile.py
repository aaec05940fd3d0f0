"""Check a safetensors file's header before any tensor is read: bank files and expert folders are input.

A safetensors file is ``<N: u64 little-endian><N bytes of JSON header><data>``; the header maps each
tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets into the data) plus an
optional ``"__metadata__"`` object of strings.  A bank or an expert folder may come from anyone, so
:func:`check_safetensors` parses that header itself, with a size cap, before the safetensors library
sees the file: a header length larger than the file or than :data:`MAX_HEADER` (a "header bomb"),
JSON nested deeper than the format allows, dtypes outside the allowed set, fields or special keys
the format does not define, and data offsets that overrun the file, overlap or disagree with the
shape are each refused with a :class:`TensorFileError` naming the file and the problem.  Nothing is
materialised and nothing is executed; safetensors never unpickles, this only bounds what it reads.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Collection
from pathlib import Path
from typing import Any

__all__ = ["ALL_DTYPES", "BANK_DTYPES", "MAX_HEADER", "TensorFileError", "check_safetensors"]

MAX_HEADER = 16 << 20
"""Largest header accepted (16 MiB): far above a real model's (a few MB for thousands of tensors)."""

ALL_DTYPES: dict[str, int] = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2,
                              "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "F64": 8, "I64": 8, "U64": 8}
"""Every safetensors dtype and its item size in bytes (what a backbone's weights may use)."""

BANK_DTYPES = frozenset({"F32", "F16", "BF16", "F64", "I64"})
"""What the bank and expert folders hold: float32/16, bfloat16 tensors, int64 counts and indices, and
float64, which the router's running statistics use (``routing.lda.RouterStats``) on purpose."""

_KEY_RE = re.compile(r"[^\x00-\x1f\x7f]{1,1024}\Z")
_FIELDS = {"dtype", "shape", "data_offsets"}
_MAX_RANK = 16


class TensorFileError(ValueError):
    """A safetensors file whose header is malformed, forged or outside what the caller allows."""


def _fail(path: Path, problem: str) -> TensorFileError:
    return TensorFileError(f"{path}: {problem}; refusing to load it")


def _read_header(path: Path, max_header: int) -> tuple[object, int]:
    """The parsed JSON header and the size of the data section, after the length checks."""
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size < 8:
                raise _fail(path, f"{size} bytes is too short for a safetensors file (no 8-byte header length)")
            n = int.from_bytes(fh.read(8), "little")
            if n > max_header:
                raise _fail(path, f"header length {n} bytes exceeds the limit of {max_header} bytes "
                                  "(a header bomb, or not a safetensors file)")
            if n > size - 8:
                raise _fail(path, f"header claims {n} bytes but the file holds only {size - 8} after the "
                                  "length field (truncated or forged)")
            raw = fh.read(n)
    except OSError as exc:
        raise TensorFileError(f"{path}: cannot read: {exc}") from exc
    try:
        return json.loads(raw.decode("utf-8")), size - 8 - n
    except RecursionError:
        raise _fail(path, "header JSON is nested too deeply (the format nests 3 levels)") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise _fail(path, f"header is not valid UTF-8 JSON: {exc}") from None


def _check_entry(path: Path, key: str, entry: object, dtypes: Collection[str], data_len: int) -> tuple[int, int]:
    """``(begin, end)`` of tensor ``key`` after checking its fields, dtype, shape and offsets."""
    if not isinstance(entry, dict) or set(entry) != _FIELDS:
        found = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
        raise _fail(path, f"tensor {key!r:.100} must have exactly the fields {sorted(_FIELDS)}, got {found!s:.200}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in ALL_DTYPES or dtype not in dtypes:
        raise _fail(path, f"tensor {key!r:.100} has dtype {dtype!r:.40}, not allowed here "
                          f"(allowed: {', '.join(sorted(dtypes))})")
    if not (isinstance(shape, list) and len(shape) <= _MAX_RANK
            and all(type(d) is int and d >= 0 for d in shape)):
        raise _fail(path, f"tensor {key!r:.100} has shape {shape!r:.100}; expected a list of at most "
                          f"{_MAX_RANK} non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
        raise _fail(path, f"tensor {key!r:.100} has data_offsets {offsets!r:.100}; expected [begin, end]")
    begin, end = offsets
    if not 0 <= begin <= end <= data_len:
        raise _fail(path, f"tensor {key!r:.100} has data_offsets [{begin}, {end}] outside the {data_len} data "
                          "bytes the file holds (truncated or forged)")
    want = math.prod(shape) * ALL_DTYPES[dtype]
    if end - begin != want:
        raise _fail(path, f"tensor {key!r:.100}: shape {shape} of {dtype} needs {want} bytes but its "
                          f"data_offsets span {end - begin}")
    return begin, end


def check_safetensors(path: str | Path, *, dtypes: Collection[str] = BANK_DTYPES,
                      keys: Collection[str] | None = None, max_header: int = MAX_HEADER) -> dict[str, Any]:
    """Check the safetensors file ``path`` without materialising a tensor; return its tensor entries.

    ``dtypes``: the dtypes allowed (default :data:`BANK_DTYPES`; a backbone passes :data:`ALL_DTYPES`).
    ``keys``: when given, the exact set of tensor names expected.  Raises :class:`TensorFileError`.
    """
    path = Path(path)
    header, data_len = _read_header(path, max_header)
    if not isinstance(header, dict):
        raise _fail(path, f"header must be a JSON object, got {type(header).__name__}")
    meta = header.pop("__metadata__", {})
    if not (isinstance(meta, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())):
        raise _fail(path, "__metadata__ must be an object mapping strings to strings")
    spans = []
    for key, entry in header.items():
        if key.startswith("__") or not _KEY_RE.match(key):
            raise _fail(path, f"unexpected key {key!r:.100} in the header (tensor names are 1-1024 printable "
                              "characters; '__metadata__' is the only special key)")
        spans.append((*_check_entry(path, key, entry, dtypes, data_len), key))
    spans.sort()
    at = 0
    for begin, end, key in spans:
        if begin != at:
            raise _fail(path, f"data of tensor {key!r:.100} starts at {begin}, expected {at} (tensors overlap "
                              "or leave gaps)")
        at = end
    if at != data_len:
        raise _fail(path, f"tensors cover {at} of the {data_len} data bytes (trailing bytes or forged offsets)")
    if keys is not None and set(header) != set(keys):
        raise _fail(path, f"unexpected tensor names: missing {sorted(set(keys) - set(header))[:5]}, "
                          f"unexpected {sorted(set(header) - set(keys))[:5]}")
    return header
