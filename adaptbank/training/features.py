"""Features for probes and routers: one batched no-grad pass, and the linear probe that starts a head.

Letters in shape comments: B batch, T tokens, D hidden size, F router features, C classes, N examples.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from adaptbank.core.frozen_start import CachedStates
from adaptbank.core.heads import ClassificationHead
from adaptbank.core.model import AdaptBankModel
from adaptbank.core.pooling import pool
from adaptbank.data.tokens import batches, collate, pad_id
from adaptbank.routing.pools import feature_dim, router_features

__all__ = ["device_of", "task_features", "encode", "frozen_pass", "frozen_pass_states", "fit_probe", "probe_head",
           "choose_probe_c", "PROBE_CS"]


def device_of(model: AdaptBankModel) -> torch.device:
    return next(model.backbone.parameters()).device


def task_features(model: AdaptBankModel, task: str | None) -> Callable[[dict[str, Tensor]], Tensor]:
    """``features(batch) -> (B, D)`` with task ``task``'s expert on every row (None: no experts)."""

    def features(batch: dict[str, Tensor]) -> Tensor:
        model.route(task=task)
        return model.features(**batch)  # (B, D)

    return features


def _map(model: AdaptBankModel, ids: Sequence[list[int]], fn: Callable[[dict[str, Tensor]], Tensor], dim: int,
         batch_size: int) -> Tensor:
    """``fn`` over length-sorted batches of ``ids`` in eval mode, rows put back in order: (N, dim)."""
    return _map_chunks(model, ids, lambda batch, _chunk: fn(batch), dim, batch_size)


@torch.no_grad()
def _map_chunks(model: AdaptBankModel, ids: Sequence[list[int]],
                fn: Callable[[dict[str, Tensor], list[int]], Tensor], dim: int, batch_size: int) -> Tensor:
    """:func:`_map` where ``fn`` also gets the batch's row indices into ``ids``."""
    was_training = model.training
    model.eval()
    out = torch.empty(len(ids), dim)  # (N, dim)
    for chunk in batches(ids, batch_size, shuffle=False):
        batch = collate([ids[i] for i in chunk], pad_id(model.tokenizer), device_of(model))
        out[chunk] = fn(batch, chunk).float().cpu()  # (B, dim)
    model.train(was_training)
    return out


def encode(model: AdaptBankModel, ids: Sequence[list[int]],
           features: Callable[[dict[str, Tensor]], Tensor] | None = None, *, batch_size: int = 32) -> Tensor:
    """Pooled features (N, D) of ``ids`` under the gates ``features`` sets (default: no experts)."""
    return _map(model, ids, features or task_features(model, None), model.hidden_size, batch_size)


def frozen_pass(model: AdaptBankModel, ids: Sequence[list[int]], *, router_layers: int,
                pools: Sequence[str] = ("mean",), batch_size: int = 32) -> tuple[Tensor, Tensor]:
    """One pass of the frozen backbone: pooled features (N, D) for the probe head, and router
    features (N, F): the ``pools`` (``routing.pools``; masked mean-pools by default) of the embeddings
    and layers 0 .. L-1, layer-major, as the router taps compute them in the routed forward."""
    pooled, router, _ = frozen_pass_states(model, ids, router_layers=router_layers, pools=pools, batch_size=batch_size)
    return pooled, router


def frozen_pass_states(model: AdaptBankModel, ids: Sequence[list[int]], *, router_layers: int,
                       pools: Sequence[str] = ("mean",), capture: int | None = None,
                       batch_size: int = 32) -> tuple[Tensor, Tensor, CachedStates | None]:
    """:func:`frozen_pass`, keeping as well, with ``capture = L``, each row's hidden states (T_i, D) entering
    layer L (the output of layer L-1), for training on cached frozen layers (``core.frozen_start``)."""
    D = model.hidden_size
    F = feature_dim(router_layers, D, pools)
    states: list[Tensor] = [torch.empty(0)] * len(ids)

    def both(batch: dict[str, Tensor], chunk: list[int]) -> Tensor:
        model.route()
        out = model.encoder(**batch, output_hidden_states=True)
        mask = batch["attention_mask"]
        if capture is not None:
            h = out.hidden_states[capture]  # (B, T, D)
            for b, i in enumerate(chunk):  # a copy per row: a view would keep the whole batch alive
                states[i] = h[b, : len(ids[i])].float().cpu().clone()  # (T_i, D)
        router = router_features(out.hidden_states[: router_layers + 1], mask, pools)  # (B, F)
        return torch.cat([pool(out.last_hidden_state, mask, model.pooling), router], -1)  # (B, D + F)

    joined = _map_chunks(model, ids, both, D + F, batch_size)  # (N, D + F)
    return joined[:, :D], joined[:, D:], CachedStates(capture, states) if capture is not None else None


PROBE_TOL = 1e-8
"""Stopping tolerance of the probe's logistic regression (scikit-learn's default is 1e-4)."""
PROBE_CS: tuple[float, ...] = (0.01, 0.1, 1.0)
"""The L2 strengths (scikit-learn's C) that :func:`choose_probe_c` chooses from."""


def _fit_quietly(clf: Any, x: Any, y: Any) -> Any:
    """``clf.fit(x, y)`` without scikit-learn's "more unique classes than 50% of the samples ... could
    represent a regression problem" warning: the labels are class indices by construction (a few-shot
    task with many classes, clinc150 at 64 examples, is still classification), so it only alarms users."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The number of unique classes is greater than 50%",
                                category=UserWarning)
        return clf.fit(x, y)


def choose_probe_c(features: Tensor, labels: Sequence[int], *, seed: int = 0, cs: Sequence[float] = PROBE_CS,
                   holdout: float = 0.25) -> float:
    """The C of ``cs`` whose probe, fitted on a random ``1 - holdout`` of the examples (drawn with
    ``seed``), has the lowest log-loss on the rest (counting held-out examples of classes seen in the
    fit). Log-loss rather than accuracy: the probe becomes a head whose logits set the first gradients,
    so its calibration matters, and log-loss rarely ties. With fewer than 8 examples, the largest C."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    y = np.asarray(list(labels))
    if len(y) < 8 or len(set(y.tolist())) < 2:
        return float(max(cs))
    order = np.random.default_rng(seed).permutation(len(y))
    n_out = max(1, int(round(holdout * len(y))))
    out, fit = order[:n_out], order[n_out:]
    if len(set(y[fit].tolist())) < 2:
        return float(max(cs))
    x = features.double().numpy()  # float64: the solver's path must not hinge on float32 rounding
    best, best_loss = float(max(cs)), float("inf")
    for c in sorted(cs):
        clf = _fit_quietly(LogisticRegression(max_iter=2000, C=c, random_state=seed), x[fit], y[fit])
        seen = np.isin(y[out], clf.classes_)
        if not seen.any():
            return float(max(cs))
        proba = clf.predict_proba(x[out][seen])  # (n, C')
        col = np.searchsorted(clf.classes_, y[out][seen])
        loss = float(-np.log(np.clip(proba[np.arange(len(col)), col], 1e-12, None)).mean())
        if loss < best_loss:
            best, best_loss = float(c), loss
    return best


def fit_probe(features: Tensor, labels: Sequence[int], n_classes: int, *, seed: int = 0, c: float | None = 1.0,
              scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """A multinomial logistic regression (scikit-learn, L2 with inverse strength ``c``; None: chosen by
    :func:`choose_probe_c`) as head weights (C, D) and bias (C,), both multiplied by ``scale``. Classes
    absent from ``labels`` get zero weights and a very low bias."""
    from sklearn.linear_model import LogisticRegression

    y = list(labels)
    present = sorted(set(y))
    W = torch.zeros(n_classes, features.shape[1])  # (C, D)
    b = torch.full((n_classes,), -10.0)  # (C,)
    if len(present) < 2:
        b[present] = 0.0
        return W, b
    if c is None:
        c = choose_probe_c(features, y, seed=seed)
    # float64 and a tight tolerance: the probe is the optimum of a strictly convex problem, found to 1e-8, so
    # features that differ by float noise (a sharded pass: 2e-7) give heads that differ by about as much,
    # not by the 1e-3 that lbfgs' default stopping point left (it depends on the path to the optimum)
    clf = _fit_quietly(LogisticRegression(max_iter=2000, C=c, random_state=seed, tol=PROBE_TOL),
                       features.double().numpy(), y)
    coef = torch.as_tensor(clf.coef_, dtype=torch.float32)  # (C', D) or (1, D) for two classes
    bias = torch.as_tensor(clf.intercept_, dtype=torch.float32)
    if len(present) == 2:  # sklearn keeps one row for two classes: split it symmetrically
        coef, bias = torch.cat([-coef / 2, coef / 2]), torch.cat([-bias / 2, bias / 2])
    W[present], b[present] = coef * scale, bias * scale
    return W, b


def probe_head(head: ClassificationHead, feats: Tensor, labels: Sequence[int], *, seed: int, c: float | None = 1.0,
               scale: float = 1.0) -> None:
    """Initialise ``head`` as a logistic-regression probe on ``feats`` (N, D) (LP-FT, see ``training.loop``)."""
    W, b = fit_probe(feats, labels, head.linear.out_features, seed=seed, c=c, scale=scale)  # (C, D), (C,)
    with torch.no_grad():
        head.linear.weight.copy_(W)
        head.linear.bias.copy_(b)
