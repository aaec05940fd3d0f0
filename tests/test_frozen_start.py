"""Cached frozen layers (``core.frozen_start``) and ``--layers``: a forward fed the cached states of the
layers below the first expert gives the same features and gradients as the whole forward, on every family
that allows it; a cached add-task stores the same expert as an uncached one (dropout off); ``layers``
keeps experts where it says and errors name the bad value; add-task records where its time went."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from conftest import randomize_expert, tiny_backbone

from adaptbank import AdaptBankModel
from adaptbank.bank.facade import AdapterBank
from adaptbank.cli.main import main
from adaptbank.core.config import (
    AdapterConfig,
    BitFitConfig,
    CombinedConfig,
    IA3Config,
    LoRAConfig,
    PromptTuningConfig,
    TrainConfig,
    method_from_dict,
)
from adaptbank.core.frozen_start import cache_refusal, cached_features, first_layer, pad_states, skipping
from adaptbank.routing.taps import layer_list

CACHE_FAMILIES = ["bert", "distilbert", "gpt2", "llama"]
FAST = TrainConfig(epochs=1, max_train=48, max_test=24, batch_size=8, train_dropout=False)


def _states(model: AdaptBankModel, inputs: dict, layer: int) -> list[torch.Tensor]:
    """Per-row frozen states entering ``layer`` (T_i, D), from a forward with no experts on."""
    model.route()
    with torch.no_grad():
        h = model.encoder(**inputs, output_hidden_states=True).hidden_states[layer]  # (B, T, D)
    return [h[b, : int(n)].clone() for b, n in enumerate(inputs["attention_mask"].sum(1))]


@pytest.mark.parametrize("family", CACHE_FAMILIES)
def test_a_fed_forward_gives_the_features_and_gradients_of_the_whole_forward(family, inputs):
    model = AdaptBankModel(tiny_backbone(family)).eval()  # dropout off: both forwards compute the same function
    model.add_task("t", LoRAConfig(rank=2, layers=(1,), targets="all-linear"), ["a", "b"])
    randomize_expert(model, "t")
    assert first_layer(model, model.tasks["t"].method) == 1
    assert all(".1." in p or ".h.1." in p for p in model.layers_of("t")), list(model.layers_of("t"))
    params = model.expert_parameters("t")
    for p in params:
        p.requires_grad_(True)

    model.route(task="t")
    whole = model.features(**inputs)  # (B, D)
    whole.square().sum().backward()
    want = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None

    states = _states(model, inputs, 1)
    hidden = pad_states(states, inputs["input_ids"].shape[1])  # (B, T, D)
    before = list(layer_list(model.encoder))
    with skipping(model, 1) as feed:
        fed = cached_features(model, "t", feed)({**inputs, "start_hidden": hidden})
        fed.square().sum().backward()
        assert feed.hidden is None  # closed after the forward
    assert list(layer_list(model.encoder)) == before  # the layers are put back, the same objects
    torch.testing.assert_close(fed, whole, rtol=1e-5, atol=1e-5)
    for p, g in zip(params, want):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-5)


def test_inside_skipping_an_unfed_forward_runs_every_layer(inputs):
    model = AdaptBankModel(tiny_backbone("bert")).eval()
    model.add_task("t", LoRAConfig(rank=2, layers=(1,)), ["a", "b"])
    randomize_expert(model, "t")
    model.route(task="t")
    want = model.features(**inputs)
    with skipping(model, 1):
        model.route(task="t")
        torch.testing.assert_close(model.features(**inputs), want, rtol=0, atol=0)
        states = _states(model, inputs, 1)
    wrong = pad_states(states, inputs["input_ids"].shape[1])[:, :-1]  # (B, T - 1, D): one token short
    with skipping(model, 1) as feed, pytest.raises(ValueError, match="do not fit the batch"):
        cached_features(model, "t", feed)({**inputs, "start_hidden": wrong})
    with pytest.raises(ValueError, match="starts at a layer in 1..1, got 2"), skipping(model, 2):
        pass


def test_what_cannot_train_on_the_cache_says_why():
    t5 = AdaptBankModel(tiny_backbone("t5"))
    assert "'t5'" in cache_refusal(t5, LoRAConfig(), "classification", 1)
    bert = AdaptBankModel(tiny_backbone("bert"))
    assert "layer 0" in cache_refusal(bert, PromptTuningConfig(), "classification", 1)
    assert "layer 0" in cache_refusal(bert, LoRAConfig(), "classification", 1)  # no router: experts from layer 0
    assert "WORLD_SIZE=2" in cache_refusal(bert, LoRAConfig(layers=(1,)), "classification", 2)
    assert cache_refusal(bert, LoRAConfig(layers=(1,)), "classification", 1) is None
    combined = CombinedConfig(parts=(LoRAConfig(layers=(1,)), AdapterConfig(layers=(1,))))
    assert first_layer(bert, combined) == 1 and cache_refusal(bert, combined, "classification", 1) is None


@pytest.mark.parametrize("method", [LoRAConfig(rank=4), LoRAConfig(rank=4, layers=(3,)), BitFitConfig(layers=(-1,))],
                         ids=["lora-2-3", "lora-3", "bitfit-top"])
def test_a_cached_add_task_stores_the_expert_an_uncached_one_stores(tiny_bert_dir, tmp_path, method):
    stored = {}
    for cache in (False, True):
        bank = AdapterBank.init(tmp_path / f"bank-{cache}", base=str(tiny_bert_dir))
        r = bank.add_task("weather", method, TrainConfig(**{**FAST.to_dict(), "cache_frozen": cache}))
        model = bank.load(["weather"])
        stored[cache] = (r.test_accuracy, {k: v.clone() for k, v in model.state_dict().items()
                                           if ".experts." in k or k.startswith("heads.")})
        phases = bank.info("weather")["metrics"]["phase_seconds"]
        assert set(phases) == {"data", "model", "tokenise", "frozen pass", "router memory", "probe", "training",
                               "evaluation"}
        assert all(v >= 0 for v in phases.values()) and phases["training"] > 0
        assert r.phase_seconds == {**phases, "commit": r.phase_seconds["commit"]} and r.phase_seconds["commit"] > 0
        assert sum(r.phase_seconds.values()) <= r.seconds + 0.1  # the phases cover add-task, no more
    (acc0, plain), (acc1, cached) = stored[False], stored[True]
    assert acc0 == acc1 and plain.keys() == cached.keys() and plain
    for k in plain:
        torch.testing.assert_close(cached[k], plain[k], rtol=1e-4, atol=1e-6)
    moved = [k for k in plain if ".experts." in k and plain[k].abs().sum() > 0]
    assert moved, "training changed the expert (a zero expert would make the comparison empty)"


def test_cache_frozen_refuses_a_prompt_task_and_leaves_the_bank_unchanged(tiny_bert_dir, tmp_path):
    bank = AdapterBank.init(tmp_path / "bank", base=str(tiny_bert_dir))
    with pytest.raises(ValueError, match="cannot train task 'weather' on cached layers: .*prompt"):
        bank.add_task("weather", PromptTuningConfig(prompt_length=2), TrainConfig(**{**FAST.to_dict(), "cache_frozen": True}))
    assert bank.tasks() == []


def test_layers_keep_the_experts_in_those_layers_and_survive_storage(tiny_bert_dir, tmp_path):
    bank = AdapterBank.init(tmp_path / "bank", base=str(tiny_bert_dir))  # 4 layers, the router reads 0-1
    bank.add_task("weather", IA3Config(layers=(-1,)), FAST)
    stored = bank.info("weather")["method"]
    assert stored["layers"] == [-1]
    assert method_from_dict(stored) == IA3Config(layers=(-1,))
    paths = list(bank.load(["weather"]).layers_of("weather"))
    assert paths and all(p.startswith("encoder.layer.3.") for p in paths), paths
    bank.add_task("weather", IA3Config(), FAST, name="everywhere")
    free = {p.split(".")[2] for p in bank.load(["everywhere"]).layers_of("everywhere")}
    assert free == {"2", "3"}  # without layers: every layer the router leaves free


@pytest.mark.parametrize("layers, message", [((9,), r"layer 9 \(--layers\) is out of range: the base has 4 layers"),
                                              ((1, 3), r"layer 1 \(--layers\) is one the router reads"),
                                              ((-5,), r"layer -5 \(--layers\) is out of range")])
def test_layers_out_of_range_or_read_by_the_router_are_refused(tiny_bert_dir, tmp_path, layers, message):
    bank = AdapterBank.init(tmp_path / "bank", base=str(tiny_bert_dir))
    with pytest.raises(ValueError, match=message):
        bank.add_task("weather", LoRAConfig(layers=layers), FAST)
    assert bank.tasks() == []


@pytest.mark.parametrize("bad", [(), (1, 1), ("2",), (True,), [2]])
def test_layers_must_be_distinct_integers(bad):
    with pytest.raises(ValueError, match="layers must be distinct integer layer indices"):
        LoRAConfig(layers=bad)


def test_cli_layers_and_cache_frozen(tiny_bert_dir, tmp_path):
    r = CliRunner()
    bank = str(tmp_path / "bank")
    assert r.invoke(main, ["init", bank, "--base", str(tiny_bert_dir)]).exit_code == 0
    common = ["--epochs", "1", "--max-train", "32", "--max-test", "16", "--json"]
    res = r.invoke(main, ["add-task", bank, "weather", "--layers", "3", "--cache-frozen", *common])
    assert res.exit_code == 0, res.output
    info = AdapterBank.open(bank).info("weather")
    assert info["method"]["layers"] == [3] and info["train"]["cache_frozen"] is True
    assert info["metrics"]["phase_seconds"]["training"] > 0
    res = r.invoke(main, ["add-task", bank, "topic", "--method", "adapter", "--layers", "2-3", *common])
    assert res.exit_code == 0, res.output
    assert AdapterBank.open(bank).info("topic")["method"]["layers"] == [2, 3]
    for flags, message in [(["--layers", "2-x"], "'2-x' in '2-x' is not a layer index"),
                           (["--layers", "3-2"], "'3-2' in '3-2' is not a layer index or an ascending range"),
                           (["--layers", "2,2"], "names a layer twice"),
                           (["--method", "prompt", "--layers", "3"], "--layers does not apply to --method prompt"),
                           (["--method", "prefix+lora", "--layers", "3"], "--layers does not apply to --method prefix+lora")]:
        res = r.invoke(main, ["add-task", bank, "weather", "--name", "w2", *flags, *common])
        assert res.exit_code != 0 and message in res.output, (flags, res.output)
    assert json.loads(r.invoke(main, ["list", bank, "--json"]).output)["tasks"][0]["task"] == "weather"
    assert sorted(AdapterBank.open(bank).tasks()) == ["topic", "weather"]
