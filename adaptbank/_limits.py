"""Size limits on what adaptbank reads whole into memory, so a huge or hostile file is refused, not read.

* task and run specs (TOML): at most :data:`MAX_SPEC_BYTES`;
* data files (JSONL, CSV, labels JSON): at most ``ADAPTBANK_MAX_DATA_BYTES`` (default 2 GiB); the examples
  of a training split are held in memory by design, so a larger file must be cut (or sampled) first;
* one line of a streamed input (``predict --input``): at most :data:`MAX_LINE_BYTES`; the file itself may be
  any size, since it is read line by line.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["MAX_SPEC_BYTES", "MAX_LINE_BYTES", "DEFAULT_MAX_DATA_BYTES", "max_data_bytes", "check_size", "read_small_text"]

MAX_SPEC_BYTES = 1 << 20
"""1 MiB: a task or run spec is a few hundred bytes; anything this large is not one."""
MAX_LINE_BYTES = 16 << 20
"""16 MiB: the longest line of a streamed input file."""
DEFAULT_MAX_DATA_BYTES = 2 << 30
"""2 GiB, overridden by the environment variable ``ADAPTBANK_MAX_DATA_BYTES``."""


def max_data_bytes() -> int:
    """The data-file limit: ``ADAPTBANK_MAX_DATA_BYTES`` (a positive integer) or 2 GiB."""
    raw = os.environ.get("ADAPTBANK_MAX_DATA_BYTES")
    if raw is None:
        return DEFAULT_MAX_DATA_BYTES
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise ValueError(f"ADAPTBANK_MAX_DATA_BYTES must be a positive integer (bytes), got {raw!r}")
    return value


def check_size(path: Path, limit: int, what: str, hint: str = "") -> None:
    """Refuse ``path`` if it is larger than ``limit`` bytes, naming both (``hint``: what to do instead)."""
    size = path.stat().st_size
    if size > limit:
        raise ValueError(f"{what} {path} is {size:,} bytes, more than the {limit:,} adaptbank reads whole into "
                         f"memory{'; ' + hint if hint else ''}")


def read_small_text(path: Path, limit: int, what: str) -> str:
    """The UTF-8 text of a file that must be small (a spec): size checked before anything is read."""
    check_size(path, limit, what)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{what} {path} is not valid UTF-8: {exc}") from None
