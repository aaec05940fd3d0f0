"""A discriminative router refitted on a bounded replay of router features (``--router-replay M``).

Letters in shape comments: N examples, M kept per task, F router features, E tasks.

**Method.** Each task keeps ``M`` of its training texts' router features (rows picked at random with a
fixed seed, stored as float16 in the task's memory file: vectors, never text) beside the statistics the
LDA router keeps. Whenever the bank's tasks change, a multinomial logistic regression over all kept
vectors is refitted on features whitened with the LDA's pooled shrunk within-task covariance
(``z = L^-1 (x - mu)``, ``S_a = L L^T``, ``mu`` the count-weighted mean of the task means), so it starts
from the geometry the closed-form LDA uses and moves its boundaries where the tasks are not Gaussian
with one shared covariance. Its L2 strength is chosen among :data:`L2_GRID` on a fixed 20% holdout of
the kept vectors (no test data), then the model is refitted on all of them. The result is linear in the
features, ``x (L^-T W) + (b - mu L^-T W)``, so it is stored and routed exactly like the LDA: a weight
(E, F) and a bias (E,) inside the one routed forward, at the same cost.

This is rehearsal on stored latent features (latent replay, Pellegrini et al. 2020) with a linear
classifier on top, against Fisher's closed-form LDA. Measured on the nine shared tasks with 500 of 500
training texts kept (``bench/routing_quality.py``, offline): task identification 95.5 -> 96.6%,
routed/oracle 96.7 -> 97.4%, the first task's identification after eight more tasks 96.8 -> 98.4%.

**Cost.** Each task's memory grows by ``2 M F`` bytes (1.15 MB for MiniLM at M = 500). A refit reads every
task's kept vectors and runs L-BFGS over ``E M`` rows: its time grows with the bank (about ``E^2 M F``
per iteration), unlike the LDA's; it suits banks of tens of tasks, and the LDA (``M = 0``, the default)
stays the choice for hundreds. The refit sees the same kept vectors in the same task order whether the
tasks came one by one or all at once, so incremental equals offline.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.nn import functional as nnf

from adaptbank.routing.lda import RouterStats, shrunk_covariance

__all__ = ["L2_GRID", "keep_rows", "fit_replay"]

L2_GRID = (1e-3, 1e-2, 1e-1)
"""L2 strengths tried on the holdout (on whitened features, per mean cross-entropy)."""


def keep_rows(features: Tensor, m: int, seed: int = 0) -> Tensor:
    """``min(N, m)`` rows of a task's router features (N, F), chosen at random with ``seed``, as float16."""
    if m < 1:
        raise ValueError(f"the router replay keeps at least one vector per task, got m={m!r}")
    g = torch.Generator().manual_seed(seed)
    keep = torch.randperm(features.shape[0], generator=g)[:m]  # (M,)
    return features[keep].to(torch.float16)  # (M, F)


def _lbfgs(z: Tensor, y: Tensor, tasks: int, l2: float, max_iter: int) -> tuple[Tensor, Tensor]:
    """Multinomial logistic regression ``z W + b`` (W (F, E)), mean cross-entropy + ``l2/2 |W|^2``."""
    w = torch.zeros(z.shape[1], tasks, requires_grad=True)  # (F, E)
    b = torch.zeros(tasks, requires_grad=True)  # (E,)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = nnf.cross_entropy(z @ w + b, y) + 0.5 * l2 * (w * w).sum()  # (N, E) logits
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def fit_replay(stats: RouterStats, kept: Sequence[Tensor], *, shrinkage: float = 0.1,
               grid: Sequence[float] = L2_GRID, max_iter: int = 100) -> tuple[Tensor, Tensor, float]:
    """The replay router of tasks ``stats.names`` with kept vectors ``kept`` (one (M_e, F) per task, in
    order): ``weight (E, F)``, ``bias (E,)`` (float32, scores ``x W^T + b``) and the chosen L2. One task:
    zeros (it is always chosen)."""
    if len(kept) != len(stats.names):
        raise ValueError(f"replay router: {len(kept)} kept-vector sets for {len(stats.names)} tasks {stats.names}")
    for name, k in zip(stats.names, kept):
        if k.dim() != 2 or k.shape[1] != stats.dim or k.shape[0] < 1:
            raise ValueError(f"replay router: task {name!r} kept vectors have shape {tuple(k.shape)}, "
                             f"expected (M >= 1, {stats.dim})")
    tasks = len(stats.names)
    if tasks == 1:
        return torch.zeros(1, stats.dim), torch.zeros(1), 0.0
    counts = torch.tensor(stats.counts, dtype=torch.float64)  # (E,)
    mu = (torch.stack(stats.held_means()) * counts[:, None]).sum(0) / counts.sum()  # (F,)
    chol = torch.linalg.cholesky(shrunk_covariance(stats, shrinkage))  # (F, F), S_a = L L^T
    x = torch.cat([k.double() for k in kept]) - mu  # (E M, F)
    z = torch.linalg.solve_triangular(chol, x.T, upper=False).T.float()  # (E M, F) whitened
    y = torch.cat([torch.full((k.shape[0],), e) for e, k in enumerate(kept)])  # (E M,)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(1))
    hold, train = perm[: len(y) // 5], perm[len(y) // 5:]
    best: tuple[float, float] | None = None
    for l2 in grid:
        w, b = _lbfgs(z[train], y[train], tasks, l2, max_iter)
        acc = float(((z[hold] @ w + b).argmax(1) == y[hold]).double().mean())
        if best is None or acc > best[0]:
            best = (acc, l2)
    assert best is not None
    w, b = _lbfgs(z, y, tasks, best[1], max_iter)  # (F, E), (E,)
    # z = (x - mu) L^-T, so z W = x (L^-T W) - mu (L^-T W)
    proj = torch.linalg.solve_triangular(chol.T, w.double(), upper=True)  # (F, E) = L^-T W
    return proj.T.float(), (b.double() - mu @ proj).float(), best[1]
