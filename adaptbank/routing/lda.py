"""The learned sequence router: picks or mixes the bank's experts per input, with no task id.

Letters in shape comments: B batch, T tokens, D hidden size, F router features, E experts, k top-k.

**Features without a second pass.** The router reads mean-pools of the first hidden states of the
backbone (the embeddings and the outputs of layers ``0 .. L-1``, ``L = RouterConfig.layers``),
concatenated: ``F = (L + 1) * D``. The bank keeps experts out of those lower layers, so these
features are the frozen model's, and they are computed inside the one routed forward: taps on
layers ``0 .. L-1`` pool their hidden states, and the tap on layer ``L - 1`` runs the router and
writes the gates before layer ``L`` (the first with experts) runs. Routed inference therefore costs
one forward plus a ``(B, F) x (F, E)`` product.

**Classifier: linear discriminant analysis from running statistics.** Each task contributes its
feature mean and its within-task scatter ``sum (x - mu)(x - mu)^T``. With the pooled covariance
``S = scatter / (N - E)`` shrunk towards a scaled identity, ``S_a = (1 - a) S + a tr(S)/F I``, the
task scores are ``x^T S_a^-1 mu_e - 1/2 mu_e^T S_a^-1 mu_e`` (equal priors). Adding a task needs only
its own mean and scatter, so the router grows by one output without the old tasks' text, and the
result equals an offline LDA fitted on all tasks at once (Fisher 1936; the incremental form is the
"running covariance" recipe). Removing or replacing a task subtracts its own scatter again (kept with
the task, see ``bank.router_memory``), so the statistics always equal a fit from scratch on the tasks
present.

**Pools.** ``LDARouter.pools`` (default ``("mean",)``, today's router) names the summaries of each read
hidden state (``routing.pools``: ``mean``, ``rms``); the statistics are the same whatever the features
are, so every guarantee above holds for any pools.

**Gates.** ``softmax(scores / temperature)``, keep the top-k, renormalise: ``index (B, k)``,
``weight (B, k)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from adaptbank.routing.pools import check_pools

__all__ = ["RouterStats", "LDARouter", "topk_gates", "shrunk_covariance"]


def topk_gates(scores: Tensor, top_k: int, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """Softmax with temperature, top-k, renormalised: ``(B, E) -> index (B, k), weight (B, k)``."""
    probs = (scores / temperature).softmax(-1)  # (B, E)
    weight, index = probs.topk(min(top_k, probs.shape[-1]), dim=-1)  # (B, k)
    return index, weight / weight.sum(-1, keepdim=True).clamp(min=1e-12)


class RouterStats:
    """Per-task feature means and counts, and the summed within-task scatter, in float64.

    The pooled scatter is ``W = sum_e S_e`` over the tasks whose scatter is known (``pooled``), with
    ``S_e = sum_{x in e} (x - mu_e)(x - mu_e)^T``. :meth:`remove` and :meth:`replace` subtract the task's
    own ``S_e`` (the caller passes it back, e.g. from the task's stored memory), so after any sequence
    of add / replace / remove the statistics equal those built from scratch on the tasks present, up to
    float64 rounding: each update adds at most ``eps64 * |W|`` (eps64 = 1.1e-16), so even after 10^6
    updates, or after removing a task 10^4 times larger than the rest, the error stays far below the
    float32 rounding (6e-8) of the features themselves; a float32 pool would not (one removal of such
    a task would leave ``6e-8 * 10^4`` of it behind). When no pooled task remains, ``W`` is reset to
    exact zeros."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.names: list[str] = []
        self.means: list[Tensor | None] = []  # each (F,); None: not loaded (stored with the task, see fill_means)
        self.counts: list[int] = []
        self.pooled: list[bool] = []
        """Whether the task's scatter is in ``scatter`` (a task added with ``scatter=None`` is not)."""
        self.scatter = torch.zeros(dim, dim, dtype=torch.float64)  # (F, F)
        self.scatter_count = 0
        """Examples that contributed to ``scatter``: the pooled tasks', plus :attr:`stale_count`."""

    @property
    def stale_count(self) -> int:
        """Examples of tasks gone with their scatter left in ``scatter`` (``keep_scatter``, old banks); 0
        means the pool is exactly the present tasks' scatters."""
        return self.scatter_count - sum(c for c, p in zip(self.counts, self.pooled) if p)

    @staticmethod
    def task_stats(features: Tensor) -> tuple[Tensor, Tensor]:
        """Mean (F,) and within-task scatter (F, F) of one task's features (N, F)."""
        x = features.double()
        mean = x.mean(0)  # (F,)
        centred = x - mean  # (N, F)
        return mean, centred.T @ centred  # (F,), (F, F)

    @staticmethod
    def task_factor(features: Tensor) -> tuple[Tensor, Tensor]:
        """Mean (F,) and an upper-trapezoidal factor ``R`` (r, F), ``r = min(N, F)``, of the task's
        scatter: ``R^T R = (X - mu)^T (X - mu)``, the R of a QR decomposition of the centred features
        (N, F). It holds the scatter in ``r F - r (r - 1) / 2`` numbers instead of ``F^2``, and, being
        a rotation of the centred rows, no single example's features."""
        x = features.double()
        mean = x.mean(0)  # (F,)
        return mean, torch.linalg.qr(x - mean, mode="r").R  # (F,), (r, F)

    def add(self, name: str, mean: Tensor, count: int, scatter: Tensor | None) -> None:
        """Append task ``name``; its ``scatter`` (F, F) joins the pool unless None (unknown)."""
        if name in self.names:
            raise KeyError(f"router already has task {name!r}")
        self._check(name, mean, scatter)
        self.names.append(name)
        self.means.append(mean.double())
        self.counts.append(int(count))
        self.pooled.append(scatter is not None)
        if scatter is not None:
            self.scatter += scatter.double()
            self.scatter_count += int(count)

    def remove(self, name: str, scatter: Tensor | None = None, *, keep_scatter: bool = False) -> None:
        """Drop task ``name``; when its scatter is pooled, subtract ``scatter``, which must be exactly the
        one it was added with. ``keep_scatter=True`` leaves it in instead (still a valid covariance
        estimate, but no longer the present tasks'; counted in :attr:`stale_count`)."""
        i = self._index(name)
        self._take_out(i, scatter, keep_scatter)
        del self.names[i], self.means[i], self.counts[i], self.pooled[i]
        self._reset_if_empty()

    def replace(self, name: str, mean: Tensor, count: int, scatter: Tensor | None, *,
                old_scatter: Tensor | None = None, keep_scatter: bool = False) -> None:
        """Task ``name``'s new version in its old place: :meth:`remove` of the old (``old_scatter``,
        ``keep_scatter``), then the new one's ``mean``, ``count`` and ``scatter`` as in :meth:`add`."""
        i = self._index(name)
        self._check(name, mean, scatter)
        self._take_out(i, old_scatter, keep_scatter)
        self.means[i], self.counts[i], self.pooled[i] = mean.double(), int(count), scatter is not None
        self._reset_if_empty()
        if scatter is not None:
            self.scatter += scatter.double()
            self.scatter_count += int(count)

    def reorder(self, names: Sequence[str]) -> None:
        """Put the tasks in the order ``names`` (a permutation of :attr:`names`)."""
        if sorted(names) != sorted(self.names):
            raise ValueError(f"reorder needs a permutation of {self.names}, got {list(names)}")
        at = [self.names.index(n) for n in names]
        self.names = list(names)
        self.means, self.counts, self.pooled = ([xs[i] for i in at] for xs in (self.means, self.counts, self.pooled))

    def _index(self, name: str) -> int:
        if name not in self.names:
            raise KeyError(f"router has no task {name!r}; it has {self.names}")
        return self.names.index(name)

    def _check(self, name: str, mean: Tensor, scatter: Tensor | None) -> None:
        if mean.shape != (self.dim,):
            raise ValueError(f"task {name!r} router features have dimension {tuple(mean.shape)}, expected ({self.dim},)")
        if scatter is not None and scatter.shape != (self.dim, self.dim):
            raise ValueError(f"task {name!r} scatter has shape {tuple(scatter.shape)}, expected ({self.dim}, {self.dim})")

    def _take_out(self, i: int, scatter: Tensor | None, keep_scatter: bool) -> None:
        if not self.pooled[i] or keep_scatter:
            return
        if scatter is None:
            raise ValueError(f"task {self.names[i]!r}'s scatter is in the pooled scatter: pass it to take it out, "
                             "or keep_scatter=True to leave it in")
        self.scatter -= scatter.double()
        self.scatter_count -= self.counts[i]

    def _reset_if_empty(self) -> None:
        """No pooled task and nothing stale: the pool is exactly zero (no rounding residue stays)."""
        if not any(self.pooled) and self.stale_count == 0:
            self.scatter.zero_()

    def fill_means(self, read: Callable[[str], Tensor]) -> None:
        """Load the means not held (None) with ``read(name)`` ((F,) each)."""
        for i, (name, mean) in enumerate(zip(self.names, self.means)):
            if mean is None:
                got = read(name)
                self._check(name, got, None)
                self.means[i] = got.double()

    def held_means(self) -> list[Tensor]:
        """The means, each (F,); an error names a task whose mean is not loaded (see :meth:`fill_means`)."""
        missing = [n for n, m in zip(self.names, self.means) if m is None]
        if missing:
            raise ValueError(f"router stats hold no mean for {missing}; load them with fill_means first")
        return [m for m in self.means if m is not None]

    def to_tensors(self, *, means: bool = True) -> dict[str, Tensor]:
        """The statistics as tensors; ``means=False`` leaves the per-task means out (a bank keeps each
        task's mean in its own memory file, so its stored router stays the same size as tasks come)."""
        out = {"counts": torch.tensor(self.counts, dtype=torch.long), "scatter": self.scatter.clone(),
               "scatter_count": torch.tensor([self.scatter_count]),
               "pooled": torch.tensor(self.pooled, dtype=torch.long)}
        if means:
            held = self.held_means()
            out["means"] = torch.stack(held) if held else torch.zeros(0, self.dim, dtype=torch.float64)
        return out

    @classmethod
    def from_tensors(cls, names: Sequence[str], t: dict[str, Tensor]) -> RouterStats:
        """Inverse of :meth:`to_tensors`; without ``means`` every mean is None until :meth:`fill_means`.
        Statistics stored before ``pooled`` existed count every task as pooled: the bank added each
        task's scatter when it added the task."""
        stats = cls(t["scatter"].shape[0])
        if "counts" in t and t["counts"].shape[0] != len(names):
            raise ValueError(f"router stats hold {t['counts'].shape[0]} counts for {len(names)} experts {list(names)}")
        if "means" in t and t["means"].shape[0] != len(names):
            raise ValueError(f"router stats hold {t['means'].shape[0]} means for {len(names)} experts {list(names)}")
        stats.names = list(names)
        stats.means = list(t["means"].double().unbind(0)) if "means" in t else [None] * len(names)
        stats.counts = [int(c) for c in t["counts"]]
        stats.pooled = [bool(p) for p in t["pooled"]] if "pooled" in t else [True] * len(names)
        stats.scatter = t["scatter"].double().clone()
        stats.scatter_count = int(t["scatter_count"][0])
        return stats


def shrunk_covariance(stats: RouterStats, shrinkage: float) -> Tensor:
    """The pooled within-task covariance ``S = scatter / (N - E)`` (N, E: examples and tasks in the pool)
    shrunk towards a scaled identity, ``(1 - a) S + a tr(S)/F I`` (F x F, float64); the identity while
    the pool is empty or zero (no scatter known, or one example per task)."""
    eye = torch.eye(stats.dim, dtype=torch.float64)  # (F, F)
    dof = stats.scatter_count - sum(stats.pooled)  # examples minus tasks in the pool
    if dof <= 0:  # nothing pooled, or one-example tasks only: the scatter is zero up to rounding, no estimate
        return eye
    cov = stats.scatter / dof  # (F, F)
    scale = torch.trace(cov) / stats.dim
    if not scale > 0:  # every pooled task's examples identical
        return eye
    return (1 - shrinkage) * cov + shrinkage * scale * eye


class LDARouter(nn.Module):
    """Linear task scores ``x W^T + b`` fitted in closed form from :class:`RouterStats`."""

    def __init__(self, names: Sequence[str], weight: Tensor, bias: Tensor, *, layers: int,
                 pools: Sequence[str] = ("mean",)) -> None:
        super().__init__()
        self.names = list(names)
        self.layers = layers
        self.pools = check_pools(pools)
        """Pools of each read hidden state (``routing.pools``), layer-major in the features."""
        self.register_buffer("weight", weight.float())  # (E, F)
        self.register_buffer("bias", bias.float())  # (E,)

    @classmethod
    def fit(cls, stats: RouterStats, *, layers: int, shrinkage: float = 0.1,
            pools: Sequence[str] = ("mean",)) -> LDARouter:
        if not stats.names:
            raise ValueError("cannot fit a router with no tasks")
        means = torch.stack(stats.held_means())  # (E, F)
        weight = torch.linalg.solve(shrunk_covariance(stats, shrinkage), means.T).T  # (E, F)
        bias = -0.5 * (weight * means).sum(1)  # (E,)
        return cls(stats.names, weight, bias, layers=layers, pools=pools)

    def forward(self, features: Tensor) -> Tensor:
        return features.float() @ self.weight.T + self.bias  # (B, E)
