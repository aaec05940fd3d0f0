"""The process's peak resident memory over a stretch of work (Linux ``/proc``), for the continual runner's
cost-per-task figures.

``/proc/self/clear_refs`` with ``5`` resets the resident-set high-water mark ``VmHWM`` to the current
resident set (Linux >= 4.0); ``VmHWM`` read afterwards is the peak since. Elsewhere (or where the reset is
not allowed) :func:`reset_peak` returns False and :func:`peak_bytes` None: no figure rather than the
lifetime maximum passed off as the task's.
"""

from __future__ import annotations

import re
from pathlib import Path

__all__ = ["reset_peak", "peak_bytes", "resident_bytes"]


def reset_peak() -> bool:
    """Reset the high-water mark to the current resident set; False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_bytes() -> int | None:
    """The resident-set high-water mark in bytes (``VmHWM``), or None where ``/proc`` does not give it."""
    return _status_bytes("VmHWM")


def resident_bytes() -> int | None:
    """The current resident set in bytes (``VmRSS``), or None where ``/proc`` does not give it."""
    return _status_bytes("VmRSS")


def _status_bytes(field: str) -> int | None:
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(rf"^{field}:\s+(\d+) kB", status, re.M)
    return int(m.group(1)) * 1024 if m else None
