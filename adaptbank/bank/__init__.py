"""The bank: a directory that holds one frozen base model's task experts.

``store`` (torch-free: atomic transactions, locking, reads), ``manifest`` (its schema, validation and
errors), ``files`` (checksummed reads, durable writes) and ``maintenance`` (verify, repair) know nothing
of models; ``facade.AdapterBank`` trains tasks and stores them; ``router_memory`` keeps each task's
exact share of the router (added and subtracted on add / replace / remove); ``expert_io`` and
``graph`` are the edges (portable expert folders, the lineage/similarity graph); ``snapshot`` keeps a
read of many files to one committed version while writers commit, and ``live.LiveBank`` is a routed model
that follows the bank's commits (a long-lived reader).

``AdapterBank`` and ``BankError`` load lazily, so ``adaptbank.bank.store`` imports without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {"AdapterBank": "facade", "AddResult": "facade", "BankError": "store"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"adaptbank.bank.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'adaptbank.bank' has no attribute {name!r}")


if TYPE_CHECKING:  # pragma: no cover
    from adaptbank.bank.facade import AdapterBank, AddResult
    from adaptbank.bank.store import BankError
