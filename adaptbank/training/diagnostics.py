"""Gradient diagnostics of a task's first optimiser steps, and a LoRA rank suggestion after training.

Letters in shape comments: O output features, I input features, r LoRA rank, k = min(O, I, r).

**Gradient norms.** A task's trainable parameters are split into named groups (:func:`parameter_groups`):
one per expert parameter role per wrapped layer (``<layer path>.A`` and ``.B`` for LoRA, ``.down`` and
``.up`` for adapters, weight and bias together) and ``head``. :class:`GradientLog` is the
``after_backward`` callback of :func:`adaptbank.training.loop.fit`: on each of the first ``steps``
optimiser steps it records, via the pure :func:`grad_norms`, each group's gradient norm
``||g|| = sqrt(sum_p ||p.grad||_F^2)`` (None when no parameter of the group has a gradient) and the
loss; on step 1, before the first update, also each group's parameter norm. The norms are the raw ones,
before clipping. No module hooks: fit hands the callback the step and the loss, the log reads ``.grad``.

:func:`gradient_warnings` names the usual faults:

* *no gradient*: a group whose grad is None on every recorded step (frozen by mistake, or unreachable);
  *zero gradient*: exactly 0 on every recorded step. A LoRA A's gradient ``(alpha/r) B^T g x`` is exactly
  0 on step 1 while B = 0, which is expected, so an A (and an adapter's down) is judged from step 2 on;
* *B not zero at start*: LoRA (and an adapter's up-projection) must start at 0, so that the new expert
  leaves the model unchanged (Hu et al. 2021, section 4.1); *A zero at start*: then B's gradient
  ``(alpha/r) g (x A^T)^T`` is 0 and neither factor ever moves (likewise an adapter's down-projection);
* *non-finite*: a NaN or Inf loss or gradient norm (fit then stops with a ``TrainingError``);
* *exploding*: a step whose norm exceeds ``EXPLODE_FACTOR`` (100) times the median of the group's
  earlier non-zero norms. The running median (not the median of the whole window) is the reference so
  that a blow-up in the second half of the window is still caught; a LoRA A's norm grows with ||B||
  during warm-up, about linearly, which stays far below the factor.

**Rank suggestion** (:func:`rank_suggestion`). The LoRA update ``dW = s B A`` (s = alpha/r,
B (O, r), A (r, I)) has rank <= r. With reduced QRs ``B = Q_B R_B`` and ``A^T = Q_A R_A``,
``dW = Q_B (s R_B R_A^T) Q_A^T`` with orthonormal columns in Q_B and Q_A, so dW's singular values are
those of the small ``s R_B R_A^T`` (at most r x r); dW is never formed. The suggestion is the smallest
rank k with ``sum_{i<=k} sigma_i^2 >= energy * sum_i sigma_i^2`` (the rank-k truncation keeps that share
of ||dW||_F^2, Eckart-Young), 0 for a zero update. Per task (:func:`rank_suggestions`) the overall
suggestion is the **maximum over layers**: LoRA has one rank for all layers, and only the maximum keeps
the energy share in every layer (a percentile would knowingly truncate the layers above it).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from adaptbank.core.composed import expert_parts
from adaptbank.core.experts import LoRAExpert
from adaptbank.core.model import AdaptBankModel

__all__ = ["DEFAULT_STEPS", "EXPLODE_FACTOR", "ENERGY", "ZERO_START", "NONZERO_START", "GradientLog",
           "parameter_groups", "grad_norms", "parameter_norms", "gradient_warnings", "lora_singular_values",
           "rank_suggestion", "rank_suggestions", "diagnosis", "diagnose_report"]

DEFAULT_STEPS = 10
"""Optimiser steps recorded by ``add-task --diagnose``."""
EXPLODE_FACTOR = 100.0
"""A step's gradient norm above this times the running median of the group's earlier norms is exploding."""
ENERGY = 0.9
"""Share of the update's energy (squared Frobenius norm) the suggested rank keeps."""
ZERO_START = ("B", "up")
"""Parameter roles that must be zero at the start (the new expert adds nothing)."""
NONZERO_START = ("A", "down")
"""Parameter roles that must not be zero at the start (else their partner gets no gradient)."""


def parameter_groups(model: AdaptBankModel, name: str) -> dict[str, list[nn.Parameter]]:
    """Task ``name``'s trainable parameters by group: ``<layer path>.<role>`` per expert parameter role
    (the first component of the parameter's name in the expert: ``A``, ``B``, ``down``, ``up``) and
    ``head``; a combined task's groups carry its part's storage prefix (``1.lora.<layer path>.A``). A
    shared A the task does not own is not trained and is left out."""
    trained = {id(p) for p in model.expert_parameters(name)}
    groups: dict[str, list[nn.Parameter]] = {}
    for path, layer in model.layers_of(name).items():
        for label, part in expert_parts(layer.experts[name]):  # type: ignore[arg-type]
            for pname, p in part.named_parameters():
                if id(p) in trained:
                    groups.setdefault(f"{label}.{path}.{pname.split('.')[0]}".lstrip("."), []).append(p)
    groups["head"] = list(model.heads[name].parameters())
    return groups


def grad_norms(groups: Mapping[str, Sequence[Tensor]]) -> dict[str, float | None]:
    """``sqrt(sum_p ||p.grad||_F^2)`` per group, in fp64; None when no parameter of the group has a grad."""
    out: dict[str, float | None] = {}
    for key, params in groups.items():
        grads = [p.grad for p in params if p.grad is not None]
        out[key] = math.sqrt(sum(float(g.double().square().sum()) for g in grads)) if grads else None
    return out


def parameter_norms(groups: Mapping[str, Sequence[Tensor]]) -> dict[str, float]:
    """``sqrt(sum_p ||p||_F^2)`` per group, in fp64."""
    return {k: math.sqrt(sum(float(p.detach().double().square().sum()) for p in ps)) for k, ps in groups.items()}


@dataclass
class GradientLog:
    """The ``after_backward`` callback of ``fit``: gradient norms of ``groups`` on steps 1..``steps``."""

    groups: Mapping[str, Sequence[Tensor]]
    steps: int = DEFAULT_STEPS
    norms: dict[str, list[float | None]] = field(default_factory=dict)
    """Per group, the gradient norm of each recorded step (None: no gradient)."""
    losses: list[float] = field(default_factory=list)
    start: dict[str, float] = field(default_factory=dict)
    """Per group, the parameter norm before the first update (read on step 1)."""

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 1:
            raise ValueError(f"diagnostic steps must be a positive integer, got {self.steps!r}")

    def __call__(self, step: int, loss: Tensor) -> None:
        if step > self.steps:
            return
        if step == 1:
            self.start = parameter_norms(self.groups)
        self.losses.append(float(loss))
        for key, norm in grad_norms(self.groups).items():
            self.norms.setdefault(key, []).append(norm)


def _role(group: str) -> str:
    return group.rsplit(".", 1)[-1]


def gradient_warnings(log: GradientLog) -> list[str]:
    """The faults the log shows (see the module docstring), one sentence each; empty when healthy."""
    out: list[str] = []
    for step, loss in enumerate(log.losses, 1):
        if not math.isfinite(loss):
            out.append(f"loss is {loss} at step {step}")
            break
    for key, norms in log.norms.items():
        role, start = _role(key), log.start.get(key)
        if role in ZERO_START and start:
            out.append(f"{key}: not zero at start (norm {start:.3g}); a new expert's {role} should start at 0")
        if role in NONZERO_START and start == 0:
            partner = "B" if role == "A" else "up"
            out.append(f"{key}: zero at start, so {partner} gets no gradient and neither moves")
        if all(n is None for n in norms):
            out.append(f"{key}: no gradient on any of {len(norms)} step(s) (frozen by mistake, or unreachable)")
            continue
        judged = norms[1:] if role in NONZERO_START else norms  # A's step-1 gradient is 0 while B = 0
        if judged and all(n == 0 for n in judged):
            out.append(f"{key}: gradient exactly zero on every recorded step")
        bad = next((s for s, n in enumerate(norms, 1) if n is not None and not math.isfinite(n)), None)
        if bad is not None:
            out.append(f"{key}: non-finite gradient norm ({norms[bad - 1]}) at step {bad}")
        earlier: list[float] = []
        for step, n in enumerate(norms, 1):
            if n is None or not math.isfinite(n):
                continue
            if earlier and n > EXPLODE_FACTOR * statistics.median(earlier):
                out.append(f"{key}: exploding gradient at step {step}: norm {n:.3g} > {EXPLODE_FACTOR:g} x the "
                           f"median {statistics.median(earlier):.3g} of the steps before")
                break
            if n > 0:
                earlier.append(n)
    return out


def lora_singular_values(A: Tensor, B: Tensor, scaling: float) -> Tensor:
    """Singular values (k,), descending, of ``dW = scaling * B A`` for A (r, I) and B (O, r), from the
    QRs of B and A^T (the r x r core ``scaling * R_B R_A^T``), in fp64; dW is not formed."""
    if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
        raise ValueError(f"A must be (r, I) and B (O, r) with the same r, got {tuple(A.shape)} and {tuple(B.shape)}")
    R_B = torch.linalg.qr(B.detach().double(), mode="r").R  # (min(O, r), r)
    R_A = torch.linalg.qr(A.detach().double().T, mode="r").R  # (min(I, r), r)
    return torch.linalg.svdvals(scaling * R_B @ R_A.T)  # (k,)


def rank_suggestion(A: Tensor, B: Tensor, scaling: float, energy: float = ENERGY) -> int:
    """The smallest rank k whose truncation of ``dW = scaling * B A`` keeps ``energy`` of
    ``||dW||_F^2 = sum_i sigma_i^2``: ``sum_{i<=k} sigma_i^2 >= energy * sum_i sigma_i^2``; 0 when dW = 0."""
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1], got {energy!r}")
    return _rank_of(lora_singular_values(A, B, scaling), energy)


def _rank_of(sigma: Tensor, energy: float) -> int:
    power = sigma.double().square()  # (k,)
    total = float(power.sum())
    if total == 0.0:
        return 0
    cum = power.cumsum(0) / total  # (k,)
    # the tolerance keeps an exact boundary (a constructed spectrum) from tipping on rounding
    return int((cum < energy - 1e-12).sum()) + 1


def rank_suggestions(model: AdaptBankModel, name: str, energy: float = ENERGY) -> dict[str, Any] | None:
    """Per LoRA layer of task ``name`` the suggested rank, and the overall one (the max over layers);
    None when the task has no LoRA experts."""
    loras = {f"{label}.{path}".lstrip("."): e for path, layer in model.layers_of(name).items()
             for label, e in expert_parts(layer.experts[name]) if isinstance(e, LoRAExpert)}  # type: ignore[arg-type]
    per_layer = {key: rank_suggestion(e.A, e.B, e.scaling, energy) for key, e in loras.items()}
    if not per_layer:
        return None
    ranks = [e.rank for e in loras.values()]
    return {"energy": energy, "rule": "max over layers", "rank": max(ranks), "overall": max(per_layer.values()),
            "per_layer": per_layer}


def _num(x: float | None) -> float | str | None:
    return x if x is None or math.isfinite(x) else str(x)  # JSON has no NaN or Inf


def diagnosis(log: GradientLog, ranks: dict[str, Any] | None = None) -> dict[str, Any]:
    """The log, its warnings and the rank suggestion as JSON-ready data (non-finite numbers as strings)."""
    return {"steps": len(log.losses), "losses": [_num(x) for x in log.losses],
            "groups": {k: {"start_norm": _num(log.start.get(k)), "grad_norms": [_num(n) for n in v]}
                       for k, v in log.norms.items()},
            "warnings": gradient_warnings(log), "rank_suggestion": ranks}


def _cell(x: float | str | None) -> str:
    return "-" if x is None else x if isinstance(x, str) else f"{x:.1e}"


def diagnose_report(diag: Mapping[str, Any]) -> str:
    """A :func:`diagnosis` for people: the gradient-norm table (rows: groups; columns: the parameter norm
    at start, then each step's gradient norm; ``-``: no gradient), the warnings and the rank suggestion."""
    groups: Mapping[str, Any] = diag["groups"]
    width = max([len("group"), *map(len, groups)])
    steps = diag["steps"]
    lines = [f"gradient norms over the first {steps} optimiser step(s) (before clipping)",
             f"{'group':<{width}}  {'|p| start':>9}  " + " ".join(f"{f'step {s}':>8}" for s in range(1, steps + 1))]
    for key, row in groups.items():
        lines.append(f"{key:<{width}}  {_cell(row['start_norm']):>9}  "
                     + " ".join(f"{_cell(n):>8}" for n in row["grad_norms"]))
    lines.append(f"{'loss':<{width}}  {'':>9}  " + " ".join(f"{_cell(x):>8}" for x in diag["losses"]))
    warnings = diag["warnings"]
    lines += [f"warning: {w}" for w in warnings] or ["no gradient warnings"]
    ranks = diag.get("rank_suggestion")
    if ranks:
        per = ", ".join(f"{p} {r}" for p, r in ranks["per_layer"].items())
        lines.append(f"rank suggestion ({ranks['energy']:.0%} of each update's energy): {ranks['overall']} "
                     f"({ranks['rule']}; trained with rank {ranks['rank']}); per layer: {per}")
    return "\n".join(lines)
