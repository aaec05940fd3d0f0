"""Properties of experts, adapted layers, injection and the model, on tiny models of every family."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FAMILIES, randomize_expert, tiny_backbone

from adaptbank import AdaptBankModel, AdapterConfig, LoRAConfig, ParallelAdapterConfig
from adaptbank.core.adapted import AdaptedLinear
from adaptbank.core.inject import iter_adapted, resolve_targets

METHODS = {
    "lora": LoRAConfig(rank=4, alpha=8, dropout=0.0, targets="all-linear"),
    "adapter-houlsby": AdapterConfig(bottleneck=6, targets="houlsby"),
    "adapter-pfeiffer": AdapterConfig(bottleneck=6, targets="pfeiffer"),
    "parallel": ParallelAdapterConfig(bottleneck=6, targets="ffn"),
    "parallel-block": ParallelAdapterConfig(bottleneck=6),
}


def base_features(family: str, inputs: dict) -> torch.Tensor:
    model = AdaptBankModel(tiny_backbone(family))
    model.route()
    return model.features(**inputs)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", list(METHODS))
def test_new_expert_is_bit_identical_to_base(family, method, inputs):
    expected = base_features(family, inputs)
    model = AdaptBankModel(tiny_backbone(family))
    model.add_task("a", METHODS[method], ["x", "y"])
    model.route(task="a")
    assert torch.equal(model.features(**inputs), expected)
    model.route(task_ids=["a", "a", "a", "a"])
    assert torch.equal(model.features(**inputs), expected)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", list(METHODS) + ["mixed-kinds"])
def test_mixed_batch_rows_equal_single_task_runs(family, method, inputs):
    model = AdaptBankModel(tiny_backbone(family))
    kinds = [METHODS[method]] * 3 if method != "mixed-kinds" else [METHODS["lora"], METHODS["adapter-houlsby"], METHODS["parallel-block"]]
    for i, (name, cfg) in enumerate(zip("abc", kinds)):
        model.add_task(name, cfg, ["x", "y"])
        randomize_expert(model, name, seed=i)
    tasks = ["c", "a", "b", "a"]
    model.route(task_ids=tasks)
    mixed = model.features(**inputs)
    for i, t in enumerate(tasks):
        model.route(task=t)
        single = model.features(**{k: v[i: i + 1] for k, v in inputs.items()})
        torch.testing.assert_close(mixed[i: i + 1], single, atol=1e-5, rtol=1e-5)
    # the experts really differ, so the test can fail
    model.route(task="a")
    assert not torch.allclose(model.features(**inputs)[0], mixed[0], atol=1e-4)


@pytest.mark.parametrize("kind", ["lora", "parallel", "adapter"])
def test_gathered_topk_and_token_gates_match_weighted_sum(kind):
    """At layer level a mixture is linear in the experts for LoRA; for bottlenecks each expert's
    delta is weighted. Both must equal the hand-computed weighted sum of single-expert deltas."""
    from adaptbank.routing.state import RoutingState

    torch.manual_seed(0)
    state = RoutingState()
    layer = AdaptedLinear(torch.nn.Linear(8, 6), state)
    cfg = {"lora": LoRAConfig(rank=2, dropout=0.0), "parallel": ParallelAdapterConfig(bottleneck=3),
           "adapter": AdapterConfig(bottleneck=3)}[kind]
    names = ["e0", "e1", "e2"]
    for n in names:
        layer.add_expert(n, cfg)
        for p in layer.experts[n].parameters():
            torch.nn.init.normal_(p, std=0.5)
    state.experts = tuple(names)
    x = torch.randn(2, 5, 8)
    base = layer.base(x)
    deltas = {}
    for n in names:
        state.use(n)
        deltas[n] = layer(x) - base
    index = torch.tensor([[2, 0], [1, 2]])
    weight = torch.tensor([[0.7, 0.3], [0.4, 0.6]])
    state.route(index, weight)
    got = layer(x)
    want = torch.stack([base[b] + sum(weight[b, j] * deltas[names[index[b, j]]][b] for j in range(2)) for b in range(2)])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    tok = torch.rand(2, 5, 3)
    state.dense(tok)
    got = layer(x)
    want = base + sum(tok[..., i: i + 1] * deltas[n] for i, n in enumerate(names))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # the cached stack follows in-place parameter changes
    with torch.no_grad():
        for p in layer.experts["e1"].parameters():
            p.mul_(2.0)
    state.route(torch.tensor([[1], [1]]))
    after = layer(x)
    state.use("e1")
    torch.testing.assert_close(after, layer(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_merge_equals_unmerged_and_unmerge_restores(family, inputs):
    model = AdaptBankModel(tiny_backbone(family))
    model.add_task("a", LoRAConfig(rank=4, dropout=0.0, targets="all-linear"), ["x", "y"])
    model.add_task("b", LoRAConfig(rank=2, dropout=0.0, targets="qv"), ["x", "y"])
    randomize_expert(model, "a")
    weights = {p: layer.base.weight.clone() for p, layer in iter_adapted(model.backbone)}
    model.route(task="a")
    unmerged = model.features(**inputs)
    model.merge("a")
    assert all(layer.merged == "a" for layer in model.layers_of("a").values())
    merged = model.features(**inputs)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)
    assert not torch.allclose(merged, base_features(family, inputs), atol=1e-4)
    with pytest.raises(RuntimeError, match="already merged"):
        model.merge("a")
    with pytest.raises(RuntimeError, match="merged"):
        model.route(task="b")
    model.unmerge()
    for p, layer in iter_adapted(model.backbone):
        torch.testing.assert_close(layer.base.weight, weights[p], atol=1e-6, rtol=0)
    model.unmerge()  # no-op


def test_merge_refused_while_mixing_and_for_adapters(inputs):
    model = AdaptBankModel(tiny_backbone("bert"))
    model.add_task("a", LoRAConfig(), ["x", "y"])
    model.add_task("b", LoRAConfig(), ["x", "y"])
    model.add_task("c", AdapterConfig(), ["x", "y"])
    model.route(task_ids=["a", "b", "a", "b"])
    with pytest.raises(RuntimeError, match="mix"):
        model.merge("a")
    model.route(task="c")
    with pytest.raises(TypeError, match="only LoRA"):
        model.merge("c")


@pytest.mark.parametrize("family", FAMILIES)
def test_trainable_parameter_counts_match_closed_form(family):
    model = AdaptBankModel(tiny_backbone(family))
    r = 4
    info = model.add_task("a", LoRAConfig(rank=r, targets="attn"), ["x", "y", "z"])
    expected = sum(r * (layer.d_in + layer.d_out) for layer in model.layers_of("a").values())
    got = sum(p.numel() for p in model.expert_parameters("a"))
    assert got == expected and len(info.paths) > 0
    info = model.add_task("p", ParallelAdapterConfig(bottleneck=5), ["x", "y"])
    m = 5
    expected = sum(m * l.d_in + m + l.d_out * m + l.d_out for l in model.layers_of("p").values())
    assert sum(p.numel() for p in model.expert_parameters("p")) == expected
    info = model.add_task("s", AdapterConfig(bottleneck=5), ["x", "y"])
    expected = sum(2 * m * l.d_out + m + l.d_out for l in model.layers_of("s").values())
    assert sum(p.numel() for p in model.expert_parameters("s")) == expected


@pytest.mark.parametrize("family", FAMILIES)
def test_only_active_expert_and_head_get_gradients(family, inputs):
    model = AdaptBankModel(tiny_backbone(family))
    model.add_task("old", LoRAConfig(rank=2), ["x", "y"])
    randomize_expert(model, "old")
    model.add_task("new", LoRAConfig(rank=2), ["x", "y"])
    expert, head = model.train_only("new")
    logits = model(**inputs, task="new").logits
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 0, 1])).backward()
    assert all(p.grad is not None for p in expert + head)
    assert all(p.grad is None for p in model.expert_parameters("old"))
    assert all(p.grad is None for p in model.heads["old"].parameters())
    assert all(p.grad is None for n, p in model.backbone.named_parameters() if ".experts." not in n)
    # one optimiser step on "new" leaves "old" bit-identical
    before = [p.clone() for p in model.expert_parameters("old")]
    torch.optim.SGD(expert + head, lr=0.1).step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.expert_parameters("old")))


@pytest.mark.parametrize("method", [*METHODS, "shared-a"])
def test_save_load_is_bit_exact(method, inputs, tmp_path):
    from adaptbank.bank.expert_io import load_expert, save_expert

    model = AdaptBankModel(tiny_backbone("bert"))
    group = "g" if method == "shared-a" else None
    cfg = METHODS["lora"] if method == "shared-a" else METHODS[method]
    model.add_task("a", cfg, ["x", "y"], shared_group=group)
    randomize_expert(model, "a")
    save_expert(model, "a", tmp_path / "a")
    files = model.export_task("a")
    assert not any("a" == part for k in files["adapter"] for part in k.split(".")), "keys must not hold the task name"
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["adaptbank_version"] and config["method"]["kind"] == cfg.kind
    other = AdaptBankModel(tiny_backbone("bert"))
    load_expert(other, tmp_path / "a", name="renamed")
    for part in files:
        exported = other.export_task("renamed")[part]
        assert exported.keys() == files[part].keys()
        assert all(torch.equal(exported[k], files[part][k]) for k in exported)
    model.eval(), other.eval()
    assert torch.equal(model(**inputs, task="a").logits, other(**inputs, task="renamed").logits)
    changed = AdaptBankModel(tiny_backbone("bert", seed=5))
    with pytest.raises(ValueError, match="fingerprint"):
        load_expert(changed, tmp_path / "a")


def test_load_into_other_shapes_names_layer_and_shapes():
    model = AdaptBankModel(tiny_backbone("bert", hidden=32))
    model.add_task("a", LoRAConfig(rank=4), ["x", "y"])
    files = model.export_task("a")
    other = AdaptBankModel(tiny_backbone("bert", hidden=48))
    with pytest.raises(ValueError, match=r"layer 'encoder\.layer\.0\.attention\.self\.query'.*\(4, 32\).*\(4, 48\)"):
        other.import_task("a", LoRAConfig(rank=4), ["x", "y"], files)
    assert "a" not in other.tasks and not other.heads
    assert all("a" not in layer.experts for _, layer in iter_adapted(other.backbone))
    with pytest.raises(ValueError, match="missing keys"):
        other.import_task("b", LoRAConfig(rank=4), ["x", "y"], {"adapter": {}, "head": {}})


def test_target_errors_list_what_the_model_offers():
    model = AdaptBankModel(tiny_backbone("bert"))
    with pytest.raises(ValueError, match=r"unknown target preset 'qkv'.*qv, attn, all-linear, v"):
        resolve_targets(model.backbone, "qkv")
    with pytest.raises(ValueError, match=r"matches no linear layer.*encoder\.layer\.\*\.attention\.self\.query"):
        model.add_task("a", LoRAConfig(targets=("nothing_here",)), ["x", "y"])
    with pytest.raises(ValueError, match="--targets"):
        LoRAConfig(targets="qkv")
    model.add_task("a", LoRAConfig(targets=(r"layer\.1\.attention\.self\.(query|key)$",)), ["x", "y"])
    assert set(model.tasks["a"].paths) == {"encoder.layer.1.attention.self.query", "encoder.layer.1.attention.self.key"}


@pytest.mark.parametrize("family", ["gpt2", "llama", "t5"])
def test_decoder_and_seq2seq_families_inject_train_one_step_and_merge(family, inputs):
    model = AdaptBankModel(tiny_backbone(family))
    model.add_task("a", LoRAConfig(rank=4, targets="qv"), ["x", "y"])
    if family == "gpt2":
        assert all(type(l.base).__name__ == "Conv1D" for l in model.layers_of("a").values())
    expert, head = model.train_only("a")
    opt = torch.optim.AdamW(expert + head, lr=1e-2)
    model.train()
    loss = torch.nn.functional.cross_entropy(model(**inputs, task="a").logits, torch.tensor([0, 1, 0, 1]))
    loss.backward()
    opt.step()
    model.eval()
    assert any(p.abs().sum() > 0 for p in model.expert_parameters("a") if p.shape[0] != 4)  # B moved off zero
    unmerged = model(**inputs, task="a").logits
    model.merge("a")
    torch.testing.assert_close(model(**inputs, task="a").logits, unmerged, atol=1e-5, rtol=0)


def test_shared_a_experts_share_one_parameter_and_train_only_b(inputs):
    model = AdaptBankModel(tiny_backbone("bert"))
    cfg = LoRAConfig(rank=4)
    first = model.add_task("a", cfg, ["x", "y"], shared_group="g")
    second = model.add_task("b", cfg, ["x", "y"], shared_group="g")
    assert first.owns_shared and not second.owns_shared
    for layer in model.layers_of("a").values():
        assert layer.experts["a"].A is layer.experts["b"].A is layer.shared_A["g"]
    n_b = sum(p.numel() for p in model.expert_parameters("b"))
    assert n_b == sum(4 * l.d_out for l in model.layers_of("b").values())
    # the group's A is exported once, by export_shared, never with a task: not with task-B "b", and
    # not with "a" either, although "a" owns (trains) it
    paths = model.tasks["a"].paths
    assert model.tasks["b"].paths == paths
    for name in "ab":
        keys = set(model.export_task(name)["adapter"])
        assert not any(k.endswith(".A") for k in keys), (name, sorted(keys)[:4])
        assert keys == {f"{p}.B" for p in paths}
    shared = model.export_shared("g")
    assert set(shared) == {f"{p}.A" for p in paths}
    for p, layer in model.layers_of("a").items():
        assert torch.equal(shared[f"{p}.A"], layer.shared_A["g"])
    # a task outside any group exports its own A beside B
    model.add_task("solo", cfg, ["x", "y"])
    assert set(model.export_task("solo")["adapter"]) == {f"{p}.{k}" for p in paths for k in "AB"}
    assert model.export_shared("g").keys() == shared.keys()
    model.remove_task("solo")
    expert, _ = model.train_only("b")
    assert not any(p is layer.shared_A["g"] for layer in model.layers_of("b").values() for p in expert)
    with pytest.raises(ValueError, match="rank"):
        model.add_task("c", LoRAConfig(rank=2), ["x", "y"], shared_group="g")
    model.remove_task("a")
    model.remove_task("b")
    assert all("g" not in l.shared_A for _, l in iter_adapted(model.backbone))
