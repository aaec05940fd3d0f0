"""The one training loop: used by ``add-task``, the token router and every continual strategy.

Letters in shape comments: B batch, T tokens, D hidden size, C classes, N examples.

minGPT's trainer shape, with every loss term visible in one line::

    for rows in plan:                                   # batches of Row(ids, label, task)
        pooled = features(collate(rows))                # (B, D) under the gates the caller sets
        loss = task_loss(rows, pooled) + sum(term(Step(...)) for term in loss_terms)
        backward, clip, AdamW step, linear warm-up then decay

* ``features`` says which experts are on (one task's, a shared learner's, all of them, or none), so one
  loop trains a bank task, a shared LoRA learner, several O-LoRA experts, the backbone or token gates;
* every row carries its task, and its logits come from that task's head; the task loss is the mean
  cross-entropy over the rows, summed per task group (replay and joint batches mix tasks);
* ``loss_terms`` are explicit extra terms (EWC, O-LoRA's orthogonality, the token router's affinity and
  load balance), ``plan`` is any iterable of row batches (:func:`epoch_batches`; replay wraps it);
* each plan batch is one optimiser step, run as ``cfg.grad_accum`` micro-batches and, with a ``dist``
  (``training.distributed``: torchrun/accelerate), one shard of each per rank under DDP, weighted so that
  the update is the one of the whole batch in one process;
* ``after_backward(step, loss)`` is the one read-only look at the raw gradients between backward and
  the update (gradient diagnostics, ``training.diagnostics``);
* ``loss`` is the task loss itself: :func:`task_loss` over pooled features for classification, or
  ``training.generation.generation_loss`` over hidden states (B, T, D) through the shared LM head, for
  rows of generation tasks (``Row.target_from``), whose ``features`` return the hidden states (on an
  encoder-decoder: the encoder's, over which the loss runs the decoder on ``Row.target``).

Dropout draws from ``seed`` through :func:`~adaptbank.core.seeding.seeded`, so a run is reproducible
and the caller's global RNG is left as it was. A NaN or Inf loss or gradient stops training with a
:class:`TrainingError` naming the step and the parameter group, before anything is updated.

``train_task`` is the bank's use of it: the head starts as a logistic-regression probe on the frozen
features (LP-FT, Kumar et al. 2022, https://arxiv.org/abs/2202.10054), then the task's expert and head
train together. A new linear expert starts at zero, so training starts exactly at the probe's accuracy
(a soft prompt or prefix cannot start without effect). After :func:`fit`, ``model.finalize`` brings the
expert into its stored form (a prefix's reparameterisation MLP is collapsed into plain prefixes).
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adaptbank.core.config import TrainConfig
from adaptbank.core.frozen_start import CachedStates, cached_features, pad_states, skipping
from adaptbank.core.model import AdaptBankModel
from adaptbank.core.seeding import seeded
from adaptbank.data.tokens import batches, collate, pad_id, tokenize
from adaptbank.training import distributed
from adaptbank.training.diagnostics import (
    GradientLog,
    diagnose_report,
    diagnosis,
    parameter_groups,
    rank_suggestions,
)
from adaptbank.training.distributed import LOCAL, Dist
from adaptbank.training.features import device_of, encode, fit_probe, task_features

__all__ = ["Row", "Step", "LossTerm", "TaskLoss", "Features", "AfterBackward", "TrainResult", "TrainingError", "epoch_batches",
           "total_steps", "task_loss", "make_optimizer", "apply_step", "fit", "train_task"]

Features = Callable[[dict[str, Tensor]], Tensor]
"""``features(batch) -> (B, D)``: pooled features of a collated batch under the gates it sets."""


class TrainingError(RuntimeError):
    """Training stopped on a fault (non-finite loss or gradient); nothing was saved."""


@dataclass(frozen=True)
class Row:
    """One training example: token ids, class index and the task whose head scores it."""

    ids: list[int]
    label: int
    task: str
    target_from: int | None = None
    """Decoder-only generation rows: the index in ``ids`` of the first target token (the prompt before it
    gets no loss); None for classification rows."""
    target: tuple[int, ...] | None = None
    """Encoder-decoder generation rows: the target ids and EOS, the decoder's side (``ids`` is the prompt,
    the encoder's side; ``core.seq2seq``); None otherwise."""
    start: Tensor | None = field(default=None, compare=False, repr=False)
    """Cached training (``core.frozen_start``): the frozen hidden states (T, D) of ``ids`` entering the first
    layer that trains; collated into the batch as ``start_hidden`` (B, T, D). None otherwise."""


@dataclass(frozen=True)
class Step:
    """What a loss term sees of one batch."""

    model: AdaptBankModel
    rows: Sequence[Row]
    batch: dict[str, Tensor]
    pooled: Tensor
    """(B, D) the features the task loss was computed on ((B, T, D) hidden states for generation rows)."""
    step: int
    """1-based optimiser step."""


LossTerm = Callable[[Step], Tensor]
"""An extra loss term, added to the task loss of every batch."""

TaskLoss = Callable[[AdaptBankModel, Sequence[Row], Tensor], Tensor]
"""``loss(model, rows, features) -> ()``: the task loss of a batch (:func:`task_loss` by default)."""

AfterBackward = Callable[[int, Tensor], None]
"""``after_backward(step, loss)``: called by :func:`fit` on every step after ``loss.backward()`` and
before the finiteness checks, clipping and the optimiser step, so it sees the raw ``.grad`` of the
parameters and their values before this step's update (``training.diagnostics.GradientLog``). It
reads only; it must not change gradients or parameters."""


@dataclass
class TrainResult:
    steps: int = 0
    seconds: float = 0.0
    examples_per_second: float = 0.0
    losses: list[float] = field(default_factory=list)
    probe_accuracy: float | None = None
    """Training-split accuracy of the probe-initialised head, before fine-tuning (``train_task``)."""
    probe_seconds: float = 0.0
    """Seconds ``train_task`` spent on the probe head (features it computed, the logistic regression)."""
    diagnostics: dict[str, Any] | None = None
    """``train_task(diagnose=n)``: gradient norms, warnings, rank suggestion (``diagnostics.diagnosis``)."""


def epoch_batches(rows: Sequence[Row], cfg: TrainConfig, seed: int) -> Iterator[list[Row]]:
    """``ceil(cfg.epochs)`` shuffled passes over ``rows`` in length-grouped batches of ``cfg.step_batch``
    (``batch_size * grad_accum``) rows, one per optimiser step (``data.tokens.batches``);
    epoch e shuffles with ``seed * 1000 + e``. :func:`fit` stops after :func:`total_steps`."""
    ids = [r.ids for r in rows]
    for epoch in range(math.ceil(cfg.epochs)):
        for chunk in batches(ids, cfg.step_batch, shuffle=True, seed=seed * 1000 + epoch):
            yield [rows[i] for i in chunk]


def total_steps(n_rows: int, cfg: TrainConfig) -> int:
    """Optimiser steps of ``cfg.epochs`` passes over ``n_rows`` (fractions of a pass allowed)."""
    return max(1, round(cfg.epochs * math.ceil(n_rows / cfg.step_batch)))


def task_loss(model: AdaptBankModel, rows: Sequence[Row], pooled: Tensor) -> Tensor:
    """``1/B * sum_t sum_{rows r of task t} CE(head_t(f_r), y_r)`` (equal, bit for bit, to the mean
    cross-entropy when all rows share one task)."""
    y = torch.tensor([r.label for r in rows], device=pooled.device)  # (B,)
    total = pooled.new_zeros((), dtype=torch.float32)
    for task in dict.fromkeys(r.task for r in rows):  # task groups, in first-seen order
        idx = torch.tensor([i for i, r in enumerate(rows) if r.task == task], device=pooled.device)  # (b,)
        logits = model.heads[task](pooled[idx])  # (b, C)
        total = total + F.cross_entropy(logits.float(), y[idx], reduction="sum")
    return total / len(rows)


def make_optimizer(groups: list[dict[str, Any]], cfg: TrainConfig, steps: int
                   ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over ``groups`` (each with ``name``, ``lr``, ``params``) and the linear warm-up/decay
    schedule over ``steps``. The warm-up starts at ``lr / warm`` rather than 0 (transformers'
    ``get_linear_schedule_with_warmup`` spends its first step at lr 0), which is kept so that results
    reproduce across versions."""
    opt = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=cfg.weight_decay)
    warm = int(cfg.warmup * steps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / max(1, warm) if s < warm else max(0.0, (steps - s) / max(1, steps - warm)))
    return opt, sched


def apply_step(loss: Tensor, opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LambdaLR,
               params: list[nn.Parameter], cfg: TrainConfig, *, what: str, step: int,
               after_backward: AfterBackward | None = None) -> None:
    """After the backward pass of a step whose loss was ``loss``: ``after_backward`` (see
    :data:`AfterBackward`), then a :class:`TrainingError` naming ``what``, the step and the parameter
    group on a non-finite loss or gradient (before anything is updated), then clip and step."""
    if after_backward is not None:  # before the loss check, so that it sees a faulty step too
        after_backward(step, loss.detach())
    if not torch.isfinite(loss):
        raise TrainingError(f"{what}: loss became {loss.item()} at step {step}; {_bad_group(opt)}; "
                            "nothing was saved (try a lower --lr)")
    # one pass over the gradients: their total norm is both the finiteness check and the clip's norm
    # (clip_grad_norm_ is get_total_norm + clip_grads_with_norm_); the group is looked up only on a fault
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    if not torch.isfinite(norm):
        for g in opt.param_groups:
            if any(p.grad is not None and not torch.isfinite(p.grad).all() for p in g["params"]):
                raise TrainingError(f"{what}: non-finite gradient in parameter group {g['name']!r} at step {step}; "
                                    "nothing was saved (try a lower --lr)")
        raise TrainingError(f"{what}: the gradients' total norm overflowed to {norm.item()} at step {step}; "
                            "nothing was saved (try a lower --lr)")
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grads_with_norm_(params, cfg.grad_clip, norm)
    opt.step()
    sched.step()


def _bad_group(opt: torch.optim.Optimizer) -> str:
    for g in opt.param_groups:
        if any(not torch.isfinite(p).all() for p in g["params"]):
            return f"parameter group {g['name']!r} holds non-finite values"
    return "all parameters were still finite"


def fit(model: AdaptBankModel, plan: Iterable[list[Row]], *, steps: int, groups: list[dict[str, Any]],
        cfg: TrainConfig, features: Features, seed: int, what: str, loss_terms: Sequence[LossTerm] = (),
        on_step: Callable[[int, float], None] | None = None, dropout: bool = True,
        after_backward: AfterBackward | None = None, loss: TaskLoss = task_loss, dist: Dist = LOCAL) -> TrainResult:
    """Train the parameters in ``groups`` (AdamW param groups with ``name``, ``lr``, ``params``) for at
    most ``steps`` batches of ``plan``, each batch one optimiser step. Only those parameters are left
    trainable; afterwards the model is frozen and in eval mode. ``dropout=False`` trains in eval mode (the
    token router's gates should see the experts as they run at inference). ``what`` names the task in
    errors. ``on_step(step, loss)`` follows each optimiser step; ``after_backward(step, loss)``
    (:data:`AfterBackward`) precedes it, after the backward pass (gradient diagnostics, ``add-task
    --diagnose``). ``loss`` is the task loss of a batch given ``features(batch)`` (see :data:`TaskLoss`).

    A step's batch runs as ``cfg.grad_accum`` micro-batches and, with ``dist`` (``training.distributed``),
    each micro-batch is sharded over the ranks: every rank walks the same ``plan``, scores its shard with
    the weight that makes the accumulated, rank-averaged gradient the one of the whole batch, and reports
    the whole batch's loss. A failure on any rank stops every rank at the same step."""
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError(f"{what}: nothing to train (every parameter group is empty)")
    distributed.check_batch(cfg.batch_size, dist)
    params = [p for g in groups for p in g["params"]]
    model.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt, sched = make_optimizer(groups, cfg, steps)
    result = TrainResult()
    start, seen = time.perf_counter(), 0
    # synced: one process, a plain call; else DDP over ``params`` only, dropped when the loop ends
    with distributed.synced(params, dist) as synced, seeded(distributed.rank_seed(seed, dist)):
        model.train(dropout)
        for rows in plan:
            if result.steps >= steps:
                break
            if not rows:
                raise ValueError(f"{what}: an empty batch in the training plan")
            step, where = result.steps + 1, f"{what}, step {result.steps + 1}"
            opt.zero_grad(set_to_none=True)
            parts = distributed.step_parts(rows, cfg.grad_accum, dist)
            values = []  # weight * loss per micro-batch of this rank
            for k, (part, weight) in enumerate(parts):
                with synced.no_sync(last=k == len(parts) - 1):  # the last backward averages over the ranks
                    with distributed.together(dist, where):
                        total = synced(functools.partial(_batch_loss, model, part, features, loss, loss_terms,
                                                         step, weight))
                    total.backward()
                values.append(total.detach())
            value = values[0] if len(values) == 1 else torch.stack(values).sum()
            value = distributed.all_sum(value, dist) / dist.world if dist.world > 1 else value
            with distributed.together(dist, where):
                apply_step(value, opt, sched, params, cfg, what=what, step=step, after_backward=after_backward)
                result.steps += 1
                seen += len(rows)
                result.losses.append(value.item())
                if on_step is not None:
                    on_step(result.steps, result.losses[-1])
    model.eval()
    model.requires_grad_(False)
    result.seconds = time.perf_counter() - start
    result.examples_per_second = seen / max(result.seconds, 1e-9)
    return result


def _check_cached(cached: CachedStates, ids: Sequence[list[int]], dist: Dist) -> None:
    """Cached states must be one per example, as long as its ids, in one process."""
    if dist.world > 1:
        raise ValueError(f"training on cached frozen layers runs in one process; this launch has {dist.world}")
    if len(cached.states) != len(ids):
        raise ValueError(f"{len(cached.states)} cached states for {len(ids)} training examples")
    bad = next((i for i, (s, x) in enumerate(zip(cached.states, ids)) if s.shape[0] != len(x)), None)
    if bad is not None:
        raise ValueError(f"cached states of example {bad} cover {cached.states[bad].shape[0]} tokens, "
                         f"its ids {len(ids[bad])}")


def _batch_loss(model: AdaptBankModel, rows: Sequence[Row], features: Features, loss: TaskLoss,
                loss_terms: Sequence[LossTerm], step: int, weight: float) -> Tensor:
    """``weight`` times the task loss of ``rows`` plus every extra term."""
    batch = collate([r.ids for r in rows], pad_id(model.tokenizer), device_of(model))
    if rows[0].start is not None:  # cached training: the frozen layers' states, padded like the ids
        batch["start_hidden"] = pad_states([r.start for r in rows], batch["input_ids"].shape[1]).to(device_of(model))
    pooled = features(batch)  # (B, D), or (B, T, D) for generation rows
    total = loss(model, rows, pooled)
    if loss_terms:
        info = Step(model, rows, batch, pooled, step)
        for term in loss_terms:
            total = total + term(info)
    return total * weight


def train_task(model: AdaptBankModel, name: str, texts: Sequence[str], labels: Sequence[int], cfg: TrainConfig,
               *, on_step: Callable[[int, float], None] | None = None, features: Tensor | None = None,
               loss_terms: Sequence[LossTerm] = (), diagnose: int = 0, dist: Dist | None = None,
               cached: CachedStates | None = None) -> TrainResult:
    """Train task ``name``'s expert and head on ``texts``/``labels`` (class indices).

    ``dist`` (None: ``training.distributed.current()``, which joins a torchrun/accelerate launch) makes it
    data-parallel: the probe's features are computed sharded and gathered, so every rank fits the same
    probe, and :func:`fit` shards every batch. Every rank must pass the same arguments.

    ``features`` (N, D) are the frozen pooled features of ``texts`` when the caller has them already
    (they seed the probe head); otherwise they are computed here when ``cfg.probe_init`` is set.
    ``cached`` (one process only) holds the frozen states of ``texts`` entering the first layer with an
    expert (``training.features.frozen_pass_states``): training then runs only the layers from there on
    (``core.frozen_start``), with the same results up to float rounding when dropout is off.
    ``diagnose`` > 0 records the gradient norms of the first ``diagnose`` steps through ``fit``'s
    ``after_backward`` and, after training, a LoRA rank suggestion, in ``result.diagnostics``
    (``training.diagnostics``); a :class:`TrainingError` then carries the diagnostics report.
    """
    dist = distributed.current() if dist is None else dist
    n_classes = len(model.tasks[name].labels)
    with distributed.together(dist, f"task {name!r}: preparing"):
        bad = [y for y in labels if not 0 <= y < n_classes]
        if bad:
            raise ValueError(f"labels of task {name!r} must be in [0, {n_classes}), got {bad[0]!r}")
        if not texts:
            raise ValueError(f"task {name!r} has no training examples")
        model.check_length(name, cfg.max_length)
        ids = tokenize(model.tokenizer, texts, cfg.max_length)
    start = time.perf_counter()
    probe_accuracy = None
    if cfg.probe_init:
        feats = (features if features is not None else  # (N, D) of the base model
                 distributed.sharded(dist, ids, lambda part: encode(model, part), where=f"task {name!r}: probe"))
        with distributed.together(dist, f"task {name!r}: probe"):  # the same fit on every rank (same features)
            W, b = fit_probe(feats, labels, n_classes, seed=cfg.seed, c=cfg.probe_c, scale=cfg.probe_scale)  # (C, D), (C,)
            with torch.no_grad():
                model.heads[name].linear.weight.copy_(W)
                model.heads[name].linear.bias.copy_(b)
            pred = (feats @ W.T + b).argmax(1)  # (N,)
            probe_accuracy = int((pred == torch.tensor(list(labels))).sum()) / len(labels)
    probe_seconds = time.perf_counter() - start
    groups = [{"params": model.expert_parameters(name), "lr": cfg.lr, "name": "expert"},
              {"params": list(model.heads[name].parameters()), "lr": cfg.head_lr, "name": "head"}]
    if cached is not None:
        _check_cached(cached, ids, dist)
    rows = [Row(x, y, name, start=s) for x, y, s in zip(ids, labels, cached.states if cached else [None] * len(ids))]
    grads = GradientLog(parameter_groups(model, name), steps=diagnose) if diagnose else None
    try:
        with skipping(model, cached.layer) if cached is not None else contextlib.nullcontext() as feed:
            result = fit(model, epoch_batches(rows, cfg, cfg.seed), steps=total_steps(len(rows), cfg), groups=groups,
                         cfg=cfg, features=(task_features(model, name) if feed is None else cached_features(model, name, feed)),
                         seed=cfg.seed, what=f"task {name!r}", loss_terms=loss_terms, on_step=on_step,
                         after_backward=grads, dropout=cfg.train_dropout, dist=dist)
    except TrainingError as err:
        if grads is None:
            raise
        raise TrainingError(f"{err}\n{diagnose_report(diagnosis(grads))}") from err
    model.finalize(name)  # training-time reparameterisations (a prefix's MLP) become the stored form
    if grads is not None:
        result.diagnostics = diagnosis(grads, rank_suggestions(model, name))
    result.probe_accuracy, result.probe_seconds = probe_accuracy, probe_seconds
    result.seconds = time.perf_counter() - start
    return result
