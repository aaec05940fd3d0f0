"""Token-level routing (the MoLE / HydraLoRA style): a small gate in every adapted layer mixes all
experts per token, trained with the experts frozen.

Letters in shape comments: B batch, T tokens, I layer input features, E experts, L adapted layers.

Each adapted layer gets ``token_gate``: a linear map ``(I -> E)``, zero-initialised so training starts
from a uniform mixture; ``softmax(gate(x))`` weights every expert per token (Wu et al. 2024, "Mixture
of LoRA Experts", https://arxiv.org/abs/2404.13628; Tian et al. 2024, HydraLoRA's router). Only the
gates train. The loss, summed visibly in :func:`fit_token_router`, has three terms:

* the classification loss of each row with its own task's head;
* a task-affinity term ``-log m[b, task(b)]``, with ``m (B, E)`` the gate mass per expert averaged over
  layers and real tokens: the head to use at inference is the task with the largest mass, so the
  gates must also say which task an input belongs to;
* the Switch Transformer load-balancing term (Fedus et al. 2021, https://arxiv.org/abs/2101.03961)
  ``E * sum_e f_e P_e`` per layer (f_e: share of tokens whose top expert is e, P_e: mean gate
  probability of e), weighted by ``balance``, which keeps the gates from collapsing onto a few experts.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adaptbank.core.inject import iter_adapted
from adaptbank.core.model import AdaptBankModel
from adaptbank.training.loop import TrainingError, _collate, _device, _pad_id, tokenize

__all__ = ["install_token_gates", "token_gate_tensors", "load_token_gates", "load_balance", "gate_mass",
           "fit_token_router", "token_routed_features"]


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


def token_routed_features(model: AdaptBankModel, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Pooled features (B, D) with token-level gates, and the gate mass per expert (B, E)."""
    model.state.tokens(attention_mask)
    pooled = model.features(input_ids, attention_mask)  # (B, D)
    if not model.state.token_probs:
        raise RuntimeError("no token gates installed; fit the token router first")
    return pooled, gate_mass(model.state.token_probs, attention_mask)


def fit_token_router(model: AdaptBankModel, data: dict[str, tuple[Sequence[str], Sequence[int]]], *,
                     epochs: float = 1.0, lr: float = 5e-3, batch_size: int = 16, max_length: int = 128,
                     balance: float = 0.01, seed: int = 0) -> list[float]:
    """Train the token gates on ``data`` (task -> texts, labels) with all experts and heads frozen."""
    unknown = sorted(set(data) - set(model.tasks))
    if unknown:
        raise KeyError(f"unknown task(s) {unknown}; the model holds {list(model.tasks)}")
    torch.manual_seed(seed)
    model.requires_grad_(False)
    gates = install_token_gates(model)
    params = [p for g in gates for p in g.parameters()]
    for p in params:
        p.requires_grad_(True)
    order = {n: i for i, n in enumerate(model.state.experts)}
    rows = [(task, ids, y) for task, (texts, labels) in data.items()
            for ids, y in zip(tokenize(model.tokenizer, texts, max_length), labels)]
    rng = random.Random(seed)
    opt = torch.optim.AdamW(params, lr=lr)
    steps = max(1, round(epochs * len(rows) / batch_size))
    losses: list[float] = []
    model.eval()  # dropout off: only the gates learn, and they should see the inference-time experts
    for step in range(steps):
        batch_rows = rng.sample(rows, min(batch_size, len(rows)))
        batch = _collate([r[1] for r in batch_rows], _pad_id(model), _device(model))
        pooled, mass = token_routed_features(model, batch["input_ids"], batch["attention_mask"])
        tasks = [r[0] for r in batch_rows]
        task_loss = sum(F.cross_entropy(model.heads[t](pooled[i: i + 1]), torch.tensor([r[2]], device=pooled.device))
                        for i, (t, r) in enumerate(zip(tasks, batch_rows))) / len(batch_rows)
        target = torch.tensor([order[t] for t in tasks], device=mass.device)
        affinity = F.nll_loss(mass.clamp(min=1e-9).log(), target)
        lb = sum(load_balance(p, batch["attention_mask"]) for p in model.state.token_probs) / len(model.state.token_probs)
        loss = task_loss + affinity + balance * lb
        if not torch.isfinite(loss):
            raise TrainingError(f"token router: loss became {loss.item()} at step {step + 1}; try a lower lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.requires_grad_(False)
    model.state.off()
    return losses
