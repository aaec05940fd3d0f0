"""Crash-safe file primitives and flock helpers for the on-disk bank (used by ``adaptbank.store``).

The one rule: a file becomes visible under its final name only when its bytes are complete and
durable.  ``atomic_write_bytes`` writes ``<dir>/.tmp-<name>-<random>``, flushes and ``fsync``s it,
then ``os.replace``s it over the final name (atomic on POSIX within one filesystem)::

    write .tmp-x-ab12 -> fsync(.tmp-x-ab12) -> replace(.tmp-x-ab12, x) -> [fsync(dir)]

A crash at any point leaves either the old ``x`` (plus a stray ``.tmp-*`` that readers ignore and
``BankStore.repair`` removes) or the new ``x``; never a torn one.  The directory ``fsync`` makes
the rename itself durable.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

TMP_PREFIX = ".tmp-"
"""Name prefix of every temporary; readers skip such names and repair deletes stale ones."""

_CHUNK = 1 << 20


def _with_filename(exc: OSError, path: Path) -> OSError:
    """Return ``exc`` with ``path`` as its filename when the OS error did not name one."""
    if exc.filename is not None:
        return exc
    return OSError(exc.errno, exc.strerror or str(exc), str(path))


def fsync_dir(path: str | Path) -> None:
    """``fsync`` a directory so that entries created, renamed or removed in it are durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as exc:
        raise _with_filename(exc, Path(path)) from exc
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes, *, sync_dir: bool = True) -> None:
    """Write ``data`` to ``path`` atomically: temporary in the same dir, fsync, ``os.replace``.

    On any failure the temporary is removed and the ``OSError`` (with the path filled in) is
    re-raised; ``path`` itself is then untouched.  With ``sync_dir`` the parent directory is
    fsynced after the rename, so the new name survives a power loss.
    """
    path = Path(path)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "xb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        try:
            tmp.unlink()
        except OSError:
            pass  # never created, or already gone: nothing to clean
        raise _with_filename(exc, tmp) from exc
    if sync_dir:
        fsync_dir(path.parent)


def file_digest(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


class LockTimeoutError(TimeoutError):
    """:func:`exclusive_lock` gave up waiting; ``holder_pid`` is the pid the holder wrote, or None."""

    def __init__(self, message: str, holder_pid: int | None) -> None:
        super().__init__(message)
        self.holder_pid = holder_pid


def lock_holder(path: str | Path) -> int | None:
    """The process id the current holder of :func:`exclusive_lock` on ``path`` wrote into it, if any."""
    try:
        text = Path(path).read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


@contextlib.contextmanager
def exclusive_lock(path: str | Path, timeout: float | None = None) -> Iterator[None]:
    """Hold an exclusive ``fcntl.flock`` on ``path`` (created if missing) for the ``with`` body.

    Waits forever when ``timeout`` is None, else raises :class:`LockTimeoutError` after ``timeout`` s.
    The kernel drops the lock when the descriptor closes or the process dies (even by SIGKILL),
    so a crashed writer never leaves the bank locked.  While held, the file holds the holder's pid,
    so that a waiter that gives up can say who holds it; it is emptied again before release.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if deadline is None else fcntl.LOCK_NB))
                break
            except BlockingIOError:
                if deadline is not None and time.monotonic() >= deadline:
                    pid = lock_holder(path)
                    who = f"process {pid}" if pid is not None else "another process (pid not recorded)"
                    raise LockTimeoutError(f"{path}: still locked by {who} after {timeout} s", pid) from None
                time.sleep(0.01)
        with contextlib.suppress(OSError):  # the pid is a courtesy to waiters; the flock is the lock
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def hold_marker(path: str | Path) -> int:
    """Create ``path`` (must not exist) and flock it; the returned fd keeps it "live" until closed."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def marker_live(path: str | Path) -> bool:
    """True while some process still holds the flock taken by :func:`hold_marker` on ``path``."""
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def write_folder(directory: str | Path, fill: Callable[[Path], None], *, replace: bool = False) -> Path:
    """Create the folder ``directory`` whole or not at all: ``fill(tmp)`` writes every file into a new
    temporary sibling ``.tmp-<name>-<id>``, which is then renamed into place.

    ``directory`` must not exist or be empty, unless ``replace=True`` (then the old folder is renamed aside,
    the new one renamed in, and the old deleted).  On any failure ``directory`` is as it was and no
    temporary is left behind.  Returns the absolute path."""
    import shutil

    out = Path(directory).absolute()
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise FileExistsError(f"{out} exists and is not a folder; refusing to replace it")
    occupied = out.is_dir() and any(out.iterdir())
    if occupied and not replace:
        raise FileExistsError(f"{out} exists and is not empty; pass replace=True (--replace) to replace that folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{TMP_PREFIX}{out.name}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    old = out.with_name(f"{TMP_PREFIX}{out.name}-old-{uuid.uuid4().hex[:8]}")
    try:
        fill(tmp)
        fsync_dir(tmp)
        if occupied:
            os.rename(out, old)
        try:
            os.rename(tmp, out)  # onto a missing or empty folder: atomic
        except BaseException:
            if occupied:
                os.rename(old, out)  # put the old folder back
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(out.parent)
    shutil.rmtree(old, ignore_errors=True)
    return out
