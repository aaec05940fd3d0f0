"""Kill ``adaptbank add-task`` at random moments and check the bank afterwards (used by the
reliability tests with a few trials and by ``bench/crash_add_task.py`` with many)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class TrialResult:
    delay: float
    outcome: str
    """``complete`` (the task landed and loads), ``absent`` (nothing of it), or ``corrupt: ...``."""


def snapshot_tensors(bank_path: Path) -> dict[str, dict[str, torch.Tensor]]:
    from adaptbank.bank import AdapterBank

    bank = AdapterBank.open(bank_path)
    return {f"{t}/{s}": bank.store.read_tensors(t, s, check="full") for t in bank.tasks() for s in ("adapter", "head")}


def add_task_cmd(bank: Path, task: str, name: str, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "adaptbank.cli", "add-task", str(bank), task, "--name", name, *extra]


def crash_trial(bank: Path, task: str, name: str, extra: list[str], delay: float,
                before: dict[str, dict[str, torch.Tensor]]) -> TrialResult:
    """Start add-task, SIGKILL it after ``delay`` seconds, then check: verify passes, earlier tasks
    load identical tensors, and the new task is complete or absent."""
    from adaptbank.bank import AdapterBank

    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(add_task_cmd(bank, task, name, extra), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env)
    time.sleep(delay)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    b = AdapterBank.open(bank)
    errors = [p for p in b.verify(full=True) if p.is_error]
    if errors:
        return TrialResult(delay, f"corrupt: verify: {errors[0].path}: {errors[0].message}")
    after = snapshot_tensors(bank)
    for key, tensors in before.items():
        if key not in after or any(not torch.equal(tensors[k], after[key][k]) for k in tensors):
            return TrialResult(delay, f"corrupt: earlier tensors of {key} changed")
    if name not in b.tasks():
        return TrialResult(delay, "absent")
    try:
        b.load([name])
    except Exception as err:  # noqa: BLE001 - any failure to load the landed task is the finding
        return TrialResult(delay, f"corrupt: {name} does not load: {err}")
    b.remove(name)
    return TrialResult(delay, "complete")


def calibrate(bank: Path, task: str, extra: list[str]) -> float:
    """Seconds one uninterrupted add-task takes here (the task is removed again)."""
    from adaptbank.bank import AdapterBank

    start = time.perf_counter()
    done = subprocess.run(add_task_cmd(bank, task, "calibration", extra), capture_output=True, text=True,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    if done.returncode != 0:  # a trial that fails by itself proves nothing about kills
        raise RuntimeError(f"the uninterrupted add-task fails: {done.stderr.strip()[-500:]}")
    took = time.perf_counter() - start
    AdapterBank.open(bank).remove("calibration")
    return took


def run_trials(bank: Path, task: str, extra: list[str], trials: int, max_delay: float | None = None,
               seed: int = 0) -> list[TrialResult]:
    """``trials`` kills at delays drawn uniformly from [0.5 s, max_delay]; by default max_delay is 1.1x
    a calibrated uninterrupted run, so kills land in start-up, training, the write and the commit."""
    if max_delay is None:
        max_delay = 1.1 * calibrate(bank, task, extra)
    rng = random.Random(seed)
    before = snapshot_tensors(bank)
    return [crash_trial(bank, task, f"crash{i}", extra, rng.uniform(0.5, max_delay), before) for i in range(trials)]
