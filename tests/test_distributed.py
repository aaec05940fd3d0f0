"""Data-parallel add-task under torch.distributed (gloo on CPU, launched with torchrun like a user would):
two processes store the expert, head and router statistics of one process with the same global batch
and seed; a rank that fails stops every rank and leaves the bank as it was; gradient accumulation
equals the larger batch; and the sharding arithmetic behind it.

Measured differences (float additions in another order: shards padded to their own widths, gradients
summed across ranks): two processes vs one, max abs diff about 3e-8 on the adapter and 1.5e-8 on the
head (values up to 0.2 and 0.8), 3e-11 on the router memory; --grad-accum 2 at batch 8 vs batch 16,
2.6e-8 on the adapter and 4e-9 on the head. The tolerance is TOL = 1e-5 abs, against 1.6e-3 (adapter)
and 5.9e-3 (head) between runs that really differ (batch 8 vs batch 16).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from conftest import REPO, tree_digest

from adaptbank.bank.facade import AdapterBank
from adaptbank.cli.main import main
from adaptbank.continual.loop import run_sequence
from adaptbank.continual.runspec import load_run_spec
from adaptbank.core.config import LoRAConfig, TrainConfig
from adaptbank.report.build import load_run
from adaptbank.training import distributed
from adaptbank.training.distributed import LOCAL, Dist

TOL = 1e-5
"""Max abs difference allowed between stored tensors of runs that differ only in float order."""

ARGS = ["--epochs", "1", "--max-train", "48", "--max-test", "16", "--max-length", "32", "--batch-size", "8",
        "--rank", "4", "--dropout", "0", "--no-train-dropout"]
"""add-task flags of the comparisons: dropout off, so runs differ in float order only."""


def _torchrun(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """Two gloo processes on this machine, as a user launches them (a bounded wait: no hang)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), ADAPTBANK_DIST_TIMEOUT="60",
               OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def _init(path: Path, base: Path) -> Path:
    res = CliRunner().invoke(main, ["init", str(path), "--base", str(base)])
    assert res.exit_code == 0, res.output
    return path


def test_two_processes_store_what_one_process_stores(tiny_bert_dir, tmp_path):
    one, two = _init(tmp_path / "one", tiny_bert_dir), _init(tmp_path / "two", tiny_bert_dir)
    res = CliRunner().invoke(main, ["add-task", str(one), "weather", *ARGS, "--json"])
    assert res.exit_code == 0, res.output
    out = _torchrun("-m", "adaptbank.cli", "add-task", str(two), "weather", *ARGS, "--json")
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count('"task"') == 1  # rank 0 alone reports
    summary = json.loads(out.stdout)
    a, b = AdapterBank.open(one), AdapterBank.open(two)
    assert b.tasks() == ["weather"] and not [p for p in b.verify() if p.is_error]
    for stem in ("adapter", "head"):
        assert _diff(a.store.read_tensors("weather", stem), b.store.read_tensors("weather", stem)) <= TOL, stem
    ma, mb = a.store.read_tensors("weather", "memory"), b.store.read_tensors("weather", "memory")
    assert torch.equal(ma["count"], mb["count"]) and torch.equal(ma["scatter_rank"], mb["scatter_rank"])
    assert _diff(ma, mb) <= TOL  # the task's router memory (mean, packed scatter factor) from gathered features
    (ra, meta_a), (rb, meta_b) = a.store.read_router(), b.store.read_router()  # type: ignore[misc]
    assert meta_a["expert_order"] == meta_b["expert_order"] == ["weather"]
    for key in ra["stats"]:
        ref = ra["stats"][key].double()
        assert float((ref - rb["stats"][key].double()).abs().max()) <= TOL * max(1.0, float(ref.abs().max())), key
    ia, ib = a.info("weather")["metrics"], b.info("weather")["metrics"]
    assert ib["processes"] == 2 and ia["processes"] == 1
    assert ib["steps"] == ia["steps"] and ib["test_accuracy"] == ia["test_accuracy"] == summary["test_accuracy"]
    assert ib["probe_accuracy"] == ia["probe_accuracy"] and abs(ib["final_loss"] - ia["final_loss"]) <= TOL


def test_a_rank_failing_mid_training_stops_every_rank_and_leaves_the_bank_unchanged(tiny_bert_dir, tmp_path):
    bank = _init(tmp_path / "bank", tiny_bert_dir)
    before = tree_digest(bank)
    reports = tmp_path / "reports"
    reports.mkdir()
    out = _torchrun(str(REPO / "tests" / "_dist_worker.py"), str(bank), str(reports), "1", "2")
    assert out.returncode != 0
    assert (reports / "rank1.txt").read_text() == "RuntimeError: simulated fault on rank 1 at step 2"
    assert (reports / "rank0.txt").read_text().startswith(
        "RankFailure: task 'weather', step 2: rank(s) 1 of 2 failed")  # rank 0 stopped at the same step
    assert "exitcode  : 1" in out.stderr and "rank      : 0" in out.stderr and "rank      : 1" in out.stderr
    assert tree_digest(bank) == before and AdapterBank.open(bank).tasks() == []


def test_a_rank_that_dies_outright_does_not_leave_the_other_waiting(tiny_bert_dir, tmp_path):
    """No launcher to stop the survivor (two plain processes with the variables torchrun would set, as
    under a batch scheduler): rank 1 ends with os._exit at step 2; rank 0 must fail by itself, bounded
    by the process group (gloo sees the closed connection; ADAPTBANK_DIST_TIMEOUT bounds a silent peer)."""
    import socket

    bank = _init(tmp_path / "bank", tiny_bert_dir)
    before = tree_digest(bank)
    reports = tmp_path / "reports"
    reports.mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), ADAPTBANK_DIST_TIMEOUT="60", OMP_NUM_THREADS="1",
               WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    procs = [subprocess.Popen([sys.executable, str(REPO / "tests" / "_dist_worker.py"), str(bank), str(reports), "1",
                               "2", "die"], env=env | {"RANK": str(r), "LOCAL_RANK": str(r)}, cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for r in (0, 1)]
    try:
        codes = [p.wait(timeout=240) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert codes == [1, 3]  # rank 0 stopped with an error of its own; rank 1 died
    assert not (reports / "rank0.txt").read_text().startswith("ok") and not (reports / "rank1.txt").exists()
    assert tree_digest(bank) == before


def test_a_commit_that_fails_on_rank_0_fails_every_rank_and_changes_nothing(tiny_bert_dir, tmp_path):
    from adaptbank._atomic import exclusive_lock

    bank = _init(tmp_path / "bank", tiny_bert_dir)
    with exclusive_lock(bank / ".lock"):  # another writer holds the bank: rank 0's commit times out
        before = tree_digest(bank)
        out = _torchrun("-m", "adaptbank.cli", "add-task", str(bank), "weather", *ARGS, "--lock-timeout", "1")
        assert tree_digest(bank) == before
    assert out.returncode != 0 and "Traceback" not in out.stdout
    assert f"process {os.getpid()}" in out.stderr  # rank 0's own error names the lock's holder
    assert "task 'weather': commit: rank 0 failed (BankLockedError:" in out.stderr  # rank 1 was told
    assert AdapterBank.open(bank).tasks() == [] and not [p for p in AdapterBank.open(bank).verify() if p.is_error]


def test_grad_accum_2_at_batch_8_equals_batch_16(tiny_bert_dir, tmp_path):
    fast = dict(epochs=1, max_train=48, max_test=8, max_length=32, train_dropout=False)
    stored = {}
    for label, cfg in {"16": TrainConfig(batch_size=16, **fast), "8x2": TrainConfig(batch_size=8, grad_accum=2, **fast),
                       "8": TrainConfig(batch_size=8, **fast)}.items():
        bank = AdapterBank.init(tmp_path / label, base=str(tiny_bert_dir))
        r = bank.add_task("weather", LoRAConfig(rank=4, dropout=0.0), cfg)
        stored[label] = {s: bank.store.read_tensors(r.name, s) for s in ("adapter", "head")}
        stored[label]["steps"] = bank.info(r.name)["metrics"]["steps"]
    assert stored["16"]["steps"] == stored["8x2"]["steps"] == 3 and stored["8"]["steps"] == 6
    for stem in ("adapter", "head"):
        assert _diff(stored["16"][stem], stored["8x2"][stem]) <= TOL, stem
    assert _diff(stored["16"]["adapter"], stored["8"]["adapter"]) > 50 * TOL  # the comparison can tell runs apart


@pytest.mark.parametrize("n, accum, world", [(16, 1, 2), (16, 2, 2), (5, 2, 2), (1, 1, 2), (10, 3, 4), (7, 1, 1)])
def test_step_parts_cover_the_batch_once_with_weights_that_average_to_its_mean(n, accum, world):
    rows = list(range(n))
    parts = [distributed.step_parts(rows, accum, Dist(rank=r, world=world)) for r in range(world)]
    real = [(rs, w) for p in parts for rs, w in p if w > 0]
    assert sorted(i for rs, _ in real for i in rs) == rows  # every row scored once, by one rank
    # DDP averages over W ranks, so sum_ranks sum_parts w * mean(part) / W must be the batch mean
    assert sum(w * sum(rs) / len(rs) for rs, w in real) / world == pytest.approx(sum(rows) / n)
    assert all(len(p) == min(accum, n) for p in parts)  # every rank runs the same micro-steps
    if n % world == 0 and accum == 1:
        assert {len(rs) for p in parts for rs, _ in p} == {n // world}


def test_a_batch_that_does_not_split_over_the_ranks_is_named():
    distributed.check_batch(8, Dist(world=2))
    with pytest.raises(ValueError, match=r"batch_size 6 \(--batch-size.*divisible by the 4 ranks"):
        distributed.check_batch(6, Dist(world=4))


def test_launch_detection(monkeypatch):
    for var in distributed.LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)
    assert distributed.current() is LOCAL
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.current() is LOCAL  # torchrun --nproc-per-node 1: one process, no group
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match="LOCAL_RANK, MASTER_ADDR, MASTER_PORT are not set"):
        distributed.current()
    monkeypatch.setenv("ADAPTBANK_DIST_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="ADAPTBANK_DIST_TIMEOUT must be a positive number of seconds, got 'soon'"):
        distributed.timeout_seconds()


def test_grad_accum_is_validated_and_flagged():
    with pytest.raises(ValueError, match=r"grad_accum must be a positive integer \(--grad-accum\), got 0"):
        TrainConfig(grad_accum=0)
    assert TrainConfig(batch_size=8, grad_accum=3).step_batch == 24
    assert TrainConfig.from_dict({"batch_size": 8}).grad_accum == 1  # configs stored before the field


# ------------------------------------------------------------------------------------ adaptbank run (continual)
RUN_TRAIN = ('epochs = 3\nmax_train = 48\nmax_test = 16\nmax_length = 32\nbatch_size = 8\nlr = 2e-2\n'
             'head_lr = 2e-2\nprobe_c = 1.0\nprobe_scale = 1.0\ntrain_dropout = false\n')
"""A two-task run of 18 steps per task whose seq-lora matrix shows learning and forgetting (intent 6.2% ->
68.8% -> 50.0%); dropout off, so one and two processes differ in float order only."""

_ONE: dict[str, dict[str, Any]] = {}


def _run_spec(tmp_path: Path, backbone: Path, strategy: str) -> Path:
    spec = tmp_path / f"{strategy}.toml"
    spec.write_text(f'[run]\nname = "dist-{strategy}"\nbackbone = "{backbone}"\ntasks = ["intent", "weather"]\n'
                    f'strategy = "{strategy}"\nseed = 0\n[method]\nkind = "lora"\nrank = 4\nalpha = 8\n'
                    f'dropout = 0.0\n[train]\n{RUN_TRAIN}')
    return spec


@pytest.fixture
def one_process(tiny_bert_dir, tmp_path_factory):
    """``one_process(strategy) -> (spec, result)``: the run in this process (made once per strategy)."""

    def get(strategy: str) -> tuple[Path, dict[str, Any]]:
        root = tmp_path_factory.mktemp(f"one-{strategy}")
        spec = _run_spec(root, tiny_bert_dir, strategy)
        if strategy not in _ONE:
            _ONE[strategy] = run_sequence(load_run_spec(spec), root / "run", log=lambda _m: None, dist=LOCAL)
        return spec, _ONE[strategy]

    return get


def _same_run(one: dict[str, Any], two: dict[str, Any]) -> None:
    """Accuracies are counts over the test examples: equal, not close; losses up to float order."""
    assert two["oracle"] == one["oracle"] and two["routed"] == one["routed"] and two["finished"]
    for a, b in zip(one["steps"], two["steps"], strict=True):
        assert (a["train_steps"], a["trainable_params"], a["router_accuracy"]) == (
            b["train_steps"], b["trainable_params"], b["router_accuracy"])
        assert abs(a["final_loss"] - b["final_loss"]) <= 1e-3  # seen: up to 5e-5 (the probe amplifies 1e-8)


@pytest.mark.parametrize("strategy", ["bank", "replay"])
def test_a_two_process_run_gives_the_matrices_of_one_process(one_process, tmp_path, strategy):
    spec, one = one_process(strategy)
    if strategy == "replay":  # the comparison can tell runs apart: learning and forgetting
        matrix = one["oracle"]["matrix"]
        assert matrix[0][0] > one["oracle"]["baseline"][0] and matrix[1][0] != matrix[0][0]
    out = _torchrun("-m", "adaptbank.cli", "run", str(spec), "--out", str(tmp_path / "two"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("[2/2] weather") == 1 and out.stdout.count("BWT") == 1  # rank 0 alone prints
    _same_run(one, load_run(tmp_path / "two"))
    if strategy == "bank":
        assert AdapterBank.open(tmp_path / "two" / "bank").tasks() == ["intent", "weather"]


def _reports(path: Path) -> tuple[str, str]:
    return (path / "rank0.txt").read_text(), (path / "rank1.txt").read_text()


def test_a_rank_failing_before_a_new_run_starts_leaves_no_run_directory(tiny_bert_dir, tmp_path):
    spec, out, reports = _run_spec(tmp_path, tiny_bert_dir, "bank"), tmp_path / "run", tmp_path / "reports"
    reports.mkdir()
    res = _torchrun(str(REPO / "tests" / "_dist_run_worker.py"), str(spec), str(out), str(reports), "1", "baseline")
    assert res.returncode != 0 and not out.exists()  # rank 0 had created run.json and bank/, then removed them
    rank0, rank1 = _reports(reports)
    assert rank1.startswith("1\n") and "simulated fault on rank 1 in the baseline" in rank1
    assert rank0.startswith("1\n") and "baseline 'intent': rank(s) 1 of 2 failed" in rank0 and "Traceback" not in rank0


def test_a_rank_failing_mid_run_keeps_the_run_as_it_was_and_a_torchrun_resume_equals_one_process(
        one_process, tmp_path):
    spec, one = one_process("bank")
    out, reports = tmp_path / "run", tmp_path / "reports"
    reports.mkdir()
    res = _torchrun(str(REPO / "tests" / "_dist_run_worker.py"), str(spec), str(out), str(reports), "1", "step:20")
    assert res.returncode != 0  # rank 1 fails at step 2 of the second task
    rank0, rank1 = _reports(reports)
    assert rank1.startswith("1\n") and "simulated fault on rank 1 at step 20 of the run" in rank1
    assert rank0.startswith("1\n") and "task 'weather', step 2: rank(s) 1 of 2 failed" in rank0
    assert tree_digest(out) == json.loads((reports / "digest.json").read_text())  # as it was when the fault hit
    partial = load_run(out)
    assert partial["oracle"]["matrix"] == one["oracle"]["matrix"][:1] and not partial["finished"]
    assert AdapterBank.open(out / "bank").tasks() == ["intent"]
    resumed = _torchrun("-m", "adaptbank.cli", "run", str(spec), "--out", str(out))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.count("resuming dist-bank after task 1 of 2 (intent)") == 1
    _same_run(one, load_run(out))


def test_a_distributed_generation_run_is_refused_before_anything_is_written(tmp_path):
    from adaptbank.continual.runspec import run_spec_from_dict

    spec = run_spec_from_dict({"run": {"name": "g", "tasks": ["antonym", "copy"], "strategy": "seq-lora"}})
    with pytest.raises(ValueError, match=r"generation tasks: a distributed run \(WORLD_SIZE=2\).*one process"):
        run_sequence(spec, tmp_path / "run", dist=Dist(rank=1, world=2))
    assert not (tmp_path / "run").exists()
