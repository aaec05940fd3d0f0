"""Generation tasks in continual runs: what the strategies train on and how a row of the matrix is scored.

Letters in shape comments: B batch, T tokens, D hidden size.

A run whose tasks are all generation tasks (``type = "generation"``, or classification posed as
generation, ``pose = "generation"``) trains every strategy with the loss on the target tokens through
the frozen shared LM head (``training.generation.generation_loss``) and scores ``R[i][j]`` by the
**exact match** of task j's greedy continuations after task i (SQuAD's normalisation, see
``training.generation``); token F1 is recorded beside it. What decodes is set by gates, as for
classification:

- the bank: task j's own expert (oracle), or the router's choice per prompt, made in the prefill
  (routed); an unseen task has no expert, so ``R[i][j] = b_j`` exactly;
- seq-lora, ewc, replay, joint: the one learner expert for every task; seq-full: the fine-tuned
  backbone; olora: every expert so far, weight 1 each;
- the baseline ``b_j``: the backbone without experts (the untrained model's exact match).

There are no per-task heads, so the "initial head" of classification runs has no counterpart: the
frozen LM head is the same before and after. EWC's Fisher uses the sequence log-likelihood
``log p(y|x) = sum_t log p(y_t | x, y_<t)`` of the target tokens (:func:`target_log_likelihood`).

Each task decodes at most ``new_tokens_for(train targets)`` tokens (twice its longest training
target, plus EOS and 2 spare); a routed batch over several tasks uses the largest of their limits
(the router, not the task id, decides what a prompt is).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

from adaptbank.core.model import AdaptBankModel
from adaptbank.data.load import TaskData, generation_pairs
from adaptbank.training.generation import (
    encode_pairs,
    exact_match,
    generate_texts,
    generation_loss,
    new_tokens_for,
    token_f1,
)
from adaptbank.training.loop import Row

__all__ = ["GenTask", "gen_task", "train_rows", "score", "routed_scores", "target_log_likelihood"]


@dataclass(frozen=True)
class GenTask:
    """One generation task's test prompts and targets, and its decoding limit."""

    name: str
    prompts: tuple[str, ...]
    targets: tuple[str, ...]
    max_new_tokens: int


def gen_task(model: AdaptBankModel, data: TaskData) -> GenTask:
    """The test split of a loaded generation task, with the decoding limit of its training targets."""
    prompts, targets = generation_pairs(data, "test")
    if not prompts:
        raise ValueError(f"task {data.spec.name!r} has no test examples")
    limit = new_tokens_for(model, generation_pairs(data, "train")[1])
    return GenTask(data.spec.name, tuple(prompts), tuple(targets), limit)


def train_rows(model: AdaptBankModel, data: TaskData, name: str, max_length: int) -> list[Row]:
    """Training rows ``prompt + " " target + EOS`` of a generation task; a posed classification task's
    rows keep their class index as ``label`` (replay's class-balanced buffer reads it)."""
    rows = encode_pairs(model, name, *generation_pairs(data, "train"), max_length)
    if data.spec.type == "classification":
        rows = [dataclasses.replace(r, label=e.label) for r, e in zip(rows, data.train, strict=True)]
    return rows


def _means(texts: Sequence[str], targets: Sequence[str]) -> tuple[float, float]:
    n = len(targets)
    return sum(map(exact_match, texts, targets)) / n, sum(map(token_f1, texts, targets)) / n


def score(model: AdaptBankModel, task: GenTask, *, max_length: int, gate: str | None = None,
          experts: Sequence[str] | None = None) -> tuple[float, float]:
    """``(exact match, token F1)`` of ``task``'s greedy continuations with expert ``gate`` on, or with
    ``experts`` on together (weight 1 each; ``()``: the base model)."""
    texts, _ = generate_texts(model, task.prompts, task=gate, experts=experts if gate is None else None,
                              max_length=max_length, max_new_tokens=task.max_new_tokens)
    return _means(texts, task.targets)


def routed_scores(model: AdaptBankModel, tasks: Sequence[GenTask], *, max_length: int
                  ) -> tuple[list[float], list[float], float]:
    """Per task, exact match and token F1 with the router choosing each prompt's experts in the prefill
    (no task ids), and the router's task-identification accuracy (the expert with the largest weight is
    the prompt's own task) over all prompts. ``model`` holds every task of ``tasks`` and a router."""
    prompts = [p for t in tasks for p in t.prompts]
    owners = [t.name for t in tasks for _ in t.prompts]
    texts, chosen = generate_texts(model, prompts, routed=True, max_length=max_length,
                                   max_new_tokens=max(t.max_new_tokens for t in tasks))
    em, f1, start = [], [], 0
    for t in tasks:
        e, f = _means(texts[start: start + len(t.prompts)], t.targets)
        em.append(e)
        f1.append(f)
        start += len(t.prompts)
    return em, f1, sum(c == o for c, o in zip(chosen, owners, strict=True)) / len(prompts)


def target_log_likelihood(model: AdaptBankModel, row: Row, hidden: Tensor) -> Tensor:
    """``log p(y|x)`` of one generation row: minus its summed target-token cross-entropy, from the hidden
    states ``(1, T, D)`` (EWC's Fisher on generation tasks)."""
    n = len(row.ids) - (row.target_from or 0)
    return -generation_loss(model, [row], hidden) * n
