"""The scripts in examples/ run for real, on the tiny saved BERT and the built-in tasks, and print
figures that make sense; one of them also runs as a subprocess through its ``__main__`` block."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from conftest import REPO

from adaptbank.data.builtin import BUILTIN_TASKS

TINY = ["--max-train", "40", "--max-test", "20", "--epochs", "1", "--max-length", "32"]


def example(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` by path (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", REPO / "examples" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(name: str, tiny_bert_dir: Path, out: Path, *extra: str) -> dict[str, Any]:
    return example(name).main(["--base", str(tiny_bert_dir), "--out", str(out), *TINY, *extra])


def is_accuracy(x: object) -> bool:
    return isinstance(x, float) and math.isfinite(x) and 0.0 <= x <= 1.0


def test_one_task_lora(tiny_bert_dir: Path, tmp_path: Path) -> None:
    got = run("one_task_lora", tiny_bert_dir, tmp_path)
    assert is_accuracy(got["before"]) and is_accuracy(got["after"]) and is_accuracy(got["probe_accuracy"])
    assert got["steps"] == 3  # 40 examples, batch 16, one epoch
    assert got["logits_shape"] == (4, len(BUILTIN_TASKS["weather"])) and got["tasks"] == ("weather",) * 4
    assert got["merge_max_diff"] <= 1e-5
    assert {p.name for p in Path(got["expert_dir"]).iterdir()} >= {"adapter.safetensors", "head.safetensors",
                                                                  "adapter_config.json"}


def test_shared_a_bank(tiny_bert_dir: Path, tmp_path: Path) -> None:
    got = run("shared_a_bank", tiny_bert_dir, tmp_path)
    assert got["groups"] == {"weather": "g", "reviews": "g"}
    assert got["trainable_params"]["reviews"] < got["trainable_params"]["weather"]  # B only
    assert got["shared_a_bytes"] > 0
    # Each task's adapter file holds only its B; the first task also paid for the group's A.
    assert got["sizes"]["reviews"]["adapter"] == got["sizes"]["weather"]["adapter"]
    assert got["added_bytes"]["reviews"] < got["added_bytes"]["weather"]
    assert got["added_bytes"]["weather"] == got["sizes"]["weather"]["bytes_on_disk"] + got["shared_a_bytes"]
    assert set(got["accuracy"]) == {"weather", "reviews"} and all(map(is_accuracy, got["accuracy"].values()))


def test_routed_prediction(tiny_bert_dir: Path, tmp_path: Path) -> None:
    got = run("routed_prediction", tiny_bert_dir, tmp_path)
    tasks = ["weather", "reviews", "intent", "topic"]
    assert got["tasks"] == tasks
    preds = got["predictions"]
    assert [p["true_task"] for p in preds] == tasks * 2  # two of each, interleaved, in one batch
    for p in preds:
        assert p["task"] in tasks and p["label"] in BUILTIN_TASKS[p["task"]]
        assert 0.0 <= p["score"] <= 1.0
        assert set(p["routing"]) <= set(tasks) and 1 <= len(p["routing"]) <= 2  # top_k=2
        assert math.isclose(sum(p["routing"].values()), 1.0, abs_tol=1e-5)
    avg = got["average"]
    assert all(is_accuracy(avg[k]) for k in ("router_accuracy", "routed_accuracy", "oracle_accuracy"))
    assert set(got["per_task"]) == set(tasks)


def test_continual_run(tiny_bert_dir: Path, tmp_path: Path) -> None:
    got = run("continual_run", tiny_bert_dir, tmp_path)
    tasks = ["weather", "reviews", "intent", "topic"]
    assert got["tasks"] == tasks and got["finished"] is True
    assert len(got["oracle"]) == 4 and all(len(row) == 4 and all(map(is_accuracy, row)) for row in got["oracle"])
    assert is_accuracy(got["acc"]) and is_accuracy(got["routed_acc"]) and isinstance(got["bwt"], float)
    report = got["report"]
    assert all(t in report for t in tasks)
    assert "| acc |" in report and "## Accuracy % with the learned router" in report
    assert str(tiny_bert_dir) in report  # the run used the backbone given by --base
    assert (tmp_path / "report.md").read_text(encoding="utf-8") == report


def test_example_runs_as_a_script(tiny_bert_dir: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "examples/one_task_lora.py", "--base", str(tiny_bert_dir),
                           "--out", str(tmp_path), *TINY], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    assert "weather (4 classes, 40 train / 20 test): accuracy" in done.stdout
    assert "merge/unmerge: max |logit difference|" in done.stdout
    assert (tmp_path / "weather" / "adapter_config.json").is_file()
