"""The continual baselines do what they are for, each shown against naive sequential training.

The setting: two synthetic binary tasks on the tiny random BERT of ``conftest.tiny_bert_dir``, fresh
heads (``probe_init = false``) and a high learning rate, in which seq-lora forgets the first task
badly. Every text holds one keyword of each task plus fillers (``"jazz coffee sunny oven van"``): task
``alpha`` is "sunny or snow?", task ``beta`` "jazz or techno?". Training one shared LoRA learner on
beta moves the features alpha's (now frozen) head reads, so alpha's accuracy falls towards chance.

Why not the built-in tasks or permuted labels: on the tiny random BERT the built-in tasks stay near
chance (weather 0.25-0.40 after 2-10 epochs at lr 2e-2..5e-2, measured), so there is nothing to
forget; and with one head per task a copy of task A with permuted labels is solved by the new head
alone on A's features, so it forces no forgetting. Two keyword tasks on the same texts are learned
to ~100% within a few epochs and compete for the same rank-4 learner.

Every run is deterministic: fixed seeds, CPU, one thread (the module fixture below; another thread
count may change the float summation order and so the low digits, one reason the margins are wide).
Measured on the development machine (torch CPU, 1 thread), ``R[i][j]`` = accuracy on task j after task i:

=============  ==========================  ======  ========================================
strategy       R                           BWT     note
=============  ==========================  ======  ========================================
seq-lora       [[1.00, .59], [0.44, .99]]  -0.56   alpha falls to chance (0.5)
ewc (1e11)     [[1.00, .59], [1.00, .97]]   0.00   default lambda 1e5: -0.56 (see EWC_LAMBDA)
replay         [[1.00, .59], [1.00, .99]]   0.00
olora (0.5)    [[1.00, .59], [1.00, .95]]   0.00   overlap 0.0033
olora (0)      [[1.00, .59], [0.46, 1.0]]  -0.54   overlap 163.7 (ratio 2e-5)
joint          [[1.00, 1.0], [1.00, 1.0]]   0.00
bank           [[1.00, .49], [1.00, 1.0]]   0.00   isolated experts, for joint's comparison
=============  ==========================  ======  ========================================

Measured identical with 2 threads. With seed 1
the setting is milder (seq-lora -0.21, O-LoRA lambda 0 -0.04) and EWC at 1e11 holds alpha but
learns beta to 0.61 only: the Fisher's scale moves with the seed, so the margins below hold for
seed 0, which is what the tests run.
``pytest -s`` prints these figures again (``test_report`` at the bottom).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from adaptbank import metrics
from adaptbank.continual.loop import run_sequence
from adaptbank.continual.runspec import run_spec_from_dict
from adaptbank.training.regularizers import OrthogonalityPenalty

# Five words per text: 7 tokens with [CLS]/[SEP]. 200 train rows, 5 epochs, batch 16: 65 steps per task.
TRAIN = {"epochs": 5, "max_train": 200, "max_test": 100, "max_length": 8, "lr": 2e-2, "head_lr": 2e-2,
         "probe_init": False}
ALPHA, BETA = ("sunny", "snow"), ("jazz", "techno")
FILLERS = ("window garden music coffee morning market ticket lamp kettle laptop office oven phone pizza rice "
           "street truck van water yoga").split()
# EWC: the empirical Fisher of a task fit to confident predictions is tiny, because the gradient of
# log p(y|x) vanishes as p(y|x) -> 1: after alpha (train loss ~0) its mean entry is ~1e-11, max ~1e-9.
# So the default lambda (1e5, calibrated on MiniLM after 1 epoch) has no effect here. Measured, seed 0:
# lambda      1e5    1e9    1e10   3e10   1e11   3e11   1e12   1e13
# BWT        -0.56  -0.55  -0.27  -0.02   0.00   0.00   0.00   0.00
# beta R[1][1] 0.99   0.99   0.99   0.99   0.97   0.94   0.78   0.44 (not learned)
# 1e11 is in the middle of the window [3e10, 3e11] where alpha is kept and beta is still learned.
EWC_LAMBDA = 1e11
RUNS = {"seq-lora": ("seq-lora", {}), "ewc": ("ewc", {"ewc_lambda": EWC_LAMBDA}), "replay": ("replay", {}),
        "olora": ("olora", {"olora_lambda": 0.5}), "olora-off": ("olora", {"olora_lambda": 0.0}),
        "joint": ("joint", {}), "bank": ("bank", {})}


def _write_task(folder: Path, name: str, keys: tuple[str, str], other: tuple[str, str], seed: int) -> Path:
    """A JSONL task whose label is which of ``keys`` a text holds; each text also holds one of ``other``."""
    rng = random.Random(seed)
    for split, n in (("train", 200), ("test", 100)):
        with open(folder / f"{name}-{split}.jsonl", "w", encoding="utf-8") as f:
            for k in range(n):
                y = k % 2
                words = [keys[y], rng.choice(other), *(rng.choice(FILLERS) for _ in range(3))]
                rng.shuffle(words)
                f.write(json.dumps({"text": " ".join(words), "label": y}) + "\n")
    spec = folder / f"{name}.toml"
    spec.write_text(f'name = "{name}"\ntype = "classification"\n[data]\ntrain = "{folder / (name + "-train.jsonl")}"\n'
                    f'test = "{folder / (name + "-test.jsonl")}"\nlabels = ["{keys[0]}", "{keys[1]}"]\n',
                    encoding="utf-8")
    return spec


@pytest.fixture(scope="module")
def runs(tiny_bert_dir: Path, tmp_path_factory) -> dict[str, tuple[Path, dict[str, Any]]]:
    """Every run of the table above, made once (one thread, as in test_continual.py)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        folder = tmp_path_factory.mktemp("conflict")
        tasks = [str(_write_task(folder, "alpha", ALPHA, BETA, 1)), str(_write_task(folder, "beta", BETA, ALPHA, 2))]
        out: dict[str, tuple[Path, dict[str, Any]]] = {}
        for key, (strategy, options) in RUNS.items():
            spec = run_spec_from_dict({
                "run": {"name": key, "backbone": str(tiny_bert_dir), "tasks": tasks, "strategy": strategy,
                        "seed": 0, "eval": ["oracle"]},
                "method": {"kind": "lora", "rank": 4, "alpha": 8}, "train": dict(TRAIN), "options": options})
            run_dir = tmp_path_factory.mktemp(f"run-{key}")
            out[key] = (run_dir, run_sequence(spec, run_dir, log=lambda _m: None))
        return out
    finally:
        torch.set_num_threads(before)


def _R(runs: dict[str, tuple[Path, dict[str, Any]]], key: str) -> list[list[float]]:
    return runs[key][1]["oracle"]["matrix"]


def _bwt(runs: dict[str, tuple[Path, dict[str, Any]]], key: str) -> float:
    return metrics.backward_transfer(_R(runs, key))


def _overlap(run_dir: Path) -> float:
    """``sum_layers ||A_beta A_alpha^T||_F^2`` of an O-LoRA checkpoint (the library's own definition)."""
    with safe_open(str(run_dir / "checkpoint" / "state.safetensors"), "pt") as f:
        A = {k: f.get_tensor(k) for k in f.keys() if k.endswith(".A")}
    layers = sorted({k.rsplit(".experts.", 1)[0] for k in A})
    pairs = [(A[f"{layer}.experts.beta.A"], A[f"{layer}.experts.alpha.A"]) for layer in layers]  # (r, I) each
    assert pairs, sorted(A)[:4]
    return OrthogonalityPenalty(pairs, [pairs[0][0]], 0.0, 0.0).overlap().item()


# Margins: seq-lora's BWT is -0.56 (alpha 1.00 -> 0.44), every remedy here measured 0.00. The
# assertions ask for much less than measured (BWT <= -0.30; a remedy closing >= half the gap), so a
# change of several test examples in either run still passes, while a remedy that does nothing fails
# by a wide margin: EWC with lambda <= 1e9 (-0.55), O-LoRA without its penalty (-0.54, tested below).
def test_seq_lora_forgets_badly(runs) -> None:
    R = _R(runs, "seq-lora")
    assert R[0][0] >= 0.95 and R[1][1] >= 0.95, R  # both tasks are learned...
    assert R[1][0] <= 0.70, R  # ...and alpha falls towards chance (0.5) once beta is learned
    assert _bwt(runs, "seq-lora") <= -0.30 and metrics.forgetting(R) >= 0.30, R


@pytest.mark.parametrize("remedy", ["ewc", "replay", "olora"])
def test_remedy_forgets_at_most_half_as_much_as_seq_lora(runs, remedy: str) -> None:
    naive, fixed = _bwt(runs, "seq-lora"), _bwt(runs, remedy)
    assert fixed - naive >= 0.5 * -naive, (remedy, _R(runs, remedy), _R(runs, "seq-lora"))
    assert metrics.forgetting(_R(runs, remedy)) <= 0.5 * metrics.forgetting(_R(runs, "seq-lora"))
    # Not by refusing to learn: the second task is still learned (measured 0.95-0.99; seq-lora 0.99).
    assert _R(runs, remedy)[1][1] >= 0.85, _R(runs, remedy)


def test_olora_without_its_penalty_forgets_like_seq_lora(runs) -> None:
    """All O-LoRA experts are on at inference, so beta's new expert moves alpha's features too: it is
    the orthogonality term, not the separate experts, that keeps alpha (measured BWT -0.54 at
    lambda_1 = 0 against 0.00 at 0.5)."""
    assert _bwt(runs, "olora-off") <= -0.30, _R(runs, "olora-off")


def test_olora_penalty_makes_the_subspaces_orthogonal(runs) -> None:
    """``sum ||A_beta A_alpha^T||_F^2`` after beta, with lambda_1 = 0.5 against lambda_1 = 0 (same seed,
    so the same initial A_beta): the penalty is what shrinks it. Measured 0.0033 against 163.7 (ratio
    2e-5); the assertion asks for < 0.5x."""
    on, off = _overlap(runs["olora"][0]), _overlap(runs["olora-off"][0])
    assert off > 0 and on < 0.5 * off, (on, off)


def test_joint_matches_each_isolated_expert(runs) -> None:
    """Joint's final accuracy on each task against the bank's accuracy on it right after learning it.

    The bank's expert for task j is an isolated expert: trained on task j alone, with the same
    settings, seed and fresh head, and never touched again, so ``R_bank[j][j]`` is what a single-task
    learner reaches. Joint trains one learner on both tasks together for the same epochs, so it
    should match that on every task (no interference to hide behind); a tolerance of 0.03 allows
    three test examples of the 100. Measured: joint 1.00 / 1.00, bank 1.00 / 1.00, seq-lora's
    right-after-learning 1.00 / 0.99; a joint that trains one task only or leaves a head untrained
    sits at chance (0.5) on the other."""
    joint, bank = _R(runs, "joint"), _R(runs, "bank")
    for j in range(2):
        assert joint[-1][j] >= bank[j][j] - 0.03, (j, joint, bank)
        assert joint[-1][j] >= _R(runs, "seq-lora")[j][j] - 0.03, (j, joint)


def test_report(runs) -> None:
    """Prints the measured figures (``pytest -s``) and checks the matrices are complete."""
    for key in RUNS:
        R = _R(runs, key)
        assert len(R) == 2 and all(len(r) == 2 for r in R), (key, R)
        print(f"{key:10s} R={[[round(x, 3) for x in r] for r in R]} BWT={metrics.backward_transfer(R):+.3f} "
              f"F={metrics.forgetting(R):+.3f}")
    on, off = _overlap(runs["olora"][0]), _overlap(runs["olora-off"][0])
    print(f"olora overlap after beta: lambda 0.5 {on:.4g}, lambda 0 {off:.4g}, ratio {on / off:.3g}")
