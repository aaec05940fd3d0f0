"""Evaluation with the true task id (oracle routing), on texts or on features already pooled.

Letters in shape comments: B batch, D hidden size, C classes, N examples.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from adaptbank.core.heads import ClassificationHead
from adaptbank.core.model import AdaptBankModel
from adaptbank.data.tokens import batches, collate, pad_id, tokenize
from adaptbank.training import distributed
from adaptbank.training.distributed import LOCAL, Dist
from adaptbank.training.features import device_of

__all__ = ["predict_task", "evaluate", "evaluate_hits", "head_accuracy", "head_hits", "accuracy", "hits"]


def accuracy(pred: Tensor, labels: Sequence[int]) -> float:
    """Share of ``pred`` (N,) equal to ``labels``."""
    return int((pred == torch.tensor(list(labels))).sum()) / len(labels)


def hits(pred: Tensor, labels: Sequence[int]) -> list[int]:
    """1 where ``pred`` (N,) equals ``labels``, else 0, per example (the mean is :func:`accuracy`)."""
    return (pred == torch.tensor(list(labels))).long().tolist()


@torch.no_grad()
def predict_task(model: AdaptBankModel, name: str, texts: Sequence[str], *, max_length: int = 128,
                 batch_size: int = 32) -> Tensor:
    """Class probabilities (N, C) of task ``name`` with its expert (oracle routing)."""
    ids = tokenize(model.tokenizer, texts, max_length) if texts else []
    model.eval()
    probs = torch.empty(len(ids), len(model.tasks[name].labels))  # (N, C)
    for chunk in batches(ids, batch_size, shuffle=False):
        batch = collate([ids[i] for i in chunk], pad_id(model.tokenizer), device_of(model))
        probs[chunk] = model(**batch, task=name).logits.float().softmax(-1).cpu()  # (B, C)
    return probs


def evaluate(model: AdaptBankModel, name: str, texts: Sequence[str], labels: Sequence[int], *,
             max_length: int = 128, batch_size: int = 32, dist: Dist = LOCAL) -> float:
    """Accuracy of task ``name`` on ``texts`` with the true task id. With ``dist`` each rank predicts its
    block of ``texts`` and the predictions are gathered (``training.distributed.sharded``)."""
    if not texts:
        raise ValueError(f"task {name!r} has no test examples")
    got = evaluate_hits(model, name, texts, labels, max_length=max_length, batch_size=batch_size, dist=dist)
    return sum(got) / len(got)


def evaluate_hits(model: AdaptBankModel, name: str, texts: Sequence[str], labels: Sequence[int], *,
                  max_length: int = 128, batch_size: int = 32, dist: Dist = LOCAL) -> list[int]:
    """Per test example, 1 when task ``name`` (true task id) predicts its label, else 0 (see :func:`evaluate`)."""
    if not texts:
        raise ValueError(f"task {name!r} has no test examples")
    probs = distributed.sharded(dist, list(texts), lambda part: predict_task(
        model, name, part, max_length=max_length, batch_size=batch_size), where=f"task {name!r}: evaluation")
    return hits(probs.argmax(1), labels)  # (N, C) -> (N,)


def head_accuracy(head: ClassificationHead, feats: Tensor, labels: Sequence[int]) -> float:
    """Accuracy of ``head`` (in eval mode) on pooled features ``feats`` (N, D): the mean of :func:`head_hits`."""
    got = head_hits(head, feats, labels)
    return sum(got) / len(got)


@torch.no_grad()
def head_hits(head: ClassificationHead, feats: Tensor, labels: Sequence[int]) -> list[int]:
    """Per example of pooled features ``feats`` (N, D), 1 when ``head`` (in eval mode) is right, else 0."""
    was_training = head.training
    head.eval()
    pred = head(feats.to(head.linear.weight.device, head.linear.weight.dtype)).argmax(1).cpu()  # (N,)
    head.train(was_training)
    return hits(pred, labels)
