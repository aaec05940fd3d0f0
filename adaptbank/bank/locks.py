"""The bank's two kinds of lock file: the writers' lock and the markers of writes in progress.

``BANK/.lock`` is flock'ed by a writer around the read-check-replace of ``manifest.json`` (and by
``repair``); it holds the holder's pid, so a writer that waits too long fails naming it. A write
that has new directories not yet committed holds a flock on ``BANK/.tmp-pending-<id>`` for as long
as they may be committed; ``repair`` (``bank.maintenance``) spares the directories of live markers.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from adaptbank._atomic import LockTimeoutError, exclusive_lock, hold_marker
from adaptbank.bank.manifest import _LOCK, _PENDING, BankLockedError

__all__ = ["pending_marker", "writer_lock"]


@contextlib.contextmanager
def writer_lock(bank: Path, timeout: float | None) -> Iterator[None]:
    """The writers' exclusive lock on ``bank/.lock`` (waits ``timeout`` s; None: forever)."""
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(exclusive_lock(bank / _LOCK, timeout))
        except LockTimeoutError as exc:
            raise BankLockedError(f"{bank}: another writer holds the bank lock: {exc}; wait for it to "
                                  "finish, or pass a longer lock_timeout (--lock-timeout)",
                                  holder_pid=exc.holder_pid) from None
        yield


@contextlib.contextmanager
def pending_marker(bank: Path, uid: str, timeout: float | None) -> Iterator[None]:
    """Hold a flock'ed ``.tmp-pending-<uid>`` marker so ``repair`` spares this write's new dirs."""
    marker = bank / f"{_PENDING}{uid}"
    with writer_lock(bank, timeout):  # repair() holds the lock, so it never sees a live marker unlocked
        fd = hold_marker(marker)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            marker.unlink()
        os.close(fd)
