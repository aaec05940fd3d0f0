"""``add-task --init-from nearest|TASK``: a new expert starts from a stored expert of the same method
(bank.init_from), chosen by name or as the nearest task in the router's feature space; refusals leave
the bank byte-identical."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import tree_digest

from adaptbank.bank.facade import AdapterBank
from adaptbank.cli.main import main
from adaptbank.core.config import IA3Config, LoRAConfig, PrefixConfig, TrainConfig

FAST = TrainConfig(epochs=1, max_train=96, max_test=32, max_length=32)
STILL = replace(FAST, lr=1e-12)
"""An expert learning rate so small that the trained expert stays where it started (to within 1e-9)."""


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def two_tasks(tiny_bert_dir, tmp_path_factory) -> Path:
    b = AdapterBank.init(tmp_path_factory.mktemp("init-from") / "bank", base=str(tiny_bert_dir))
    b.add_task("weather", LoRAConfig(rank=4), FAST)
    b.add_task("topic", LoRAConfig(rank=4), FAST)
    return b.path


@pytest.fixture
def bank(two_tasks, tmp_path) -> AdapterBank:
    """A fresh copy of a bank holding weather and topic (LoRA r=4), trained once per module."""
    return AdapterBank.open(shutil.copytree(two_tasks, tmp_path / "bank"))


def test_a_named_source_is_where_the_new_expert_starts(bank):
    source = bank.store.read_tensors("weather", "adapter")
    assert max(float(v.abs().max()) for k, v in source.items() if k.endswith(".B")) > 1e-4  # trained: B moved off zero
    r = bank.add_task("weather", LoRAConfig(rank=4), STILL, name="again", init_from="weather")
    assert _max_diff(bank.store.read_tensors("again", "adapter"), source) < 1e-9
    zero = bank.add_task("weather", LoRAConfig(rank=4), STILL, name="fresh")
    fresh = bank.store.read_tensors("fresh", "adapter")
    assert max(float(v.abs().max()) for k, v in fresh.items() if k.endswith(".B")) < 1e-9  # the usual zero start
    info = bank.info("again")
    assert info["parent"] == "weather" and info["init_from"]["task"] == "weather" == r.init_from["task"]
    assert info["init_from"]["distance"] >= 0 and bank.info("fresh")["init_from"] is None and zero.init_from is None


def test_nearest_is_the_task_of_the_same_inputs_and_never_the_task_itself(bank):
    r = bank.add_task("weather", LoRAConfig(rank=4), FAST, name="weather_b", init_from="nearest")
    assert r.init_from["task"] == "weather" and "nearest of 2 task(s)" in r.init_from["reason"]
    again = bank.add_task("topic", LoRAConfig(rank=4), FAST, replace=True, init_from="nearest")
    assert again.init_from["task"] != "topic"  # a replaced task does not start from its own old version
    other = bank.add_task("topic", IA3Config(), FAST, name="topic_ia3", init_from="nearest")
    assert other.init_from["task"] is None and "started from zero" in other.init_from["reason"]


def test_the_probe_is_fitted_under_the_started_expert(bank):
    """The head starts matched to the features the expert gives (not the frozen backbone's)."""
    started = bank.add_task("weather", LoRAConfig(rank=4), STILL, name="w2", init_from="weather")
    plain = bank.add_task("weather", LoRAConfig(rank=4), STILL, name="w3")
    assert started.probe_accuracy is not None and plain.probe_accuracy is not None
    h2, h3 = bank.store.read_tensors("w2", "head"), bank.store.read_tensors("w3", "head")
    assert _max_diff(h2, h3) > 1e-4  # different features, different probe


@pytest.mark.parametrize(("init_from", "method", "extra", "message"), [
    ("nowhere", LoRAConfig(rank=4), {}, "no such task in bank"),
    ("weather", LoRAConfig(rank=8), {}, "differs from the new task's"),
    ("weather", LoRAConfig(rank=4), {"share_a": "g"}, "cannot be combined with --share-a"),
    ("nearest", PrefixConfig(prefix_length=4), {}, "MLP reparameterisation"),
])
def test_what_cannot_start_from_a_stored_expert_is_refused_and_changes_nothing(bank, init_from, method, extra, message):
    before = tree_digest(bank.path)
    with pytest.raises((KeyError, ValueError), match=message):
        bank.add_task("weather", method, FAST, name="new", init_from=init_from, **extra)
    assert tree_digest(bank.path) == before


def test_cli_init_from_prints_the_source_and_refuses_an_unknown_task(bank):
    res = CliRunner().invoke(main, ["add-task", str(bank.path), "weather", "--name", "w4", "--rank", "4",
                                    "--epochs", "1", "--max-train", "64", "--max-test", "16", "--max-length", "32",
                                    "--init-from", "nearest"])
    assert res.exit_code == 0, res.output
    assert "init: started from 'weather'" in res.output
    before = tree_digest(bank.path)
    res = CliRunner().invoke(main, ["add-task", str(bank.path), "weather", "--name", "w5", "--init-from", "ghost"])
    assert res.exit_code == 1 and "--init-from 'ghost'" in res.output and "allowed: 'nearest' or one of" in res.output
    assert tree_digest(bank.path) == before


def test_a_bank_run_with_init_from_nearest_starts_each_later_expert_from_an_earlier_one(tiny_bert_dir, tmp_path):
    from adaptbank.continual.loop import run_sequence
    from adaptbank.continual.runspec import run_spec_from_dict

    doc = {"run": {"name": "init", "backbone": str(tiny_bert_dir), "tasks": ["weather", "topic", "intent"],
                   "strategy": "bank", "seed": 0},
           "method": {"kind": "lora", "rank": 4}, "train": {"epochs": 1, "max_train": 48, "max_test": 16, "max_length": 32},
           "options": {"init_from": "nearest"}}
    result = run_sequence(run_spec_from_dict(doc), tmp_path / "run", log=lambda _m: None)
    assert result["config"]["options"]["init_from"] == "nearest" and result["finished"]
    bank = AdapterBank.open(tmp_path / "run" / "bank")
    assert bank.info("weather")["init_from"]["task"] is None  # the first task has nothing to start from
    assert bank.info("topic")["init_from"]["task"] == "weather"
    assert bank.info("intent")["init_from"]["task"] in ("weather", "topic")
    assert bank.info("intent")["parent"] == bank.info("intent")["init_from"]["task"]
    with pytest.raises(ValueError, match="options.init_from = 'nearest' needs strategy 'bank'"):
        run_spec_from_dict({**doc, "run": {**doc["run"], "strategy": "seq-lora"}})
    with pytest.raises(ValueError, match="options.init_from must be"):
        run_spec_from_dict({**doc, "options": {"init_from": "weather"}})
    spec = run_spec_from_dict({**doc, "options": {}}).with_overrides(init_from="nearest")
    assert spec.options.init_from == "nearest" and spec.config_changed() == {"init_from": [None, "nearest"]}
