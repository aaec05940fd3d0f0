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
"running covariance" recipe).

**Gates.** ``softmax(scores / temperature)``, keep the top-k, renormalise: ``index (B, k)``,
``weight (B, k)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["RouterStats", "LDARouter", "topk_gates", "shrunk_covariance"]


def topk_gates(scores: Tensor, top_k: int, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """Softmax with temperature, top-k, renormalised: ``(B, E) -> index (B, k), weight (B, k)``."""
    probs = (scores / temperature).softmax(-1)  # (B, E)
    weight, index = probs.topk(min(top_k, probs.shape[-1]), dim=-1)  # (B, k)
    return index, weight / weight.sum(-1, keepdim=True).clamp(min=1e-12)


class RouterStats:
    """Per-task feature means and counts, and the summed within-task scatter, in float64."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.names: list[str] = []
        self.means: list[Tensor] = []  # each (F,)
        self.counts: list[int] = []
        self.scatter = torch.zeros(dim, dim, dtype=torch.float64)  # (F, F)
        self.scatter_count = 0
        """Examples that contributed to ``scatter`` (a removed task's scatter stays in)."""

    @staticmethod
    def task_stats(features: Tensor) -> tuple[Tensor, Tensor]:
        """Mean (F,) and within-task scatter (F, F) of one task's features (N, F)."""
        x = features.double()
        mean = x.mean(0)  # (F,)
        centred = x - mean  # (N, F)
        return mean, centred.T @ centred  # (F,), (F, F)

    def add(self, name: str, mean: Tensor, count: int, scatter: Tensor | None) -> None:
        if name in self.names:
            raise KeyError(f"router already has task {name!r}")
        if mean.shape != (self.dim,):
            raise ValueError(f"task {name!r} router features have dimension {tuple(mean.shape)}, expected ({self.dim},)")
        self.names.append(name)
        self.means.append(mean.double())
        self.counts.append(int(count))
        if scatter is not None:
            self.scatter += scatter.double()
            self.scatter_count += int(count)

    def remove(self, name: str) -> None:
        """Drop a task's mean; its share of the pooled scatter stays, still a valid estimate."""
        i = self.names.index(name)
        del self.names[i], self.means[i], self.counts[i]

    def to_tensors(self) -> dict[str, Tensor]:
        return {"means": torch.stack(self.means) if self.means else torch.zeros(0, self.dim, dtype=torch.float64),
                "counts": torch.tensor(self.counts, dtype=torch.long), "scatter": self.scatter.clone(),
                "scatter_count": torch.tensor([self.scatter_count])}

    @classmethod
    def from_tensors(cls, names: Sequence[str], t: dict[str, Tensor]) -> RouterStats:
        stats = cls(t["scatter"].shape[0])
        if t["means"].shape[0] != len(names):
            raise ValueError(f"router stats hold {t['means'].shape[0]} means for {len(names)} experts {list(names)}")
        stats.names = list(names)
        stats.means = list(t["means"].double().unbind(0))
        stats.counts = [int(c) for c in t["counts"]]
        stats.scatter = t["scatter"].double().clone()
        stats.scatter_count = int(t["scatter_count"][0])
        return stats


def shrunk_covariance(stats: RouterStats, shrinkage: float) -> Tensor:
    """The pooled within-task covariance ``S = scatter / (N - E)`` shrunk towards a scaled identity,
    ``(1 - a) S + a tr(S)/F I`` (F x F, float64); the scaled identity alone while no scatter is known."""
    eye = torch.eye(stats.dim, dtype=torch.float64)  # (F, F)
    if not stats.scatter_count:
        return eye
    cov = stats.scatter / max(1, stats.scatter_count - len(stats.names))  # (F, F)
    scale = torch.trace(cov) / stats.dim
    return (1 - shrinkage) * cov + shrinkage * scale * eye


class LDARouter(nn.Module):
    """Linear task scores ``x W^T + b`` fitted in closed form from :class:`RouterStats`."""

    def __init__(self, names: Sequence[str], weight: Tensor, bias: Tensor, *, layers: int) -> None:
        super().__init__()
        self.names = list(names)
        self.layers = layers
        self.register_buffer("weight", weight.float())  # (E, F)
        self.register_buffer("bias", bias.float())  # (E,)

    @classmethod
    def fit(cls, stats: RouterStats, *, layers: int, shrinkage: float = 0.1) -> LDARouter:
        if not stats.names:
            raise ValueError("cannot fit a router with no tasks")
        means = torch.stack(stats.means)  # (E, F)
        weight = torch.linalg.solve(shrunk_covariance(stats, shrinkage), means.T).T  # (E, F)
        bias = -0.5 * (weight * means).sum(1)  # (E,)
        return cls(stats.names, weight, bias, layers=layers)

    def forward(self, features: Tensor) -> Tensor:
        return features.float() @ self.weight.T + self.bias  # (B, E)
