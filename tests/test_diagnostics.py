"""Gradient diagnostics and the LoRA rank suggestion: norms against torch's own, each warning on a model
built to have its fault (and none on healthy tasks), the QR route against a dense SVD, and the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner
from conftest import tiny_backbone

from adaptbank.cli.main import main
from adaptbank.core.config import AdapterConfig, LoRAConfig, ParallelAdapterConfig, TrainConfig
from adaptbank.core.experts import LoRAExpert
from adaptbank.core.model import AdaptBankModel
from adaptbank.data.tokens import tokenize
from adaptbank.training.diagnostics import (
    GradientLog,
    diagnose_report,
    diagnosis,
    gradient_warnings,
    lora_singular_values,
    parameter_groups,
    rank_suggestion,
    rank_suggestions,
)
from adaptbank.training.features import task_features
from adaptbank.training.loop import (
    Row,
    Step,
    TrainingError,
    epoch_batches,
    fit,
    task_loss,
    total_steps,
    train_task,
)

TEXTS = ["w1 w2 w3", "w4 w5", "w6 w7 w8 w9", "w10 w11"] * 8
LABELS = [0, 1, 0, 1] * 8


class _WordIds:
    """A whitespace tokenizer over ids 1..119 (the tiny models' vocabulary), enough for the loop."""

    pad_token_id = 0

    def __call__(self, texts, truncation=True, max_length=None, **_):
        return {"input_ids": [[1 + sum(map(ord, w)) % 119 for w in t.split()][:max_length] for t in texts]}


def _model(method=None, family: str = "bert") -> AdaptBankModel:
    model = AdaptBankModel(tiny_backbone(family))
    model.tokenizer = _WordIds()
    model.add_task("t", method or LoRAConfig(rank=4), ["a", "b"], seed=0)
    return model


def _loras(model: AdaptBankModel) -> dict[str, LoRAExpert]:
    return {p: layer.experts["t"] for p, layer in model.layers_of("t").items()}


def _fit(model: AdaptBankModel, callback, *, cfg: TrainConfig | None = None, loss_terms=(), features=None,
         skip: tuple[torch.nn.Parameter, ...] = ()):
    """``fit`` on task t as ``train_task`` sets it up (no probe head), leaving ``skip`` out of the optimiser."""
    cfg = cfg or TrainConfig(epochs=2, batch_size=4, seed=3)  # 16 steps
    rows = [Row(x, y, "t") for x, y in zip(tokenize(model.tokenizer, TEXTS, 16), LABELS)]
    kept = [p for p in model.expert_parameters("t") if all(p is not s for s in skip)]
    groups = [{"params": kept, "lr": cfg.lr, "name": "expert"},
              {"params": list(model.heads["t"].parameters()), "lr": cfg.head_lr, "name": "head"}]
    return fit(model, epoch_batches(rows, cfg, cfg.seed), steps=total_steps(len(rows), cfg), groups=groups, cfg=cfg,
               features=features or task_features(model, "t"), seed=cfg.seed, what="task 't'",
               loss_terms=loss_terms, after_backward=callback)


# --------------------------------------------------------------------------------------------- norms
@pytest.mark.parametrize("family, method", [("bert", LoRAConfig(rank=4)), ("gpt2", LoRAConfig(rank=2)),
                                            ("bert", AdapterConfig(bottleneck=4)),
                                            ("llama", ParallelAdapterConfig(bottleneck=4))])
def test_recorded_norms_equal_torchs_gradient_norms_on_the_same_step(family, method):
    model = _model(method, family)
    groups = parameter_groups(model, "t")
    assert set(groups) == {f"{p}.{r}" for p in model.layers_of("t")
                           for r in (("A", "B") if isinstance(method, LoRAConfig) else ("down", "up"))} | {"head"}
    start = {k: torch.linalg.vector_norm(torch.cat([p.detach().flatten() for p in ps])).item()
             for k, ps in groups.items()}
    log = GradientLog(groups, steps=5)
    torchs: list[dict[str, float | None]] = []

    def both(step: int, loss: torch.Tensor) -> None:
        log(step, loss)
        torchs.append({k: torch.nn.utils.get_total_norm([p.grad for p in ps]).item()
                       if all(p.grad is not None for p in ps) else None for k, ps in groups.items()})

    # a tiny clip: the recorded norms are the raw ones, read before clipping and the update
    result = _fit(model, both, cfg=TrainConfig(epochs=1, batch_size=4, seed=3, grad_clip=1e-4))
    assert result.steps == 8 and len(log.losses) == 5 and log.losses == result.losses[:5]
    for step in range(5):
        for k in groups:
            ours, theirs = log.norms[k][step], torchs[step][k]
            assert theirs is not None and ours == pytest.approx(theirs, rel=1e-5, abs=1e-12), (k, step)
    assert log.start == pytest.approx(start, rel=1e-6)
    assert max(log.norms["head"]) > 1e-4  # not clipped
    if isinstance(method, LoRAConfig):  # B = 0 on step 1: A's gradient is exactly zero, B's is not
        assert all(log.norms[k][0] == 0 for k in groups if k.endswith(".A"))
        assert all(log.norms[k][0] > 0 for k in groups if k.endswith(".B"))


# --------------------------------------------------------------------------------------------- warnings
@pytest.mark.parametrize("method", [LoRAConfig(rank=4), AdapterConfig(bottleneck=4), ParallelAdapterConfig(bottleneck=4)])
def test_a_healthy_task_raises_no_warning(method):
    model = _model(method)
    result = train_task(model, "t", TEXTS, LABELS, TrainConfig(epochs=2, batch_size=4, seed=3), diagnose=10)
    diag = result.diagnostics
    assert diag is not None and diag["steps"] == 10 and diag["warnings"] == []
    assert all(len(row["grad_norms"]) == 10 for row in diag["groups"].values())
    assert "no gradient warnings" in diagnose_report(diag)
    if isinstance(method, LoRAConfig):
        assert diag["rank_suggestion"] == rank_suggestions(model, "t")
        assert 1 <= diag["rank_suggestion"]["overall"] <= 4
    else:
        assert diag["rank_suggestion"] is None


def _b_nonzero(model):
    with torch.no_grad():
        for e in _loras(model).values():
            e.B.normal_(0, 0.1)
    return {}


def _a_zero(model):
    with torch.no_grad():
        for e in _loras(model).values():
            e.A.zero_()
    return {}


def _frozen(model):
    path, expert = next(iter(_loras(model).items()))
    return {"skip": (expert.B,)}


def _nan_loss(model):
    return {"loss_terms": [lambda s: s.pooled.new_tensor(math.nan if s.step == 3 else 0.0)]}


def _nan_input(model):
    plain, calls = task_features(model, "t"), []

    def features(batch):
        calls.append(1)
        pooled = plain(batch)  # (B, D)
        return pooled + torch.nan if len(calls) == 3 else pooled  # NaN in the head's input on step 3

    return {"features": features}


def _exploding(model):
    def scaled(s: Step) -> torch.Tensor:  # from step 6 on, the loss is scaled by 1 + 1e5
        return task_loss(s.model, s.rows, s.pooled) * (1e5 if s.step >= 6 else 0.0)

    return {"loss_terms": [scaled]}


FAULTS = [  # (id, make the fault, the warning it must raise, does training stop?)
    ("B not zero at start", _b_nonzero, r"\.B: not zero at start", False),
    ("A zero at start", _a_zero, r"\.A: zero at start, so B gets no gradient", False),
    ("A zero: B never moves", _a_zero, r"\.B: gradient exactly zero on every recorded step", False),
    ("a frozen group", _frozen, r"query\.B: no gradient on any of 10 step\(s\)", False),
    ("NaN loss", _nan_loss, r"^loss is nan at step 3$", True),
    ("NaN input", _nan_input, r"head: non-finite gradient norm \(nan\) at step 3", True),
    ("exploding", _exploding, r"head: exploding gradient at step 6", False),
]


@pytest.mark.parametrize("fault, expected, stops", [f[1:] for f in FAULTS], ids=[f[0] for f in FAULTS])
def test_each_warning_fires_on_a_model_built_to_have_that_fault(fault, expected, stops):
    import re

    model = _model(LoRAConfig(rank=4))
    kw = fault(model)
    log = GradientLog(parameter_groups(model, "t"), steps=10)
    if stops:
        with pytest.raises(TrainingError, match="at step 3"):
            _fit(model, log, **kw)
    else:
        _fit(model, log, **kw)
    warnings = gradient_warnings(log)
    assert any(re.search(expected, w) for w in warnings), warnings
    json.dumps(diagnosis(log), allow_nan=False)  # JSON-ready: non-finite numbers become strings
    assert diagnosis(log)["warnings"] == warnings and all(f"warning: {w}" in diagnose_report(diagnosis(log))
                                                          for w in warnings)


def test_a_training_fault_carries_the_report():
    model = _model()
    with pytest.raises(TrainingError) as err:
        train_task(model, "t", TEXTS, LABELS, TrainConfig(epochs=1, batch_size=4, seed=3), diagnose=10,
                   loss_terms=[lambda s: s.pooled.new_tensor(math.nan if s.step == 2 else 0.0)])
    text = str(err.value)
    assert "loss became nan at step 2" in text and "gradient norms over the first 2 optimiser step(s)" in text
    assert "warning: loss is nan at step 2" in text


# --------------------------------------------------------------------------------------------- rank suggestion
def _dense_rank(A: torch.Tensor, B: torch.Tensor, s: float, energy: float) -> int:
    """The same rule on the dense update's singular values (the tolerance of rank_suggestion's rule)."""
    sigma = torch.linalg.svdvals(s * B.double() @ A.double())  # (min(O, I),)
    power = sigma.square()
    if power.sum() == 0:
        return 0
    cum = power.cumsum(0) / power.sum()
    return next(k + 1 for k, c in enumerate(cum.tolist()) if c >= energy - 1e-12)


def _deficient(O: int, I: int, r: int, true_rank: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A (r, I) and B (O, r) whose product has rank ``true_rank`` < r (B's columns span true_rank dims)."""
    B = torch.randn(O, true_rank, generator=g) @ torch.randn(true_rank, r, generator=g)  # (O, r)
    return torch.randn(r, I, generator=g), B


SHAPES = [(8, 6, 3), (5, 7, 4), (3, 10, 5), (10, 3, 6), (16, 16, 8), (32, 12, 1)]


@pytest.mark.parametrize("O, I, r", SHAPES)
@pytest.mark.parametrize("energy", [0.5, 0.9, 0.99])
def test_rank_suggestion_equals_the_dense_svd_answer(O, I, r, energy):
    g = torch.Generator().manual_seed(O * 100 + I * 10 + r)
    cases = [(torch.randn(r, I, generator=g), torch.randn(O, r, generator=g)),  # full rank min(O, I, r)
             (torch.randn(r, I, generator=g) * torch.logspace(0, -3, r)[:, None], torch.randn(O, r, generator=g))]
    if r > 1:
        cases.append(_deficient(O, I, r, r // 2 or 1, g))
        A, B = torch.randn(r, I, generator=g), torch.randn(O, r, generator=g)
        A[0] = 0  # a zero row of A: rank r - 1 at most
        cases.append((A, B))
    for A, B in cases:
        s = 0.37
        assert rank_suggestion(A, B, s, energy) == _dense_rank(A, B, s, energy)
        ours = lora_singular_values(A, B, s)  # (k,)
        dense = torch.linalg.svdvals(s * B.double() @ A.double())  # (min(O, I),)
        assert torch.allclose(ours, dense[: len(ours)], rtol=1e-9, atol=1e-9)
        assert torch.all(dense[len(ours):] < 1e-9)  # the rest is rounding


@pytest.mark.parametrize("energy, expected", [(0.5, 1), (0.75, 1), (0.76, 2), (0.9, 2), (0.95, 3),
                                              (0.99, 4), (1.0, 5)])
def test_an_update_with_known_singular_values_gets_the_known_rank(energy, expected):
    """sigma = 4, 2, 1, 0.5, 0.25: energies 16, 4, 1, .25, .0625 of 21.3125, cumulative shares
    .751, .938, .985, .997, 1: 90% needs 2, 95% needs 3, 99% needs 4. The factors are not orthogonal:
    B = U diag(sigma) M^-1 / s and A = M V^T for a random invertible M."""
    g = torch.Generator().manual_seed(0)
    sigma = torch.tensor([4.0, 2.0, 1.0, 0.5, 0.25], dtype=torch.float64)
    U = torch.linalg.qr(torch.randn(12, 5, generator=g, dtype=torch.float64)).Q  # (O, r)
    V = torch.linalg.qr(torch.randn(9, 5, generator=g, dtype=torch.float64)).Q  # (I, r)
    M = torch.randn(5, 5, generator=g, dtype=torch.float64) + 3 * torch.eye(5, dtype=torch.float64)  # (r, r)
    s = 2.0
    B = U @ torch.diag(sigma) @ torch.linalg.inv(M) / s  # (O, r)
    A = M @ V.T  # (r, I)
    assert torch.allclose(lora_singular_values(A, B, s), sigma, atol=1e-12)
    assert rank_suggestion(A, B, s, energy) == expected


def test_a_zero_update_suggests_rank_zero_and_bad_arguments_are_named():
    assert rank_suggestion(torch.randn(4, 6), torch.zeros(5, 4), 2.0) == 0
    with pytest.raises(ValueError, match=r"energy must be in \(0, 1\], got 1.5"):
        rank_suggestion(torch.randn(4, 6), torch.randn(5, 4), 1.0, energy=1.5)
    with pytest.raises(ValueError, match="same r"):
        rank_suggestion(torch.randn(4, 6), torch.randn(5, 3), 1.0)
    with pytest.raises(ValueError, match="positive integer, got 0"):
        GradientLog({}, steps=0)


def test_the_overall_suggestion_is_the_max_over_layers():
    model = _model(LoRAConfig(rank=4))
    with torch.no_grad():
        for i, e in enumerate(_loras(model).values()):  # layer i gets a rank-(i+1) update
            e.B.zero_()
            e.B[:, : i + 1] = torch.randn(e.B.shape[0], i + 1)
    ranks = rank_suggestions(model, "t", energy=1.0)
    assert ranks is not None and list(ranks["per_layer"].values()) == [1, 2, 3, 4]
    assert ranks["overall"] == 4 and ranks["rank"] == 4 and ranks["rule"] == "max over layers"


# --------------------------------------------------------------------------------------------- CLI
def test_cli_add_task_diagnose_prints_stores_and_shows_the_suggestion(tiny_bert_dir, tmp_path):
    from adaptbank.bank.facade import AdapterBank

    r = CliRunner()
    bank = str(tmp_path / "bank")
    fast = ["--epochs", "1", "--max-train", "80", "--max-test", "40", "--max-length", "32"]
    assert r.invoke(main, ["init", bank, "--base", str(tiny_bert_dir)]).exit_code == 0
    res = r.invoke(main, ["add-task", bank, "weather", "--rank", "4", "--diagnose", *fast])
    assert res.exit_code == 0, res.output
    assert "gradient norms over the first" in res.stderr
    assert "rank suggestion (90% of each update's energy)" in res.stderr and "added weather" in res.stdout
    assert "gradient norms" not in res.stdout
    stored = json.loads(r.invoke(main, ["show", bank, "weather", "--json"]).stdout)["metrics"]["diagnostics"]
    suggestion = stored["rank_suggestion"]
    assert suggestion["rank"] == 4 and 1 <= suggestion["overall"] <= 4 and stored["warnings"] == []
    steps = json.loads(r.invoke(main, ["show", bank, "weather", "--json"]).stdout)["metrics"]["steps"]
    assert stored["steps"] == min(10, steps) and f"first {stored['steps']} optimiser step(s)" in res.stderr
    model = AdapterBank.open(bank).load(["weather"])  # the stored experts give the stored suggestion
    assert rank_suggestions(model, "weather") == suggestion
    shown = r.invoke(main, ["show", bank, "weather"])
    assert shown.exit_code == 0 and f"rank suggestion (90% of each update's energy): {suggestion['overall']}" \
        in shown.stdout and '"grad_norms"' not in shown.stdout

    res = r.invoke(main, ["add-task", bank, "topic", "--rank", "2", "--diagnose", "--json", *fast])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["diagnostics"]["rank_suggestion"]["rank"] == 2
    assert summary["diagnostics"] == json.loads(r.invoke(main, ["show", bank, "topic", "--json"]).stdout)[
        "metrics"]["diagnostics"]
    assert "gradient norms" not in res.stderr
    plain = json.loads(r.invoke(main, ["add-task", bank, "intent", "--json", *fast]).stdout)
    assert "diagnostics" not in plain
