"""bench/init_from.py's report: pairs grouped by train settings, Δ ACC pooled over seeds with its interval."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import bench_module


@pytest.fixture()
def bench():  # the bench script as a module
    with bench_module("init_from") as module:
        yield module


def _pair(seed: int, max_train: int, p_zero: float, p_nearest: float, n: int = 400) -> dict:
    rng = np.random.default_rng(seed)
    tasks = ["a", "b"]
    hits = {v: {t: (rng.random(n) < p).astype(float).tolist() for t in tasks}
            for v, p in (("zero", p_zero), ("nearest", p_nearest))}
    return {"dir": f"n{max_train}-s{seed}", "seed": seed, "tasks": tasks, "sources": {"a": None, "b": "a"},
            "settings": {"max_train": max_train, "max_test": n, "epochs": 2, "max_length": 128}, "hits": hits,
            "acc": {v: [float(np.mean(hits[v][t])) for t in tasks] for v in hits}}


def test_pooled_difference_is_the_mean_over_seeds_and_its_interval_separates(bench) -> None:
    pairs = [_pair(s, 64, 0.5, 0.6) for s in (0, 1, 2)] + [_pair(7, 500, 0.7, 0.7)]
    low, high = bench.summarise(pairs)  # sorted by settings: 64 before 500
    assert low["settings"]["max_train"] == 64 and low["seeds"] == [0, 1, 2] and high["seeds"] == [7]
    per_seed = [np.mean(p["acc"]["nearest"]) - np.mean(p["acc"]["zero"]) for p in pairs[:3]]
    assert low["diff"] == pytest.approx(np.mean(per_seed), abs=1e-12)
    assert 0 < low["lo"] < low["diff"] < low["hi"]  # 10 points better on 2,400 examples: clearly so
    assert high["lo"] < 0 < high["hi"] or high["diff"] == 0  # same rate: the interval covers 0
    assert [r["sources"] for r in low["per_task"]] == [[None] * 3, ["a"] * 3]
    for j, r in enumerate(low["per_task"]):
        assert r["diff"] == pytest.approx(np.mean([p["acc"]["nearest"][j] - p["acc"]["zero"][j] for p in pairs[:3]]))
        assert r["lo"] <= r["diff"] <= r["hi"]
    text = bench.markdown([low, high])
    assert "64 train / 400 test per task" in text and "| b | a, a, a |" in text


def test_a_group_with_different_task_sequences_is_refused(bench) -> None:
    pair = _pair(0, 64, 0.5, 0.5)
    pairs = [pair, {**pair, "seed": 1, "tasks": ["a", "c"]}]
    with pytest.raises(ValueError, match="different task sequences"):
        bench.summarise(pairs)


def test_few_shot_adds_every_target_both_ways_and_leaves_the_source_bank(bench, tiny_bert_dir, tmp_path) -> None:
    """bench/init_from.py few-shot on a tiny three-task bank: each later task is added from zero and from
    an earlier (never a later) task's expert, its hits are those of its accuracy, and the source run's
    bank is byte-identical afterwards; a second call resumes (adds nothing)."""
    import argparse
    import json

    from conftest import tree_digest

    from adaptbank.bank.facade import AdapterBank
    from adaptbank.core.config import LoRAConfig, TrainConfig

    tasks = ["weather", "topic", "intent"]
    run = tmp_path / "run"
    bank = AdapterBank.init(run / "bank", base=str(tiny_bert_dir))
    train = TrainConfig(epochs=1, max_train=64, max_test=16, max_length=32)
    for t in tasks:
        bank.add_task(t, LoRAConfig(rank=4), train)
    (run / "result.json").write_text(json.dumps({"finished": True, "strategy": "bank", "tasks": tasks, "config": {
        "options": {"init_from": None}, "train": train.to_dict()}}))
    before = tree_digest(run)
    args = argparse.Namespace(source_run=str(run), shots=8, seeds=[0], max_test=16, threads=1,
                              out=str(tmp_path / "few"))
    assert bench.few_shot(args) == 0
    adds = json.loads((tmp_path / "few.json").read_text())["adds"]
    assert sorted(adds) == [f"{t}/s0/{v}" for t in ("intent", "topic") for v in ("nearest", "zero")]
    assert adds["topic/s0/nearest"]["source"] == "weather"  # the only earlier task
    assert adds["intent/s0/nearest"]["source"] in ("weather", "topic")
    for a in adds.values():
        assert len(a["hits"]) == 16 and sum(a["hits"]) / 16 == pytest.approx(a["accuracy"])
        assert (a["source"] is None) == (a["variant"] == "zero")
    assert tree_digest(run) == before
    text = (tmp_path / "few.md").read_text()
    assert "8 train / 16 test per task" in text and "| topic | weather |" in text
    assert bench.few_shot(args) == 0 and json.loads((tmp_path / "few.json").read_text())["adds"] == adds
