"""What the continual baselines add to the one training loop: loss terms and a data wrapper.

Letters in shape comments: r LoRA rank, I layer input features.

* :class:`EWCPenalty` (Kirkpatrick et al. 2017, https://arxiv.org/abs/1612.00796), a loss term::

      lambda/2 * sum_{t finished} sum_i F_t,i (theta_i - theta*_t,i)^2

  with ``F_t`` the diagonal empirical Fisher of :func:`fisher_diagonal` (the mean squared per-example
  gradient of log p(y|x) at the true labels, as avalanche computes it).
* :class:`OrthogonalityPenalty` (O-LoRA, Wang et al. 2023, https://arxiv.org/abs/2310.14152), a loss term::

      lambda_1 * sum_layers sum_old ||A_new A_old^T||_F^2 + lambda_2 * ||theta_new||^2

* :func:`with_replay` (experience replay, Chaudhry et al. 2019, https://arxiv.org/abs/1902.10486), a
  data wrapper: every batch of the plan gets ``n`` rows drawn from a buffer of finished tasks' rows;
  :func:`class_balanced` picks the buffer.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adaptbank.core.model import AdaptBankModel
from adaptbank.data.tokens import collate, pad_id
from adaptbank.training.features import device_of
from adaptbank.training.loop import Row, Step

__all__ = ["head_log_likelihood", "EWCPenalty", "fisher_diagonal", "OrthogonalityPenalty", "with_replay",
           "class_balanced"]


class EWCPenalty:
    """``lam / 2 * sum_t sum_i F_t,i (theta_i - theta*_t,i)^2`` over the finished tasks, in a fixed order."""

    def __init__(self, params: Sequence[nn.Parameter], fisher: Sequence[Sequence[Tensor]],
                 star: Sequence[Sequence[Tensor]], lam: float) -> None:
        self.params, self.fisher, self.star, self.lam = list(params), fisher, star, lam

    def __call__(self, step: Step | None = None) -> Tensor:
        terms = ((f * (p - s) ** 2).sum() for fs, ss in zip(self.fisher, self.star)
                 for p, f, s in zip(self.params, fs, ss, strict=True))
        total = sum(terms, torch.zeros((), device=self.params[0].device))
        return self.lam / 2 * total


def head_log_likelihood(model: AdaptBankModel, row: Row, pooled: Tensor) -> Tensor:
    """``log p(y|x)`` of one classification row under its task's head, from pooled features (1, D)."""
    return F.log_softmax(model.heads[row.task](pooled).float(), -1)[0, row.label]


def fisher_diagonal(model: AdaptBankModel, rows: Sequence[Row], params: Sequence[nn.Parameter],
                    features: Callable[[dict[str, Tensor]], Tensor],
                    log_likelihood: Callable[[AdaptBankModel, Row, Tensor], Tensor] = head_log_likelihood
                    ) -> list[Tensor]:
    """Mean over ``rows`` of the squared gradient of ``log p(y|x)`` w.r.t. ``params`` (eval mode, one
    row at a time); ``log_likelihood(model, row, features(batch))`` is that log-probability (by default
    the row's task head's, :func:`head_log_likelihood`; generation rows: their target tokens')."""
    fisher = [torch.zeros_like(p) for p in params]
    model.eval()
    for p in params:
        p.requires_grad_(True)
    for row in rows:
        batch = collate([row.ids], pad_id(model.tokenizer), device_of(model))
        logp = log_likelihood(model, row, features(batch))
        grads = torch.autograd.grad(logp, list(params), allow_unused=True)
        for f, g in zip(fisher, grads, strict=True):
            if g is not None:
                f += g.detach() ** 2
    model.requires_grad_(False)
    return [f / len(rows) for f in fisher]


class OrthogonalityPenalty:
    """O-LoRA's term: ``lam1 * sum ||A_new A_old^T||_F^2 + lam2 * sum ||theta_new||^2``."""

    def __init__(self, pairs: Sequence[tuple[Tensor, Tensor]], new: Sequence[nn.Parameter], lam1: float,
                 lam2: float) -> None:
        self.pairs, self.new, self.lam1, self.lam2 = list(pairs), list(new), lam1, lam2

    def overlap(self) -> Tensor:
        """``sum ||A_new A_old^T||_F^2`` over the (A_new (r, I), A_old (r, I)) pairs."""
        zero = torch.zeros((), device=self.new[0].device)
        return sum((((a @ b.T) ** 2).sum() for a, b in self.pairs), zero)  # ||(r, r)||_F^2 per pair

    def __call__(self, step: Step | None = None) -> Tensor:
        zero = torch.zeros((), device=self.new[0].device)
        l2 = sum((p.pow(2).sum() for p in self.new), zero)
        return self.lam1 * self.overlap() + self.lam2 * l2


def with_replay(plan: Iterable[list[Row]], pool: Sequence[Row], n: int, seed: int) -> Iterator[list[Row]]:
    """Every batch of ``plan`` plus ``n`` rows drawn without replacement from ``pool`` (seeded)."""
    rng, pool = random.Random(seed), list(pool)
    for rows in plan:
        yield rows + rng.sample(pool, n)


def class_balanced(rows: Sequence[Row], n: int, seed: int) -> list[int]:
    """Indices of up to ``n`` rows, classes taking turns, each class in a seeded random order."""
    by_class: dict[int, list[int]] = {}
    for k, row in enumerate(rows):
        by_class.setdefault(row.label, []).append(k)
    rng = random.Random(seed)
    queues = [rng.sample(v, len(v)) for _, v in sorted(by_class.items())]
    picked: list[int] = []
    while len(picked) < n and any(queues):
        for q in queues:
            if q and len(picked) < n:
                picked.append(q.pop())
    return sorted(picked)
