"""Routed prediction: any input, no task id. The router picks (or mixes) experts per row inside one
forward; the chosen task's head gives the label.

Letters in shape comments: B batch, D hidden size, C classes, k experts per row.

Where several selected experts belong to tasks with the same label list (amazon and yelp, say),
their heads' probabilities are mixed with the routing weights, so a row routed 55/45 between two
star-rating tasks gets a blend of both heads rather than a coin flip between them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from adaptbank.core.model import AdaptBankModel
from adaptbank.data.tokens import batches, collate, pad_id, tokenize_checked
from adaptbank.routing.token import token_routed_features
from adaptbank.training.features import device_of

__all__ = ["Prediction", "predict", "routed_hit"]


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

    def to_dict(self) -> dict[str, object]:
        return {"text": self.text, "task": self.task, "label": self.label, "score": round(self.score, 6),
                "routing": {k: round(v, 6) for k, v in self.routing.items()}, "truncated": self.truncated}


def routed_hit(pred_task: str, pred_label: str, true_task: str, true_label: str,
               labels_of: dict[str, tuple[str, ...]]) -> bool:
    """The one rule for a correct routed prediction: the right label name, from the true task's head or
    from a head with the identical label list (amazon vs yelp: the label names mean the same there)."""
    return pred_label == true_label and (pred_task == true_task or labels_of[pred_task] == labels_of[true_task])


@torch.no_grad()
def predict(model: AdaptBankModel, texts: Sequence[str], *, task: str | None = None, max_length: int = 128,
            batch_size: int = 64, mix_heads: bool = True, token_level: bool = False,
            top_k: int = 2) -> list[Prediction]:
    """Predict every text; ``task`` forces oracle routing to that task, else the router decides:
    the sequence router (default), or with ``token_level`` the per-layer token gates, whose gate mass
    per expert picks the head (the ``top_k`` largest masses are reported and mixed)."""
    if not model.tasks:
        raise ValueError("the bank holds no tasks; add one with `adaptbank add-task`")
    if task is not None and task not in model.tasks:
        raise KeyError(f"unknown task {task!r}; the bank holds: {', '.join(model.tasks)}")
    ids, truncated = tokenize_checked(model.tokenizer, texts, max_length)
    model.eval()
    out_list: list[Prediction | None] = [None] * len(texts)
    names = list(model.state.experts)
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
        for row, i in enumerate(chunk):
            out_list[i] = _answer(model, texts[i], pooled[row], index[row], weight[row], names, mix_heads, truncated[i])
    return out_list  # type: ignore[return-value]


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
