"""A weight-only quantised frozen base (nf4, int8): its arithmetic against hand-written references, its
memory, its forward, experts training on top, merging into it, and the bank and CLI round trip."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from conftest import tiny_backbone

from adaptbank import AdaptBankModel, LoRAConfig
from adaptbank.bank.expert_io import load_expert, save_expert
from adaptbank.bank.facade import AdapterBank
from adaptbank.cli.main import main
from adaptbank.core.config import TrainConfig
from adaptbank.core.quantize import (
    MissingQuantizeBackend,
    QuantizedLinear,
    merge_into_quantized,
    quantization_of,
    quantize_backbone,
)
from adaptbank.data.tokens import collate, tokenize

FAMILIES = ["bert", "llama", "gpt2"]
KINDS = ["nf4", "int8"]
FAST = TrainConfig(epochs=1, max_train=80, max_test=40, max_length=32)
NF4_LEVELS = torch.tensor([  # Dettmers et al. 2023, appendix E
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0])


def quantized(family: str, kind: str) -> AdaptBankModel:
    backbone = tiny_backbone(family)
    quantize_backbone(backbone.model, kind)
    return AdaptBankModel(backbone)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def linears_of_layers(family: str) -> dict[str, torch.Tensor]:
    """Path -> (O, I) weight of every linear in the transformer layers of a fresh fp32 tiny model."""
    from transformers.pytorch_utils import Conv1D

    model = tiny_backbone(family).model
    return {n: (m.weight if isinstance(m, torch.nn.Linear) else m.weight.T) for n, m in model.named_modules()
            if isinstance(m, (torch.nn.Linear, Conv1D))}


@pytest.mark.parametrize("shape", [(64, 32), (64, 96), (33, 31), (7, 9), (96, 64)])
def test_nf4_and_int8_match_hand_written_references(shape):
    """NF4: blocks of 64 of the flattened weight, nearest of the 16 levels times the block's absmax (its
    double-quantised value); int8: round(127 w / row absmax). (64, 32) and (64, 96) are shapes on which
    bitsandbytes 0.50's 2-D CPU dequantisation misplaces blocks, so they guard the flat layout."""
    import bitsandbytes.functional as bnbf

    W = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 0.02  # (O, I)
    q = QuantizedLinear.from_weight(W, None, "nf4")
    flat = torch.cat([W.reshape(-1), W.new_zeros((-W.numel()) % 64)]).reshape(-1, 64)  # (G, 64)
    absmax = flat.abs().amax(1, keepdim=True)  # (G, 1)
    stored = bnbf.dequantize_blockwise(q.absmax, absmax=q.absmax_scale, blocksize=256) + q.absmax_offset  # (G,)
    assert float(((stored - absmax[:, 0]).abs() / absmax[:, 0]).max()) < 0.01  # double quantisation
    code = ((flat / absmax)[..., None] - NF4_LEVELS).abs().argmin(-1)  # (G, 64)
    want = (NF4_LEVELS[code] * stored[:, None]).reshape(-1)[: W.numel()].reshape(shape)
    torch.testing.assert_close(q.dequantized_weight(), want, atol=1e-8, rtol=0)
    assert 0.05 < rel(q.dequantized_weight(), W) < 0.12  # NF4 on Gaussian weights: ~0.09
    q8 = QuantizedLinear.from_weight(W, None, "int8")
    scale = W.abs().amax(1, keepdim=True)  # (O, 1)
    torch.testing.assert_close(q8.dequantized_weight(), torch.round(127 * W / scale) * scale / 127, atol=1e-8, rtol=0)
    assert q8.codes.dtype == torch.int8 and q.codes.dtype == torch.uint8


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", KINDS)
def test_frozen_linear_weights_take_at_least_3_5x_less_memory(family, kind):
    backbone = tiny_backbone(family)
    biases = {n: getattr(m, "bias", None) for n, m in backbone.model.named_modules()}
    report = quantize_backbone(backbone.model, kind)
    originals = linears_of_layers(family)
    assert set(report.layers) == set(originals)  # every linear of the layers, nothing else
    replaced = {n: m for n, m in backbone.model.named_modules() if isinstance(m, QuantizedLinear)}
    assert set(replaced) == set(originals)
    stored = sum(b.numel() * b.element_size() for m in replaced.values() for b in m.buffers())
    full = sum(w.numel() * 4 for w in originals.values())
    assert (report.quantized_bytes, report.full_bytes) == (stored, full)
    assert full / stored >= 3.5 and report.ratio == full / stored
    assert report.ratio >= (7.0 if kind == "nf4" else 3.5)
    kept = [type(m).__name__ for m in backbone.model.modules() if isinstance(m, (torch.nn.Embedding, torch.nn.LayerNorm))]
    assert kept, "embeddings and norms stay as they are"
    assert quantization_of(backbone.model) == kind
    assert all(m.bias is biases[path] for path, m in replaced.items())  # weight-only: the same bias Parameter


@pytest.mark.parametrize("family", FAMILIES + ["t5"])
@pytest.mark.parametrize("kind", KINDS)
def test_quantized_forward_is_close_to_fp32(family, kind, inputs):
    ref = AdaptBankModel(tiny_backbone(family))
    model = quantized(family, kind)
    ref.route()
    model.route()
    error = rel(model.features(**inputs), ref.features(**inputs))
    assert 0 < error < (0.2 if kind == "nf4" else 0.02), error
    layer = next(m for m in model.modules() if isinstance(m, QuantizedLinear))
    x = torch.randn(3, layer.in_features)
    torch.testing.assert_close(layer(x), x @ layer.dequantized_weight().T + (0 if layer.bias is None else layer.bias))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", KINDS)
def test_new_lora_is_bit_identical_and_experts_train_on_top(family, kind, inputs):
    model = quantized(family, kind)
    model.route()
    base = model.features(**inputs)
    frozen = {n: b.clone() for n, b in model.backbone.named_buffers()}
    model.add_task("a", LoRAConfig(rank=4, dropout=0.0, targets="all-linear"), ["x", "y"])
    model.route(task="a")
    assert torch.equal(model.features(**inputs), base)
    params = model.expert_parameters("a")
    opt = torch.optim.SGD(params, lr=0.5)
    model.train()
    loss = torch.nn.functional.cross_entropy(model(**inputs, task="a").logits, torch.tensor([0, 1, 0, 1]))
    loss.backward()
    assert all(p.grad is not None for p in params)
    assert any(float(p.grad.abs().sum()) > 0 for p in params)  # B (zero at first) gets the gradient
    assert all(not b.requires_grad for b in model.backbone.buffers())
    opt.step()
    model.eval()
    assert not torch.equal(model.features(**inputs), base)
    for n, b in model.backbone.named_buffers():  # names see through AdaptedLinear's .base
        if n.replace(".base.", ".") in frozen:
            assert torch.equal(b, frozen[n.replace(".base.", ".")])
    assert sum(1 for _ in model.backbone.named_buffers()) >= len(frozen)


def test_unknown_kind_is_a_value_error_naming_it():
    model = tiny_backbone("bert").model
    with pytest.raises(ValueError, match=r"'bogus'.*nf4, int8"):
        quantize_backbone(model, "bogus")
    quantize_backbone(model, "int8")
    with pytest.raises(ValueError, match="already quantised"):
        quantize_backbone(model, "nf4")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", KINDS)
def test_merge_into_quantized_reports_its_error_and_unmerge_restores(family, kind, inputs):
    model = quantized(family, kind)
    model.add_task("a", LoRAConfig(rank=4, dropout=0.0, targets="all-linear"), ["x", "y"])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.expert_parameters("a"):
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    layers = model.layers_of("a")
    originals = {p: layer.base for p, layer in layers.items()}
    with torch.no_grad():
        exact = {p: layer.base.dequantized_weight() + layer.experts["a"].delta_weight() for p, layer in layers.items()}
    model.route(task="a")
    unmerged = model.features(**inputs).detach()
    report = merge_into_quantized(model, "a", **inputs)
    merged = model.features(**inputs).detach()
    assert model.merged == "a" and all(isinstance(layer.base, QuantizedLinear) for layer in layers.values())
    # the report is what happened ...
    assert report.output_max_abs == pytest.approx(float((merged - unmerged).abs().max()), rel=1e-5, abs=1e-7)
    assert report.output_rel_error == pytest.approx(rel(merged, unmerged), rel=1e-5, abs=1e-7)
    for p, layer in layers.items():
        err = (layer.base.dequantized_weight() - exact[p]).abs()  # (O, I)
        assert float(err.max()) <= report.weight_max_abs + 1e-7
        # ... and within what re-quantisation can cost: half a level gap of the block / row scale
        if kind == "int8":
            assert bool((err <= layer.base.scale[:, None] / 254 * (1 + 1e-4) + 1e-8).all())
        else:
            assert float(err.max()) <= 0.14 * float(exact[p].abs().max()) * 1.02
    assert 0 < report.weight_rel_error < (0.12 if kind == "nf4" else 0.01)
    assert report.update_rel_size > report.weight_rel_error  # the update is larger than what rounding lost
    assert 0 < report.output_rel_error < (0.3 if kind == "nf4" else 0.05)
    model.unmerge()
    assert all(layer.base is originals[p] for p, layer in layers.items())
    assert torch.equal(model.features(**inputs), unmerged)


@pytest.mark.parametrize("family", ["bert", "llama"])
@pytest.mark.parametrize("method", ["bitfit", "ia3"])
def test_bitfit_and_ia3_merge_into_a_quantized_base(family, method, inputs):
    from adaptbank.core.config import BitFitConfig, IA3Config

    model = quantized(family, "int8")
    model.add_task("a", BitFitConfig() if method == "bitfit" else IA3Config(), ["x", "y"])
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.expert_parameters("a"):
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    layers = model.layers_of("a")
    originals = {p: (layer.base, layer.base.bias) for p, layer in layers.items()}
    model.route(task="a")
    unmerged = model.features(**inputs).detach()
    model.merge("a")
    merged = model.features(**inputs).detach()
    assert all(isinstance(layer.base, QuantizedLinear) for layer in layers.values())
    assert rel(merged, unmerged) < 0.05  # int8 re-quantisation of the scaled weights (BitFit: biases only)
    if method == "bitfit":  # the weights are not touched: only the bias moves, exactly
        assert rel(merged, unmerged) < 1e-5
    model.unmerge()
    assert all(layer.base is originals[p][0] and layer.base.bias is originals[p][1] for p, layer in layers.items())
    assert torch.equal(model.features(**inputs), unmerged)
    with pytest.raises(TypeError, match=f"task 'a' uses '{method}'"):
        merge_into_quantized(model, "a", **inputs)


@pytest.fixture
def quantized_bank(tiny_bert_dir, tmp_path):
    r = CliRunner()
    bank = tmp_path / "bank"
    res = r.invoke(main, ["init", str(bank), "--base", str(tiny_bert_dir), "--quantize", "nf4"])
    assert res.exit_code == 0 and "nf4-quantised" in res.output, res.output
    res = r.invoke(main, ["add-task", str(bank), "weather", "--rank", "4", "--json", "--epochs", "1",
                          "--max-train", "80", "--max-test", "40", "--max-length", "32"])
    assert res.exit_code == 0, res.output
    return bank, json.loads(res.stdout)


def _logits(model: AdaptBankModel, texts: list[str]) -> torch.Tensor:
    batch = collate(tokenize(model.tokenizer, texts, 32), model.tokenizer.pad_token_id)
    with torch.no_grad():
        return model(**batch, task="weather").logits


def test_bank_round_trip_with_quantize_is_bit_exact(quantized_bank, tiny_bert_dir, tmp_path):
    path, added = quantized_bank
    bank = AdapterBank.open(path)
    assert bank.base["quantize"] == "nf4"
    plain = AdapterBank.init(tmp_path / "plain", base=str(tiny_bert_dir))
    assert plain.base["quantize"] is None and plain.base["fingerprint"] != bank.base["fingerprint"]
    texts = ["heavy snow is falling tonight", "a hot and sunny afternoon", "strong wind from the north"]
    first = bank.load()
    assert quantization_of(first.backbone) == "nf4"
    again = AdapterBank.open(path).load()  # a freshly loaded base, quantised again
    assert torch.equal(_logits(first, texts), _logits(again, texts))
    assert AdapterBank.open(path).evaluate()["weather"] == added["test_accuracy"]
    # a merge in one model of the bank never shows in another over the same frozen weights
    other = bank.load()
    batch = collate(tokenize(first.tokenizer, texts, 32), first.tokenizer.pad_token_id)
    merge_into_quantized(first, "weather", **batch)
    assert torch.equal(_logits(other, texts), _logits(again, texts))


def test_experts_refuse_a_base_of_another_quantisation(quantized_bank, tiny_bert_dir, tmp_path):
    path, _ = quantized_bank
    nf4_model = AdapterBank.open(path).load()
    save_expert(nf4_model, "weather", tmp_path / "nf4-expert")
    plain = AdapterBank.init(tmp_path / "plain", base=str(tiny_bert_dir))
    with pytest.raises(ValueError, match=r"nf4-quantised base, this model's is full-precision"):
        load_expert(plain.new_model(), tmp_path / "nf4-expert")
    plain.add_task("weather", LoRAConfig(rank=4), FAST)
    save_expert(plain.load(), "weather", tmp_path / "fp32-expert")
    with pytest.raises(ValueError, match=r"full-precision \(not quantised\) base, this model's is nf4-quantised"):
        load_expert(AdapterBank.open(path).new_model(), tmp_path / "fp32-expert")
    load_expert(AdapterBank.open(path).new_model(), tmp_path / "nf4-expert", name="again")  # same base: fine


def test_cli_quantize_bogus_names_the_value_and_creates_nothing(tiny_bert_dir, tmp_path):
    bank = tmp_path / "bank"
    res = CliRunner().invoke(main, ["init", str(bank), "--base", str(tiny_bert_dir), "--quantize", "bogus"])
    assert res.exit_code != 0 and "'bogus'" in res.output and "nf4, int8" in res.output, res.output
    assert "Traceback" not in res.output
    assert not bank.exists()


def test_missing_bitsandbytes_is_a_clear_error_and_creates_nothing(tiny_bert_dir, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes -> ImportError
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)
    with pytest.raises(MissingQuantizeBackend, match=r"pip install 'adaptbank\[quantize\]'"):
        quantize_backbone(tiny_backbone("bert").model, "nf4")
    res = CliRunner().invoke(main, ["init", str(tmp_path / "bank"), "--base", str(tiny_bert_dir), "--quantize", "nf4"])
    assert res.exit_code != 0 and "bitsandbytes" in res.output and "Traceback" not in res.output, res.output
    assert not (tmp_path / "bank").exists()
