"""The learned router: incremental LDA equals the offline fit, routing happens inside one forward,
mixed rows equal single-row runs, and the bank's routed commands behave on bad input."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from conftest import tiny_backbone

from adaptbank import AdaptBankModel, LoRAConfig
from adaptbank.bank.facade import AdapterBank
from adaptbank.cli.main import main
from adaptbank.core.config import TrainConfig
from adaptbank.routing.lda import LDARouter, RouterStats, topk_gates

FAST = TrainConfig(epochs=1, max_train=120, max_test=60, max_length=32)


def blobs(noise_seed: int = 0, n: int = 60, dim: int = 6, tasks: int = 4) -> list[torch.Tensor]:
    """Gaussian tasks with fixed centres and a shared correlated covariance; ``noise_seed`` draws samples."""
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(tasks, dim, generator=g) * 2
    mix = torch.randn(dim, dim, generator=g) / dim ** 0.5 + torch.eye(dim)
    g.manual_seed(100 + noise_seed)
    return [centers[t] + torch.randn(n, dim, generator=g) @ mix for t in range(tasks)]


def test_incremental_lda_equals_offline_sklearn_fit():
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    feats = blobs()
    stats = RouterStats(feats[0].shape[1])
    for t, x in enumerate(feats):  # one task at a time, only its mean and scatter are kept
        stats.add(f"t{t}", *_ms(x))
    router = LDARouter.fit(stats, layers=1, shrinkage=0.1)
    X = torch.cat(feats)
    y = torch.arange(len(feats)).repeat_interleave(feats[0].shape[0])
    sk = LinearDiscriminantAnalysis(solver="lsqr", shrinkage=0.1, priors=[1 / len(feats)] * len(feats)).fit(X, y)
    test = torch.cat(blobs(noise_seed=1))
    ours = router(test).argmax(1)
    assert torch.equal(ours, torch.as_tensor(sk.predict(test.numpy())))
    assert (ours == y).float().mean() > 0.8  # the blobs are separable enough to make the test meaningful
    # remove + re-add round trips through the tensor form
    again = RouterStats.from_tensors(stats.names, stats.to_tensors())
    assert torch.equal(LDARouter.fit(again, layers=1).weight, router.weight)


def _ms(x: torch.Tensor) -> tuple[torch.Tensor, int, torch.Tensor]:
    mean, scatter = RouterStats.task_stats(x)
    return mean, x.shape[0], scatter


def test_topk_gates_renormalise():
    scores = torch.tensor([[3.0, 1.0, 2.0], [0.0, 0.0, 5.0]])
    index, weight = topk_gates(scores, 2)
    assert index.tolist() == [[0, 2], [2, 0]]
    torch.testing.assert_close(weight.sum(1), torch.ones(2))
    p = scores[0].softmax(0)
    torch.testing.assert_close(weight[0], torch.stack([p[0], p[2]]) / (p[0] + p[2]))


def routed_model(top_k: int = 2) -> tuple[AdaptBankModel, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = AdaptBankModel(tiny_backbone("bert"))
    model.reserved_layers = 1
    for name in "abc":
        model.add_task(name, LoRAConfig(rank=4, dropout=0.0, targets="all-linear"), ["x", "y"])
        with torch.no_grad():
            for p in model.expert_parameters(name):
                p.copy_(torch.randn(p.shape) * 0.3)
    stats = RouterStats(2 * model.hidden_size)
    g = torch.Generator().manual_seed(3)
    for name in "abc":
        stats.add(name, *_ms(torch.randn(20, 2 * model.hidden_size, generator=g)))
    model.attach_router(LDARouter.fit(stats, layers=1), top_k=top_k)
    ids = torch.randint(1, 120, (6, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[4, 6:] = 0
    return model, {"input_ids": ids, "attention_mask": mask}


def test_routed_forward_runs_the_backbone_once_and_rows_match_single_runs():
    model, batch = routed_model(top_k=2)
    model.eval()  # the heads' dropout off: logits are compared below
    calls = []
    emb = model.backbone.embeddings
    original = emb.forward
    emb.forward = lambda *a, **k: calls.append(1) or original(*a, **k)  # count passes (test only)
    out = model(**batch, routed=True)
    assert len(calls) == 1, "the router must not run a second backbone pass"
    mixed, index, weight = out.pooled, out.index.clone(), out.weight.clone()
    assert index.shape == (6, 2) and len(set(index[:, 0].tolist())) > 1, "rows should use different experts"
    assert out.scores.shape == (6, len(model.tasks))
    for i in range(6):
        model.route(index=index[i: i + 1], weight=weight[i: i + 1])
        single = model.features(**{k: v[i: i + 1, : int(batch["attention_mask"][i].sum())] for k, v in batch.items()})
        torch.testing.assert_close(mixed[i: i + 1], single, atol=1e-5, rtol=1e-5)
        top = out.tasks[i]
        assert top == model.state.experts[int(index[i, weight[i].argmax()])]
        n = len(model.tasks[top].labels)
        torch.testing.assert_close(out.logits[i, :n], model.heads[top](single)[0], atol=1e-5, rtol=1e-5)
        assert torch.isinf(out.logits[i, n:]).all()
    # top-1 routing is exactly the chosen task's expert
    model.attach_router(model.router, top_k=1)
    top1 = model(**batch, routed=True)
    for i, e in enumerate(top1.index[:, 0].tolist()):
        model.route(task=model.state.experts[e])
        torch.testing.assert_close(top1.pooled[i: i + 1], model.features(**{k: v[i: i + 1] for k, v in batch.items()}),
                                   atol=1e-5, rtol=1e-5)


def test_router_refuses_experts_in_its_layers():
    model = AdaptBankModel(tiny_backbone("bert"))
    model.add_task("a", LoRAConfig(targets="qv"), ["x", "y"])  # layers 0 and 1
    stats = RouterStats(2 * model.hidden_size)
    stats.add("a", torch.zeros(2 * model.hidden_size), 1, None)
    with pytest.raises(ValueError, match="layers the router reads"):
        model.attach_router(LDARouter.fit(stats, layers=1))


@pytest.fixture
def bank(tiny_bert_dir, tmp_path) -> AdapterBank:
    b = AdapterBank.init(tmp_path / "bank", base=str(tiny_bert_dir))
    for task in ("weather", "intent"):
        b.add_task(task, LoRAConfig(rank=4), FAST)
    return b


def _task_split(bank: AdapterBank, name: str, split: str) -> tuple[list[str], list[int], TrainConfig]:
    """Texts and labels of a stored task's split, drawn as add-task and eval draw them."""
    from adaptbank.data.load import load_task
    from adaptbank.data.specs import TaskSpec

    cfg = bank.store.read_config(name)
    train = TrainConfig.from_dict(cfg["train"])
    data = load_task(TaskSpec.from_dict(cfg["spec"]), max_train=train.max_train, max_test=train.max_test,
                     seed=train.seed)
    examples = data.train if split == "train" else data.test
    return [e.text for e in examples], [e.label for e in examples], train


def test_bank_router_equals_offline_sklearn_lda_on_unequal_tasks(bank):
    """The router the bank grows one task at a time equals scikit-learn's LDA fitted offline on all
    the raw router features at once, with unequal task sizes, and routes the test splits as it does."""
    import numpy as np
    from sklearn.covariance import ShrunkCovariance
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    from adaptbank.data.tokens import tokenize
    from adaptbank.training.evaluate import predict_task
    from adaptbank.training.features import frozen_pass

    bank.add_task("topic", LoRAConfig(rank=4), TrainConfig(epochs=1, max_train=50, max_test=60, max_length=32))
    names = ["weather", "intent", "topic"]  # three tasks: scikit-learn folds two classes into one score
    assert bank.store.read_router()[1]["expert_order"] == names == bank.tasks()
    model = bank.load()  # the router's layers hold no experts, so its features are the frozen base's

    def router_features(texts: list[str], max_length: int) -> torch.Tensor:
        return frozen_pass(model, tokenize(model.tokenizer, texts, max_length), router_layers=bank.router_layers)[1]

    feats = []
    for name in names:
        texts, _, train = _task_split(bank, name, "train")
        feats.append(router_features(texts, train.max_length))
    counts = np.array([len(f) for f in feats])
    assert len(set(counts.tolist())) > 1, "unequal task sizes: a per-task weighting error must show"
    X = torch.cat(feats).double().numpy()
    y = np.repeat(np.arange(len(names)), counts)
    n, e = len(y), len(names)
    # The same model as routing.lda, fitted independently: with priors n_k / N scikit-learn pools the
    # tasks' biased covariances into scatter / N, and ShrunkCovariance shrinks as (1 - a) S + a tr(S)/F I,
    # the bank's form. The bank divides the scatter by N - E instead; shrinking is linear, so its weights
    # are (N - E) / N times coef_ and its biases (N - E) / N times intercept_ less the log-priors (the bank
    # uses equal priors).
    priors = counts / n
    shrinkage = bank.router_config.shrinkage
    sk = LinearDiscriminantAnalysis(solver="lsqr", covariance_estimator=ShrunkCovariance(shrinkage=shrinkage),
                                    priors=priors).fit(X, y)
    want_w = torch.as_tensor(sk.coef_ * (n - e) / n)
    want_b = torch.as_tensor((sk.intercept_ - np.log(priors)) * (n - e) / n)

    def assert_is_reference(router: LDARouter) -> None:
        assert router.names == names
        torch.testing.assert_close(router.weight.double(), want_w, rtol=1e-4, atol=1e-5 * float(want_w.abs().max()))
        torch.testing.assert_close(router.bias.double(), want_b, rtol=1e-4, atol=1e-5 * float(want_b.abs().max()))

    assert_is_reference(bank.router())  # grown one task at a time at add-task
    assert bank.fit_router() == names  # refit from the bank's memory: stored statistics, no raw text
    assert_is_reference(bank.router())

    res = bank.evaluate_routed()
    assert res["top_k"] == 1 and set(res["tasks"]) == set(names)
    for i, name in enumerate(names):
        texts, labels, train = _task_split(bank, name, "test")
        test = router_features(texts, train.max_length)
        ref_scores = torch.as_tensor(sk.decision_function(test.double().numpy()) - np.log(priors))  # equal priors
        margin = ref_scores.topk(2, dim=1).values.diff(dim=1).abs().min()
        assert margin > 1e-2, "no near-ties, so routed and offline choices must agree row by row"
        ref_route = ref_scores.argmax(1) == i  # (N,) the reference picks the true task
        oracle_hit = predict_task(model, name, texts, max_length=train.max_length).argmax(1) == torch.tensor(labels)
        row = res["tasks"][name]
        assert row["n"] == len(texts)
        # the router inside the routed forward chooses exactly what the offline LDA chooses
        assert row["router_accuracy"] == pytest.approx(ref_route.double().mean().item(), abs=1e-9)
        # oracle accuracy with the router attached reproduces the add-time accuracy exactly
        assert row["oracle_accuracy"] == bank.info(name)["metrics"]["test_accuracy"]
        assert row["oracle_accuracy"] == pytest.approx(oracle_hit.double().mean().item(), abs=1e-9)
        # top-1 routing: a row is right when it went to its own expert (the three label lists differ,
        # so another task's head never counts) and that expert's head is right
        assert row["routed_accuracy"] == pytest.approx((ref_route & oracle_hit).double().mean().item(), abs=1e-9)
        # Thresholds: the seeded tiny BERT and the built-in tasks are deterministic, and the offline LDA
        # above identifies 0.78 (topic) to 0.93 (weather) of each test split, 0.87 on average. A router
        # that ignores its input (constant or uniform gates) averages 1/3 over three tasks, with 0 on two
        # of them; measured on this bank, reversed expert order gives 0.02 on weather and router features
        # pooled over the padding 0.42.
        assert row["router_accuracy"] >= 0.7, (name, row)
    assert res["average"]["router_accuracy"] >= 0.8, res["average"]
    bank.remove("intent")
    assert bank.store.read_router()[1]["expert_order"] == ["weather", "topic"]


def test_predict_cli_json_and_bad_input(bank, tmp_path):
    runner = CliRunner()
    out = runner.invoke(main, ["predict", str(bank.path), "it is snowing hard in the mountains", "wake me at 7",
                               "--json", "--top-k", "2"])
    assert out.exit_code == 0, out.output
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(rows) == 2 and {"text", "task", "label", "score", "routing"} <= set(rows[0])
    assert abs(sum(rows[0]["routing"].values()) - 1.0) < 1e-4
    forced = runner.invoke(main, ["predict", str(bank.path), "hello", "--task", "intent", "--json"])
    assert json.loads(forced.stdout)["task"] == "intent"
    long = runner.invoke(main, ["predict", str(bank.path), "rain " * 300, "--json", "--max-length", "16"])
    assert long.exit_code == 0 and json.loads(long.stdout.splitlines()[-1])["truncated"] is True
    assert "truncated" in long.stderr
    for args, msg in [(["", "--json"], "input 1 is empty"), (["x", "--task", "nope"], "unknown task 'nope'"),
                      ([], "--input")]:
        res = runner.invoke(main, ["predict", str(bank.path), *args])
        assert res.exit_code != 0 and msg in res.output and "Traceback" not in res.output
    empty = tmp_path / "empty"
    AdapterBank.init(empty, base=bank.base["name"])
    res = runner.invoke(main, ["predict", str(empty), "hello"])
    assert res.exit_code != 0 and "holds no tasks" in res.output
    res = runner.invoke(main, ["eval", str(bank.path), "--routed", "--json"])
    assert res.exit_code == 0 and "routed_over_oracle" in json.loads(res.stdout)["average"]


def test_token_router_trains_gates_only_and_balances(bank):
    from adaptbank.routing.token import gate_mass, load_balance

    # the load-balancing loss is 1 for a perfectly even router and E for total collapse
    E = 4
    even = torch.full((2, 3, E), 1 / E)
    collapsed = torch.nn.functional.one_hot(torch.zeros(2, 3, dtype=torch.long), E).float()
    mask = torch.ones(2, 3)
    assert load_balance(even, mask).item() == pytest.approx(1.0)
    assert load_balance(collapsed, mask).item() == pytest.approx(E)
    assert gate_mass([even, collapsed], mask)[0].tolist() == pytest.approx([0.625, 0.125, 0.125, 0.125])
    experts_before = {k: v.clone() for k, v in bank.load().state_dict().items() if ".experts." in k}
    losses = bank.fit_token_router(epochs=3, max_train=64, lr=2e-2)
    assert sum(losses[-4:]) < sum(losses[:4])  # batches are sampled, so compare a few at each end
    model = bank.load()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in experts_before.items())
    res = bank.evaluate_routed(token_level=True)
    # untrained (zero) gates give equal mass, so argmax picks the first task: 50% on two tasks
    assert res["router"] == "token" and res["average"]["router_accuracy"] > 0.6
    out = CliRunner().invoke(main, ["predict", str(bank.path), "a cold snowy night", "--router", "token", "--json"])
    assert out.exit_code == 0, out.output
    assert set(json.loads(out.stdout)["routing"]) <= {"weather", "intent"}
    # adding a task makes the token gates stale: routed use says what to run
    bank.add_task("topic", LoRAConfig(rank=4), FAST)
    res = CliRunner().invoke(main, ["predict", str(bank.path), "x", "--router", "token"])
    assert res.exit_code != 0 and "router fit --token-level" in res.output
