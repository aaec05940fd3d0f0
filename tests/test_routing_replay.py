"""The replay router (``routing.replay``, ``init --router-replay M``) and the bank's router stored without
per-task tensors: a logistic regression over kept router vectors separates tasks that the LDA's shared
covariance blurs; a bank with it keeps M float16 vectors per task, stores the fitted weights, refits on
every change, and incremental equals `router fit`; an LDA bank's stored router holds no per-task
means or weights (they are solved at load from each task's memory), and an old router with stored
weights still reads."""

from __future__ import annotations

import pytest
import torch

from adaptbank import LoRAConfig
from adaptbank.bank.router_memory import router_files, stored_router
from adaptbank.routing.lda import LDARouter, RouterStats
from adaptbank.routing.replay import fit_replay, keep_rows


def _three_tasks(n: int, gen: torch.Generator) -> list[torch.Tensor]:
    """Task 0 spreads widely along dim 0 (std 9) and sits apart along dim 2; tasks 1 and 2 are 6.7 standard
    deviations apart along dim 0 and 1 along dim 1. The pooled covariance takes task 0's spread for all,
    so the LDA judges 1 vs 2 mostly by dim 1; a discriminative fit finds dim 0."""
    out = []
    for e in range(3):
        x = torch.randn(n, 6, generator=gen, dtype=torch.float64) * 0.3  # (n, F)
        if e == 0:
            x[:, 0] *= 30
            x[:, 2] += 5
        else:
            x[:, 0] += 1 if e == 1 else -1
            x[:, 1] += 0.15 if e == 1 else -0.15
        out.append(x)
    return out


def _stats(train: list[torch.Tensor]) -> RouterStats:
    stats = RouterStats(train[0].shape[1])
    for e, x in enumerate(train):
        mean, scatter = RouterStats.task_stats(x)
        stats.add(f"t{e}", mean, x.shape[0], scatter)
    return stats


def test_replay_router_separates_tasks_the_shared_covariance_blurs():
    g = torch.Generator().manual_seed(0)
    train, test = _three_tasks(300, g), _three_tasks(300, g)
    stats = _stats(train)
    lda = LDARouter.fit(stats, layers=1)
    weight, bias, l2 = fit_replay(stats, [keep_rows(x, 200) for x in train])
    assert weight.shape == (3, 6) and bias.shape == (3,) and l2 in (1e-3, 1e-2, 1e-1)
    x, y = torch.cat(test).float(), torch.arange(3).repeat_interleave(300)
    acc = {name: [float((s.argmax(1)[y == e] == e).float().mean()) for e in range(3)]
           for name, s in (("lda", lda(x)), ("replay", x @ weight.T + bias))}
    assert max(acc["lda"][1:]) < 0.92, acc  # the setting is one the LDA gets wrong
    assert min(acc["replay"]) > 0.97, acc


def test_replay_router_as_linear_scores_equals_its_whitened_logistic_regression():
    """The stored (W, b) are the whitened model's logits rewritten in the raw features: the scores the
    routed forward computes rank tasks as the fitted model does on the kept vectors (>= 95% right on
    their own training vectors here), and one task is the constant router."""
    g = torch.Generator().manual_seed(1)
    train = _three_tasks(120, g)
    stats = _stats(train)
    kept = [keep_rows(x, 80) for x in train]
    weight, bias, _ = fit_replay(stats, kept)
    x, y = torch.cat(kept).float(), torch.arange(3).repeat_interleave(80)
    assert float(((x @ weight.T + bias).argmax(1) == y).float().mean()) > 0.95
    one = _stats(train[:1])
    w1, b1, _ = fit_replay(one, kept[:1])
    assert torch.equal(w1, torch.zeros(1, 6)) and torch.equal(b1, torch.zeros(1))
    with pytest.raises(ValueError, match=r"2 kept-vector sets for 3 tasks"):
        fit_replay(stats, kept[:2])
    with pytest.raises(ValueError, match=r"task 't1' kept vectors have shape \(80, 5\)"):
        fit_replay(stats, [kept[0], kept[1][:, :5], kept[2]])


def test_keep_rows_is_a_seeded_float16_subset():
    x = torch.randn(50, 4, dtype=torch.float64)
    a, b = keep_rows(x, 20), keep_rows(x, 20)
    assert a.dtype == torch.float16 and a.shape == (20, 4) and torch.equal(a, b)
    rows = {tuple(r.tolist()) for r in x.half()}
    assert all(tuple(r.tolist()) in rows for r in a) and len({tuple(r.tolist()) for r in a}) == 20
    assert keep_rows(x, 500).shape == (50, 4)  # at most the task's own rows
    with pytest.raises(ValueError, match="at least one vector per task, got m=0"):
        keep_rows(x, 0)


def test_old_stored_router_with_means_and_weights_still_reads():
    g = torch.Generator().manual_seed(2)
    stats = _stats(_three_tasks(40, g))
    lda = LDARouter.fit(stats, layers=1)
    old = {"stats": stats.to_tensors(), "lda": {"weight": lda.weight, "bias": lda.bias}}  # the form before this one
    meta = {"kind": "lda", "layers": 1, "shrinkage": 0.1, "expert_order": stats.names}
    assert torch.equal(stored_router(old, meta).weight, lda.weight)
    back = RouterStats.from_tensors(stats.names, old["stats"])
    assert all(torch.equal(a, b) for a, b in zip(back.means, stats.means))
    files, meta, _ = router_files(stats, 1, 0.1)  # today's: no per-task tensor beyond counts and flags
    assert set(files) == {"stats"} and set(files["stats"]) == {"counts", "scatter", "scatter_count", "pooled"}
    means = dict(zip(stats.names, stats.means))
    torch.testing.assert_close(stored_router(files, meta, means.__getitem__).weight, lda.weight, rtol=0, atol=0)
    with pytest.raises(ValueError, match="pass read_mean"):
        stored_router(files, meta)


def test_bank_with_router_replay_refits_on_every_change_and_equals_router_fit(tiny_bert_dir, tmp_path):
    """`init --router-replay 40`: every task's memory keeps 40 float16 router vectors, the stored router is
    the replay fit (weights stored, kind replay-lr), it routes the tasks apart (over 70% each on the tiny
    random model, chance 33%), the router after adding
    tasks one by one equals `router fit` over all of them, a removal refits it over the rest, a bad value
    is refused before any folder exists, and the LDA bank's stored router stays the same size as tasks come."""
    from click.testing import CliRunner

    from adaptbank.bank.facade import AdapterBank
    from adaptbank.cli.main import main
    from adaptbank.core.config import RouterConfig, TrainConfig

    r = CliRunner()
    bad = r.invoke(main, ["init", str(tmp_path / "bad"), "--base", str(tiny_bert_dir), "--router-replay", "-3"])
    assert bad.exit_code != 0 and "replay must be a whole number >= 0" in bad.output and "got -3" in bad.output
    assert not (tmp_path / "bad").exists()
    res = r.invoke(main, ["init", str(tmp_path / "bank"), "--base", str(tiny_bert_dir), "--router-layers", "1",
                          "--router-replay", "40"])
    assert res.exit_code == 0, res.output
    bank = AdapterBank.open(tmp_path / "bank")
    assert bank.router_config == RouterConfig(layers=1, replay=40)
    lda_bank = AdapterBank.init(tmp_path / "lda", base=str(tiny_bert_dir), router=RouterConfig(layers=1))
    fast = TrainConfig(epochs=1, max_train=60, max_test=40, max_length=24)
    sizes = []
    for spec in ("weather", "topic", "intent"):
        bank.add_task(spec, LoRAConfig(rank=2), fast)
        lda_bank.add_task(spec, LoRAConfig(rank=2), fast)
        files, meta = lda_bank.store.read_router()
        sizes.append({k: v.numel() for k, v in files["stats"].items() if k not in ("counts", "pooled")})
        assert "lda" not in files and meta["kind"] == "lda"
    assert sizes[0] == sizes[1] == sizes[2]  # no per-task (E, F) tensor is rewritten per commit
    memory = bank.store.read_tensors("topic", "memory")
    assert memory["replay"].dtype == torch.float16 and memory["replay"].shape == (40, bank._router_dim)
    files, meta = bank.store.read_router()
    assert meta["kind"] == "replay-lr" and meta["replay_rows"] == [40, 40, 40] and "lda" in files
    incremental = bank.router()
    assert incremental.names == ["weather", "topic", "intent"]
    routed = bank.evaluate_routed()
    assert all(routed["tasks"][name]["router_accuracy"] > 0.7 for name in ("weather", "topic", "intent")), {n: r["router_accuracy"] for n, r in routed["tasks"].items()}
    bank.fit_router()
    torch.testing.assert_close((bank.router().weight, bank.router().bias), (incremental.weight, incremental.bias),
                               rtol=1e-5, atol=1e-5)
    bank.remove("topic")
    files, meta = bank.store.read_router()
    assert meta["replay_rows"] == [40, 40] and bank.router().names == ["weather", "intent"]
    assert not torch.equal(bank.router().weight, incremental.weight[[0, 2]])  # refitted, not cut
