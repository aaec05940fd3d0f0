"""Reliability of the bank under add-task: SIGKILL at random moments, concurrent writers, Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from _crash import add_task_cmd, run_trials
from conftest import tree_digest

from adaptbank.bank.facade import AdapterBank
from adaptbank.core.config import LoRAConfig, TrainConfig

SHORT = TrainConfig(epochs=1, max_train=60, max_test=30, max_length=32)
FLAGS = ["--epochs", "1", "--max-train", "120", "--max-test", "30", "--max-length", "32"]


@pytest.fixture
def bank(tiny_bert_dir, tmp_path) -> Path:
    b = AdapterBank.init(tmp_path / "bank", base=str(tiny_bert_dir))
    b.add_task("weather", LoRAConfig(rank=4), SHORT)
    b.add_task("topic", LoRAConfig(rank=4), SHORT, share_a="g")
    return b.path


def earlier_tensors(bank: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The fixture's tasks' stored tensors (adapter, head, router memory) and group g's shared A."""
    store = AdapterBank.open(bank).store
    out = {f"{t}/{s}": store.read_tensors(t, s, check="full") for t in ("weather", "topic")
           for s in ("adapter", "head", "memory")}
    out["shared g/A"] = store.read_shared("g", "A", check="full")
    assert all(out.values())
    return out


def test_sigkilled_add_task_leaves_task_complete_or_absent(bank):
    # delays up to 1.1x a calibrated uninterrupted run: start-up, training, writing, commit; 30 trials in
    # bench/crash_add_task.py
    results = run_trials(bank, "intent", [*FLAGS, "--share-a", "g", "--rank", "4"], trials=4, seed=1)
    assert all(r.outcome in ("complete", "absent") for r in results), [r.outcome for r in results]


@pytest.mark.parametrize("n", [2, 4])
def test_concurrent_add_tasks_all_land(bank, n):
    before = earlier_tensors(bank)
    tasks = ["intent", "reviews", "weather", "topic"][:n]
    procs = [subprocess.Popen(add_task_cmd(bank, t, f"c{i}", FLAGS), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=dict(os.environ, HF_HUB_OFFLINE="1")) for i, t in enumerate(tasks)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err.decode()[-2000:]
    b = AdapterBank.open(bank)
    assert b.tasks()[:2] == ["weather", "topic"]
    assert sorted(b.tasks()[2:]) == [f"c{i}" for i in range(n)]  # commit order is the race's
    assert [p for p in b.verify() if p.is_error] == []
    after = earlier_tensors(bank)
    for part, tensors in before.items():  # every earlier task's tensors, value for value
        assert after[part].keys() == tensors.keys(), part
        changed = [k for k, t in tensors.items() if not torch.equal(after[part][k], t)]
        assert not changed, f"{part}: {changed[:3]} changed"
    # the router saw every task: its statistics were updated under the lock, one commit per task
    assert sorted(b.store.read_router()[1]["expert_order"]) == sorted(b.tasks())
    b.router()  # not stale


def test_ctrl_c_during_add_task_leaves_bank_unchanged(bank):
    before = {k: v for k, v in tree_digest(bank).items() if k != ".lock"}  # .lock holds a writer's pid
    manifest = (bank / "manifest.json").read_bytes()
    proc = subprocess.Popen(add_task_cmd(bank, "intent", "interrupted", ["--epochs", "50", "--max-train", "200",
                                                                          "--max-length", "32"]),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ, HF_HUB_OFFLINE="1"),
                            # as at a terminal: a shell's background jobs inherit SIGINT ignored, and then
                            # Python never installs its KeyboardInterrupt handler
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 300
    while b"training on" not in proc.stderr.readline():  # interrupt during training, not during imports
        assert proc.poll() is None and time.monotonic() < deadline, "add-task never started training"
    time.sleep(1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err.decode()[-1000:]
    assert b"bank is unchanged" in err and b"Traceback" not in err
    assert (bank / "manifest.json").read_bytes() == manifest
    assert {k: v for k, v in tree_digest(bank).items() if k != ".lock"} == before  # every file's bytes
