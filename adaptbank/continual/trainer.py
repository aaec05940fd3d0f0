"""The training loop shared by the single-learner strategies: mixed-task batches with one head per row.

Letters in shape comments: B batch, D hidden size, C classes of a task, N examples.

``fit_rows`` is ``training.train_task`` generalised in two ways that the continual baselines need,
and otherwise the same minGPT-style loop (AdamW, linear warm-up then decay, gradient clipping, a
``TrainingError`` naming the step on a non-finite loss or gradient):

* the caller says how features are computed (``features(batch) -> (B, D)``: which experts are on,
  or none), so the same loop trains a shared LoRA learner, several O-LoRA experts or the backbone;
* every row carries its task, and its logits come from that task's head. The loss is the mean
  cross-entropy over all rows, summed per task group (replay and joint batches mix tasks)::

      loss = 1/B * sum_t sum_{rows r of task t} CE(head_t(f_r), y_r)  +  sum(extra terms)

``extra`` adds explicit penalty terms (EWC, O-LoRA orthogonality), ``more_rows(step)`` adds rows to
each batch (experience replay). Batches and dropout are seeded, so a run is reproducible.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from adaptbank.core.config import TrainConfig
from adaptbank.core.model import AdaptBankModel, ClassificationHead
from adaptbank.training.loop import (
    _collate,
    _device,
    _pad_id,
    batches,
    fit_probe,
    make_optimizer,
    optimizer_step,
)

__all__ = ["Row", "FitResult", "fit_rows", "encode", "probe_head", "head_accuracy"]

Features = Callable[[dict[str, Tensor]], Tensor]


@dataclass(frozen=True)
class Row:
    """One training example: token ids, class index and the task whose head scores it."""

    ids: list[int]
    label: int
    task: str


@dataclass
class FitResult:
    steps: int = 0
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)


def fit_rows(model: AdaptBankModel, rows: Sequence[Row], cfg: TrainConfig, groups: list[dict], features: Features, *,
             seed: int, what: str, extra: Callable[[], Tensor] | None = None,
             more_rows: Callable[[int], list[Row]] | None = None,
             on_step: Callable[[int, float], None] | None = None) -> FitResult:
    """Train the parameters in ``groups`` (AdamW param groups, each with ``name`` and ``lr``) on ``rows``.

    The caller has set ``requires_grad`` on exactly those parameters. ``what`` names the task in errors.
    """
    if not rows:
        raise ValueError(f"{what}: no training examples")
    groups = [g for g in groups if g["params"]]
    params = [p for g in groups for p in g["params"]]
    opt, sched, total = make_optimizer(groups, cfg, len(rows))
    ids = [r.ids for r in rows]
    result = FitResult()
    start = time.perf_counter()
    torch.manual_seed(seed)
    model.train()
    for epoch in range(math.ceil(cfg.epochs)):
        for chunk in batches(ids, cfg.batch_size, shuffle=True, seed=seed * 1000 + epoch):
            if result.steps >= total:
                break
            batch_rows = [rows[i] for i in chunk] + (more_rows(result.steps) if more_rows else [])
            loss = _loss(model, batch_rows, features)
            if extra is not None:
                loss = loss + extra()
            step = result.steps + 1
            optimizer_step(loss, opt, sched, params, cfg, what=what, step=step)
            result.steps = step
            result.losses.append(loss.item())
            if on_step is not None:
                on_step(step, result.losses[-1])
    model.eval()
    model.requires_grad_(False)
    result.seconds = time.perf_counter() - start
    return result


def _loss(model: AdaptBankModel, rows: Sequence[Row], features: Features) -> Tensor:
    batch = _collate([r.ids for r in rows], _pad_id(model), _device(model))
    pooled = features(batch)  # (B, D)
    y = torch.tensor([r.label for r in rows], device=pooled.device)  # (B,)
    total = pooled.new_zeros((), dtype=torch.float32)
    for task in dict.fromkeys(r.task for r in rows):  # task groups, in first-seen order
        idx = torch.tensor([i for i, r in enumerate(rows) if r.task == task], device=pooled.device)  # (b,)
        logits = model.heads[task](pooled[idx])  # (b, C)
        total = total + F.cross_entropy(logits.float(), y[idx], reduction="sum")
    return total / len(rows)


@torch.no_grad()
def encode(model: AdaptBankModel, ids: Sequence[list[int]], features: Features, *, batch_size: int = 64) -> Tensor:
    """Pooled features (N, D) of ``ids`` in eval mode, under the routing ``features`` sets."""
    was_training = model.training
    model.eval()
    out = torch.empty(len(ids), model.hidden_size)  # (N, D)
    for chunk in batches(ids, batch_size, shuffle=False):
        batch = _collate([ids[i] for i in chunk], _pad_id(model), _device(model))
        out[chunk] = features(batch).float().cpu()  # (B, D)
    model.train(was_training)
    return out


def probe_head(head: ClassificationHead, feats: Tensor, labels: Sequence[int], *, seed: int) -> None:
    """Initialise ``head`` as a logistic-regression probe on ``feats`` (N, D) (LP-FT, see ``training``)."""
    W, b = fit_probe(feats, labels, head.linear.out_features, seed=seed)  # (C, D), (C,)
    with torch.no_grad():
        head.linear.weight.copy_(W)
        head.linear.bias.copy_(b)


@torch.no_grad()
def head_accuracy(head: ClassificationHead, feats: Tensor, labels: Sequence[int]) -> float:
    """Accuracy of ``head`` (in eval mode) on pooled features ``feats`` (N, D)."""
    was_training = head.training
    head.eval()
    device = head.linear.weight.device
    pred = head(feats.to(device, head.linear.weight.dtype)).argmax(1).cpu()  # (N,)
    head.train(was_training)
    return int((pred == torch.tensor(list(labels))).sum()) / len(labels)
