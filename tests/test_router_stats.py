"""Router statistics that stay right: after any sequence of add / replace / remove the incremental
statistics (and the router fitted on them) equal those built from scratch on the tasks present; the
stored per-task scatter factor round-trips; an old bank's task is refused (or, when allowed, kept with
a warning) instead of drifting silently."""

from __future__ import annotations

import warnings

import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from adaptbank.bank.facade import AdapterBank
from adaptbank.bank.router_memory import RouterDriftError, memory_stats, task_memory
from adaptbank.cli.main import main
from adaptbank.core.config import LoRAConfig, TrainConfig
from adaptbank.routing.lda import LDARouter, RouterStats

DIM = 5
PROBES = torch.randn(64, DIM, generator=torch.Generator().manual_seed(7), dtype=torch.float64) * 3


def features(n: int, seed: int, scale: float) -> torch.Tensor:
    """``n`` examples (N, F) of a task: a seeded centre and a correlated spread of size ``scale``."""
    g = torch.Generator().manual_seed(seed)
    centre = torch.randn(DIM, generator=g) * 4
    mix = torch.randn(DIM, DIM, generator=g) + torch.eye(DIM)
    return (centre + torch.randn(n, DIM, generator=g) @ mix * scale).float()  # (N, F)


def from_scratch(tasks: dict[str, torch.Tensor]) -> RouterStats:
    """The statistics of ``tasks`` (in order) built in one go, each task's scatter from its memory file."""
    stats = RouterStats(DIM)
    for name, x in tasks.items():
        stats.add(name, *memory_stats(task_memory(x)))
    return stats


sizes = st.integers(1, 14)  # below and above F: both shapes of the factor (r = min(N, F))
scales = st.sampled_from([1e-2, 1.0, 30.0])  # unequal magnitudes: removing a large task must leave no residue


class IncrementalEqualsScratch(RuleBasedStateMachine):
    """Add, replace and remove tasks of unequal sizes through ``RouterStats`` as the bank does (each
    removal passes back the scatter stored in the task's memory, the stats round-trip through their
    stored tensors), and compare with a from-scratch fit after every step."""

    def __init__(self) -> None:
        super().__init__()
        self.stats = RouterStats(DIM)
        self.tasks: dict[str, torch.Tensor] = {}  # the tasks present, in router order
        self.memory: dict[str, dict[str, torch.Tensor]] = {}
        self.serial = 0
        self.peak = 0.0  # the largest pooled scatter entry so far: the scale float64 rounding is relative to

    def _store(self, name: str, x: torch.Tensor) -> tuple[torch.Tensor, int, torch.Tensor | None]:
        self.memory[name] = task_memory(x)
        return memory_stats(self.memory[name])

    @rule(n=sizes, seed=st.integers(0, 10**6), scale=scales)
    def add(self, n: int, seed: int, scale: float) -> None:
        name = f"t{self.serial}"
        self.serial += 1
        x = features(n, seed, scale)
        self.stats.add(name, *self._store(name, x))
        self.tasks[name] = x

    @precondition(lambda self: self.tasks)
    @rule(data=st.data(), n=sizes, seed=st.integers(0, 10**6), scale=scales)
    def replace(self, data: st.DataObject, n: int, seed: int, scale: float) -> None:
        name = data.draw(st.sampled_from(sorted(self.tasks)))
        old = memory_stats(self.memory[name])[2]
        x = features(n, seed, scale)
        self.stats.replace(name, *self._store(name, x), old_scatter=old)
        self.tasks[name] = x  # keeps its place in the dict, as the task keeps its place in the bank

    @precondition(lambda self: self.tasks)
    @rule(data=st.data())
    def remove(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.tasks)))
        self.stats.remove(name, memory_stats(self.memory.pop(name))[2])
        del self.tasks[name]

    @invariant()
    def equals_from_scratch(self) -> None:
        self.stats = RouterStats.from_tensors(self.stats.names, self.stats.to_tensors())  # as stored by the bank
        self.peak = max(self.peak, float(self.stats.scatter.abs().max()))
        want = from_scratch(self.tasks)
        got = self.stats
        assert got.names == want.names == list(self.tasks)
        assert got.counts == want.counts and got.scatter_count == want.scatter_count and got.stale_count == 0
        assert all(torch.equal(a, b) for a, b in zip(got.means, want.means))
        if not self.tasks:
            assert torch.equal(got.scatter, torch.zeros(DIM, DIM, dtype=torch.float64))  # reset, no residue
            return
        # float64 rounding: at most eps64 * peak per update, a few dozen updates per example
        torch.testing.assert_close(got.scatter, want.scatter, rtol=0, atol=1e-12 * self.peak)
        mine, theirs = LDARouter.fit(got, layers=1), LDARouter.fit(want, layers=1)
        assert torch.equal(mine(PROBES).argmax(1), theirs(PROBES).argmax(1))
        torch.testing.assert_close(mine.weight, theirs.weight, rtol=1e-5, atol=1e-6 * float(theirs.weight.abs().max()))


IncrementalEqualsScratch.TestCase.settings = settings(max_examples=40, stateful_step_count=15, deadline=None,
                                                      suppress_health_check=[HealthCheck.too_slow])
test_incremental_stats_equal_from_scratch = IncrementalEqualsScratch.TestCase


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 14), seed=st.integers(0, 10**6), scale=scales)
def test_stored_factor_is_the_scatter_in_its_bytes(n, seed, scale):
    """The packed float32 QR factor gives the task's scatter to float32 precision, in
    ``8 F + 4 (r F - r (r - 1) / 2)`` bytes with r = min(N, F)."""
    x = features(n, seed, scale)
    memory = task_memory(x)
    mean, count, scatter = memory_stats(memory)
    want_mean, want = RouterStats.task_stats(x)
    assert count == n and torch.equal(mean, want_mean)
    torch.testing.assert_close(scatter, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()) + 1e-12)
    r = min(n, DIM)
    nbytes = sum(t.numel() * t.element_size() for k, t in memory.items() if k in ("mean", "scatter_factor"))
    assert nbytes == 8 * DIM + 4 * (r * DIM - r * (r - 1) // 2)
    assert memory["scatter_factor"].dtype == torch.float32


def test_stats_refuse_to_drop_a_pooled_scatter_they_are_not_given():
    mean, scatter = RouterStats.task_stats(features(6, 0, 1.0))
    stats = RouterStats(DIM)
    stats.add("a", mean, 6, scatter)
    with pytest.raises(ValueError, match="'a'.s scatter is in the pooled scatter"):
        stats.remove("a")
    stats.remove("a", keep_scatter=True)
    assert stats.stale_count == 6 and stats.scatter.abs().max() > 0  # kept, and counted as stale


# ------------------------------------------------------------------------------------------ the bank
def router_features(bank: AdapterBank, model, name: str) -> torch.Tensor:
    """The router features (N, F) of a stored task's training split, drawn as add-task draws it."""
    from adaptbank.data.load import load_task
    from adaptbank.data.specs import TaskSpec
    from adaptbank.data.tokens import tokenize
    from adaptbank.training.features import frozen_pass

    cfg = bank.store.read_config(name)
    train = TrainConfig.from_dict(cfg["train"])
    data = load_task(TaskSpec.from_dict(cfg["spec"]), max_train=train.max_train, max_test=train.max_test,
                     seed=train.seed)
    ids = tokenize(model.tokenizer, [e.text for e in data.train], train.max_length)
    return frozen_pass(model, ids, router_layers=bank.router_layers)[1]


def test_bank_router_after_add_replace_remove_equals_a_fresh_fit(tiny_bert_dir, tmp_path):
    bank = AdapterBank.init(tmp_path / "bank", base=str(tiny_bert_dir))
    for task, n in (("weather", 90), ("intent", 60), ("topic", 40)):  # unequal sizes
        bank.add_task(task, LoRAConfig(rank=2), TrainConfig(epochs=1, max_train=n, max_test=30, max_length=24))
    before = bank.router()
    bank.add_task("weather", LoRAConfig(rank=2), TrainConfig(epochs=1, max_train=25, max_test=30, max_length=24,
                                                             seed=3), replace=True)
    assert bank.router().names == bank.tasks() == ["weather", "intent", "topic"]  # the replaced task keeps its place
    bank.remove("intent")
    assert bank.tasks() == ["weather", "topic"]

    model = bank.load()
    feats = {name: router_features(bank, model, name) for name in bank.tasks()}
    scratch = RouterStats(bank._router_dim)
    for name, x in feats.items():
        mean, scatter = RouterStats.task_stats(x)  # (F,), (F, F) exact, from the raw features
        scratch.add(name, mean, len(x), scatter)
    stored = RouterStats.from_tensors(bank.tasks(), bank.store.read_router()[0]["stats"])
    assert stored.means == [None, None]  # the stored router keeps no means: each task's memory file holds its own
    stored.fill_means(lambda name: bank.store.read_tensors(name, "memory", keys=["mean"])["mean"])
    assert stored.counts == scratch.counts == [25, 40]
    assert stored.scatter_count == scratch.scatter_count == 65 and stored.stale_count == 0  # no removed share left
    for a, b in zip(stored.means, scratch.means):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(stored.scatter, scratch.scatter, rtol=1e-4, atol=1e-5 * float(scratch.scatter.abs().max()))

    fresh = LDARouter.fit(scratch, layers=bank.router_layers, shrinkage=bank.router_config.shrinkage)
    router = bank.router()
    torch.testing.assert_close(router.weight, fresh.weight, rtol=1e-3, atol=1e-4 * float(fresh.weight.abs().max()))
    probe = torch.cat(list(feats.values()))  # the remaining tasks' texts, through the router
    assert torch.equal(router(probe).argmax(1), fresh(probe).argmax(1))
    assert not torch.equal(before.weight[[0, 2]], router.weight)  # the replace and remove did change it
    assert bank.fit_router() == bank.tasks()  # the refit from memory rebuilds the same router
    torch.testing.assert_close(bank.router().weight, router.weight, rtol=1e-4, atol=1e-5 * float(router.weight.abs().max()))


def test_old_bank_task_is_refused_with_the_fix_or_kept_with_a_warning(tiny_bert_dir, tmp_path):
    bank = AdapterBank.init(tmp_path / "bank", base=str(tiny_bert_dir))
    fast = TrainConfig(epochs=1, max_train=40, max_test=20, max_length=24)
    for task in ("weather", "intent", "topic"):
        bank.add_task(task, LoRAConfig(rank=2), fast)
    # make "weather" an old bank's task: memory without the scatter factor, stats without "pooled"
    entry = bank.store.task_entry("weather")
    files = {stem: bank.store.read_tensors("weather", stem) for stem in bank.store.stems("weather")}
    files["memory"] = {"mean": files["memory"]["mean"].float(), "count": files["memory"]["count"]}
    bank.store.write_task("weather", files, bank.store.read_config("weather"), shared=entry["shared"], replace=True)
    rfiles, meta = bank.store.read_router()
    rfiles["stats"].pop("pooled")
    bank.store.write_router(rfiles, meta, meta["expert_order"])
    bank.store.reload()
    router_before = bank.store.read_router()[0]["stats"]["scatter"].clone()

    with pytest.raises(RouterDriftError) as err:
        bank.remove("weather")
    message = str(err.value)
    assert "task 'weather'" in message and "no 'scatter_factor'" in message and "--allow-router-drift" in message
    assert "--replace" in message and "adaptbank router fit" in message
    with pytest.raises(RouterDriftError, match="replacing it"):  # refused before any training
        bank.add_task("weather", LoRAConfig(rank=2), fast, replace=True)
    assert bank.tasks() == ["weather", "intent", "topic"]
    assert torch.equal(bank.store.read_router()[0]["stats"]["scatter"], router_before)

    res = CliRunner().invoke(main, ["remove", str(bank.path), "weather"])
    assert res.exit_code != 0 and "task 'weather'" in res.output and "Traceback" not in res.output
    # removing a task that holds its factor is exact even in this bank
    bank.remove("intent")
    # the escape hatch: the old behaviour, said out loud
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = CliRunner().invoke(main, ["remove", str(bank.path), "weather", "--allow-router-drift"])
    assert res.exit_code == 0, res.output
    assert any("task 'weather'" in str(w.message) and "its share stays in" in str(w.message) for w in caught)
    bank.store.reload()
    stored = RouterStats.from_tensors(bank.tasks(), bank.store.read_router()[0]["stats"])
    assert bank.tasks() == ["topic"] and stored.stale_count == 40  # weather's share stayed, and is counted
    # every task left holds its factor: router fit rebuilds the pool exactly, the drift is gone
    assert bank.fit_router() == ["topic"]
    stored = RouterStats.from_tensors(bank.tasks(), bank.store.read_router()[0]["stats"])
    want = memory_stats(bank.store.read_tensors("topic", "memory"))[2]
    assert stored.stale_count == 0 and torch.equal(stored.scatter, want)
