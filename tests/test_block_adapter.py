"""The parallel adapter beside the whole feed-forward block (He et al. 2021; issue 11, item 9), on tiny
models of every family: the block's output is ``FFN(x) + s * up(f(down(x)))`` with ``x`` the block's
input (BERT: inside the residual sum, before the LayerNorm), the trainable count is the closed form,
paths of sub-layers do not change when the block around them is wrapped, only a parallel adapter goes
beside a block, and a bank round trip is bit-exact."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import FAMILIES, randomize_expert, tiny_backbone

from adaptbank import AdaptBankModel
from adaptbank.core.backbone import fingerprint
from adaptbank.core.block import AdaptedBlock
from adaptbank.core.config import LoRAConfig, ParallelAdapterConfig, TrainConfig
from adaptbank.core.inject import FAMILY_BLOCKS, iter_adapted, submodule

BLOCK = ParallelAdapterConfig(bottleneck=5, scale=2.0, activation="gelu")


@pytest.mark.parametrize("family", FAMILIES)
def test_block_output_is_ffn_plus_scaled_bottleneck_of_the_block_input(family):
    model = AdaptBankModel(tiny_backbone(family))
    block_path = next(p.removesuffix(".beside") for p in model.target_paths(BLOCK))
    original = copy.deepcopy(submodule(model.backbone, block_path)).eval()
    model.add_task("a", BLOCK, ["x", "y"])
    randomize_expert(model, "a")
    model.eval()
    model.route(task="a")
    wrapped = submodule(model.backbone, block_path)
    assert isinstance(wrapped, AdaptedBlock) and wrapped.form == FAMILY_BLOCKS[family][1]
    expert = wrapped.beside.experts["a"]
    D = model.backbone.config.hidden_size
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, D, generator=g)  # (B, T, D): the block's input
    delta = BLOCK.scale * expert.up(torch.nn.functional.gelu(expert.down(x)))  # (B, T, D)
    with torch.no_grad():
        if wrapped.form == "residual":  # BERT: LayerNorm(dropout(dense(u)) + x), u the intermediate activation
            u = torch.randn(2, 4, original.dense.in_features, generator=g)  # (B, T, F)
            want = original.LayerNorm(original.dense(u) + delta + x)
            got = wrapped(u, x)
        else:
            want = original(x) + delta
            got = wrapped(x)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(delta, torch.zeros_like(delta))  # the adapter really acts


@pytest.mark.parametrize("family", FAMILIES)
def test_block_adapter_parameter_count_is_the_closed_form(family):
    model = AdaptBankModel(tiny_backbone(family))
    model.add_task("a", BLOCK, ["x", "y"])
    D, m = model.backbone.config.hidden_size, BLOCK.bottleneck
    n_blocks = len(model.target_paths(BLOCK))
    assert n_blocks == model.backbone.config.num_hidden_layers
    assert sum(p.numel() for p in model.expert_parameters("a")) == n_blocks * (D * m + m + m * D + D)


@pytest.mark.parametrize("family", FAMILIES)
def test_sub_layer_paths_and_fingerprint_do_not_depend_on_the_block_wrapper_and_rows_mix(family, inputs):
    lora = LoRAConfig(rank=2, dropout=0.0, targets="all-linear")
    first = AdaptBankModel(tiny_backbone(family))
    base_fp = fingerprint(first.backbone)
    first.add_task("blk", BLOCK, ["x", "y"])
    first.add_task("lo", lora, ["x", "y"])
    second = AdaptBankModel(tiny_backbone(family))
    second.add_task("lo", lora, ["x", "y"])
    second.add_task("blk", BLOCK, ["x", "y"])
    for m in (first, second):
        assert fingerprint(m.backbone) == base_fp
    assert list(first.layers_of("lo")) == list(second.layers_of("lo"))
    assert set(first.export_task("lo")["adapter"]) == set(second.export_task("lo")["adapter"])
    assert all(p.endswith(".beside") for p in first.layers_of("blk"))
    randomize_expert(first, "lo", 1)
    randomize_expert(first, "blk", 2)
    first.route(task_ids=["lo", "blk", "blk", "lo"])
    mixed = first.features(**inputs)
    for i, t in enumerate(["lo", "blk", "blk", "lo"]):
        first.route(task=t)
        single = first.features(**{k: v[i: i + 1] for k, v in inputs.items()})
        torch.testing.assert_close(mixed[i: i + 1], single, atol=1e-5, rtol=1e-5)


def test_only_a_parallel_adapter_goes_beside_a_block_and_a_refusal_leaves_the_model_as_it_was(inputs):
    model = AdaptBankModel(tiny_backbone("bert"))
    model.route()
    before = model.features(**inputs)
    with pytest.raises(ValueError, match=r"whole feed-forward block.*only a parallel adapter.*'lora'"):
        model.add_task("bad", LoRAConfig(targets="ffn-block"), ["x", "y"])
    assert "bad" not in model.tasks
    assert all("bad" not in layer.experts for _, layer in iter_adapted(model.backbone))
    model.route()
    assert torch.equal(model.features(**inputs), before)
    sub = ParallelAdapterConfig(bottleneck=4, targets="ffn")  # the sub-layer form stays an option
    model.add_task("sub", sub, ["x", "y"])
    assert all(p.endswith("output.dense") for p in model.layers_of("sub"))
    assert {layer.d_in for layer in model.layers_of("sub").values()} == {model.backbone.config.intermediate_size}


def test_block_adapter_trains_and_round_trips_through_the_bank_bit_exact(tiny_bert_dir, tmp_path):
    from adaptbank.bank.facade import AdapterBank

    fast = TrainConfig(epochs=1, max_train=80, max_test=40, max_length=32, lr=5e-3)
    bank = AdapterBank.init(tmp_path / "bank", base=str(tiny_bert_dir))
    bank.add_task("weather", ParallelAdapterConfig(bottleneck=8), fast)
    stored = bank.store.read_tensors("weather", "adapter")
    assert stored and all(".beside." in k for k in stored)
    assert any(k.endswith("up.weight") and not torch.equal(v, torch.zeros_like(v)) for k, v in stored.items())
    model = bank.load()
    loaded = model.export_task("weather")["adapter"]
    assert set(stored) == set(loaded) and all(torch.equal(stored[k], loaded[k]) for k in stored)
    assert bank.evaluate() == {"weather": bank.info("weather")["metrics"]["test_accuracy"]}
