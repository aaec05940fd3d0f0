"""Router pools (``routing.pools``): the routed forward's taps compute exactly the features a frozen pass
computes, for today's mean pools and for mean + rms; incremental LDA over them equals the offline fit
with unequal task sizes; a task's memory stays within its stated bound; empty texts and a one-task
router route sensibly; a stored router without pools reads as today's."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_backbone

from adaptbank import AdaptBankModel, LoRAConfig
from adaptbank.bank.router_memory import memory_stats, router_files, stored_router, task_memory
from adaptbank.routing.lda import LDARouter, RouterStats, topk_gates
from adaptbank.routing.pools import check_pools, feature_dim, router_features

BOTH = ("mean", "rms")


def model_and_batch() -> tuple[AdaptBankModel, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = AdaptBankModel(tiny_backbone("bert"))
    model.reserved_layers = 1
    for name in "ab":
        model.add_task(name, LoRAConfig(rank=4, dropout=0.0), ["x", "y"])
        with torch.no_grad():
            for p in model.expert_parameters(name):
                p.copy_(torch.randn(p.shape) * 0.3)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 120, (5, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[3, 4:] = 0
    mask[4, 1:] = 0  # a one-token row: an "empty" text keeps only its first token
    return model.eval(), {"input_ids": ids, "attention_mask": mask}


def frozen_features(model: AdaptBankModel, batch: dict[str, torch.Tensor], pools: tuple[str, ...]) -> torch.Tensor:
    """Router features from a plain frozen pass (no experts), the way a bank computes them at add-task."""
    model.route()
    with torch.no_grad():
        states = model.encoder(**batch, output_hidden_states=True).hidden_states[:2]  # embeddings, layer 0
    return router_features(states, batch["attention_mask"], pools)  # (B, F)


@pytest.mark.parametrize("pools", [("mean",), BOTH])
def test_routed_taps_compute_the_frozen_pass_features(pools):
    model, batch = model_and_batch()
    D = model.hidden_size
    F = feature_dim(1, D, pools)
    feats = frozen_features(model, batch, pools)
    assert feats.shape == (5, F)
    stats = RouterStats(F)
    g = torch.Generator().manual_seed(5)
    for name in "ab":
        stats.add(name, *_ms(torch.randn(30, F, generator=g, dtype=torch.float64)))
    router = LDARouter.fit(stats, layers=1, pools=pools)
    model.attach_router(router, top_k=1)
    with torch.no_grad():
        out = model(**batch, routed=True)
    torch.testing.assert_close(out.scores, router(feats), atol=1e-4, rtol=1e-4)
    assert torch.equal(out.index[:, 0].cpu(), router(feats).argmax(1))
    assert torch.isfinite(out.pooled).all()
    if pools == ("mean",):  # today's features: the masked means of embeddings and layer 0, in that order
        from adaptbank.core.pooling import mean_pool

        model.route()
        with torch.no_grad():
            hs = model.encoder(**batch, output_hidden_states=True).hidden_states
        today = torch.cat([mean_pool(h, batch["attention_mask"]) for h in hs[:2]], -1)
        torch.testing.assert_close(feats, today)
    else:  # layer-major: [mean, rms] of the embeddings, then of layer 0; rms >= |mean| per dimension
        blocks = feats.reshape(5, 2, 2, D)  # (B, state, pool, D)
        assert (blocks[:, :, 1] + 1e-5 >= blocks[:, :, 0].abs()).all()


def _ms(x: torch.Tensor) -> tuple[torch.Tensor, int, torch.Tensor]:
    mean, scatter = RouterStats.task_stats(x)
    return mean, x.shape[0], scatter


def test_incremental_fit_on_mean_rms_features_equals_offline_with_unequal_tasks():
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    model, _ = model_and_batch()
    g = torch.Generator().manual_seed(11)
    sizes = [7, 40, 13]  # unequal, one task smaller than F
    feats = []
    for t, n in enumerate(sizes):  # each task: texts drawn from its own slice of the vocabulary
        ids = torch.randint(1 + 35 * t, 35 * (t + 1), (n, 8), generator=g)
        feats.append(frozen_features(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, BOTH).double())
    F = feats[0].shape[1]
    stats = RouterStats(F)
    for t, x in enumerate(feats):  # one task at a time: only its memory file is read
        stats.add(f"t{t}", *memory_stats(task_memory(x)))
    inc = LDARouter.fit(stats, layers=1, shrinkage=0.1, pools=BOTH)
    X, y = torch.cat(feats), torch.cat([torch.full((n,), t) for t, n in enumerate(sizes)])
    sk = LinearDiscriminantAnalysis(solver="lsqr", shrinkage=0.1, priors=[1 / 3] * 3).fit(X.numpy(), y.numpy())
    # sklearn's lsqr LDA: the same covariance (pooled within-class / (N - E)), shrunk the same way
    assert torch.equal(inc(X).argmax(1), torch.as_tensor(sk.predict(X.numpy())))
    assert (inc(X).argmax(1) == y).float().mean() > 0.9
    batch_stats = RouterStats(F)  # all at once, in another order: the same router up to the order
    for t in (2, 0, 1):
        batch_stats.add(f"t{t}", *memory_stats(task_memory(feats[t])))
    batch_stats.reorder(["t0", "t1", "t2"])
    torch.testing.assert_close(LDARouter.fit(batch_stats, layers=1, pools=BOTH).weight, inc.weight, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", [10, 200])
def test_task_memory_is_within_its_stated_bound(n):
    F = feature_dim(2, 16, BOTH)  # 96 features
    mem = task_memory(torch.randn(n, F))
    nbytes = sum(t.numel() * t.element_size() for t in mem.values())
    r = min(n, F)
    assert nbytes == 8 * F + 4 * (r * F - r * (r - 1) // 2) + 16  # mean, packed factor, count and rank
    assert nbytes <= 8 * F + 2 * F * (F + 1) + 16


def test_one_task_router_and_empty_texts_route_sensibly():
    model, batch = model_and_batch()
    F = feature_dim(1, model.hidden_size, BOTH)
    stats = RouterStats(F)
    stats.add("a", *_ms(torch.randn(4, F, dtype=torch.float64)))
    router = LDARouter.fit(stats, layers=1, pools=BOTH)
    index, weight = topk_gates(router(frozen_features(model, batch, BOTH)), 2)
    assert index.tolist() == [[0]] * 5 and torch.equal(weight, torch.ones(5, 1))
    none = router_features([torch.randn(2, 3, 4)], torch.zeros(2, 3, dtype=torch.long), BOTH)  # no real token
    assert torch.equal(none, torch.zeros(2, 8))


def test_stored_router_without_pools_reads_as_mean_and_pools_round_trip():
    stats = RouterStats(6)
    g = torch.Generator().manual_seed(2)
    for name in "ab":
        stats.add(name, *_ms(torch.randn(9, 6, generator=g, dtype=torch.float64)))
    means = dict(zip(stats.names, stats.means))
    files, meta, _ = router_files(stats, 1, 0.1)
    assert "pools" not in meta and stored_router(files, meta, means.__getitem__).pools == ("mean",)  # old format
    files, meta, _ = router_files(stats, 1, 0.1, pools=("rms", "mean"))
    assert meta["pools"] == ["mean", "rms"] and stored_router(files, meta, means.__getitem__).pools == BOTH
    with pytest.raises(ValueError, match="router pools must be distinct names from"):
        check_pools(("mean", "max"))
    with pytest.raises(ValueError, match="at least one"):
        check_pools(())


def test_a_bank_made_with_mean_rms_pools_routes_on_them_and_refits_exactly(tiny_bert_dir, tmp_path):
    """`adaptbank init --router-pools mean+rms`: each task's router memory holds the mean and rms pools of
    the frozen pass, the router is stored with those pools and routes the texts of two tasks apart (over
    70% each; the tiny random model, chance 50%),
    the incremental router equals `router fit`, and a bad value is refused before any folder exists."""
    from click.testing import CliRunner

    from adaptbank.bank.facade import AdapterBank
    from adaptbank.cli.main import main
    from adaptbank.core.config import RouterConfig, TrainConfig

    r = CliRunner()
    bad = r.invoke(main, ["init", str(tmp_path / "bad"), "--base", str(tiny_bert_dir), "--router-pools", "mean+max"])
    assert bad.exit_code == 1 and "pools must be distinct names from mean, rms joined by '+'" in bad.output
    assert "got 'mean+max'" in bad.output and not (tmp_path / "bad").exists()
    res = r.invoke(main, ["init", str(tmp_path / "bank"), "--base", str(tiny_bert_dir), "--router-layers", "1",
                          "--router-pools", "rms+mean"])
    assert res.exit_code == 0, res.output
    bank = AdapterBank.open(tmp_path / "bank")
    assert bank.router_config == RouterConfig(layers=1, pools="rms+mean") and bank.router_pools == BOTH
    fast = TrainConfig(epochs=1, max_train=60, max_test=40, max_length=24)
    for spec in ("weather", "topic"):
        bank.add_task(spec, LoRAConfig(rank=2), fast)
    F = feature_dim(1, int(bank.base["hidden_size"]), BOTH)
    mean, count, scatter = memory_stats(bank.store.read_tensors("weather", "memory"))
    assert mean.shape == (F,) and count == 60
    router = bank.router()
    assert router.pools == BOTH and router.weight.shape[-1] == F
    incremental = router.weight.clone(), router.bias.clone()
    bank.fit_router()
    torch.testing.assert_close((bank.router().weight, bank.router().bias), incremental, atol=1e-9, rtol=1e-9)
    routed = bank.evaluate_routed()
    assert all(routed["tasks"][name]["router_accuracy"] > 0.7 for name in ("weather", "topic")), {n: r["router_accuracy"] for n, r in routed["tasks"].items()}
