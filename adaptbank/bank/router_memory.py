"""Each task's share of the router's memory, and the router updates that add and take it out exactly.

Letters in shape comments: N examples, F router features ((layers + 1) * hidden), r = min(N, F).

**What a task keeps.** ``memory.safetensors`` holds the task's router-feature mean (F,) (float64), its
example count, and its within-task scatter ``S_e = (X - mu)^T (X - mu)`` as the packed upper trapezoid
of the R factor of a QR decomposition of the centred features, ``S_e = R^T R`` (``RouterStats.task_factor``):
``scatter_factor`` (float32, ``r F - r (r - 1) / 2`` numbers) and ``scatter_rank`` r. Bytes per task,
``8 F + 4 (r F - r (r - 1) / 2)``; for MiniLM (F = 3 * 384 = 1152): 0.53 MB at N = 120 and at most 2.66 MB
(any N >= 1152), against 5.3 MB for a float32 F x F scatter, 2.65 MB for its packed triangle and
10.6 MB in float64.

With ``--router-replay M`` it also keeps ``replay``: M of the task's router-feature rows (float16,
``2 M F`` bytes), which the replay router (``routing.replay``) is refitted on whenever the tasks change.

**What the stored router keeps.** ``stats``: the pooled scatter (F x F float64, once per bank), its
example count, and per task a count and a pooled flag (16 bytes); no per-task mean or weight row.
The means stay in the tasks' own memory files and the LDA is solved when the router is loaded
(:func:`stored_router`), so a commit writes the same bytes whether the bank holds 1 task or 1,000.
The replay router's weights are stored (``lda``), since its fit is an optimisation, not a solve; so
are the weights of routers written before this form, which still read as they were.

**Why a float32 factor suffices, and the pool is float64.** The task's contribution to the pooled
scatter is *defined* as ``R^T R`` computed in float64 from the stored float32 ``R``, at add time and
again at remove time, so the subtraction takes out bit for bit what was added: what float32 storage
rounds (about 6e-8 relative, the precision of the float32 features themselves) never turns into
drift. The pool itself is float64, where each add or subtract rounds by at most 1.1e-16 of its
largest entry (see ``RouterStats``).

**Old banks.** A task stored before the factor existed has none, but its scatter is in the pool.
Removing or replacing it would leave that share behind, so the bank refuses (:class:`RouterDriftError`,
naming the task and the fix) unless the caller passes ``allow_router_drift=True``, which keeps the
share in the pool with a warning (the old behaviour). Once every task holds its factor,
:func:`refit` (``adaptbank router fit``) rebuilds the pool exactly from them.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from adaptbank._version import __version__
from adaptbank.bank.store import BankError, BankStore
from adaptbank.core.config import MethodConfig
from adaptbank.data.specs import validate_task_name
from adaptbank.routing.lda import LDARouter, RouterStats, shrunk_covariance
from adaptbank.routing.pools import check_pools
from adaptbank.routing.replay import fit_replay, keep_rows

__all__ = ["RouterDriftError", "task_memory", "kept_vectors", "memory_stats", "stats_from", "router_files", "router_update",
           "refit", "stored_router", "check_exact_removal", "precheck", "choose_group", "router_distances"]

TaskStats = tuple[Tensor, int, "Tensor | None"]
"""A task's router statistics: mean (F,), example count, scatter (F, F) or None when not stored."""


class RouterDriftError(BankError):
    """Removing or replacing a task whose scatter the bank cannot subtract (an old bank's task)."""


def task_memory(features: Tensor, replay: int = 0) -> dict[str, Tensor]:
    """The memory file of a task with router features ``features`` (N, F): mean, count, packed factor, and
    with ``replay`` > 0 that many of the feature rows (``routing.replay.keep_rows``, float16) as ``replay``."""
    mean, factor = RouterStats.task_factor(features)  # (F,), (r, F)
    rows, cols = torch.triu_indices(*factor.shape)  # (K,) each, K = r F - r (r - 1) / 2
    memory = {"mean": mean, "count": torch.tensor([features.shape[0]]),
              "scatter_factor": factor[rows, cols].float(), "scatter_rank": torch.tensor([factor.shape[0]])}
    if replay:
        memory["replay"] = keep_rows(features, replay)  # (M, F)
    return memory


def kept_vectors(memory: dict[str, Tensor], name: str, where: object) -> Tensor:
    """The router replay vectors (M, F) of task ``name``'s memory; an error says when it keeps none."""
    if "replay" not in memory:
        raise BankError(f"{where}: task {name!r} keeps no router replay vectors (it was stored without "
                        "--router-replay); add it again to this bank, or use a bank with the LDA router")
    return memory["replay"]


def memory_stats(memory: dict[str, Tensor]) -> TaskStats:
    """Mean, count and scatter ``R^T R`` (float64, from the stored float32 R) of a task's memory file."""
    mean, count = memory["mean"].double(), int(memory["count"][0])  # (F,)
    if "scatter_factor" not in memory:
        return mean, count, None
    rank, dim = int(memory["scatter_rank"][0]), mean.shape[0]
    rows, cols = torch.triu_indices(rank, dim)
    packed = memory["scatter_factor"]  # (K,)
    if packed.shape != rows.shape:
        raise BankError(f"router memory: scatter_factor has {packed.numel()} numbers, expected {rows.numel()} "
                        f"for rank {rank} and {dim} features")
    factor = torch.zeros(rank, dim, dtype=torch.float64)  # (r, F)
    factor[rows, cols] = packed.double()
    return mean, count, factor.T @ factor  # (F, F)


def stats_from(current: tuple[dict, dict[str, Any]] | None, dim: int) -> RouterStats:
    """The router statistics of a stored router ``(files, meta)``, or empty ones."""
    if current is None:
        return RouterStats(dim)
    files, meta = current
    return RouterStats.from_tensors(meta["expert_order"], files["stats"])


def router_files(stats: RouterStats, layers: int, shrinkage: float,
                 pools: Sequence[str] = ("mean",), kept: Sequence[Tensor] | None = None) -> tuple[dict, dict, list[str]]:
    """``(files, meta, expert_order)`` for the store: the statistics without per-task means (the LDA is
    solved from them at load, :func:`stored_router`), and with ``kept`` (each task's replay vectors, in
    ``stats.names`` order, means filled in) the replay router (``routing.replay``), fitted now and stored
    in the LDA's linear form under ``lda``. ``meta["pools"]`` is written only
    for pools other than today's ``("mean",)``, so such banks' stored router stays byte-identical to
    before the option."""
    files = {"stats": stats.to_tensors(means=False)}
    meta: dict[str, Any] = {"kind": "lda", "layers": layers, "shrinkage": shrinkage, "expert_order": list(stats.names),
                            "adaptbank_version": __version__}
    if stats.names and kept is not None:
        weight, bias, l2 = fit_replay(stats, kept, shrinkage=shrinkage)  # (E, F), (E,)
        files["lda"] = {"weight": weight, "bias": bias}
        meta |= {"kind": "replay-lr", "replay_l2": l2, "replay_rows": [int(k.shape[0]) for k in kept]}
    if tuple(pools) != ("mean",):
        meta["pools"] = list(check_pools(pools))
    return files, meta, list(stats.names)


def stored_router(files: dict[str, Any], meta: dict[str, Any],
                  read_mean: Callable[[str], Tensor] | None = None) -> LDARouter:
    """The router of a stored router ``(files, meta)``: its stored weights (the replay router, and banks
    written before the LDA was solved at load), else the LDA solved now from the stored statistics and
    each task's mean, ``read_mean(name)`` (F,) (its memory file's). A router stored before pools existed
    (no ``meta["pools"]``) reads mean pools, as it was fitted on."""
    pools = meta.get("pools", ("mean",))
    if "lda" in files:
        return LDARouter(meta["expert_order"], files["lda"]["weight"], files["lda"]["bias"], layers=meta["layers"],
                         pools=pools)
    stats = RouterStats.from_tensors(meta["expert_order"], files["stats"])
    if read_mean is None and any(m is None for m in stats.means):
        raise ValueError("this stored router keeps its tasks' means in their memory files: pass read_mean")
    if read_mean is not None:
        stats.fill_means(read_mean)
    return LDARouter.fit(stats, layers=meta["layers"], shrinkage=meta["shrinkage"], pools=pools)


def check_exact_removal(where: object, stats: RouterStats, name: str, scatter: Tensor | None, *,
                        doing: str, allow_drift: bool) -> bool:
    """Whether task ``name``'s share must stay in the pool when it goes (``keep_scatter``): False when
    its ``scatter`` is known or not pooled; for an old bank's task :class:`RouterDriftError`, naming the
    task and the fix, or with ``allow_drift`` a warning and True. ``doing``: "removing" or "replacing"."""
    if scatter is not None or name not in stats.names or not stats.pooled[stats.names.index(name)]:
        return False
    reason = (f"task {name!r} of bank {where} was stored before adaptbank kept each task's router scatter (its "
              f"memory.safetensors has no 'scatter_factor'), so {doing} it cannot take its share out of the router's "
              "pooled covariance")
    if not allow_drift:
        raise RouterDriftError(
            f"{reason}: the router would drift from a fit on the tasks present. To go ahead and leave that share "
            "in, pass allow_router_drift=True (CLI: --allow-router-drift). To make the router exact again, re-add "
            "every such task with --replace --allow-router-drift, then run `adaptbank router fit`.")
    warnings.warn(f"{reason}; its share stays in (allow_router_drift); once every task holds its scatter, "
                  "`adaptbank router fit` rebuilds the pool exactly", stacklevel=2)
    return True


def precheck(store: BankStore, name: str, *, doing: str, allow_drift: bool) -> None:
    """:func:`check_exact_removal` on the committed bank, before any work: a refusal comes before training
    (it is checked again, and any warning given, at commit)."""
    current = store.read_router()
    if not allow_drift and current is not None and name in store.tasks() and "memory" in store.stems(name):
        old = memory_stats(store.read_tensors(name, "memory"))[2]
        check_exact_removal(store.path, stats_from(current, 0), name, old, doing=doing, allow_drift=allow_drift)


def router_update(store: BankStore, *, dim: Callable[[], int], layers: int, shrinkage: float,
                  add: tuple[str, TaskStats] | None = None, drop: str | None = None,
                  allow_drift: bool = False, pools: Sequence[str] = ("mean",), replay: bool = False,
                  add_kept: Tensor | None = None) -> Callable[..., tuple[dict, dict, list[str]]]:
    """A store callback (``store.RouterUpdate``): the stored statistics plus task ``add`` (replacing the
    same name's old version in its place) or minus ``drop``, each removal subtracting the task's own
    stored scatter (read as committed before the change), then the router refitted. ``dim()``: the
    feature width F, asked for only when the bank has no router yet. With ``replay`` the refit is the
    replay router over every task's kept vectors (the added task's ``add_kept``, the others' as
    committed)."""

    def update(current: Any, tasks: list[str], previous: Callable[[str, str], dict[str, Tensor]]) -> Any:
        stats = stats_from(current, dim() if current is None else 0)

        def old_share(name: str, doing: str) -> tuple[Tensor | None, bool]:
            old = memory_stats(previous(name, "memory"))[2]
            return old, check_exact_removal(store.path, stats, name, old, doing=doing, allow_drift=allow_drift)

        if drop is not None and drop in stats.names:
            old, keep = old_share(drop, "removing")
            stats.remove(drop, old, keep_scatter=keep)
        if add is not None and add[0] in stats.names:
            old, keep = old_share(add[0], "replacing")
            stats.replace(add[0], *add[1], old_scatter=old, keep_scatter=keep)
        elif add is not None:
            stats.add(add[0], *add[1])
        _drop_vanished(stats, tasks, store.path)
        if sorted(stats.names) == sorted(tasks):
            stats.reorder(tasks)
        kept = None
        if replay:  # the refit reads every other task's memory: its kept vectors and its mean
            if add is not None and add_kept is None:
                raise ValueError(f"replay router: task {add[0]!r} is added without its kept vectors")
            memories = {n: previous(n, "memory") for n in stats.names if add is None or n != add[0]}
            stats.fill_means(lambda n: memories[n]["mean"])
            kept = [add_kept if n not in memories else kept_vectors(memories[n], n, store.path) for n in stats.names]
        return router_files(stats, layers, shrinkage, pools, kept)

    return update


def _drop_vanished(stats: RouterStats, tasks: list[str], where: object) -> None:
    """Tasks the statistics name but the bank no longer holds (a router left stale by hand): their
    files are gone, so their scatter stays in, with a warning."""
    for name in [n for n in stats.names if n not in tasks]:
        warnings.warn(f"router of bank {where}: task {name!r} is gone from the bank but not from the router; its "
                      "scatter stays in the pooled covariance (run `adaptbank router fit` once every task holds "
                      "its scatter to rebuild it exactly)", stacklevel=2)
        stats.remove(name, keep_scatter=True)


def refit(store: BankStore, *, dim: int, layers: int, shrinkage: float,
          pools: Sequence[str] = ("mean",), replay: bool = False) -> tuple[dict, dict, list[str]]:
    """The router refitted from the bank's memory. When every task holds its scatter, from scratch: the
    tasks' stored means, counts and scatters, nothing else (exact, whatever happened before). Otherwise
    the stored statistics, with the mean (and scatter, when stored) of any task they lack; such a task's
    unknown scatter is left out and the pooled covariance of the others stands in. With ``replay``, the
    replay router over the tasks' kept vectors."""
    tasks = store.tasks()
    stats, kept = RouterStats(dim), [] if replay else None
    for name in tasks:  # one task's memory at a time: a scatter is F x F float64 (10.6 MB for MiniLM)
        memory = store.read_tensors(name, "memory")
        mean, count, scatter = memory_stats(memory)
        if scatter is None:
            break
        stats.add(name, mean, count, scatter)
        if kept is not None:
            kept.append(kept_vectors(memory, name, store.path))
    else:
        return router_files(stats, layers, shrinkage, pools, kept)
    stats = stats_from(store.read_router(), dim)
    _drop_vanished(stats, tasks, store.path)
    kept = [] if replay else None
    means = {}
    for name in tasks:
        memory = store.read_tensors(name, "memory")
        if name not in stats.names:
            stats.add(name, *memory_stats(memory))
        if kept is not None:
            kept.append(kept_vectors(memory, name, store.path))
            means[name] = memory["mean"]
    if kept is not None:
        stats.fill_means(means.__getitem__)
    stats.reorder(tasks)
    return router_files(stats, layers, shrinkage, pools, kept)


def router_distances(store: BankStore, tasks: list[str], mean: Tensor, scatter: Tensor, count: int, *, dim: int,
                     shrinkage: float) -> dict[str, float]:
    """Distance of a new task (router-feature mean (F,), scatter (F, F), ``count`` examples) to each stored
    task of ``tasks`` in the router's feature space: the Mahalanobis distance between the task means under
    the pooled within-task covariance (the new task's scatter included), shrunk by ``shrinkage``; in order."""
    if not tasks:
        return {}
    stats = stats_from(store.read_router(), dim)
    stats.add("\0new", mean, count, scatter)
    cov = shrunk_covariance(stats, shrinkage)  # (F, F)
    out = {}
    for t in tasks:
        diff = mean.double() - store.read_tensors(t, "memory")["mean"].double()  # (F,)
        out[t] = float(diff @ torch.linalg.solve(cov, diff)) ** 0.5
    return out


def choose_group(store: BankStore, share_a: str, mean: Tensor, scatter: Tensor, count: int, method: MethodConfig, *,
                 dim: int, shrinkage: float, share_distance: float) -> tuple[str, str]:
    """The shared-A group for a new task and why: ``share_a`` itself, or for ``auto`` the group holding the
    task nearest to the new one (mean (F,), scatter (F, F), ``count`` examples) in the router's feature
    space (Mahalanobis distance under the pooled within-task covariance, shrunk by ``shrinkage``), when the
    router could barely tell the two apart (distance <= ``share_distance``): tasks with overlapping inputs
    share A."""
    groups = store.section("shared")
    if share_a != "auto":
        validate_task_name(share_a)
        if share_a in groups:
            return share_a, f"joined the named group {share_a!r}"
        return share_a, f"started the named group {share_a!r}"
    compatible = {}
    for group, entry in groups.items():
        first = store.read_config(entry["tasks"][0])["method"]
        if first.get("rank") == getattr(method, "rank", None) and first.get("targets") == method.to_dict()["targets"]:
            compatible |= {t: group for t in entry["tasks"]}
    best, best_d = None, float("inf")
    for t, d in router_distances(store, list(compatible), mean, scatter, count, dim=dim, shrinkage=shrinkage).items():
        if d < best_d:
            best, best_d = compatible[t], d
    if best is not None and best_d <= share_distance:
        return best, (f"joined group {best!r}: its nearest task is at distance {best_d:.2f} <= "
                      f"{share_distance} in the router's feature space")
    new = next(f"group{i}" for i in range(1, len(groups) + 2) if f"group{i}" not in groups)
    why = (f"started group {new!r}: the nearest compatible group {best!r} is at distance {best_d:.2f} > "
           f"{share_distance}" if best is not None else f"started group {new!r}: no compatible group yet")
    return new, why
