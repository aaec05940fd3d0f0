"""The probe head of the training defaults (issue 10): its L2 strength and its softened start."""

from __future__ import annotations

import pytest
import torch

from adaptbank.core.config import TrainConfig
from adaptbank.training.features import fit_probe


def _data(n: int = 120, d: int = 16, classes: int = 3, seed: int = 0) -> tuple[torch.Tensor, list[int]]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, d, generator=g) * 2
    y = [i % classes for i in range(n)]
    x = centres[y] + torch.randn(n, d, generator=g)  # (N, D)
    return x, y


@pytest.mark.parametrize("classes", [2, 3, 5])
def test_scale_multiplies_the_fitted_probe(classes):
    x, y = _data(classes=classes)
    W1, b1 = fit_probe(x, y, classes, c=0.1)
    Wh, bh = fit_probe(x, y, classes, c=0.1, scale=0.5)
    assert torch.equal(Wh, W1 * 0.5) and torch.equal(bh, b1 * 0.5)
    assert torch.equal((x @ Wh.T + bh).argmax(1), (x @ W1.T + b1).argmax(1))  # same predictions, softer logits


def test_smaller_c_regularises_harder():
    x, y = _data()
    norms = [float(fit_probe(x, y, 3, c=c)[0].norm()) for c in (10.0, 1.0, 0.1, 0.01)]
    assert norms == sorted(norms, reverse=True) and norms[-1] < 0.5 * norms[0]


def test_defaults_are_the_chosen_rule_and_bad_values_are_named():
    cfg = TrainConfig()
    assert (cfg.probe_init, cfg.probe_c, cfg.probe_scale) == (True, None, 0.5)
    for field, bad in (("probe_c", 0.0), ("probe_scale", -1.0), ("probe_c", float("nan"))):
        with pytest.raises(ValueError, match=field):
            TrainConfig(**{field: bad})
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_chosen_c_follows_the_held_out_loss():
    from adaptbank.training.features import choose_probe_c

    x, y = _data(n=400, d=64, classes=3)
    noisy = torch.randn(400, 64, generator=torch.Generator().manual_seed(5))  # (N, D): labels carry no signal
    assert choose_probe_c(noisy, y) == 0.01  # nothing to learn: the strongest regularisation fits best
    clean = x * 0 + torch.nn.functional.one_hot(torch.tensor(y), 64).float() * 3  # (N, D): separable
    assert choose_probe_c(clean, y) == 1.0  # a clean signal: the weakest regularisation
    assert choose_probe_c(x[:5], y[:5]) == 1.0  # too few examples to hold any out
    W, b = fit_probe(x, y, 3, c=None, scale=0.5)
    Wc, bc = fit_probe(x, y, 3, c=choose_probe_c(x, y), scale=0.5)
    assert torch.equal(W, Wc) and torch.equal(b, bc)


def test_few_shot_many_classes_fits_without_a_regression_warning():
    import warnings

    x, y = _data(n=60, d=16, classes=40)  # more classes than half the examples: clinc150 at 64 examples
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        W, b = fit_probe(x, y, 40, c=None)
    assert not [w for w in caught if "unique classes" in str(w.message)], [str(w.message) for w in caught]
    assert (x @ W.T + b).argmax(1).eq(torch.tensor(y)).float().mean() > 0.9  # still a real fit of 40 classes
