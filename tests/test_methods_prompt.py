"""Prompt-Tuning, Prefix-Tuning and P-Tuning v2: closed-form sizes, collapse, save/load, mixed batches,
routing, equality with peft, training on a built-in task, and the errors; on tiny models."""

from __future__ import annotations

import copy
import dataclasses
import json
import warnings

import pytest
import torch
from conftest import FAMILIES, tiny_backbone

from adaptbank import AdaptBankModel, LoRAConfig
from adaptbank.core.config import PrefixConfig, PromptTuningConfig, PTuningV2Config, TrainConfig
from adaptbank.core.pooling import pool
from adaptbank.routing.lda import LDARouter

PREFIX_FAMILIES = ["bert", "gpt2", "llama"]
D, N, H = 32, 2, 8  # hidden size and layers of tiny_backbone, reparameterisation width used below
METHODS = {
    "prompt": PromptTuningConfig(prompt_length=3, prompt_init="random"),
    "prefix": PrefixConfig(prefix_length=4, reparam_hidden=H),
    "ptuning-v2": PTuningV2Config(prefix_length=2),
}
LABELS = ["x", "y"]


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 120, (6, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    mask[3, 2:] = 0
    mask[5, 6:] = 0
    return ids, mask


def model_with(family: str, names: dict[str, object], seed: int = 0) -> AdaptBankModel:
    model = AdaptBankModel(tiny_backbone(family, seed=seed))
    for name, cfg in names.items():
        model.add_task(name, cfg, LABELS, seed=len(name))  # type: ignore[arg-type]
    if "l" in names:  # LoRA's B starts at zero: give it an effect
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for p in model.expert_parameters("l"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def run(model: AdaptBankModel, ids: torch.Tensor, mask: torch.Tensor, task: str | None) -> torch.Tensor:
    model.route(task=task)
    return model.features(ids, mask)  # (B, D)


def count(model: AdaptBankModel, name: str) -> int:
    return sum(p.numel() for p in model.expert_parameters(name))


# ----------------------------------------------------------------------------- sizes and collapse
@pytest.mark.parametrize("family", PREFIX_FAMILIES)
def test_trainable_parameter_counts_match_closed_form(family):
    model = model_with(family, {"p": PromptTuningConfig(prompt_length=5), **{k: METHODS[k] for k in ("prefix",)},
                                "ptv2": PTuningV2Config(prefix_length=4)})
    P = 4
    assert count(model, "p") == 5 * D
    assert count(model, "prefix") == P * D + D * H + H + H * N * 2 * D + N * 2 * D  # embedding + MLP
    assert count(model, "ptv2") == N * 2 * P * D
    model.finalize("prefix")
    assert count(model, "prefix") == N * 2 * P * D  # stored: the collapsed prefixes only
    shapes = {k: tuple(v.shape) for k, v in model.export_task("prefix")["adapter"].items()}
    assert shapes == {"prefix.key": (N, P, D), "prefix.value": (N, P, D)}
    assert {k: tuple(v.shape) for k, v in model.export_task("p")["adapter"].items()} == {"prompt": (5, D)}
    assert model.tasks["p"].paths == () and model.tasks["prefix"].paths == ()


@pytest.mark.parametrize("family", PREFIX_FAMILIES)
def test_collapsing_the_mlp_keeps_the_outputs(family, batch):
    model = model_with(family, {"prefix": METHODS["prefix"]})
    before = run(model, *batch, "prefix")
    exported = model.export_task("prefix")["adapter"]  # evaluated through the MLP, not stored as it
    model.finalize("prefix")
    assert not model.virtual.prefixes["prefix"].reparameterised
    torch.testing.assert_close(run(model, *batch, "prefix"), before, atol=1e-6, rtol=0)
    assert all(torch.equal(v, model.export_task("prefix")["adapter"][k]) for k, v in exported.items())


# ----------------------------------------------------------------------------- save / load
@pytest.mark.parametrize("family", PREFIX_FAMILIES)
def test_export_import_is_bit_exact(family, batch):
    model = model_with(family, {**METHODS, "l": LoRAConfig(rank=2, dropout=0.0)})
    model.finalize("prefix")
    other = AdaptBankModel(tiny_backbone(family)).eval()  # same base weights, no tasks
    for name in ("prompt", "prefix", "ptuning-v2"):
        info = model.tasks[name]
        other.import_task(name, info.method, info.labels, model.export_task(name))
        assert torch.equal(run(other, *batch, name), run(model, *batch, name))
    with pytest.raises(ValueError, match=r"tensor 'key' has shape \(2, 3, 32\) in the file but \(2, 4, 32\)"):
        bad = model.export_task("prefix")
        bad["adapter"] = {k: v[:, :3] for k, v in bad["adapter"].items()}
        other.import_task("bad", METHODS["prefix"], LABELS, bad)
    assert "bad" not in other.tasks and "bad" not in other.virtual
    other.remove_task("prompt")
    assert "prompt" not in other.virtual and "prompt" not in other.heads


# ----------------------------------------------------------------------------- mixed batches and routing
@pytest.mark.parametrize("family", PREFIX_FAMILIES)
def test_mixed_batch_rows_equal_single_task_runs(family, batch):
    model = model_with(family, {**METHODS, "l": LoRAConfig(rank=2, dropout=0.0, targets="all-linear")})
    tasks = ["prompt", "l", "prefix", "ptuning-v2", "prompt", "l"]
    model.route(task_ids=tasks)
    mixed = model.features(*batch)
    out = model(*batch, task_ids=tasks)
    assert torch.equal(out.pooled, mixed)
    for i, t in enumerate(tasks):
        torch.testing.assert_close(mixed[i], run(model, *batch, t)[i], atol=1e-5, rtol=0)
    base = run(model, *batch, None)
    assert (mixed[0] - base[0]).abs().max() > 1e-3 and (mixed[2] - base[2]).abs().max() > 1e-3  # they act


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_tuning_works_on_every_family(family, batch):
    model = model_with(family, {"prompt": METHODS["prompt"], "p5": PromptTuningConfig(prompt_length=5),
                                "l": LoRAConfig(rank=2, dropout=0.0)})
    tasks = ["p5", "l", "prompt", "prompt", "l", "p5"]
    model.route(task_ids=tasks)
    mixed = model.features(*batch)
    for i, t in enumerate(tasks):
        torch.testing.assert_close(mixed[i], run(model, *batch, t)[i], atol=1e-5, rtol=0)


def test_routed_forward_gives_prompt_and_prefix_rows_a_second_pass(batch):
    from adaptbank.core.pooling import mean_pool

    ids, mask = batch
    model = AdaptBankModel(tiny_backbone("bert")).eval()
    model.reserved_layers = 1  # the router reads the embeddings and layer 0
    for name, cfg in {"l": LoRAConfig(rank=2, dropout=0.0), **METHODS}.items():
        model.add_task(name, cfg, LABELS, seed=1)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.expert_parameters("l"):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        hidden = model.encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        feats = torch.cat([mean_pool(h, mask) for h in hidden[:2]], -1)  # (B, 2 D) what the taps pool
    want = [0, 1, 2, 3, 1, 0]  # a router that sends row b to task want[b]: scores = 10 * one-hot
    weight = (torch.linalg.pinv(feats) @ (10 * torch.eye(4)[want])).T  # (E, F)
    router = LDARouter(list(model.tasks), weight, torch.zeros(4), layers=1)
    with pytest.raises(ValueError, match="top_k=2 would mix prompt/prefix task 'prompt'"):
        model.attach_router(router, top_k=2)
    model.attach_router(router, top_k=1)
    out = model(ids, mask, routed=True)
    assert out.tasks == tuple(list(model.tasks)[w] for w in want)
    for i, t in enumerate(out.tasks):
        torch.testing.assert_close(out.pooled[i], run(model, ids, mask, t)[i], atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- equality with peft
def _peft(model: torch.nn.Module, cfg: object) -> torch.nn.Module:
    import peft

    return peft.get_peft_model(copy.deepcopy(model), cfg).eval()


@pytest.mark.parametrize("family", PREFIX_FAMILIES)
def test_prompt_tuning_equals_peft(family, batch):
    import peft

    ids, mask = batch
    backbone = tiny_backbone(family)
    hf = copy.deepcopy(backbone.model)
    model = model_with(family, {"prompt": METHODS["prompt"]})
    ref = _peft(hf, peft.PromptTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=3))
    with torch.no_grad():
        ref.prompt_encoder["default"].embedding.weight.copy_(model.virtual.prompts["prompt"].prompt)
        hidden = ref(input_ids=ids, attention_mask=mask).last_hidden_state[:, 3:]  # (B, T, D) real tokens
    torch.testing.assert_close(run(model, ids, mask, "prompt"), pool(hidden, mask, model.pooling), atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", PREFIX_FAMILIES)
@pytest.mark.parametrize("projection", [False, True])
def test_prefix_equals_peft_prefix_tuning(family, projection, batch):
    import peft

    ids, mask = batch
    hf = copy.deepcopy(tiny_backbone(family).model)
    name = "prefix" if projection else "ptuning-v2"
    model = model_with(family, {name: dataclasses.replace(METHODS[name], positions="after-prefix")})  # peft's positions
    expert = model.virtual.prefixes[name]
    P = expert.length
    cfg = peft.PrefixTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=P, prefix_projection=projection,
                                  encoder_hidden_size=H)
    ref = _peft(hf, cfg)
    encoder = ref.prompt_encoder["default"]
    with torch.no_grad():
        if projection:  # the same MLP reparameterisation
            encoder.embedding.weight.copy_(expert.embedding)
            encoder.transform.load_state_dict(expert.mlp.state_dict())
        else:  # peft's (P, N * 2 * W) layout: per token, layer by layer, key then value
            encoder.embedding.weight.copy_(torch.stack([expert.key, expert.value], 1).permute(2, 0, 1, 3).reshape(P, -1))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # peft passes past_key_values=, renamed cache=
            hidden = ref(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, D)
    torch.testing.assert_close(run(model, ids, mask, name), pool(hidden, mask, model.pooling),
                               atol=1e-5 if projection else 1e-6, rtol=0)


# ----------------------------------------------------------------------------- prefix positions
@pytest.mark.parametrize("family, want", [("bert", "from-zero"), ("gpt2", "after-prefix"), ("llama", "after-prefix")])
def test_auto_positions_are_fixed_when_the_task_is_created(family, want):
    from adaptbank.core.config import CombinedConfig

    model = model_with(family, {"p": METHODS["ptuning-v2"], "given": PrefixConfig(prefix_length=2, positions="from-zero"),
                                "both": CombinedConfig(parts=(LoRAConfig(rank=2), PTuningV2Config(prefix_length=2)))})
    assert METHODS["ptuning-v2"].positions == "auto"
    assert model.tasks["p"].method.positions == want and model.virtual.prefixes["p"].shift == (want == "after-prefix")
    assert model.tasks["given"].method.positions == "from-zero"  # a concrete choice is kept on every family
    assert model.tasks["both"].method.parts[1].positions == want


def test_from_zero_positions_are_the_unprefixed_ones_and_after_prefix_the_shifted(batch):
    """With positions from zero the real tokens read position embeddings 0..T-1 only (those of the run
    without a prefix); after the prefix they read P..P+T-1. Changing the embeddings of positions >= T
    moves only the latter; a mixed batch of both kinds still equals each row's own run."""
    ids, mask = batch
    T = ids.shape[1]
    model = model_with("bert", {"zero": PTuningV2Config(prefix_length=4, positions="from-zero"),
                                "after": PTuningV2Config(prefix_length=4, positions="after-prefix")})
    with torch.no_grad():
        model.virtual.prefixes["after"].key.copy_(model.virtual.prefixes["zero"].key)
        model.virtual.prefixes["after"].value.copy_(model.virtual.prefixes["zero"].value)
    zero, after = run(model, ids, mask, "zero"), run(model, ids, mask, "after")
    assert (zero - after).abs().max() > 1e-3  # the same prefixes, other positions
    tasks = ["zero", "after", "after", "zero", "after", "zero"]
    model.route(task_ids=tasks)
    mixed = model.features(ids, mask)
    for i, t in enumerate(tasks):
        torch.testing.assert_close(mixed[i], run(model, ids, mask, t)[i], atol=1e-6, rtol=0)
    table = model.encoder.embeddings.position_embeddings.weight
    with torch.no_grad():
        table[T:] += torch.randn_like(table[T:])
    torch.testing.assert_close(run(model, ids, mask, "zero"), zero, atol=0, rtol=0)
    assert (run(model, ids, mask, "after") - after).abs().max() > 1e-2


def test_from_zero_prefix_needs_only_the_input_positions():
    model = model_with("bert", {"zero": PTuningV2Config(prefix_length=60, positions="from-zero"),
                                "after": PTuningV2Config(prefix_length=60, positions="after-prefix")})
    model.check_length("zero", 64)  # the model's 64 positions hold the 64 input tokens
    with pytest.raises(ValueError, match="60 virtual tokens plus 10 input tokens need 70 positions"):
        model.check_length("after", 10)
    with pytest.raises(ValueError, match="positions must be one of auto, from-zero, after-prefix "
                                         r"\(--prefix-positions\), got 'zero'"):
        PrefixConfig(positions="zero")  # type: ignore[arg-type]


def test_a_prefix_stored_before_positions_existed_keeps_its_shifted_positions(tmp_path, batch):
    from adaptbank.bank.expert_io import load_expert, save_expert
    from adaptbank.core.config import stored_method

    ids, mask = batch
    model = model_with("bert", {"old": PTuningV2Config(prefix_length=3, positions="after-prefix")})
    save_expert(model, "old", tmp_path / "old")
    config = json.loads((tmp_path / "old" / "adapter_config.json").read_text())
    assert config["method"]["positions"] == "after-prefix"  # the resolved value is what is stored
    del config["method"]["positions"]  # as an expert saved before the field existed
    (tmp_path / "old" / "adapter_config.json").write_text(json.dumps(config))
    fresh = model_with("bert", {})
    assert load_expert(fresh, tmp_path / "old").method.positions == "after-prefix"
    torch.testing.assert_close(run(fresh.eval(), ids, mask, "old"), run(model, ids, mask, "old"), atol=0, rtol=0)
    parts = stored_method({"kind": "lora+prefix", "parts": [{"kind": "lora"}, {"kind": "prefix"}]}).parts
    assert parts[1].positions == "after-prefix"
    assert stored_method({"kind": "prefix", "positions": "from-zero"}).positions == "from-zero"


# ----------------------------------------------------------------------------- errors
def test_errors_name_the_bad_value_and_what_is_allowed(batch):
    ids, mask = batch
    model = model_with("bert", {"long": PromptTuningConfig(prompt_length=60), "prompt": METHODS["prompt"],
                                "l": LoRAConfig(rank=2)})
    with pytest.raises(ValueError, match="60 virtual tokens plus 7 input tokens need 67 positions, but the model has 64"):
        run(model, ids, mask, "long")
    with pytest.raises(ValueError, match=r"60 virtual tokens plus 10 input tokens .* --max-length <= 4"):
        model.check_length("long", 10)
    model.check_length("prompt", 61)
    model.check_length("l", 1000)  # no positions added
    index = torch.tensor([[1, 2]] * 6)  # prompt and LoRA in every row
    with pytest.raises(ValueError, match="prompt/prefix task 'prompt' a share of a top-2 mixture"):
        model.route(index=index, weight=torch.full((6, 2), 0.5))
        model.features(ids, mask)
    with pytest.raises(ValueError, match="must have weight 1"):
        model.route(index=torch.tensor([[1]] * 6), weight=torch.full((6, 1), 0.5))
        model.features(ids, mask)
    model.state.tokens()
    with pytest.raises(ValueError, match="token-level gates cannot apply prompt/prefix tasks"):
        model.features(ids, mask)
    with pytest.raises(TypeError, match="only LoRA, bitfit and ia3 tasks can be merged; 'prompt' uses 'prompt'"):
        model.merge("prompt")
    with pytest.raises(ValueError, match="--share-a works with LoRA only, not 'prefix'"):
        model.add_task("s", METHODS["prefix"], LABELS, shared_group="g")
    for family in ("distilbert", "t5"):
        other = AdaptBankModel(tiny_backbone(family))
        with pytest.raises(ValueError, match=f"do not support model family '{family}'; supported: bert, gpt2, llama"):
            other.add_task("q", METHODS["ptuning-v2"], LABELS)
        assert "q" not in other.tasks
    with pytest.raises(ValueError, match="needs the backbone's tokenizer"):
        model.add_task("lab", PromptTuningConfig(prompt_init="labels", prompt_length=4), LABELS)


def test_label_and_vocab_inits_use_the_embeddings(tiny_bert_dir):
    from adaptbank.core.backbone import load_backbone

    model = AdaptBankModel(load_backbone(str(tiny_bert_dir)))
    model.add_task("lab", PromptTuningConfig(prompt_init="labels", prompt_length=5), ["sunny", "rainy"])
    ids = model.tokenizer("sunny rainy", add_special_tokens=False)["input_ids"]
    table = model.backbone.get_input_embeddings().weight
    assert torch.equal(model.virtual.prompts["lab"].prompt, table[torch.tensor((ids * 3)[:5])])
    model.add_task("voc", PromptTuningConfig(prompt_init="vocab", prompt_length=6), ["a", "b"], seed=3)
    rows = model.virtual.prompts["voc"].prompt
    assert all(any(torch.equal(r, t) for t in table[5:]) for r in rows)  # special tokens (ids 0-4) excluded
    again = AdaptBankModel(load_backbone(str(tiny_bert_dir)))
    again.add_task("voc", PromptTuningConfig(prompt_init="vocab", prompt_length=6), ["a", "b"], seed=3)
    assert torch.equal(again.virtual.prompts["voc"].prompt, rows)  # seeded


# ----------------------------------------------------------------------------- training through the bank
@pytest.mark.parametrize("method", list(METHODS))
def test_bank_trains_stores_and_loads_each_kind(method, tiny_bert_dir, tmp_path):
    from adaptbank import AdapterBank

    bank = AdapterBank.init(tmp_path / "bank", base=str(tiny_bert_dir))
    cfg = {"prompt": PromptTuningConfig(prompt_length=8, prompt_init="vocab"),
           "prefix": PrefixConfig(prefix_length=8, reparam_hidden=32),
           "ptuning-v2": PTuningV2Config(prefix_length=8)}[method]
    base_before = {k: v.clone() for k, v in bank.new_model().backbone.state_dict().items()}
    train = TrainConfig(epochs=6, lr=3e-2, head_lr=3e-2, batch_size=16, max_length=24, max_train=200, max_test=100,
                        probe_init=False)  # a fresh head: no probe, so nothing starts above chance
    result = bank.add_task("weather", cfg, train)
    assert result.test_accuracy > 0.32, result  # 4 classes: chance is 0.25 (measured: 0.40-0.44 on 200 test rows)
    model = bank.load()
    assert all(torch.equal(v, base_before[k]) for k, v in model.backbone.state_dict().items())  # base untouched
    assert model.base_fingerprint() == bank.base["fingerprint"]
    stored = bank.store.read_tensors("weather", "adapter")
    want = {"prompt": {"prompt"}}.get(method, {"prefix.key", "prefix.value"})
    assert set(stored) == want  # a prefix is stored collapsed, never as its MLP
    assert all(torch.equal(stored[k], v) for k, v in model.export_task("weather")["adapter"].items())
    assert result.trainable_params == sum(v.numel() for v in stored.values())
    assert bank.evaluate()["weather"] == result.test_accuracy  # the loaded expert answers as the trained one
    fresh = bank.new_model()
    fresh.add_task("weather", cfg, model.tasks["weather"].labels, seed=train.seed)  # the expert as it started
    fresh.finalize("weather")
    start = fresh.export_task("weather")["adapter"]
    assert all(not torch.equal(start[k], v) for k, v in stored.items())  # the expert itself trained


@pytest.mark.parametrize("family", PREFIX_FAMILIES)
def test_a_batch_of_eight_methods_equals_the_single_task_runs(family):
    """Issue 11, item 8: one batched forward over rows of every expert kind (LoRA, serial and parallel
    adapters, BitFit, (IA)^3, prompt, prefix, P-tuning v2) equals, row by row, each task run alone."""
    from adaptbank.core.config import AdapterConfig, BitFitConfig, IA3Config, ParallelAdapterConfig

    kinds = {**METHODS, "l": LoRAConfig(rank=2, dropout=0.0, targets="qv"), "ad": AdapterConfig(bottleneck=4),
             "pa": ParallelAdapterConfig(bottleneck=4), "bf": BitFitConfig(), "ia": IA3Config()}
    model = model_with(family, kinds)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():  # every linear kind starts at identity: move them all off it
        for name in ("l", "ad", "pa", "bf", "ia"):
            for p in model.expert_parameters(name):
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    tasks = ["prompt", "l", "ad", "pa", "bf", "ia", "prefix", "ptuning-v2"]
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(1, 120, (len(tasks), 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    mask[6, 3:] = 0
    mixed = model(ids, mask, task_ids=tasks).pooled  # (B, D): one forward
    base = run(model, ids, mask, None)
    for i, t in enumerate(tasks):
        alone = run(model, ids, mask, t)[i]
        torch.testing.assert_close(mixed[i], alone, atol=1e-5, rtol=0)
        assert (alone - base[i]).abs().max() > 1e-4, f"task {t!r} has no effect, so the test would prove nothing"
