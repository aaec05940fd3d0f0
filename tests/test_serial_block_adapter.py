"""The serial bottleneck adapter where the ``adapters`` library puts it (``SeqBnConfig``, preset
``pfeiffer-block``, AdapterConfig's default): on a post-LN (BERT-family) block it reads the block's
normalised output and joins the residual sum before the LayerNorm again, ``LN(r + up(f(down(LN(r)))))``;
on pre-LN families it is the FFN-output sub-layer adapter. Formula, identity at init, closed-form count,
rows that mix, refusals, and a bank round trip."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import FAMILIES, randomize_expert, tiny_backbone

from adaptbank import AdaptBankModel
from adaptbank.core.block import AdaptedBlock
from adaptbank.core.config import AdapterConfig, LoRAConfig, ParallelAdapterConfig
from adaptbank.core.experts import SerialAdapterExpert
from adaptbank.core.inject import FAMILY_BLOCKS, submodule

SERIAL = AdapterConfig(bottleneck=5)


def test_the_default_serial_adapter_reads_the_normalised_block_output_and_joins_before_layernorm():
    model = AdaptBankModel(tiny_backbone("bert"))
    assert AdapterConfig().targets == "pfeiffer-block"
    path = model.target_paths(SERIAL)[0]
    assert path.endswith(".output.after"), path
    block_path = path.removesuffix(".after")
    original = copy.deepcopy(submodule(model.backbone, block_path)).eval()
    model.add_task("a", SERIAL, ["x", "y"])
    randomize_expert(model, "a")
    model.eval()
    model.route(task="a")
    wrapped = submodule(model.backbone, block_path)
    assert isinstance(wrapped, AdaptedBlock) and isinstance(wrapped.after.experts["a"], SerialAdapterExpert)
    e = wrapped.after.experts["a"]
    g = torch.Generator().manual_seed(3)
    D = model.backbone.config.hidden_size
    x = torch.randn(2, 4, D, generator=g)  # (B, T, D) the block's residual input
    u = torch.randn(2, 4, original.dense.in_features, generator=g)  # (B, T, F) the intermediate activation
    with torch.no_grad():
        r = original.dense(u) + x  # (B, T, D)
        y = original.LayerNorm(r)
        want = original.LayerNorm(r + e.up(torch.relu(e.down(y))))  # adapters' SeqBn (original_ln_before/after)
        got = wrapped(u, x)
        plain = original(u, x)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(got, plain, atol=1e-3)  # the adapter really acts


@pytest.mark.parametrize("family", FAMILIES)
def test_a_new_serial_adapter_leaves_the_model_bit_identical_and_counts_the_closed_form(family, inputs):
    model = AdaptBankModel(tiny_backbone(family))
    model.reserved_layers = 0
    model.route()
    before = model.features(**inputs)
    model.add_task("a", SERIAL, ["x", "y"])
    model.route(task="a")
    assert torch.equal(model.features(**inputs), before)
    D, m = model.backbone.config.hidden_size, SERIAL.bottleneck
    paths = model.target_paths(SERIAL)
    residual = FAMILY_BLOCKS[family][1] == "residual"
    assert all(p.endswith(".after") for p in paths) == residual
    width = D if residual else None
    for p in paths:
        layer = submodule(model.backbone, p)
        d_out = width or layer.d_out
        assert sum(t.numel() for t in layer.experts["a"].parameters()) == 2 * d_out * m + m + d_out


def test_rows_with_and_without_the_serial_adapter_equal_their_single_task_runs(inputs):
    model = AdaptBankModel(tiny_backbone("bert"))
    model.reserved_layers = 0
    for name, cfg in (("s", SERIAL), ("p", ParallelAdapterConfig(bottleneck=4)), ("l", LoRAConfig(rank=2))):
        model.add_task(name, cfg, ["x", "y"])
        randomize_expert(model, name, seed=len(name) + ord(name))
    model.eval()
    rows = ["s", "p", "l", "s"]
    model.route(task_ids=rows)
    mixed = model.features(**inputs)  # (B, D)
    for b, name in enumerate(rows):
        model.route(task=name)
        alone = model.features(**{k: v[b:b + 1] for k, v in inputs.items()})
        torch.testing.assert_close(mixed[b:b + 1], alone, atol=1e-5, rtol=1e-5)
    model.route()
    torch.testing.assert_close(model.features(**inputs), AdaptBankModel(tiny_backbone("bert")).features(**inputs))


def test_only_a_serial_adapter_goes_after_a_block_and_a_refusal_leaves_the_model_as_it_was(inputs):
    model = AdaptBankModel(tiny_backbone("bert"))
    model.add_task("s", SERIAL, ["x", "y"])
    modules = {n for n, _ in model.backbone.named_modules()}
    with pytest.raises(ValueError, match="only a serial adapter goes"):
        model.add_task("l", LoRAConfig(targets=(r"layer\.1\.output\.after$",)), ["x", "y"])
    with pytest.raises(ValueError, match="only a parallel adapter goes"):
        model.add_task("b", AdapterConfig(targets=(r"layer\.1\.output\.beside$",)), ["x", "y"])
    assert list(model.tasks) == ["s"] and {n for n, _ in model.backbone.named_modules()} == modules
    old = AdaptBankModel(tiny_backbone("bert"))  # the sub-layer form stays, by its own preset
    old.add_task("o", AdapterConfig(bottleneck=5, targets="pfeiffer"), ["x", "y"])
    assert all(p.endswith(".output.dense") for p in old.layers_of("o"))
