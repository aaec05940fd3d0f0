"""``LiveBank``: a routed model that follows a bank's commits, for a long-lived reader such as a server.

Per call, :meth:`LiveBank.current` reads the committed manifest's generation (``bank.snapshot.disk_generation``:
one small file, no lock, no tensor file).  When it differs from the generation of the model in hand, the bank
re-reads its manifest and loads a new routed model of one committed version (``AdapterBank.load_routed``,
``bank.snapshot.read_consistent``), which replaces the old one; a model handed out earlier is never changed,
so a request already running on it finishes on the version it started with.  The backbone is loaded and
fingerprinted once, at the first call; only the experts, heads and router are re-read per new version.
"""

from __future__ import annotations

from pathlib import Path

from adaptbank.bank.facade import AdapterBank
from adaptbank.bank.snapshot import disk_generation
from adaptbank.core.model import AdaptBankModel

__all__ = ["LiveBank"]


class LiveBank:
    """The newest committed version of the bank at ``path`` as a routed model (``top_k``, ``temperature``:
    as for :meth:`AdapterBank.load_routed`)."""

    def __init__(self, path: str | Path, *, top_k: int | None = None, temperature: float | None = None) -> None:
        self.bank = AdapterBank.open(path)
        self.top_k, self.temperature = top_k, temperature
        self._model: AdaptBankModel | None = None
        self._generation = -1
        self.reloads = 0
        """How many times :meth:`current` loaded a model (the first load included)."""

    @property
    def generation(self) -> int:
        """The generation of the model :meth:`current` returned last (-1 before the first call)."""
        return self._generation

    def current(self) -> AdaptBankModel:
        """The routed model of the newest committed version, loading it when a writer committed since."""
        if self._model is None or disk_generation(self.bank.path) != self._generation:
            self.bank.store.reload()
            self._model = self.bank.load_routed(top_k=self.top_k, temperature=self.temperature)
            self._generation = self.bank.store.generation  # the version read: no re-read happened after it
            self.reloads += 1
        return self._model
