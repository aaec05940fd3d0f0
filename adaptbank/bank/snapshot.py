"""Reading a bank while writers change it: every multi-file read from one manifest version, and a cheap
check for a newer version.

Writers commit by replacing ``manifest.json`` and then delete the directories the commit superseded
(``bank.store``).  A reader building a model reads many files (each task's config, adapter and head, the
router) through its cached manifest, so one of them can vanish half-way; ``BankStore`` then re-reads the
manifest and retries that one file on the new version, which is right for a single read but would build a
model out of two versions: the router of version g with a task of version g+1, or a task removed in g+1
half-loaded.  :func:`read_consistent` makes the whole read optimistic, as a seqlock reader does::

    g = store.generation; out = read()
    accept out  iff  store.generation == g      (no file vanished, so no manifest re-read, mid-read)
    else            read() again, on the newer manifest the store re-read (at most ``attempts`` times)

Committed directories never change (``bank.store``), so a read that saw no re-read read exactly version g:
its model matches one commit, router and experts alike.

A long-lived reader (a server) notices a new version with :func:`disk_generation`: one read of the small
``manifest.json`` and a JSON parse, no lock and no tensor file, compared with the generation its model was
loaded at (``bank.live.LiveBank``).  Re-opening the bank per request instead would load and fingerprint
the backbone each time (seconds for MiniLM), and readers never take the writers' lock, so neither way
ever waits for a writer.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from adaptbank.bank.manifest import BankChangedError, _read_manifest_file

if TYPE_CHECKING:
    from adaptbank.bank.store import BankStore

__all__ = ["BankChangedError", "consistent", "disk_generation", "read_consistent"]

_T = TypeVar("_T")
_F = TypeVar("_F", bound=Callable[..., Any])
DEFAULT_ATTEMPTS = 10
"""Reads :func:`read_consistent` tries before giving up: each retry means a writer committed during the read."""


def disk_generation(path: str | Path) -> int:
    """The ``generation`` of the bank's committed ``manifest.json`` at ``path`` (validated, read without a lock)."""
    return int(_read_manifest_file(Path(path))["generation"])


def read_consistent(store: BankStore, read: Callable[[], _T], *, attempts: int = DEFAULT_ATTEMPTS) -> _T:
    """``read()``'s result, accepted only when ``store`` re-read no manifest meanwhile (see the module).

    A failure of a read that saw a re-read is retried too: mixing versions can fail in any way (a removed
    task not found, a replaced expert's shapes), and a real error raises again on the stable version.
    Raises :class:`BankChangedError` when writers committed during each of ``attempts`` reads."""
    if attempts < 1:
        raise ValueError(f"attempts must be >= 1, got {attempts!r}")
    for _ in range(attempts):
        start = store.generation
        try:
            out = read()
        except Exception:
            if store.generation == start:
                raise
            continue
        if store.generation == start:
            return out
    raise BankChangedError(f"{store.path}: the bank changed during each of {attempts} reads (writers committing "
                           "faster than a model loads); retry when they pause")


def consistent(method: _F) -> _F:
    """Decorate a method of an object with a ``store`` (``AdapterBank``): its body runs under
    :func:`read_consistent`. Nested calls are fine: the outermost check decides."""

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        return read_consistent(self.store, lambda: method(self, *args, **kwargs))

    return wrapper  # type: ignore[return-value]
