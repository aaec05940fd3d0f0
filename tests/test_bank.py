"""The bank end to end on a tiny saved BERT and the built-in tasks: add, list, eval from disk,
shared-A bytes, graph, and bad input that must leave the bank unchanged."""

from __future__ import annotations

import json
import re
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
    from adaptbank.data.load import load_task
    from adaptbank.training.evaluate import evaluate_hits

    test = load_task("weather", max_train=1, max_test=FAST.max_test, seed=FAST.seed).test
    assert r.test_hits == evaluate_hits(bank.load(["weather"]), "weather", [e.text for e in test],
                                        [e.label for e in test], max_length=FAST.max_length)  # the stored expert's
    assert len(r.test_hits) == r.n_test and sum(r.test_hits) / r.n_test == r.test_accuracy


def test_shared_a_tasks_store_b_only_and_are_smaller(bank, tiny_bert_dir, tmp_path):
    cfg = LoRAConfig(rank=8, targets="all-linear")
    first = bank.add_task("weather", cfg, FAST, share_a="g")
    second = bank.add_task("topic", cfg, FAST, share_a="g")
    assert first.shared_group == second.shared_group == "g"
    solo = AdapterBank.init(tmp_path / "solo", base=str(tiny_bert_dir)).add_task("topic", cfg, FAST)
    a_keys = bank.store.read_shared("g", "A")
    assert a_keys and all(k.endswith(".A") for k in a_keys)
    assert not any(k.endswith(".A") for k in bank.store.read_tensors("topic", "adapter"))
    # the router memory (mean and scatter factor, bank.router_memory) is the same size either way: compare the rest
    router_share = bank.info("topic")["files"]["memory.safetensors"]["size"]
    ratio = (second.bytes_on_disk - router_share) / (solo.bytes_on_disk - router_share)
    print(f"shared-A task {second.bytes_on_disk} B vs independent {solo.bytes_on_disk} B, "
          f"{router_share} B of each the router's memory: {ratio:.2f}")
    assert ratio <= 0.55
    # loading both back gives the exact tensors and one A object per layer
    model = bank.load()
    for layer in model.layers_of("topic").values():
        assert layer.experts["topic"].A is layer.experts["weather"].A
    assert bank.evaluate() == {"weather": first.test_accuracy, "topic": second.test_accuracy}


def unknown_words_task(tmp_path: Path) -> Path:
    """A two-class task whose every word is outside the tiny tokenizer's vocabulary: its texts are
    runs of [UNK], far from any built-in task in the router's feature space."""
    import random

    rng = random.Random(0)
    words = ["qzxv", "wjrk", "pfmt", "xqzl", "vvbn", "kkzq"]
    data = tmp_path / "unknown"
    data.mkdir()
    for split, n in (("train", 80), ("test", 20)):
        rows = [{"text": " ".join(rng.choice(words) for _ in range(rng.randint(3, 12))), "label": i % 2}
                for i in range(n)]
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = tmp_path / "unknown.toml"
    spec.write_text('name = "unknown"\ntype = "classification"\n[data]\ntrain = "unknown/train.jsonl"\n'
                    'test = "unknown/test.jsonl"\nlabels = ["a", "b"]\n')
    return spec


def mahalanobis_from_stored_router(bank: AdapterBank, a: str, b: str) -> float:
    """Distance of tasks ``a`` and ``b``'s stored mean router features under the pooled within-task
    covariance of the stored router statistics, shrunk as the router shrinks it."""
    stats = bank.store.read_router()[0]["stats"]
    scatter, dim = stats["scatter"].double(), stats["scatter"].shape[0]
    cov = scatter / (int(stats["scatter_count"][0]) - stats["counts"].shape[0])
    shrink = bank.router_config.shrinkage
    cov = (1 - shrink) * cov + shrink * torch.trace(cov) / dim * torch.eye(dim, dtype=torch.float64)
    diff = bank.store.read_tensors(a, "memory")["mean"].double() - bank.store.read_tensors(b, "memory")["mean"].double()
    return float(diff @ torch.linalg.solve(cov, diff)) ** 0.5


def test_share_a_auto_joins_near_tasks_and_starts_groups_for_distant_ones(bank, tmp_path):
    cfg = LoRAConfig(rank=4)
    limit = bank.router_config.share_distance  # 3.0 by default
    joined = (r"joined group 'group1': its nearest task is at distance (\d+\.\d\d) <= "
              + re.escape(str(limit)) + r" in the router's feature space")
    first = bank.add_task("weather", cfg, FAST, share_a="auto")
    assert (first.shared_group, first.share_reason) == ("group1", "started group 'group1': no compatible group yet")
    # the same task again: the same training examples give the same mean router feature, distance 0
    same = bank.add_task("weather", cfg, FAST, name="weather_again", share_a="auto")
    assert same.shared_group == "group1"
    assert re.fullmatch(joined, same.share_reason) and "distance 0.00 <=" in same.share_reason, same.share_reason
    # near-identical: another sample of the same task (measured distance 0.90, well inside the limit)
    other = TrainConfig(epochs=1, max_train=60, max_test=30, max_length=32, seed=3)
    near = bank.add_task("weather", cfg, other, name="weather_resampled", share_a="auto")
    m = re.fullmatch(joined, near.share_reason)
    assert near.shared_group == "group1" and m, near.share_reason
    assert 0.0 < float(m[1]) < limit / 2
    # the distance it reports is the Mahalanobis distance under the router's pooled covariance
    assert float(m[1]) == pytest.approx(mahalanobis_from_stored_router(bank, "weather_resampled", "weather"),
                                        abs=0.01)
    # a very different task (all words unknown: measured distance 32) starts a group of its own
    far = bank.add_task(unknown_words_task(tmp_path), cfg, FAST, share_a="auto")
    m = re.fullmatch(r"started group 'group2': the nearest compatible group 'group1' is at distance (\d+\.\d\d) > "
                     + re.escape(str(limit)), far.share_reason)
    assert far.shared_group == "group2" and m, far.share_reason
    assert float(m[1]) > 3 * limit
    # a LoRA of another rank cannot share any group's A, however near its inputs
    rank2 = bank.add_task("weather", LoRAConfig(rank=2), FAST, name="weather_rank2", share_a="auto")
    assert (rank2.shared_group, rank2.share_reason) == ("group3", "started group 'group3': no compatible group yet")
    # the bank stored the decisions it reported
    groups = {n: (bank.info(n)["shared_group"], bank.info(n)["owns_shared"]) for n in bank.tasks()}
    assert groups == {"weather": ("group1", True), "weather_again": ("group1", False),
                      "weather_resampled": ("group1", False), "unknown": ("group2", True),
                      "weather_rank2": ("group3", True)}
    assert bank.info("weather_resampled")["share_reason"] == near.share_reason


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
