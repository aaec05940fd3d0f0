"""What the continual runner records for the report beyond the matrices: the last row's per-example hits
(oracle and routed), the router's confusion matrix, and each task's peak memory; and the report's paired
bootstrap between two real runs built on them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from adaptbank.continual.loop import run_sequence
from adaptbank.continual.runspec import run_spec_from_dict
from adaptbank.report.build import build_report, load_run

TASKS = ["weather", "topic", "intent"]


def _doc(backbone: Path, strategy: str) -> dict[str, Any]:
    return {"run": {"name": f"rec-{strategy}", "backbone": str(backbone), "tasks": TASKS, "strategy": strategy, "seed": 0},
            "method": {"kind": "lora", "rank": 4, "alpha": 8},
            "train": {"epochs": 1, "max_train": 40, "max_test": 30, "max_length": 32, "lr": 2e-2, "head_lr": 2e-2}}


@pytest.fixture(scope="module")
def runs(tiny_bert_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("records")
    out = {}
    for strategy in ("bank", "seq-lora"):
        out[strategy] = root / strategy
        run_sequence(run_spec_from_dict(_doc(tiny_bert_dir, strategy)), out[strategy], log=lambda _m: None)
    return out


def test_the_last_rows_hits_are_the_matrix_rows_per_example(runs):
    for strategy, path in runs.items():
        result = load_run(path)
        hits, last = result["hits"], result["oracle"]["matrix"][-1]
        assert list(hits["oracle"]) == TASKS
        for j, task in enumerate(TASKS):
            vec = hits["oracle"][task]
            assert len(vec) == 30 and set(vec) <= {0, 1}
            assert sum(vec) / len(vec) == last[j], (strategy, task)
        if strategy == "bank":
            routed = result["routed"]["matrix"][-1]
            assert [sum(hits["routed"][t]) / 30 for t in TASKS] == routed
        else:
            assert hits["routed"] is None and "router_confusion" not in result


def test_router_confusion_counts_every_test_example_once_and_its_trace_is_the_router_accuracy(runs):
    result = load_run(runs["bank"])
    conf = result["router_confusion"]
    assert conf["tasks"] == TASKS and all(sum(row) == 30 for row in conf["counts"])
    trace = sum(conf["counts"][k][k] for k in range(3))
    assert trace / 90 == result["steps"][-1]["router_accuracy"]


def test_the_router_matrix_is_each_steps_task_identification_and_the_report_summarises_it(runs):
    """Row i holds, per task seen by then, the share of its test examples the router sent to its own
    expert: the last row is the final confusion's diagonal over its row sums, each row's mean the step's
    router accuracy (equal test sets); the report's router forgetting is RWalk's over this matrix."""
    result = load_run(runs["bank"])
    matrix, conf = result["router_matrix"], result["router_confusion"]["counts"]
    assert [len([v for v in row if v is not None]) for row in matrix] == [1, 2, 3] and matrix[0][0] == 1.0
    assert matrix[-1] == [conf[j][j] / sum(conf[j]) for j in range(3)]
    for row, step in zip(matrix, result["steps"], strict=True):
        seen = [v for v in row if v is not None]
        assert abs(sum(seen) / len(seen) - step["router_accuracy"]) < 1e-12 and step["router_row"] == seen
    router = build_report([runs["bank"]])["router"]
    best = [max(matrix[i][j] for i in range(j, 2)) for j in range(2)]
    assert abs(router["forgetting"] - sum(b - matrix[2][j] for j, b in enumerate(best)) / 2) < 1e-12
    assert router["first_task"] == [1.0, matrix[2][0]]
    assert "router_matrix" not in load_run(runs["seq-lora"])  # no router, no matrix


def test_each_task_records_its_peak_memory(runs):
    for path in runs.values():
        peaks = [s["peak_memory_bytes"] for s in load_run(path)["steps"]]
        assert all(isinstance(p, int) and p > 50 * 2**20 for p in peaks), peaks  # a process holding torch and a model


def test_the_report_compares_two_real_runs_with_a_paired_bootstrap(runs):
    report = build_report([runs["bank"], runs["seq-lora"]])
    (d,) = [d for d in report["differences"] if d["kind"] == "oracle"]  # seq-lora has no routed row
    assert d["reason"] is None and d["n_examples"] == 90, d
    assert d["lo"] <= d["diff"] <= d["hi"] and d["hi"] - d["lo"] > 0


def test_each_step_keeps_its_tasks_hits_when_learned_and_the_report_puts_an_interval_on_bwt(runs):
    """Step i records task i's per-example hits of row i (R[i][i]); the report's BWT interval is a paired
    bootstrap of final-row hits against those: exactly [0, 0] for the bank (nothing moves), and for
    seq-lora an interval that holds the run's BWT (the unit test below covers a run that forgets)."""
    from adaptbank.report.build import summarize_run

    for strategy, path in runs.items():
        result = load_run(path)
        matrix = result["oracle"]["matrix"]
        for i, step in enumerate(result["steps"]):
            vec = step["learned_hits"]
            assert len(vec) == 30 and sum(vec) / 30 == matrix[i][i], (strategy, i)
        summary = summarize_run(result)
        lo, hi = summary["bwt_interval"]
        if strategy == "bank":
            assert lo == hi == 0.0 and summary["bwt"] == 0.0
        else:  # an interval around the run's BWT, of width zero exactly when no earlier answer changed
            moved = any(result["hits"]["oracle"][s["task"]] != s["learned_hits"] for s in result["steps"][:-1])
            assert lo <= summary["bwt"] <= hi and (hi - lo > 0) == moved, (summary["bwt"], lo, hi, moved)
    old = load_run(runs["seq-lora"])
    for step in old["steps"]:
        del step["learned_hits"]  # a run written before the runner kept them: no interval, no error
    assert summarize_run(old)["bwt_interval"] is None
    report = build_report([runs["bank"], runs["seq-lora"]])
    assert report["comparison"][0]["bwt_interval"] == [0.0, 0.0]
    from adaptbank.report.export import data_files
    from adaptbank.report.tables import comparison_rows

    assert comparison_rows(report["comparison"])[0][3] == "0.0 [0.0, 0.0]"  # BWT with its interval
    files = data_files(report)
    head = files["steps.csv"].decode().splitlines()[0].split(",")
    assert "learned_hits" not in head and "task" in head  # the per-example vectors stay in report.json
    assert b"learned_hits" in files["report.json"]


def test_bwt_interval_is_the_paired_bootstrap_of_final_against_learned_hits():
    """Unit check on made-up hits: task a loses 10 of 100 right answers, task b none; the observed BWT
    (-5 points) lies inside the interval, which excludes 0 (every change is a loss)."""
    from adaptbank.report.build import _bwt_interval

    learned = [1] * 60 + [0] * 40
    final = [0] * 10 + [1] * 50 + [0] * 40
    steps = [{"task": "a", "learned_hits": learned}, {"task": "b", "learned_hits": [1, 0] * 50}]
    hits = {"oracle": {"a": final, "b": [1, 0] * 50, "c": [1] * 100}, "routed": None}
    lo, hi = _bwt_interval(steps, hits, rows=3)
    assert lo <= -0.05 <= hi and hi < 0, (lo, hi)
    with pytest.raises(ValueError, match="learned_hits of task 'a' must be 0/1 integers"):
        _bwt_interval([{"task": "a", "learned_hits": [2] * 100}, steps[1]], hits, rows=3)
