"""The bank end to end on a tiny saved BERT and the built-in tasks: add, list, eval from disk,
shared-A bytes, graph, and bad input that must leave the bank unchanged."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import networkx as nx
import pytest
import torch

from adaptbank.bank.facade import AdapterBank
from adaptbank.bank.store import BankError, TaskExistsError
from adaptbank.core.config import LoRAConfig, ParallelAdapterConfig, TrainConfig
from adaptbank.training.loop import TrainingError

FAST = TrainConfig(epochs=1, max_train=120, max_test=60, max_length=32)


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file of a bank with its bytes: equality means nothing changed."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file() and p.name != ".lock"}


@pytest.fixture
def bank(tiny_bert_dir, tmp_path) -> AdapterBank:
    return AdapterBank.init(tmp_path / "bank", base=str(tiny_bert_dir))


def test_add_task_stores_and_eval_reproduces_in_a_new_process(bank):
    r = bank.add_task("weather", LoRAConfig(rank=4), FAST)
    assert bank.tasks() == ["weather"]
    info = bank.info("weather")
    assert info["metrics"]["test_accuracy"] == r.test_accuracy
    assert info["labels"] == ["sunny", "rainy", "snowy", "windy"]
    assert info["method"]["kind"] == "lora" and info["train"]["max_train"] == 120
    assert set(info["files"]) == {"adapter.safetensors", "head.safetensors", "memory.safetensors", "config.json"}
    assert all(len(f["sha256"]) == 64 for f in info["files"].values())
    assert r.trainable_params == sum(4 * (32 + 32) for _ in range(4))  # q and v in layers 2, 3 (0, 1: router)
    out = subprocess.run([sys.executable, "-m", "adaptbank.cli", "eval", str(bank.path), "--json"],
                         capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)["oracle"]["weather"] == r.test_accuracy


def test_shared_a_tasks_store_b_only_and_are_smaller(bank, tiny_bert_dir, tmp_path):
    cfg = LoRAConfig(rank=8, targets="all-linear")
    first = bank.add_task("weather", cfg, FAST, share_a="g")
    second = bank.add_task("topic", cfg, FAST, share_a="g")
    assert first.shared_group == second.shared_group == "g"
    solo = AdapterBank.init(tmp_path / "solo", base=str(tiny_bert_dir)).add_task("topic", cfg, FAST)
    a_keys = bank.store.read_shared("g", "A")
    assert a_keys and all(k.endswith(".A") for k in a_keys)
    assert not any(k.endswith(".A") for k in bank.store.read_tensors("topic", "adapter"))
    ratio = second.bytes_on_disk / solo.bytes_on_disk
    print(f"shared-A task {second.bytes_on_disk} B vs independent {solo.bytes_on_disk} B: {ratio:.2f}")
    assert ratio <= 0.55
    # loading both back gives the exact tensors and one A object per layer
    model = bank.load()
    for layer in model.layers_of("topic").values():
        assert layer.experts["topic"].A is layer.experts["weather"].A
    assert bank.evaluate() == {"weather": first.test_accuracy, "topic": second.test_accuracy}


def test_share_a_auto_explains_its_choice(bank):
    r1 = bank.add_task("weather", LoRAConfig(rank=4), FAST, share_a="auto")
    assert r1.shared_group and "started" in r1.share_reason
    r2 = bank.add_task("reviews", LoRAConfig(rank=4), FAST, share_a="auto")
    assert r2.shared_group and ("joined" in r2.share_reason or "started" in r2.share_reason)
    assert "distance" in r2.share_reason


def test_parallel_adapter_task_and_remove(bank):
    bank.add_task("intent", ParallelAdapterConfig(bottleneck=8), FAST)
    assert bank.info("intent")["method"]["kind"] == "parallel-adapter"
    bank.remove("intent")
    assert bank.tasks() == []
    assert not list((bank.path / "tasks").iterdir())


def test_bad_input_leaves_bank_unchanged(bank, tmp_path):
    bank.add_task("weather", LoRAConfig(rank=4), FAST)
    before = snapshot(bank.path)
    with pytest.raises(TaskExistsError, match="'weather' already exists.*--replace"):
        bank.add_task("weather", LoRAConfig(rank=4), FAST)
    for bad in ["a/b", "..", "", "x" * 101, "/abs", "a.b"]:
        with pytest.raises(ValueError, match="task name"):
            bank.add_task("weather", LoRAConfig(rank=4), FAST, name=bad)
    missing = tmp_path / "missing.toml"
    missing.write_text('name = "missing"\ntype = "classification"\n[data]\ntrain = "nope/train.jsonl"\n'
                       'test = "nope/test.jsonl"\nlabels = ["a", "b"]\n')
    with pytest.raises(FileNotFoundError, match="nope"):
        bank.add_task(missing, LoRAConfig(rank=4), FAST)
    data = tmp_path / "d"
    data.mkdir()
    (data / "train.jsonl").write_text('{"text": "hello", "label": 0}\n{"text": "bad", "label": 7}\n')
    (data / "test.jsonl").write_text('{"text": "hi", "label": 1}\n')
    spec = tmp_path / "badlabel.toml"
    spec.write_text('name = "badlabel"\ntype = "classification"\n[data]\ntrain = "d/train.jsonl"\n'
                    'test = "d/test.jsonl"\nlabels = ["a", "b"]\n')
    with pytest.raises(ValueError, match=r"train\.jsonl:2.*7"):
        bank.add_task(spec, LoRAConfig(rank=4), FAST)
    with pytest.raises(TrainingError, match=r"step \d+.*nothing was saved"):
        bank.add_task("topic", LoRAConfig(rank=4), TrainConfig(epochs=2, max_train=64, max_test=10, lr=1e30,
                                                                 head_lr=1e30, grad_clip=0.0, probe_init=False))
    assert snapshot(bank.path) == before


def test_bank_of_another_base_model_is_refused(tiny_bert_dir, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny_bert_dir, base)
    bank = AdapterBank.init(tmp_path / "bank", base=str(base))
    bank.add_task("weather", LoRAConfig(rank=4), FAST)
    from safetensors.torch import load_file, save_file

    weights = load_file(base / "model.safetensors")
    key = next(k for k in weights if k.endswith("query.weight"))
    weights[key] = weights[key] + 0.01
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    before = snapshot(bank.path)
    with pytest.raises(BankError, match="fingerprint"):
        AdapterBank.open(bank.path).evaluate()
    with pytest.raises(BankError, match="fingerprint"):
        AdapterBank.open(bank.path).add_task("topic", LoRAConfig(rank=4), FAST)
    assert snapshot(bank.path) == before


def test_corrupted_file_is_named_by_verify_and_load(bank):
    bank.add_task("weather", LoRAConfig(rank=4), FAST)
    assert [p for p in bank.verify() if p.is_error] == []
    adapter = next((bank.path / "tasks").glob("weather@*/adapter.safetensors"))
    raw = bytearray(adapter.read_bytes())
    raw[-3] ^= 0xFF
    adapter.write_bytes(bytes(raw))
    problems = [p for p in AdapterBank.open(bank.path).verify() if p.is_error]
    assert problems and any("adapter.safetensors" in f"{p.path} {p.message}" for p in problems)
    with pytest.raises(BankError, match="adapter.safetensors"):
        AdapterBank.open(bank.path).evaluate()


def test_graph_has_tasks_groups_lineage_and_similarity(bank, tmp_path):
    cfg = LoRAConfig(rank=4)
    bank.add_task("weather", cfg, FAST, share_a="g")
    bank.add_task("topic", cfg, FAST, share_a="g")
    bank.add_task("intent", cfg, FAST, parent="weather")
    from adaptbank.bank.graph import bank_graph, lora_similarity, write_graph

    g = bank_graph(bank)
    kinds = {d["kind"] for _, _, d in g.edges(data=True)}
    assert {"member", "lineage", "similarity"} <= kinds
    assert g.nodes["group:g"]["kind"] == "shared-A group"
    for suffix in (".graphml", ".json", ".png"):
        write_graph(g, tmp_path / f"g{suffix}")
        assert (tmp_path / f"g{suffix}").stat().st_size > 100
    assert nx.read_graphml(tmp_path / "g.graphml").number_of_nodes() == g.number_of_nodes()
    # the low-rank similarity equals the cosine of the dense updates
    torch.manual_seed(0)
    e1 = {"l.A": torch.randn(3, 5), "l.B": torch.randn(4, 3)}
    e2 = {"l.A": torch.randn(2, 5), "l.B": torch.randn(4, 2)}
    d1, d2 = e1["l.B"] @ e1["l.A"], e2["l.B"] @ e2["l.A"]
    want = float(torch.cosine_similarity(d1.flatten(), d2.flatten(), dim=0))
    assert lora_similarity(e1, e2) == pytest.approx(want, abs=1e-6)
    assert lora_similarity(e1, e1) == pytest.approx(1.0)
