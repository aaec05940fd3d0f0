"""Readers serving while writers change the bank: one committed version per loaded model, and the
shortened ``bench/readers_under_load.py`` (reader and writer processes on a tiny BERT)."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch

from adaptbank.bank.facade import AdapterBank
from adaptbank.bank.live import LiveBank
from adaptbank.bank.snapshot import BankChangedError, disk_generation, read_consistent
from adaptbank.core.config import LoRAConfig, TrainConfig
from adaptbank.routing.predict import predict

REPO = Path(__file__).resolve().parent.parent
SHORT = TrainConfig(epochs=1, max_train=40, max_test=16, max_length=32)


def bench_module():
    spec = importlib.util.spec_from_file_location("readers_under_load", REPO / "bench" / "readers_under_load.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def seeded(tiny_bert_dir, tmp_path_factory) -> Path:
    b = AdapterBank.init(tmp_path_factory.mktemp("seeded") / "bank", base=str(tiny_bert_dir))
    b.add_task("weather", LoRAConfig(rank=4), SHORT, name="a")
    b.add_task("intent", LoRAConfig(rank=4), SHORT, name="b")
    return b.path


@pytest.fixture
def bank(seeded, tmp_path) -> AdapterBank:
    """A copy of the seeded two-task bank (copy2 keeps the mtimes the manifest records)."""
    return AdapterBank.open(shutil.copytree(seeded, tmp_path / "bank"))


def commit_after_router_read(reader: AdapterBank, change) -> list[int]:
    """Make ``change`` (a writer's commit) happen while ``reader`` loads: after it read the router, before
    its first task's files, as when a writer commits in that instant."""
    real, fired = reader.store.read_config, []

    def read_config(name, **kw):
        if not fired:
            fired.append(1)
            change()
        return real(name, **kw)

    reader.store.read_config = read_config
    return fired


@pytest.mark.parametrize("change", ["remove", "replace"])
def test_load_routed_is_one_version_when_a_writer_commits_mid_load(bank, change):
    # Before read_consistent, the reader's per-file retry re-read the manifest half-way: a removed task failed
    # the load (TaskNotFoundError), a replaced one came back new under the old version's router.
    reader, writer = AdapterBank.open(bank.path), AdapterBank.open(bank.path)
    before = reader.store.generation
    if change == "remove":
        fired = commit_after_router_read(reader, lambda: writer.remove("b"))
    else:
        fired = commit_after_router_read(reader, lambda: writer.add_task("topic", LoRAConfig(rank=4), SHORT, name="a",
                                                                         replace=True))
    model = reader.load_routed()
    assert fired and reader.store.generation == before + 1 == disk_generation(bank.path)
    fresh = AdapterBank.open(bank.path)
    assert list(model.tasks) == list(model.router.names) == fresh.tasks()
    want = fresh.router()
    assert torch.equal(model.router.weight, want.weight) and torch.equal(model.router.bias, want.bias)
    for name in fresh.tasks():  # every expert and head is the committed version's, value for value
        assert model.tasks[name].labels == tuple(fresh.store.read_config(name)["labels"])
        stored = fresh.store.read_tensors(name, "adapter")
        assert all(torch.equal(t, model.export_task(name)["adapter"][k]) for k, t in stored.items())
    assert len(predict(model, ["will it rain tomorrow", "book a table"], max_length=32)) == 2


def test_read_consistent_gives_up_when_every_read_sees_a_commit(bank):
    reader, writer = AdapterBank.open(bank.path), AdapterBank.open(bank.path)
    calls = []

    def read():  # each attempt finds a newer commit (the store re-read the manifest mid-read)
        calls.append(1)
        writer.store.write_router(*writer.store.read_router(), writer.tasks())
        reader.store.reload()
        return "mixed"

    with pytest.raises(BankChangedError, match="changed during each of 3 reads"):
        read_consistent(reader.store, read, attempts=3)
    assert len(calls) == 3
    assert read_consistent(reader.store, lambda: "stable") == "stable"
    with pytest.raises(KeyError):  # a real error of a stable read is raised, not retried
        read_consistent(reader.store, lambda: {}["x"])


def test_live_bank_reloads_only_on_a_new_generation(bank):
    live = LiveBank(bank.path)
    first = live.current()
    assert live.current() is first and live.reloads == 1 and live.generation == disk_generation(bank.path)
    AdapterBank.open(bank.path).remove("b")
    second = live.current()
    assert second is not first and list(second.tasks) == ["a"] and live.reloads == 2
    assert list(first.tasks) == ["a", "b"]  # a model handed out before is never changed


def test_readers_under_load_short(tiny_bert_dir, tmp_path):
    mod = bench_module()
    args = mod.parse(["--base", str(tiny_bert_dir), "--work", str(tmp_path / "run"), "--readers", "2",
                      "--writers", "1", "--rounds", "2", "--max-train", "32", "--max-test", "8", "--think", "0.02",
                      "--lock-timeout", "0.3", "--hold-lock", "1.0", "--hold-every", "3", "--out", ""])
    out = mod.run(args)
    assert out["errors"] == 0, out["error_samples"]
    assert out["changes_landed"] + out["changes_refused"] == 5  # 2 adds, 2 replaces, 1 remove
    assert out["changes_landed"] >= 1 and out["landed_changes_unseen"] == 0 and out["stale_or_unknown_states"] == 0
    assert out["versions_loaded"] >= 2 * 2  # each reader loaded the seeded bank and at least one newer version
    final = AdapterBank.open(args.bank)
    assert [p for p in final.verify(full=True)] == []
    assert final.store.generation == out["final_generation"]
