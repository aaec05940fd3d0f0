"""Start a new task's expert from a stored one: ``add-task --init-from nearest|TASK``.

Letters in shape comments: F router features.

The new task's expert is made as usual and then overwritten, tensor by tensor, with the stored expert of
a *source* task (same method configuration, so the same keys and shapes; checked before anything is
copied by ``core.task_io.load_adapter``); training then starts where the source ended instead of from
the zero-initialised update. The head is the new task's own (its labels differ) and is fitted as usual.
This is soft-prompt transfer (SPoT, Vu et al. 2022, arXiv:2110.07904: initialise the target's prompt
with the most similar source task's) applied to any expert kind, with task similarity measured where
adaptbank already measures it:

* ``nearest``: among stored tasks whose method configuration equals the new task's, the one nearest in
  the router's feature space: the Mahalanobis distance between task means under the pooled within-task
  covariance (``bank.router_memory.router_distances``, the distance ``--share-a auto`` uses). With no
  such task (an empty bank, or only other methods), the expert starts from zero, and the reason says so.
* a task name: that stored task, which must hold the same method configuration.

The source becomes the task's ``parent`` (lineage) unless one is given, and ``init_from`` in its config
records ``{"task", "distance", "reason"}`` (``task`` None for a zero start). Combined with a shared-A
group, or for a prefix trained through its MLP (stored prefixes are collapsed, the MLP is not kept), the
option is refused before anything trains.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from adaptbank.bank.router_memory import router_distances
from adaptbank.bank.store import BankStore
from adaptbank.core.config import MethodConfig, PrefixConfig, stored_method
from adaptbank.core.model import AdaptBankModel
from adaptbank.core.task_io import load_adapter
from adaptbank.training import distributed
from adaptbank.training.distributed import Dist
from adaptbank.training.features import encode, task_features

__all__ = ["NEAREST", "check", "choose", "apply", "start", "probe_features"]

NEAREST = "nearest"


def _same_method(store: BankStore, task: str, method: MethodConfig) -> bool:
    return stored_method(store.read_config(task)["method"]).to_dict() == method.to_dict()  # old records filled in


def check(store: BankStore, init_from: str, method: MethodConfig, *, share_a: str | None) -> None:
    """Refuse, before anything trains, what ``--init-from`` cannot do (naming the value and what is allowed)."""
    if share_a is not None:
        raise ValueError(f"--init-from {init_from!r} cannot be combined with --share-a {share_a!r}: a shared-A task "
                         "trains B against the group's A; start it from zero")
    if isinstance(method, PrefixConfig) and method.reparam_hidden:
        raise ValueError(f"--init-from {init_from!r}: a prefix trained through its MLP reparameterisation cannot start "
                         "from stored prefixes (the MLP is not stored); use --method ptuning-v2 (prefixes trained directly)")
    if init_from == NEAREST:
        return
    tasks = store.tasks()
    if init_from not in tasks:
        raise KeyError(f"--init-from {init_from!r}: no such task in bank {store.path}; allowed: {NEAREST!r} or one of "
                       f"{', '.join(tasks) or '(none yet)'}")
    if not _same_method(store, init_from, method):
        raise ValueError(f"--init-from {init_from!r}: that task's method {store.read_config(init_from)['method']} differs "
                         f"from the new task's {method.to_dict()}; an expert can start only from one of the same method "
                         "configuration")


def choose(store: BankStore, name: str, init_from: str, method: MethodConfig, mean: Tensor, scatter: Tensor,
           count: int, *, dim: int, shrinkage: float) -> dict[str, Any]:
    """``{"task", "distance", "reason"}``: the source for new task ``name`` (router mean (F,), scatter (F, F),
    ``count`` examples); ``task`` None when ``nearest`` finds no other stored task of the same method
    (``nearest`` never picks ``name`` itself, which a ``--replace`` may still hold)."""
    if init_from != NEAREST:
        d = router_distances(store, [init_from], mean, scatter, count, dim=dim, shrinkage=shrinkage)[init_from]
        return {"task": init_from, "distance": d, "reason": f"started from the named task {init_from!r}"}
    same = [t for t in store.tasks() if t != name and _same_method(store, t, method)]
    if not same:
        return {"task": None, "distance": None,
                "reason": "started from zero: no other stored task has the same method configuration"}
    dists = router_distances(store, same, mean, scatter, count, dim=dim, shrinkage=shrinkage)
    best = min(same, key=lambda t: (dists[t], same.index(t)))
    return {"task": best, "distance": dists[best],
            "reason": f"started from {best!r}, the nearest of {len(same)} task(s) of the same method "
                      f"(distance {dists[best]:.2f} in the router's feature space)"}


def apply(store: BankStore, model: AdaptBankModel, name: str, choice: dict[str, Any]) -> None:
    """Copy the chosen source's stored expert into task ``name``'s (a no-op for a zero start)."""
    if choice["task"] is not None:
        load_adapter(model, name, store.read_tensors(choice["task"], "adapter"), source=choice["task"])


def start(store: BankStore, model: AdaptBankModel, name: str, init_from: str | None, method: MethodConfig,
          stats: tuple[Tensor, int, Tensor], *, dim: int, shrinkage: float) -> dict[str, Any] | None:
    """:func:`choose` and :func:`apply` for task ``name`` with router ``stats`` (mean (F,), count, scatter
    (F, F)); None when ``init_from`` is None (the usual zero start, nothing recorded)."""
    if init_from is None:
        return None
    mean, count, scatter = stats
    choice = choose(store, name, init_from, method, mean, scatter, count, dim=dim, shrinkage=shrinkage)
    apply(store, model, name, choice)
    return choice


def probe_features(model: AdaptBankModel, name: str, ids: Sequence[list[int]], frozen: Tensor,
                   choice: dict[str, Any] | None, dist: Dist) -> Tensor:
    """The pooled features (N, D) the new head's probe is fitted on: the frozen backbone's ``frozen`` for a
    zero start (the zero-initialised expert changes nothing), else the features under the started expert,
    so that the head starts matched to the expert it trains with (sharded over ``dist``'s ranks)."""
    if choice is None or choice["task"] is None:
        return frozen
    return distributed.sharded(dist, list(ids), lambda part: encode(model, part, task_features(model, name)),
                               where=f"task {name!r}: features under the started expert")
