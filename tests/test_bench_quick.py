"""The benchmark suite's smoke run (``bench/run_all.py --quick``): every side-by-side script runs on
tiny sizes in its own process, on the real MiniLM and the shared data, and the report is rendered from
their JSON. No figure is checked for speed (timings are for quiet machines, never for tests); what is
checked is that each comparison computed what it claims: peft and adaptbank outputs agree, a cached
add-task stored the uncached expert, every step's figures are there and finite."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

from conftest import REPO, bench_module, require_data


def test_run_all_quick_runs_every_step_and_writes_the_report(tmp_path):
    data = require_data()
    out = tmp_path / "results"
    env = {**os.environ, "ADAPTBANK_DATA": str(data), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(REPO / "bench" / "run_all.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with bench_module("run_all") as run_all:
        STEPS = run_all.STEPS
    report = (out / "BENCHMARKS.md").read_text()
    log = json.loads((out / "run_all.json").read_text())
    for step in STEPS:
        assert (out / f"{step.name}.json").is_file(), step.name
        assert f"## {step.title}" in report and step.name in log
    assert "not run yet" not in report and "--quick (smoke sizes" in report

    inference = json.loads((out / "inference.json").read_text())
    assert set(inference["seconds"]) == {"base", "adaptbank q+v", "peft q+v", "adaptbank merged", "peft merged",
                                         "adaptbank all-linear", "peft all-linear"}
    assert all(v < 1e-4 for v in inference["max_abs_diff"].values()), inference["max_abs_diff"]
    assert all(v > 1e-3 for v in inference["expert_effect"].values())  # the agreement is not of two base models
    assert all(math.isfinite(v) and v > 0 for v in inference["seconds"].values())

    cached = json.loads((out / "cached_layers.json").read_text())
    for pair in cached["dropout_off"]["pairs"].values():  # dropout off: the cached run stores the same expert
        assert pair["max_abs_diff"] < 1e-4 and pair["accuracies"][0] == pair["accuracies"][1]
    for name, pair in cached["pairs"].items():  # the perfect cache's bound: uncached / (uncached - forward below)
        plain = cached["median"][name.replace(", cached", "")]["wall"]
        assert 0 < pair["below_seconds"] < plain and pair["bound"] == plain / (plain - pair["below_seconds"])

    memory = json.loads((out / "train_memory.json").read_text())["memory"]["lora"]
    assert memory["adaptbank"]["peak_rss"] >= memory["adaptbank"]["rss_after_setup"] > 100 * 2**20
    mixed = json.loads((out / "mixed_batch.json").read_text())["results"]
    assert [r["n"] for r in mixed] == [1, 4] and all(r["max_abs_diff_mixed"] < 1e-4 for r in mixed)
    sizes = json.loads((out / "task_bytes.json").read_text())["tasks"]
    shared = sizes["LoRA q+v r8, shared-A 2nd task"]["files"]["adapter"]
    assert shared < sizes["LoRA q+v r8"]["files"]["adapter"]  # the second task of a group stores only B
    assert sizes["BitFit"]["files"]["adapter"] < sizes["LoRA q+v r8"]["files"]["adapter"]
    bank = json.loads((out / "bank_minilm_1000.json").read_text())["build"]  # --quick: 2 tasks, 2 router commits
    assert bank["commit_with_router_ms"] > 0 and bank["router_bytes"] > 1152 * 1152 * 8  # the pooled F x F scatter
    compiled = json.loads((out / "compile.json").read_text())["paths"]["one-expert"]
    assert compiled["max_abs_diff"] < 1e-4
