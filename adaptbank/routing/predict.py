"""Routed prediction: any input, no task id. The router picks (or mixes) experts per row inside one
forward; the chosen task's head gives the label.

Letters in shape comments: B batch, D hidden size, C classes, k experts per row.

Where several selected experts belong to tasks with the same label list (amazon and yelp, say),
their heads' probabilities are mixed with the routing weights, so a row routed 55/45 between two
star-rating tasks gets a blend of both heads rather than a coin flip between them.

**Confidence and ambiguity.** With the sequence router each answer carries the router's probability
for its task, ``softmax(scores / temperature)`` over all tasks (the LDA posterior at the bank's
temperature), and the full distribution. When the runner-up task holds at least ``ambiguous_at`` of
it (default 0.2), or with ``explain``, the answer also carries the runner-up's own answer: the same
rows run once more under that task (``alternative``), so a caller sees both readings of an input
that two tasks claim.

**Inputs the router cannot read.** An answer's ``notes`` say when its routing carries little
information: most of the input's tokens are the tokenizer's unknown token (a script no task was
trained on: the features are those of ``[UNK]`` repeated, whatever the text says), or the bank holds
one task, so every input goes to it and no routing happened. An empty input is refused (naming it)
by ``tokenize_checked`` before anything runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from adaptbank.core.model import AdaptBankModel
from adaptbank.data.tokens import batches, collate, pad_id, tokenize_checked
from adaptbank.routing.ambiguity import AMBIGUOUS_AT
from adaptbank.routing.token import token_routed_features
from adaptbank.training.features import device_of

__all__ = ["AMBIGUOUS_AT", "ONE_TASK_NOTE", "UNKNOWN_SHARE", "Prediction", "input_notes", "predict", "routed_hit", "token_kinds",
           "right_task"]


@dataclass
class Prediction:
    """One input's answer."""

    text: str
    task: str
    label: str
    label_index: int
    score: float
    routing: dict[str, float] = field(default_factory=dict)
    truncated: bool = False
    router_probability: float | None = None
    """The sequence router's probability for ``task`` (None: oracle or token routing)."""
    task_probabilities: dict[str, float] = field(default_factory=dict)
    """The router's whole distribution over the tasks (empty: oracle or token routing)."""
    alternative: dict[str, object] | None = None
    """The runner-up task's answer, ``{"task", "probability", "label", "score"}``, when the input is
    ambiguous (or asked for with ``explain``); else None."""
    ambiguous: bool = False
    """Whether the runner-up task holds at least ``predict``'s ``ambiguous_at`` of the router's probability."""
    notes: list[str] = field(default_factory=list)
    """Why this answer's routing says little (module docstring): unknown tokens, a bank of one task."""

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"text": self.text, "task": self.task, "label": self.label,
                                  "score": round(self.score, 6),
                                  "routing": {k: round(v, 6) for k, v in self.routing.items()}, "truncated": self.truncated}
        if self.router_probability is not None:
            top = sorted(self.task_probabilities.items(), key=lambda kv: -kv[1])[:3]
            out |= {"router_probability": round(self.router_probability, 6), "ambiguous": self.ambiguous,
                    "router_top": {k: round(v, 6) for k, v in top}}
        if self.alternative is not None:
            out["alternative"] = {k: round(v, 6) if isinstance(v, float) else v for k, v in self.alternative.items()}
        if self.notes:
            out["notes"] = list(self.notes)
        return out


UNKNOWN_SHARE = 0.5
"""An input whose real tokens are at least this share the tokenizer's unknown token gets a note."""

ONE_TASK_NOTE = "the bank holds one task: every input goes to it (no routing needed)"


def token_kinds(tokenizer: object) -> tuple[int | None, frozenset[int]]:
    """The tokenizer's unknown-token id (None: it has none) and its other special ids."""
    unk = getattr(tokenizer, "unk_token_id", None)
    return unk, frozenset(getattr(tokenizer, "all_special_ids", ())) - {unk}


def input_notes(tokenizer: object, ids: list[int], routed: bool, n_tasks: int, *,
                kinds: tuple[int | None, frozenset[int]] | None = None) -> list[str]:
    """The notes of one input with token ids ``ids`` (special tokens included), see the module docstring;
    ``kinds``: :func:`token_kinds` of ``tokenizer``, computed once by a caller with many inputs."""
    notes = []
    unk, special = token_kinds(tokenizer) if kinds is None else kinds
    real = [i for i in ids if i not in special]
    unknown = sum(i == unk for i in real) if unk is not None else 0
    if real and unknown / len(real) >= UNKNOWN_SHARE:
        notes.append(f"{unknown} of its {len(real)} tokens are unknown to the tokenizer (a script no task has "
                     "seen?): the model reads mostly unknown-token markers, so "
                     + ("the routing and the answer are guesses" if routed else "the answer is a guess"))
    if routed and n_tasks == 1:
        notes.append(ONE_TASK_NOTE)
    return notes


def routed_hit(pred_task: str, pred_label: str, true_task: str, true_label: str,
               labels_of: dict[str, tuple[str, ...]]) -> bool:
    """The one rule for a correct routed prediction: the right label name, from the true task's head or
    from a head with the identical label list (amazon vs yelp: the label names mean the same there)."""
    return pred_label == true_label and right_task(pred_task, true_task, labels_of)


def right_task(pred_task: str, true_task: str, labels_of: dict[str, tuple[str, ...]]) -> bool:
    """Whether routing to ``pred_task`` answers ``true_task``'s question: the same task, or one with the
    identical label list (:func:`routed_hit`'s rule for the task)."""
    return pred_task == true_task or labels_of[pred_task] == labels_of[true_task]


@torch.no_grad()
def predict(model: AdaptBankModel, texts: Sequence[str], *, task: str | None = None, max_length: int = 128,
            batch_size: int = 64, mix_heads: bool = True, token_level: bool = False,
            top_k: int = 2, explain: bool = False, ambiguous_at: float = AMBIGUOUS_AT) -> list[Prediction]:
    """Predict every text; ``task`` forces oracle routing to that task, else the router decides:
    the sequence router (default), or with ``token_level`` the per-layer token gates, whose gate mass
    per expert picks the head (the ``top_k`` largest masses are reported and mixed). The sequence
    router's answers carry its probabilities and, for ambiguous inputs (runner-up probability >=
    ``ambiguous_at``) or with ``explain``, the runner-up task's answer (module docstring)."""
    if not 0.0 < ambiguous_at <= 1.0:
        raise ValueError(f"ambiguous_at must be in (0, 1], got {ambiguous_at!r}")
    if not model.tasks:
        raise ValueError("the bank holds no tasks; add one with `adaptbank add-task`")
    if task is not None and task not in model.tasks:
        raise KeyError(f"unknown task {task!r}; the bank holds: {', '.join(model.tasks)}")
    ids, truncated = tokenize_checked(model.tokenizer, texts, max_length)
    model.eval()
    out_list: list[Prediction | None] = [None] * len(texts)
    names = list(model.state.experts)
    kinds = token_kinds(model.tokenizer)
    for chunk in batches(ids, batch_size, shuffle=False):
        batch = collate([ids[i] for i in chunk], pad_id(model.tokenizer), device_of(model))
        if task is not None:
            pooled = model(**batch, task=task).pooled  # (B, D)
            index = torch.full((len(chunk), 1), names.index(task))  # (B, 1)
            weight = torch.ones(len(chunk), 1)  # (B, 1)
        elif token_level:
            pooled, mass = token_routed_features(model, batch["input_ids"], batch["attention_mask"])  # (B, D), (B, E)
            weight, index = mass.float().cpu().topk(min(top_k, mass.shape[-1]), dim=-1)  # (B, k)
            weight = weight / weight.sum(-1, keepdim=True)
        else:
            out = model(**batch, routed=True)
            pooled, index, weight = out.pooled, out.index.cpu(), out.weight.float().cpu()  # type: ignore[union-attr]
        answers = [_answer(model, texts[i], pooled[row], index[row], weight[row], names, mix_heads, truncated[i])
                   for row, i in enumerate(chunk)]
        if task is None and not token_level and model.router is not None:
            probs = (out.scores.float() / model.router_temperature).softmax(-1).cpu()  # (B, E) router order
            _with_alternatives(model, batch, answers, probs, explain, ambiguous_at)
        for row, i in enumerate(chunk):
            answers[row].notes = input_notes(model.tokenizer, ids[i], task is None, len(model.tasks), kinds=kinds)
            out_list[i] = answers[row]
    return out_list  # type: ignore[return-value]


def _with_alternatives(model: AdaptBankModel, batch: dict[str, Tensor], answers: list[Prediction], probs: Tensor,
                       explain: bool, ambiguous_at: float) -> None:
    """Fill each answer's router probabilities and, where the runner-up task is close (or ``explain``),
    the runner-up's answer: those rows run once more, each under its runner-up task."""
    router_names = list(model.router.names)  # type: ignore[union-attr]
    wanted: list[tuple[int, str, float]] = []
    for row, answer in enumerate(answers):
        dist = {t: float(p) for t, p in zip(router_names, probs[row])}
        answer.task_probabilities, answer.router_probability = dist, dist[answer.task]
        others = sorted(((p, t) for t, p in dist.items() if t != answer.task), reverse=True)
        answer.ambiguous = bool(others) and others[0][0] >= ambiguous_at
        if others and (explain or answer.ambiguous):
            wanted.append((row, others[0][1], others[0][0]))
    if not wanted:
        return
    rows = torch.tensor([r for r, _, _ in wanted], device=batch["input_ids"].device)  # (A,)
    sub = {k: v[rows] for k, v in batch.items()}
    pooled = model(**sub, task_ids=[t for _, t, _ in wanted]).pooled  # (A, D)
    for (row, alt, p), feats in zip(wanted, pooled):
        scores = model.heads[alt](feats[None]).float().softmax(-1)[0]  # (C,)
        label = int(scores.argmax())
        answers[row].alternative = {"task": alt, "probability": p, "label": model.tasks[alt].labels[label],
                                    "score": float(scores[label])}


def _answer(model: AdaptBankModel, text: str, pooled: Tensor, index: Tensor, weight: Tensor, names: list[str],
            mix_heads: bool, truncated: bool) -> Prediction:
    chosen = [names[int(j)] for j in index]
    top = chosen[int(weight.argmax())]
    labels = model.tasks[top].labels
    probs = model.heads[top](pooled[None]).float().softmax(-1)[0]  # (C,)
    if mix_heads:
        same = [(t, float(w)) for t, w in zip(chosen, weight) if model.tasks[t].labels == labels]
        if len(same) > 1:
            total = sum(w for _, w in same)
            probs = sum(w / total * model.heads[t](pooled[None]).float().softmax(-1)[0] for t, w in same)  # (C,)
    label = int(probs.argmax())
    routing: dict[str, float] = {}
    for t, w in zip(chosen, weight):
        routing[t] = routing.get(t, 0.0) + float(w)
    return Prediction(text=text, task=top, label=labels[label], label_index=label, score=float(probs[label]),
                      routing=routing, truncated=truncated)
