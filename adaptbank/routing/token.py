"""Token-level routing (the MoLE / HydraLoRA style): a small gate in every adapted layer mixes all
experts per token, trained with the experts frozen.

Letters in shape comments: B batch, T tokens, I layer input features, E experts, L adapted layers.

Each adapted layer gets ``token_gate``: a linear map ``(I -> E)``, zero-initialised so training starts
from a uniform mixture; ``softmax(gate(x))`` weights every expert per token (Wu et al. 2024, "Mixture
of LoRA Experts", https://arxiv.org/abs/2404.13628; Tian et al. 2024, HydraLoRA's router). Only the
gates train. The loss, summed visibly in :func:`fit_token_router`, has three terms:

* the classification loss of each row with its own task's head (the loop's task loss);
* a task-affinity term ``-log m[b, task(b)]``, with ``m (B, E)`` the gate mass per expert averaged over
  layers and real tokens: the head to use at inference is the task with the largest mass, so the
  gates must also say which task an input belongs to;
* the Switch Transformer load-balancing term (Fedus et al. 2021, https://arxiv.org/abs/2101.03961)
  ``E * sum_e f_e P_e`` per layer (f_e: share of tokens whose top expert is e, P_e: mean gate
  probability of e), weighted by ``balance``, which keeps the gates from collapsing onto a few experts.

The last two are loss terms of the one training loop (``training.loop.fit``: AdamW, the learning
rate decaying linearly to zero, gradient clipping at 1.0); batches are drawn at random from all tasks'
rows, and training runs in eval mode (no dropout), so the gates see the experts as they run at inference. Each gate keeps the probabilities of its last forward (``gate_probs``), the
output this module reads back.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adaptbank.core.config import TrainConfig
from adaptbank.core.inject import iter_adapted
from adaptbank.core.model import AdaptBankModel
from adaptbank.data.tokens import tokenize
from adaptbank.training.loop import Row, Step, fit

__all__ = ["install_token_gates", "remove_token_gates", "token_gate_tensors", "load_token_gates", "load_balance",
           "gate_mass", "gate_probs", "fit_token_router", "token_routed_features", "AffinityTerm", "BalanceTerm"]


def install_token_gates(model: AdaptBankModel) -> list[nn.Linear]:
    """A zero-initialised gate ``(I -> E)`` in every adapted layer that holds experts."""
    E = len(model.state.experts)
    if E == 0:
        raise ValueError("the model holds no experts to route between")
    gates = []
    for _, layer in iter_adapted(model.backbone):
        if len(layer.experts):
            gate = nn.Linear(layer.d_in, E).to(layer.base.weight.device)
            nn.init.zeros_(gate.weight)
            nn.init.zeros_(gate.bias)
            layer.token_gate = gate
            gates.append(gate)
    return gates


def token_gate_tensors(model: AdaptBankModel) -> dict[str, Tensor]:
    """``{"<layer path>.weight": (E, I), "<layer path>.bias": (E,)}`` for saving."""
    out = {}
    for path, layer in iter_adapted(model.backbone):
        if layer.token_gate is not None:
            out[f"{path}.weight"] = layer.token_gate.weight.detach().clone()
            out[f"{path}.bias"] = layer.token_gate.bias.detach().clone()
    return out


def load_token_gates(model: AdaptBankModel, tensors: dict[str, Tensor]) -> None:
    """Install gates from :func:`token_gate_tensors` output; shapes must fit the loaded experts."""
    install_token_gates(model)
    for path, layer in iter_adapted(model.backbone):
        if layer.token_gate is None:
            continue
        for attr in ("weight", "bias"):
            key = f"{path}.{attr}"
            if key not in tensors or tensors[key].shape != getattr(layer.token_gate, attr).shape:
                got = tuple(tensors[key].shape) if key in tensors else "missing"
                raise ValueError(f"token router tensor {key!r} is {got}, the model needs "
                                 f"{tuple(getattr(layer.token_gate, attr).shape)}; refit the token router")
            with torch.no_grad():
                getattr(layer.token_gate, attr).copy_(tensors[key])


def load_balance(probs: Tensor, mask: Tensor) -> Tensor:
    """Switch load-balancing loss ``E * sum_e f_e P_e`` over real tokens: ``(B, T, E), (B, T) -> ()``."""
    m = mask.to(probs.dtype)[..., None]  # (B, T, 1)
    n = m.sum().clamp(min=1.0)
    top = F.one_hot(probs.argmax(-1), probs.shape[-1]).to(probs.dtype)  # (B, T, E)
    f = (top * m).sum((0, 1)) / n  # (E,)
    P = (probs * m).sum((0, 1)) / n  # (E,)
    return probs.shape[-1] * (f * P).sum()


def gate_mass(probs: Sequence[Tensor], mask: Tensor) -> Tensor:
    """Gate probability per expert averaged over layers and real tokens: ``L x (B, T, E) -> (B, E)``."""
    m = mask.to(probs[0].dtype)[..., None]  # (B, T, 1)
    per_layer = [(p * m).sum(1) / m.sum(1).clamp(min=1.0) for p in probs]  # L x (B, E)
    return torch.stack(per_layer).mean(0)  # (B, E)


def gate_probs(model: AdaptBankModel) -> list[Tensor]:
    """The (B, T, E) gate probabilities of every gated layer in the last token-gated forward."""
    return [layer.gate_probs for _, layer in iter_adapted(model.backbone)
            if layer.token_gate is not None and layer.gate_probs is not None]


def remove_token_gates(model: AdaptBankModel) -> None:
    """Take the token gates out of every adapted layer."""
    for _, layer in iter_adapted(model.backbone):
        layer.token_gate, layer.gate_probs = None, None


def token_routed_features(model: AdaptBankModel, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Pooled features (B, D) with token-level gates, and the gate mass per expert (B, E)."""
    for _, layer in iter_adapted(model.backbone):
        layer.gate_probs = None
    model.state.tokens()
    pooled = model.features(input_ids, attention_mask)  # (B, D)
    probs = gate_probs(model)
    if not probs:
        raise RuntimeError("no token gates installed; fit the token router first")
    return pooled, gate_mass(probs, attention_mask)


class AffinityTerm:
    """``-log m[b, task(b)]``: the gates' mass must name each row's own task (its head is used at inference)."""

    def __init__(self, order: Sequence[str]) -> None:
        self.order = {n: i for i, n in enumerate(order)}

    def __call__(self, step: Step) -> Tensor:
        mass = gate_mass(gate_probs(step.model), step.batch["attention_mask"])  # (B, E)
        target = torch.tensor([self.order[r.task] for r in step.rows], device=mass.device)  # (B,)
        return F.nll_loss(mass.clamp(min=1e-9).log(), target)


class BalanceTerm:
    """``balance`` times the Switch load-balancing loss, averaged over the gated layers."""

    def __init__(self, balance: float) -> None:
        self.balance = balance

    def __call__(self, step: Step) -> Tensor:
        probs = gate_probs(step.model)
        return self.balance * sum(load_balance(p, step.batch["attention_mask"]) for p in probs) / len(probs)


def _sampled(rows: Sequence[Row], batch_size: int, seed: int) -> Iterator[list[Row]]:
    """Endless batches drawn at random (without replacement within a batch) from all rows."""
    rng, rows = random.Random(seed), list(rows)
    while True:
        yield rng.sample(rows, min(batch_size, len(rows)))


def fit_token_router(model: AdaptBankModel, data: dict[str, tuple[Sequence[str], Sequence[int]]], *,
                     epochs: float = 1.0, lr: float = 5e-3, batch_size: int = 16, max_length: int = 128,
                     balance: float = 0.01, seed: int = 0) -> list[float]:
    """Train the token gates on ``data`` (task -> texts, labels) with all experts and heads frozen."""
    unknown = sorted(set(data) - set(model.tasks))
    if unknown:
        raise KeyError(f"unknown task(s) {unknown}; the model holds {list(model.tasks)}")
    gates = install_token_gates(model)
    rows = [Row(ids, y, task) for task, (texts, labels) in data.items()
            for ids, y in zip(tokenize(model.tokenizer, texts, max_length), labels)]
    cfg = TrainConfig(epochs=epochs, lr=lr, batch_size=batch_size, max_length=max_length, seed=seed, warmup=0.0)
    steps = max(1, round(epochs * len(rows) / batch_size))
    params = [p for g in gates for p in g.parameters()]

    def features(batch: dict[str, Tensor]) -> Tensor:
        return token_routed_features(model, batch["input_ids"], batch["attention_mask"])[0]  # (B, D)

    result = fit(model, _sampled(rows, batch_size, seed), steps=steps,
                 groups=[{"params": params, "lr": lr, "name": "token gates"}], cfg=cfg, features=features, seed=seed,
                 what="token router", loss_terms=[AffinityTerm(model.state.experts), BalanceTerm(balance)],
                 dropout=False)
    model.state.off()
    return result.losses
