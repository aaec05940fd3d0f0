"""Plain training and evaluation loops for one task's expert and head.

Letters in shape comments: B batch, T tokens, D hidden size, C classes, N examples.

``train_task`` is a minGPT-style loop: forward, cross-entropy, backward, clip, AdamW step, linear
warm-up then decay. Only the task's expert and head are trainable (``AdaptBankModel.train_only``).
Before training, the head can be initialised as a logistic-regression probe on the frozen features
(LP-FT, Kumar et al. 2022, https://arxiv.org/abs/2202.10054): since a new expert starts at zero, the
model then starts exactly at the linear probe's accuracy, and fine-tuning the expert moves on from
there instead of first repairing a random head. A NaN or Inf loss stops training with an error that
names the step and the parameter group whose gradient went bad.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adaptbank.core.config import TrainConfig
from adaptbank.core.model import AdaptBankModel
from adaptbank.routing.lda import pool

__all__ = ["TrainingError", "TrainResult", "tokenize", "batches", "pooled_features", "frozen_pass", "fit_probe",
           "make_optimizer", "optimizer_step",
           "train_task", "predict_task", "evaluate"]


class TrainingError(RuntimeError):
    """Training stopped on a fault (non-finite loss or gradient); nothing was saved."""


@dataclass
class TrainResult:
    steps: int
    seconds: float
    examples_per_second: float
    losses: list[float] = field(default_factory=list)
    probe_accuracy: float | None = None
    """Training-split accuracy of the probe-initialised head, before fine-tuning."""


def tokenize(tokenizer: object, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids per text, truncated to ``max_length``, unpadded (padding happens per batch)."""
    enc = tokenizer(list(texts), truncation=True, max_length=max_length)  # type: ignore[operator]
    return enc["input_ids"]


def _collate(ids: Sequence[list[int]], pad_id: int, device: torch.device) -> dict[str, Tensor]:
    width = max(1, max(len(x) for x in ids))
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(ids), width), dtype=torch.long)  # (B, T)
    for i, x in enumerate(ids):
        input_ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        mask[i, : len(x)] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": mask.to(device)}


def batches(ids: Sequence[list[int]], batch_size: int, *, shuffle: bool, seed: int = 0) -> list[list[int]]:
    """Index batches. Shuffled batches are grouped by length within windows of 50 batches, which
    cuts padding without ordering the whole epoch; unshuffled ones are sorted by length."""
    order = list(range(len(ids)))
    if shuffle:
        random.Random(seed).shuffle(order)
        window = batch_size * 50
        order = [i for s in range(0, len(order), window)
                 for i in sorted(order[s: s + window], key=lambda j: len(ids[j]))]
        chunks = [order[s: s + batch_size] for s in range(0, len(order), batch_size)]
        random.Random(seed + 1).shuffle(chunks)
        return chunks
    order.sort(key=lambda j: len(ids[j]))
    return [order[s: s + batch_size] for s in range(0, len(order), batch_size)]


def _device(model: AdaptBankModel) -> torch.device:
    return next(model.backbone.parameters()).device


def _pad_id(model: AdaptBankModel) -> int:
    pad = getattr(model.tokenizer, "pad_token_id", None)
    return int(pad) if pad is not None else 0


@torch.no_grad()
def pooled_features(model: AdaptBankModel, ids: Sequence[list[int]], *, task: str | None = None,
                    batch_size: int = 64) -> Tensor:
    """Pooled features (N, D) with task ``task``'s expert, or of the base model when None."""
    was_training = model.training
    model.eval()
    out = torch.empty(len(ids), model.hidden_size)
    for chunk in batches(ids, batch_size, shuffle=False):
        model.route(task=task)
        batch = _collate([ids[i] for i in chunk], _pad_id(model), _device(model))
        out[chunk] = model.features(**batch).float().cpu()  # (B, D)
    model.train(was_training)
    return out


@torch.no_grad()
def frozen_pass(model: AdaptBankModel, ids: Sequence[list[int]], *, router_layers: int,
                batch_size: int = 64) -> tuple[Tensor, Tensor]:
    """One pass of the frozen backbone: pooled features (N, D) for the probe head, and router
    features (N, (L+1) D): masked mean-pools of the embeddings and layers 0 .. L-1, concatenated."""
    was_training = model.training
    model.eval()
    model.route()
    n_router = (router_layers + 1) * model.hidden_size
    pooled, router = torch.empty(len(ids), model.hidden_size), torch.empty(len(ids), n_router)
    for chunk in batches(ids, batch_size, shuffle=False):
        batch = _collate([ids[i] for i in chunk], _pad_id(model), _device(model))
        out = model.encoder(**batch, output_hidden_states=True)
        mask = batch["attention_mask"]
        router[chunk] = torch.cat([pool(h, mask) for h in out.hidden_states[: router_layers + 1]], -1).float().cpu()
        last = out.last_hidden_state  # (B, T, D)
        pooled[chunk] = (pool(last, mask) if model.pooling == "mean" else _last_token(last, mask)).float().cpu()
    model.train(was_training)
    return pooled, router


def _last_token(hidden: Tensor, mask: Tensor) -> Tensor:
    last = mask.long().sum(1).clamp(min=1) - 1  # (B,)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, D)


def fit_probe(features: Tensor, labels: Sequence[int], n_classes: int, *, seed: int = 0) -> tuple[Tensor, Tensor]:
    """A multinomial logistic regression (scikit-learn, L2, C=1) as head weights (C, D) and bias (C,).
    Classes absent from ``labels`` get zero weights and a very low bias."""
    from sklearn.linear_model import LogisticRegression

    y = list(labels)
    present = sorted(set(y))
    W = torch.zeros(n_classes, features.shape[1])  # (C, D)
    b = torch.full((n_classes,), -10.0)  # (C,)
    if len(present) < 2:
        b[present] = 0.0
        return W, b
    clf = LogisticRegression(max_iter=2000, C=1.0, random_state=seed)
    clf.fit(features.numpy(), y)
    coef = torch.as_tensor(clf.coef_, dtype=torch.float32)  # (C', D) or (1, D) for two classes
    bias = torch.as_tensor(clf.intercept_, dtype=torch.float32)
    if len(present) == 2:  # sklearn keeps one row for two classes: split it symmetrically
        coef, bias = torch.cat([-coef / 2, coef / 2]), torch.cat([-bias / 2, bias / 2])
    W[present], b[present] = coef, bias
    return W, b


def make_optimizer(groups: list[dict], cfg: TrainConfig, n_examples: int
                   ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR, int]:
    """AdamW over ``groups`` (each with ``name``, ``lr``, ``params``) and the linear warm-up/decay
    schedule for ``cfg.epochs`` passes over ``n_examples``; returns (optimizer, scheduler, total steps)."""
    opt = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=cfg.weight_decay)
    total = max(1, round(cfg.epochs * math.ceil(n_examples / cfg.batch_size)))
    warm = int(cfg.warmup * total)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / max(1, warm) if s < warm else max(0.0, (total - s) / max(1, total - warm)))
    return opt, sched, total


def optimizer_step(loss: Tensor, opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LambdaLR,
                   params: list[nn.Parameter], cfg: TrainConfig, *, what: str, step: int) -> None:
    """Backward, clip and step, stopping with a :class:`TrainingError` that names ``what``, the step
    and the parameter group on a non-finite loss or gradient (before anything is updated)."""
    if not torch.isfinite(loss):
        raise TrainingError(f"{what}: loss became {loss.item()} at step {step}; {_bad_group(opt)}; "
                            "nothing was saved (try a lower --lr)")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    for g in opt.param_groups:
        if any(p.grad is not None and not torch.isfinite(p.grad).all() for p in g["params"]):
            raise TrainingError(f"{what}: non-finite gradient in parameter group {g['name']!r} at step {step}; "
                                "nothing was saved (try a lower --lr)")
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    opt.step()
    sched.step()


def train_task(model: AdaptBankModel, name: str, texts: Sequence[str], labels: Sequence[int], cfg: TrainConfig,
               *, on_step: Callable[[int, float], None] | None = None,
               features: Tensor | None = None) -> TrainResult:
    """Train task ``name``'s expert and head on ``texts``/``labels`` (class indices).

    ``features`` (N, D) are the frozen pooled features of ``texts`` when the caller has them already
    (they seed the probe head); otherwise they are computed here when ``cfg.probe_init`` is set.
    """
    n_classes = len(model.tasks[name].labels)
    bad = [y for y in labels if not 0 <= y < n_classes]
    if bad:
        raise ValueError(f"labels of task {name!r} must be in [0, {n_classes}), got {bad[0]!r}")
    if not texts:
        raise ValueError(f"task {name!r} has no training examples")
    torch.manual_seed(cfg.seed)
    ids = tokenize(model.tokenizer, texts, cfg.max_length)
    result = TrainResult(steps=0, seconds=0.0, examples_per_second=0.0)
    start = time.perf_counter()
    if cfg.probe_init:
        feats = features if features is not None else pooled_features(model, ids, task=None)  # (N, D)
        W, b = fit_probe(feats, labels, n_classes, seed=cfg.seed)
        with torch.no_grad():
            model.heads[name].linear.weight.copy_(W)
            model.heads[name].linear.bias.copy_(b)
        pred = (feats @ W.T + b).argmax(1)  # (N,)
        result.probe_accuracy = int((pred == torch.tensor(list(labels))).sum()) / len(labels)
    expert_params, head_params = model.train_only(name)
    groups = [{"params": expert_params, "lr": cfg.lr, "name": "expert"},
              {"params": head_params, "lr": cfg.head_lr, "name": "head"}]
    opt, sched, total = make_optimizer(groups, cfg, len(ids))
    y_all = torch.tensor(labels, dtype=torch.long)
    model.train()
    seen = 0
    for epoch in range(math.ceil(cfg.epochs)):
        for chunk in batches(ids, cfg.batch_size, shuffle=True, seed=cfg.seed * 1000 + epoch):
            if result.steps >= total:
                break
            batch = _collate([ids[i] for i in chunk], _pad_id(model), _device(model))
            logits = model(**batch, task=name)  # (B, C)
            loss = F.cross_entropy(logits.float(), y_all[chunk].to(logits.device))
            optimizer_step(loss, opt, sched, expert_params + head_params, cfg, what=f"task {name!r}",
                           step=result.steps + 1)
            result.steps += 1
            seen += len(chunk)
            result.losses.append(loss.item())
            if on_step is not None:
                on_step(result.steps, result.losses[-1])
    model.eval()
    model.requires_grad_(False)
    result.seconds = time.perf_counter() - start
    result.examples_per_second = seen / max(result.seconds, 1e-9)
    return result


def _bad_group(opt: torch.optim.Optimizer) -> str:
    for g in opt.param_groups:
        if any(not torch.isfinite(p).all() for p in g["params"]):
            return f"parameter group {g['name']!r} holds non-finite values"
    return "all parameters were still finite"


@torch.no_grad()
def predict_task(model: AdaptBankModel, name: str, texts: Sequence[str], *, max_length: int = 128,
                 batch_size: int = 64) -> Tensor:
    """Class probabilities (N, C) of task ``name`` with its expert (oracle routing)."""
    ids = tokenize(model.tokenizer, texts, max_length)
    model.eval()
    probs = torch.empty(len(ids), len(model.tasks[name].labels))
    for chunk in batches(ids, batch_size, shuffle=False):
        batch = _collate([ids[i] for i in chunk], _pad_id(model), _device(model))
        probs[chunk] = model(**batch, task=name).float().softmax(-1).cpu()  # (B, C)
    return probs


def evaluate(model: AdaptBankModel, name: str, texts: Sequence[str], labels: Sequence[int], *,
             max_length: int = 128, batch_size: int = 64) -> float:
    """Accuracy of task ``name`` on ``texts`` with the true task id."""
    if not texts:
        raise ValueError(f"task {name!r} has no test examples")
    pred = predict_task(model, name, texts, max_length=max_length, batch_size=batch_size).argmax(1)
    return int((pred == torch.tensor(list(labels))).sum()) / len(labels)
