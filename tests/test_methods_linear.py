"""BitFit and (IA)^3 experts on tiny models of every family: a new expert is the base model, the
trainable counts are the closed forms, merge equals the unmerged forward and unmerge restores the
exact objects, a bank round trip is bit-exact, mixed batches equal single-task runs (and top-2 mixtures
follow the side-by-side rule of ``core.adapted``), and training moves only the task's own parameters."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, tiny_backbone

from adaptbank import AdaptBankModel
from adaptbank.core.adapted import AdaptedLinear
from adaptbank.core.config import AdapterConfig, BitFitConfig, IA3Config, LoRAConfig, TrainConfig
from adaptbank.core.experts import (
    BitFitExpert,
    IA3Expert,
    IA3InputExpert,
    LoRAExpert,
    ParallelAdapterExpert,
    SerialAdapterExpert,
)
from adaptbank.core.inject import iter_adapted

METHODS = {"bitfit": BitFitConfig(), "ia3": IA3Config()}


def randomize(model: AdaptBankModel, name: str, seed: int = 0) -> None:
    """Non-trivial values everywhere: scales around 1, deltas, B and up-projections around 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.layers_of(name).values():
            for key, p in layer.experts[name].named_parameters():
                noise = torch.randn(p.shape, generator=g) * 0.3
                p.copy_(1 + noise if key == "scale" else noise)


def base_features(family: str, inputs: dict) -> torch.Tensor:
    model = AdaptBankModel(tiny_backbone(family))
    model.route()
    return model.features(**inputs)


@pytest.mark.parametrize("family", FAMILIES)
def test_new_bitfit_and_ia3_experts_are_bit_identical_to_base(family, inputs):
    expected = base_features(family, inputs)
    model = AdaptBankModel(tiny_backbone(family))
    model.add_task("b", METHODS["bitfit"], ["x", "y"])
    model.add_task("i", METHODS["ia3"], ["x", "y"])
    for task in ("b", "i"):
        model.route(task=task)
        assert torch.equal(model.features(**inputs), expected)
        model.route(task_ids=[task] * 4)
        assert torch.equal(model.features(**inputs), expected)
    model.route(task_ids=["b", "i", "i", "b"])  # the gathered path, both kinds stacked
    assert torch.equal(model.features(**inputs), expected)
    model.route(index=torch.tensor([[0, 1]] * 4), weight=torch.tensor([[0.3, 0.7]] * 4))
    assert torch.equal(model.features(**inputs), expected)


def _widths(family: str, model: AdaptBankModel) -> dict[str, int]:
    """Per transformer layer: output widths of q, k, v, o, ffn_in (all of them), ffn_out, and the
    input width of ffn_out, from the model config (not from the wrapped layers)."""
    c = model.backbone.config
    if family == "bert":
        H, F = c.hidden_size, c.intermediate_size
        return {"q": H, "k": H, "v": H, "o": H, "ffn_in": F, "ffn_out": H, "ffn_out_in": F}
    if family == "distilbert":
        H, F = c.dim, c.hidden_dim
        return {"q": H, "k": H, "v": H, "o": H, "ffn_in": F, "ffn_out": H, "ffn_out_in": F}
    if family == "gpt2":  # one fused c_attn (I, 3H) counts whole, once
        H = c.n_embd
        F = c.n_inner or 4 * H
        return {"qkv": 3 * H, "o": H, "ffn_in": F, "ffn_out": H, "ffn_out_in": F}
    if family == "llama":  # gate and up
        H, F, kv = c.hidden_size, c.intermediate_size, c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
        return {"q": H, "k": kv, "v": kv, "o": H, "ffn_in": 2 * F, "ffn_out": H, "ffn_out_in": F}
    if family == "t5":  # the encoder only: classification reads it
        inner, H, F = c.num_heads * c.d_kv, c.d_model, c.d_ff
        return {"q": inner, "k": inner, "v": inner, "o": H, "ffn_in": F, "ffn_out": H, "ffn_out_in": F}
    raise ValueError(family)


@pytest.mark.parametrize("family", FAMILIES)
def test_trainable_parameter_counts_match_closed_form(family):
    model = AdaptBankModel(tiny_backbone(family))
    w = _widths(family, model)
    n_layers = model.backbone.config.num_hidden_layers
    model.add_task("b", BitFitConfig(), ["x", "y"])
    bitfit = sum(v for k, v in w.items() if k != "ffn_out_in")  # d_out of every linear
    assert sum(p.numel() for p in model.expert_parameters("b")) == n_layers * bitfit
    model.add_task("i", IA3Config(), ["x", "y"])
    ia3 = (w["qkv"] if family == "gpt2" else w["k"] + w["v"]) + w["ffn_out_in"]  # d_out of k, v; d_in of ffn_out
    assert sum(p.numel() for p in model.expert_parameters("i")) == n_layers * ia3
    kinds = {type(layer.experts["i"]) for layer in model.layers_of("i").values()}
    assert kinds == {IA3Expert, IA3InputExpert}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", list(METHODS))
def test_merge_equals_unmerged_and_unmerge_restores_the_objects(family, method, inputs):
    model = AdaptBankModel(tiny_backbone(family))
    model.add_task("a", METHODS[method], ["x", "y"])
    model.add_task("other", LoRAConfig(rank=2, dropout=0.0, targets="qv"), ["x", "y"])
    randomize(model, "a")
    randomize(model, "other", seed=1)
    layers = dict(iter_adapted(model.backbone))
    objects = {p: (layer.base.weight, layer.base.bias) for p, layer in layers.items()}
    values = {p: (w.clone(), None if b is None else b.clone()) for p, (w, b) in objects.items()}
    model.route(task="a")
    unmerged = model.features(**inputs)
    model.merge("a")
    merged = model.features(**inputs)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)
    assert not torch.allclose(merged, base_features(family, inputs), atol=1e-4)
    for p, layer in model.layers_of("a").items():
        w, b = objects[p]
        expert = layer.experts["a"]
        assert layer.base.weight is not w or isinstance(expert, BitFitExpert)  # IA3 folds into a new weight
        if isinstance(expert, BitFitExpert):
            assert layer.base.weight is w and layer.base.bias is not b and layer.base.bias is not None
        if isinstance(expert, IA3InputExpert):
            assert layer.base.bias is b  # input scaling leaves the bias alone
        assert torch.equal(w, values[p][0])  # the frozen originals were not written in place
    with pytest.raises(RuntimeError, match="merged"):
        model.route(task="other")
    model.unmerge()
    for p, layer in layers.items():
        assert layer.base.weight is objects[p][0] and layer.base.bias is objects[p][1]
        assert torch.equal(layer.base.weight, values[p][0])
        assert (layer.base.bias is None) == (values[p][1] is None)
        assert layer.base.bias is None or torch.equal(layer.base.bias, values[p][1])
    model.route(task="a")
    assert torch.equal(model.features(**inputs), unmerged)


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_bitfit_merge_gives_a_biasless_layer_a_bias_and_unmerge_takes_it_away(family, inputs):
    model = AdaptBankModel(tiny_backbone(family))
    model.add_task("a", BitFitConfig(), ["x", "y"])
    randomize(model, "a")
    layers = model.layers_of("a")
    assert all(layer.base.bias is None for layer in layers.values())
    model.merge("a")
    for layer in layers.values():
        assert torch.equal(layer.base.bias, layer.experts["a"].delta.detach())
    model.unmerge()
    assert all(layer.base.bias is None and "bias" in layer.base._parameters for layer in layers.values())


def test_ia3_merge_on_a_layer_without_bias_matches_peft_rule():
    """IA3 output scaling on a bias-free Linear: merged weight diag(l) W, still no bias."""
    from adaptbank.routing.state import RoutingState

    state = RoutingState(experts=("a", "f"))
    lin = torch.nn.Linear(5, 3, bias=False)
    layer = AdaptedLinear(lin, state)
    layer.add_expert("a", IA3Config())
    x = torch.randn(2, 4, 5)
    with torch.no_grad():
        layer.experts["a"].scale.copy_(torch.tensor([0.5, 2.0, -1.0]))
    state.use("a")
    want = layer(x)
    torch.testing.assert_close(want, lin(x) * torch.tensor([0.5, 2.0, -1.0]), atol=0, rtol=0)
    layer.merge("a")
    assert layer.base.bias is None
    torch.testing.assert_close(layer(x), want, atol=1e-6, rtol=0)
    layer.unmerge()
    assert layer.base.weight is lin.weight and layer.base.bias is None


def test_bitfit_and_ia3_round_trip_through_the_bank_bit_exact(tiny_bert_dir, tmp_path):
    from adaptbank.bank.facade import AdapterBank

    fast = TrainConfig(epochs=1, max_train=80, max_test=40, max_length=32, lr=5e-3)
    bank = AdapterBank.init(tmp_path / "bank", base=str(tiny_bert_dir))
    bank.add_task("weather", BitFitConfig(), fast)
    bank.add_task("topic", IA3Config(), fast)
    assert [bank.info(t)["method"]["kind"] for t in bank.tasks()] == ["bitfit", "ia3"]
    model = bank.load()
    for name in bank.tasks():
        stored = bank.store.read_tensors(name, "adapter")
        loaded = model.export_task(name)["adapter"]
        assert set(stored) == set(loaded) and all(torch.equal(stored[k], loaded[k]) for k in stored)
        assert not any(name in k for k in stored)
        assert any(not torch.equal(v, torch.ones_like(v)) and not torch.equal(v, torch.zeros_like(v))
                   for v in stored.values())  # trained, not the initial values
    assert {type(layer.experts["topic"]) for layer in model.layers_of("topic").values()} == {IA3Expert, IA3InputExpert}
    again = bank.evaluate()
    assert again == {t: bank.info(t)["metrics"]["test_accuracy"] for t in bank.tasks()}  # same as at add time


# --------------------------------------------------------------------------- mixed batches and the rule
MIXED = {"lora": LoRAConfig(rank=3, dropout=0.0, targets="qv"), "bitfit": BitFitConfig(), "ia3": IA3Config(),
         "adapter": AdapterConfig(bottleneck=4, targets="houlsby")}


def rule(layer: AdaptedLinear, x: torch.Tensor, index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The side-by-side mixing rule of ``core.adapted``, written out from the experts' parameters."""
    names = layer.state.experts
    rows = []
    for b in range(x.shape[0]):
        chosen = [(layer.experts[names[int(i)]], float(w)) for i, w in zip(index[b], weight[b])
                  if names[int(i)] in layer.experts]
        xb = x[b]  # (T, I)
        pre = 1 + sum(w * (e.scale - 1) for e, w in chosen if isinstance(e, IA3InputExpert))
        h = layer.base(xb * pre) * (1 + sum(w * (e.scale - 1) for e, w in chosen if isinstance(e, IA3Expert)))
        for e, w in chosen:
            if isinstance(e, LoRAExpert):
                h = h + w * e.scaling * (xb @ e.A.T @ e.B.T)
            elif isinstance(e, BitFitExpert):
                h = h + w * e.delta
            elif isinstance(e, ParallelAdapterExpert):
                h = h + w * e.delta(xb)
        h = h + sum(w * e.delta(h) for e, w in chosen if isinstance(e, SerialAdapterExpert))
        rows.append(h)
    return torch.stack(rows)  # (B, T, O)


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_batch_of_four_kinds_equals_single_task_runs_and_top2_follows_the_rule(family, inputs):
    model = AdaptBankModel(tiny_backbone(family))
    for i, (name, cfg) in enumerate(MIXED.items()):
        model.add_task(name, cfg, ["x", "y"])
        randomize(model, name, seed=i)
    shared = [p for p, layer in iter_adapted(model.backbone) if len(layer.experts) >= 3]
    assert shared  # kinds really meet in one layer (v: LoRA, BitFit, IA3; ffn_out: adapter, BitFit, IA3)
    tasks = ["ia3", "lora", "adapter", "bitfit"]
    model.route(task_ids=tasks)
    mixed = model.features(**inputs)
    singles = []
    for i, t in enumerate(tasks):
        model.route(task=t)
        singles.append(model.features(**{k: v[i: i + 1] for k, v in inputs.items()}))
        torch.testing.assert_close(mixed[i: i + 1], singles[-1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(singles[0], model.features(**{k: v[:1] for k, v in inputs.items()}), atol=1e-4)

    # top-2 with weights (1, 0): the second expert must vanish, whatever its kind
    order = {n: i for i, n in enumerate(model.state.experts)}
    others = ["bitfit", "adapter", "ia3", "lora"]
    index = torch.tensor([[order[a], order[b]] for a, b in zip(tasks, others)])  # (B, 2)
    model.route(index=index, weight=torch.tensor([[1.0, 0.0]] * 4))
    torch.testing.assert_close(model.features(**inputs), mixed, atol=1e-5, rtol=1e-5)

    # a real top-2 mixture: every wrapped layer's output is the rule applied to its input, and each
    # row equals its own run alone
    weight = torch.tensor([[0.7, 0.3], [0.4, 0.6], [0.5, 0.5], [0.9, 0.1]])
    seen: list[tuple[AdaptedLinear, torch.Tensor, torch.Tensor]] = []
    hooks = [layer.register_forward_hook(lambda m, args, out: seen.append((m, args[0], out)))
             for _, layer in iter_adapted(model.backbone)]
    model.route(index=index, weight=weight)
    top2 = model.features(**inputs)
    for h in hooks:
        h.remove()
    assert len(seen) == len(list(iter_adapted(model.backbone)))
    for layer, x, out in seen:
        torch.testing.assert_close(out, rule(layer, x, index, weight), atol=1e-5, rtol=1e-5)
    for i in range(4):
        model.route(index=index[i: i + 1], weight=weight[i: i + 1])
        one = model.features(**{k: v[i: i + 1] for k, v in inputs.items()})
        torch.testing.assert_close(top2[i: i + 1], one, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(top2, mixed, atol=1e-4)


def test_per_token_weights_and_token_gates_follow_the_rule():
    from adaptbank.routing.state import RoutingState

    torch.manual_seed(0)
    names = ("lora", "bitfit", "ia3", "ia3-in", "adapter")
    state = RoutingState(experts=names)
    layer = AdaptedLinear(torch.nn.Linear(6, 6), state)
    layer.add_expert("lora", LoRAConfig(rank=2, dropout=0.0))
    layer.add_expert("bitfit", BitFitConfig())
    layer.add_expert("ia3", IA3Config())
    layer.add_expert("ia3-in", IA3Config(), feedforward=True)
    layer.add_expert("adapter", AdapterConfig(bottleneck=3))
    with torch.no_grad():
        for key, p in layer.experts.named_parameters():
            p.copy_(torch.randn(p.shape) * 0.4 + (1 if key.endswith("scale") else 0))
    x = torch.randn(2, 5, 6)
    tok = torch.rand(2, 5, len(names)).softmax(-1)  # (B, T, E)
    state.dense(tok)
    got = layer(x)
    want = torch.stack([torch.cat([rule(layer, x[b:b + 1, t:t + 1], torch.arange(5)[None], tok[b:b + 1, t])
                                   for t in range(5)], dim=1)[0] for b in range(2)])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- training
@pytest.mark.parametrize("method", list(METHODS))
def test_train_task_beats_chance_and_moves_only_the_task(method, tiny_bert_dir):
    from adaptbank.core.backbone import load_backbone
    from adaptbank.data.builtin import generate
    from adaptbank.training.evaluate import evaluate
    from adaptbank.training.loop import train_task

    model = AdaptBankModel(load_backbone(str(tiny_bert_dir)))
    model.add_task("weather", METHODS[method], ["sunny", "rainy", "snowy", "windy"], seed=0)
    model.add_task("bystander", METHODS[method], ["x", "y"], seed=1)
    randomize(model, "bystander")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    mine = {id(p) for p in model.expert_parameters("weather")} | {id(p) for p in model.heads["weather"].parameters()}
    train = generate("weather", "train", 240)
    test = generate("weather", "test", 120)
    # no probe head: training starts from a random head at chance and must learn (about 0.6 after 90 steps)
    cfg = TrainConfig(epochs=6, lr=3e-2, head_lr=1e-1, warmup=0.0, batch_size=16, max_length=32, probe_init=False)
    train_task(model, "weather", [t for t, _ in train], [y for _, y in train], cfg)
    acc = evaluate(model, "weather", [t for t, _ in test], [y for _, y in test], max_length=32)
    assert acc > 0.25 + 0.15, acc  # four balanced classes: chance is 0.25
    for n, p in model.named_parameters():
        if id(p) in mine:
            assert p.grad is not None
        else:
            assert p.grad is None, n
            assert torch.equal(p, before[n]), n  # the base and the other task are bit-identical
    moved = [not torch.equal(p, before[n]) for n, p in model.named_parameters()
             if id(p) in {id(q) for q in model.expert_parameters("weather")}]
    assert moved and all(moved)


# --------------------------------------------------------------------------- peers and the bank's edges
@pytest.mark.parametrize("family", ["bert", "distilbert", "gpt2", "llama"])
def test_ia3_equals_peft_ia3_with_the_same_vectors(family, inputs):
    """peft's IA3 with ``feedforward_modules`` on the same layers and the same vectors gives the same
    features: output scaling of keys and values, input scaling of the feed-forward output projection."""
    import copy

    from peft import IA3Config as PeftIA3Config
    from peft import get_peft_model

    from adaptbank.core.inject import FAMILY_ROLES
    from adaptbank.core.pooling import pool

    backbone = tiny_backbone(family)
    peer = copy.deepcopy(backbone.model)
    model = AdaptBankModel(backbone)
    model.add_task("a", IA3Config(), ["x", "y"])
    randomize(model, "a")
    roles = FAMILY_ROLES[family]
    peft_model = get_peft_model(peer, PeftIA3Config(
        target_modules="|".join(f".*{roles[r]}" for r in ("k", "v", "ffn_out")),
        feedforward_modules=f".*{roles['ffn_out']}"))
    copied = 0
    for name, module in peft_model.named_modules():
        if "default" in getattr(module, "ia3_l", {}):
            path = name.removeprefix("base_model.model.")
            ours = model.backbone.get_submodule(path).experts["a"]
            assert module.is_feedforward == isinstance(ours, IA3InputExpert), path
            with torch.no_grad():
                module.ia3_l["default"].copy_(ours.scale.reshape(module.ia3_l["default"].shape))
            copied += 1
    assert copied == len(model.layers_of("a"))
    model.route(task="a")
    theirs = pool(peft_model.eval()(**inputs).last_hidden_state, inputs["attention_mask"], model.pooling)
    torch.testing.assert_close(model.features(**inputs), theirs, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("method", list(METHODS))
def test_save_expert_and_load_expert_round_trip_bit_exact(method, tmp_path, inputs):
    from adaptbank.bank.expert_io import load_expert, save_expert

    model = AdaptBankModel(tiny_backbone("llama"))
    model.add_task("a", METHODS[method], ["x", "y"])
    randomize(model, "a")
    save_expert(model, "a", tmp_path / "a")
    other = AdaptBankModel(tiny_backbone("llama"))
    load_expert(other, tmp_path / "a", name="b")
    saved, loaded = model.export_task("a"), other.export_task("b")
    for part in ("adapter", "head"):
        assert set(saved[part]) == set(loaded[part])
        assert all(torch.equal(saved[part][k], loaded[part][k]) for k in saved[part])
    model.route(task="a")
    other.route(task="b")
    assert torch.equal(model.features(**inputs), other.features(**inputs))


def test_graph_compares_ia3_scales_by_their_change():
    from adaptbank.bank.graph import _flat_similarity

    a, b = torch.tensor([0.5, 0.0, 0.0]), torch.tensor([0.0, -0.5, 0.0])  # orthogonal changes of the scale
    e1, e2 = {"x.scale": 1 + a}, {"x.scale": 1 + b}
    assert _flat_similarity(e1, e2) > 0.7  # the raw vectors look alike: both are near one
    assert _flat_similarity(e1, e2, shift=1.0) == pytest.approx(0.0)
