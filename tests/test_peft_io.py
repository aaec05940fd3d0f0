"""peft's format both ways and the merged export (issue 12, items 4 and 5), on tiny models and a tiny bank.

Every equality is against peft itself (``PeftModel.from_pretrained``, ``get_peft_model``) or transformers
alone (``AutoModel.from_pretrained``), on the real tokens (attention mask respected), within 1e-5.
"""

from __future__ import annotations

import copy
import json
import re
import warnings
from pathlib import Path

import peft
import pytest
import torch
from click.testing import CliRunner
from conftest import tiny_backbone, tree_digest

from adaptbank.bank.facade import AdapterBank
from adaptbank.bank.interop import HEAD_FILE, HEAD_META, export_merged, export_peft, import_peft
from adaptbank.bank.merged_export import write_merged
from adaptbank.bank.peft_io import PeftFormatError, from_peft, read_peft_dir, to_peft, write_peft_dir
from adaptbank.cli.main import main
from adaptbank.core.config import (
    AdapterConfig,
    BitFitConfig,
    CombinedConfig,
    IA3Config,
    LoRAConfig,
    PrefixConfig,
    PromptTuningConfig,
    PTuningV2Config,
    TrainConfig,
)
from adaptbank.core.experts import IA3Expert, IA3InputExpert
from adaptbank.core.model import AdaptBankModel
from adaptbank.core.pooling import pool

LABELS = ["neg", "pos", "mid"]
FAST = TrainConfig(epochs=1, max_train=48, max_test=24, max_length=24)


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 120, (4, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    mask[3, 2:] = 0
    return ids, mask


def randomize(model: AdaptBankModel, name: str, seed: int = 0) -> None:
    """Non-trivial values in every expert tensor: scales around 1, the rest around 0 (never the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.layers_of(name).values():
            expert = layer.experts[name]
            for p in expert.parameters():
                noise = torch.randn(p.shape, generator=g) * 0.3
                p.copy_(1 + noise if isinstance(expert, (IA3Expert, IA3InputExpert)) else noise)
        if name in model.virtual:
            for p in model.virtual.get(name).parameters():
                p.copy_(torch.randn(p.shape, generator=g))
        for p in model.heads[name].parameters():
            p.copy_(torch.randn(p.shape, generator=g))


def hidden(model: AdaptBankModel, task: str | None, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """adaptbank's last hidden state of the real tokens (B, T, D) under ``task``."""
    model.route(task=task)
    with torch.no_grad():
        if task is not None and task in model.virtual:
            return model.virtual.encode(model.encoder, ids, mask, [task] * ids.shape[0])
        return model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state


def peft_hidden(pm: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, prompt: int = 0) -> torch.Tensor:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft passes past_key_values=, renamed cache=
        return pm(input_ids=ids, attention_mask=mask).last_hidden_state[:, prompt:]  # a prompt's rows dropped


def close_on_tokens(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor, atol: float = 1e-5) -> None:
    """Equal on the real tokens up to float32 summation order (peft scales B(A x), adaptbank (x A) B; with
    alpha patterns of 7/2 the two differ by ~1.5e-5 relative after two layers); a wrong import is off by ~1e-1."""
    keep = mask.bool()
    torch.testing.assert_close(a[keep], b[keep], atol=atol, rtol=2e-5)


def model_with(family: str, name: str, method: object, *, shared: str | None = None) -> tuple[AdaptBankModel, object]:
    """A fresh model with task ``name`` randomised, and an untouched copy of its base for peft."""
    backbone = tiny_backbone(family)
    base = copy.deepcopy(backbone.model)
    model = AdaptBankModel(backbone)
    model.add_task(name, method, LABELS, shared_group=shared, seed=1)  # type: ignore[arg-type]
    randomize(model, name)
    return model.eval(), base


EXPORTS = {
    "lora-qv": LoRAConfig(rank=2, alpha=6.0),
    "lora-attn": LoRAConfig(rank=3, targets="attn"),
    "lora-all": LoRAConfig(rank=2, targets="all-linear"),
    "lora-explicit": LoRAConfig(rank=2, targets=(r"(layers?|h)\.1\..*(query|v_proj|c_attn)$",)),
    "ia3": IA3Config(),
    "prompt": PromptTuningConfig(prompt_length=3),
    "prefix": PrefixConfig(prefix_length=3, reparam_hidden=8, positions="after-prefix"),  # peft's positions
    "ptuning-v2": PTuningV2Config(prefix_length=2, positions="after-prefix"),
}


# ----------------------------------------------------------------------------- export: adaptbank -> peft
@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize("kind", list(EXPORTS))
def test_exported_adapter_loads_in_peft_alone_and_matches(family, kind, batch, tmp_path):
    ids, mask = batch
    model, base = model_with(family, "t", EXPORTS[kind])
    model.finalize("t")  # a prefix's MLP collapsed, as the bank stores it
    adapter = to_peft(model, "t", base_name="tiny")
    write_peft_dir(adapter, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny" and config["task_type"] == "FEATURE_EXTRACTION"
    pm = peft.PeftModel.from_pretrained(base, tmp_path).eval()
    prompt = EXPORTS[kind].prompt_length if kind == "prompt" else 0
    ours, theirs = hidden(model, "t", ids, mask), peft_hidden(pm, ids, mask, prompt)
    close_on_tokens(ours, theirs, mask)
    assert (ours - hidden(model, None, ids, mask)).abs().max() > 1e-2  # the task really acts


def test_a_prefix_with_positions_from_zero_is_not_exported_to_peft():
    model, _ = model_with("bert", "z", PTuningV2Config(prefix_length=2))  # auto: from-zero on an encoder
    assert model.tasks["z"].method.positions == "from-zero"
    with pytest.raises(PeftFormatError, match="positions='from-zero'.*--prefix-positions after-prefix"):
        to_peft(model, "z", base_name=None)


def test_peft_types_and_layouts_are_peft_s(batch, tmp_path):
    model, _ = model_with("bert", "t", IA3Config())
    adapter = to_peft(model, "t", base_name=None)
    assert adapter.config["peft_type"] == "IA3"
    assert adapter.config["feedforward_modules"] == ["encoder.layer.0.output.dense", "encoder.layer.1.output.dense"]
    assert adapter.tensors["base_model.model.encoder.layer.0.output.dense.ia3_l"].shape == (1, 64)  # input side
    assert adapter.tensors["base_model.model.encoder.layer.0.attention.self.key.ia3_l"].shape == (32, 1)
    gpt, _ = model_with("gpt2", "p", PTuningV2Config(prefix_length=2))
    cfg = to_peft(gpt, "p", base_name=None).config
    assert (cfg["peft_type"], cfg["prefix_projection"], cfg["num_layers"], cfg["token_dim"]) == ("PREFIX_TUNING", False, 2, 32)
    assert to_peft(model_with("gpt2", "l", LoRAConfig())[0], "l", base_name=None).config["fan_in_fan_out"] is True


def test_a_shared_a_task_exports_as_plain_lora_with_its_group_s_a(batch, tmp_path):
    ids, mask = batch
    backbone = tiny_backbone("bert")
    base = copy.deepcopy(backbone.model)
    model = AdaptBankModel(backbone)
    model.add_task("a", LoRAConfig(rank=2), LABELS, shared_group="g", seed=1)
    model.add_task("b", LoRAConfig(rank=2), LABELS, shared_group="g", seed=2)
    for name in ("a", "b"):
        randomize(model, name, seed=len(name))
    model.eval()
    write_peft_dir(to_peft(model, "b", base_name=None), tmp_path)
    pm = peft.PeftModel.from_pretrained(base, tmp_path).eval()
    close_on_tokens(hidden(model, "b", ids, mask), peft_hidden(pm, ids, mask), mask)


@pytest.mark.parametrize("method, why", [
    (AdapterConfig(bottleneck=4), "'adapter': a bottleneck adapter"),
    (BitFitConfig(), "'bitfit': BitFit bias deltas"),
    (CombinedConfig(parts=(LoRAConfig(), BitFitConfig())), "'lora\\+bitfit': a combination"),
])
def test_what_peft_cannot_hold_is_refused_naming_the_method_and_the_way_out(method, why):
    model, _ = model_with("bert", "t", method)
    with pytest.raises(PeftFormatError, match=why + r".*--merged.*--format adaptbank"):
        to_peft(model, "t", base_name=None)


# ----------------------------------------------------------------------------- import: peft -> adaptbank
def randomize_peft(pm: torch.nn.Module, seed: int = 0) -> None:
    """peft's LoRA B starts at zero and IA3 at one: give every adapter tensor another value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if any(k in name for k in ("lora_", "ia3_l", "prompt_encoder")):
                noise = torch.randn(p.shape, generator=g) * (0.3 if "prompt_encoder" not in name else 1.0)
                p.copy_(1 + noise if "ia3_l" in name else noise)


def saved_peft(base: torch.nn.Module, cfg: object, folder: Path, seed: int = 0) -> torch.nn.Module:
    """``get_peft_model(base, cfg)`` randomised and saved to ``folder``; the peft model, in eval mode."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(base), cfg)
    randomize_peft(pm, seed)
    pm.save_pretrained(folder)
    return pm.eval()


def imported(model: AdaptBankModel, folder: Path, name: str = "imp") -> str:
    method, tensors = from_peft(model, read_peft_dir(folder))
    head = {"weight": torch.zeros(len(LABELS), model.hidden_size), "bias": torch.zeros(len(LABELS))}
    model.import_task(name, method, LABELS, {"adapter": tensors, "head": head})
    return name


FE = "FEATURE_EXTRACTION"
IMPORTS = {  # family, peft config
    "lora-bert": ("bert", lambda: peft.LoraConfig(r=2, lora_alpha=5, target_modules=["query", "value"])),
    "lora-bert-patterns": ("bert", lambda: peft.LoraConfig(r=2, lora_alpha=4, use_rslora=True, target_modules="all-linear",
                                                           rank_pattern={"value": 3}, alpha_pattern={r"layer\.1\..*dense": 7})),
    "lora-gpt2": ("gpt2", lambda: peft.LoraConfig(r=2, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),
    "lora-llama": ("llama", lambda: peft.LoraConfig(r=4, target_modules=r"layers\.1\..*_proj", task_type=FE)),
    "ia3-bert": ("bert", lambda: peft.IA3Config(target_modules=["key", "value", "output.dense"],
                                                feedforward_modules=["output.dense"])),
    "ia3-llama": ("llama", lambda: peft.IA3Config(target_modules=["k_proj", "v_proj"], feedforward_modules=[])),
    "prompt-gpt2": ("gpt2", lambda: peft.PromptTuningConfig(task_type=FE, num_virtual_tokens=3)),
    "prefix-bert": ("bert", lambda: peft.PrefixTuningConfig(task_type=FE, num_virtual_tokens=2)),
    "prefix-mlp-llama": ("llama", lambda: peft.PrefixTuningConfig(task_type=FE, num_virtual_tokens=2, prefix_projection=True,
                                                                  encoder_hidden_size=8)),
}


@pytest.mark.parametrize("case", list(IMPORTS))
def test_a_peft_made_adapter_imports_and_matches_peft(case, batch, tmp_path):
    ids, mask = batch
    family, make = IMPORTS[case]
    backbone = tiny_backbone(family)
    cfg = make()
    pm = saved_peft(backbone.model, cfg, tmp_path)
    model = AdaptBankModel(backbone).eval()
    name = imported(model, tmp_path)
    prompt = cfg.num_virtual_tokens if isinstance(cfg, peft.PromptTuningConfig) else 0
    ours = hidden(model, name, ids, mask)
    close_on_tokens(ours, peft_hidden(pm, ids, mask, prompt), mask)
    assert (ours - hidden(model, None, ids, mask)).abs().max() > 1e-2


def test_a_causal_lm_adapter_imports_onto_the_bare_decoder(batch, tmp_path):
    """An adapter trained on LlamaForCausalLM (keys base_model.model.model.layers...) fits the bank's LlamaModel."""
    import transformers as tr

    ids, mask = batch
    backbone = tiny_backbone("llama")
    lm = tr.LlamaForCausalLM(backbone.model.config).eval()
    lm.model.load_state_dict(backbone.model.state_dict())
    pm = saved_peft(lm, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"), tmp_path)
    assert any(k.startswith("base_model.model.model.layers.") for k in read_peft_dir(tmp_path).tensors)
    model = AdaptBankModel(backbone).eval()
    imported(model, tmp_path)
    with torch.no_grad():
        theirs = pm.base_model.model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    close_on_tokens(hidden(model, "imp", ids, mask), theirs, mask)


def test_rank_and_alpha_patterns_are_held_exactly(tmp_path):
    backbone = tiny_backbone("bert")
    saved_peft(backbone.model, IMPORTS["lora-bert-patterns"][1](), tmp_path)
    method, tensors = from_peft(AdaptBankModel(backbone), read_peft_dir(tmp_path))
    assert method.rank == 3  # the largest layer rank; rank-2 layers padded with zeros
    A = tensors["encoder.layer.0.attention.self.query.A"]
    assert A.shape == (3, 32) and torch.equal(A[2], torch.zeros(32))


# ----------------------------------------------------------------------------- merged export
MERGED = {
    "lora": LoRAConfig(rank=2, alpha=2.0, targets="all-linear"),
    "ia3": IA3Config(),
    "bitfit": BitFitConfig(targets="attn"),
    "lora+ia3": CombinedConfig(parts=(LoRAConfig(rank=2), IA3Config())),
}


def transformers_alone(folder: Path, *, no_pooler: bool = False) -> torch.nn.Module:
    """``AutoModel.from_pretrained(folder)``, checked to have found every weight it expects (``no_pooler``:
    the tiny test BERT is built without the pooler a BertConfig implies, which stays random, unused)."""
    from transformers import AutoModel

    loaded, info = AutoModel.from_pretrained(folder, output_loading_info=True)
    missing = {k for k in info["missing_keys"] if not (no_pooler and k.startswith("pooler."))}
    assert not (missing or info["unexpected_keys"] or info["mismatched_keys"]), info
    return loaded.eval()


def head_logits(folder: Path, pooled: torch.Tensor) -> torch.Tensor:
    from safetensors.torch import load_file

    head = load_file(folder / HEAD_FILE)
    return pooled @ head["weight"].T + head["bias"]  # (B, C)


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize("kind", list(MERGED))
def test_merged_checkpoint_loads_with_transformers_alone_and_matches(family, kind, batch, tmp_path):
    ids, mask = batch
    if family == "llama" and kind == "bitfit":  # LLaMA's projections have no bias to merge a delta into
        model, _ = model_with(family, "t", MERGED[kind])
        with pytest.raises(ValueError, match="puts a bias on layer .layers.0.self_attn.q_proj., which has none"):
            write_merged(model, "t", tmp_path)
        return
    model, _ = model_with(family, "t", MERGED[kind])
    write_merged(model, "t", tmp_path)
    with torch.no_grad():
        theirs = transformers_alone(tmp_path, no_pooler=family == "bert")(input_ids=ids, attention_mask=mask)
    ours = hidden(model, "t", ids, mask)
    theirs = theirs.last_hidden_state
    close_on_tokens(ours, theirs, mask)
    assert (ours - hidden(model, None, ids, mask)).abs().max() > 1e-2


def test_a_quantised_base_is_dequantised_into_the_merged_checkpoint(batch, tmp_path):
    from adaptbank.core.quantize import quantize_backbone

    ids, mask = batch
    backbone = tiny_backbone("gpt2")
    quantize_backbone(backbone.model, "int8")
    model = AdaptBankModel(backbone)
    model.add_task("t", LoRAConfig(rank=2), LABELS, seed=1)
    randomize(model, "t")
    model.eval()
    write_merged(model, "t", tmp_path)
    with torch.no_grad():
        theirs = transformers_alone(tmp_path)(input_ids=ids, attention_mask=mask).last_hidden_state
    close_on_tokens(hidden(model, "t", ids, mask), theirs, mask)


@pytest.mark.parametrize("method", [AdapterConfig(bottleneck=4), PromptTuningConfig(prompt_length=2),
                                    CombinedConfig(parts=(LoRAConfig(), AdapterConfig(bottleneck=4)))])
def test_unmergeable_methods_are_refused(method, tmp_path):
    model, _ = model_with("bert", "t", method)
    with pytest.raises(TypeError, match=re.escape(f"uses {method.kind!r}; only LoRA, bitfit and ia3") + ".*--format adaptbank"):
        write_merged(model, "t", tmp_path)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- the bank: import, route, round trip
@pytest.fixture(scope="module")
def bank_dir(tiny_bert_dir, tmp_path_factory) -> Path:
    """A bank on the tiny 4-layer BERT (router: layers 0, 1) holding one trained LoRA task, ``topic``."""
    path = tmp_path_factory.mktemp("peft-bank") / "bank"
    AdapterBank.init(path, base=str(tiny_bert_dir)).add_task("topic", LoRAConfig(rank=2), FAST)
    return path


@pytest.fixture
def bank(bank_dir, tmp_path) -> AdapterBank:
    import shutil

    shutil.copytree(bank_dir, tmp_path / "bank")
    return AdapterBank.open(tmp_path / "bank")


def bank_peft(bank: AdapterBank, folder: Path, cfg: object, seed: int = 0) -> torch.nn.Module:
    """A randomised peft adapter made with peft on the bank's own base, saved to ``folder``."""
    from transformers import AutoModel

    base = AutoModel.from_pretrained(bank.base["name"]).eval()
    return saved_peft(base, cfg, folder, seed)


def texts_batch(bank: AdapterBank, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    from adaptbank.data.tokens import collate, pad_id, tokenize

    model = bank.new_model()
    b = collate(tokenize(model.tokenizer, texts, 24), pad_id(model.tokenizer), torch.device("cpu"))
    return b["input_ids"], b["attention_mask"]


UPPER_QV = dict(r=2, lora_alpha=4, target_modules=["query", "value"], layers_to_transform=[2, 3])


def test_an_imported_peft_adapter_matches_peft_in_the_bank_and_routes(bank, tmp_path):
    pm = bank_peft(bank, tmp_path / "lora", peft.LoraConfig(**UPPER_QV))
    r = import_peft(bank, tmp_path / "lora", "weather", spec="weather", train={"max_train": 48, "max_test": 24})
    assert (r.head, r.method, bank.tasks()) == ("probe", "lora", ["topic", "weather"])
    cfg = bank.info("weather")
    assert cfg["imported_from"]["peft_type"] == "LORA" and cfg["metrics"]["test_accuracy"] == r.test_accuracy
    ids, mask = texts_batch(bank, ["sunny skies and warm", "the team won the match", "snow falls tonight"])
    model = bank.load()
    close_on_tokens(hidden(model, "weather", ids, mask), peft_hidden(pm, ids, mask), mask)
    routed = bank.evaluate_routed()  # the router was refitted with the imported task in the same commit
    assert set(routed["tasks"]) == {"topic", "weather"} and routed["tasks"]["weather"]["router_accuracy"] > 0.5
    assert bank.evaluate()["weather"] == r.test_accuracy


def test_export_then_import_round_trips_expert_head_and_routing(bank, tmp_path, tiny_bert_dir):
    ids, mask = texts_batch(bank, ["the team won", "a rainy cold day"])
    out = export_peft(bank, "topic", tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == sorted(["adapter_config.json", "adapter_model.safetensors",
                                                             HEAD_FILE, HEAD_META])
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_bert_dir)
    other = AdapterBank.init(tmp_path / "other", base=str(tiny_bert_dir))
    r = import_peft(other, out, "again")  # head, labels, spec and settings from the head file
    assert r.head == "file"
    a, b = bank.load(["topic"]), other.load(["again"])
    torch.testing.assert_close(b(ids, mask, task="again").logits, a(ids, mask, task="topic").logits, atol=1e-5, rtol=0)
    assert r.test_accuracy == bank.info("topic")["metrics"]["test_accuracy"]
    assert other.router().names == ["again"]


def test_a_bank_task_merged_export_matches_the_bank_with_its_head(bank, tmp_path):
    ids, mask = texts_batch(bank, ["the team won the cup", "stocks fell", "x"])
    out = export_merged(bank, "topic", tmp_path / "merged")
    assert (out / "tokenizer_config.json").is_file() and (out / HEAD_META).is_file()
    with torch.no_grad():
        h = transformers_alone(out)(input_ids=ids, attention_mask=mask).last_hidden_state
    model = bank.load(["topic"])
    close_on_tokens(hidden(model, "topic", ids, mask), h, mask)
    torch.testing.assert_close(head_logits(out, pool(h, mask, "mean")), model(ids, mask, task="topic").logits,
                               atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- bad input: clear errors, bank unchanged
def corrupt(folder: Path, what: str) -> None:
    if what == "no-config":
        (folder / "adapter_config.json").unlink()
    elif what == "bad-json":
        (folder / "adapter_config.json").write_text("{not json")
    elif what == "no-weights":
        (folder / "adapter_model.safetensors").unlink()
    elif what == "truncated":
        blob = (folder / "adapter_model.safetensors").read_bytes()
        (folder / "adapter_model.safetensors").write_bytes(blob[: len(blob) // 2])
    elif what == "adalora":
        cfg = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps(cfg | {"peft_type": "ADALORA"}))
    elif what == "other-name":
        cfg = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps(cfg | {"base_model_name_or_path": "bert-base-uncased"}))


BAD = {  # case: (peft config or None for the plain upper-layer LoRA, corruption, error type, message)
    "another base's shapes": (lambda: "small", None, PeftFormatError, r"lora_A \(2, 16\).*do not fit.*another base model"),
    "another base's names": (lambda: "gpt2", None, PeftFormatError, r"has no linear layer 'h.0.attn.c_attn'"),
    "another base's name": (None, "other-name", PeftFormatError, r"made for base 'bert-base-uncased'.*--allow-other-base"),
    "LOHA": (lambda: peft.LoHaConfig(r=2, target_modules=["query"], layers_to_transform=[2]), None, PeftFormatError,
             r"peft_type 'LOHA' is not supported; adaptbank reads LORA, IA3, PROMPT_TUNING, PREFIX_TUNING"),
    "ADALORA": (None, "adalora", PeftFormatError, r"peft_type 'ADALORA' is not supported"),
    "no config": (None, "no-config", FileNotFoundError, r"holds no adapter_config.json"),
    "bad config": (None, "bad-json", PeftFormatError, r"adapter_config.json: invalid JSON"),
    "no weights": (None, "no-weights", FileNotFoundError, r"holds no adapter_model.safetensors"),
    "truncated weights": (None, "truncated", ValueError, r"adapter_model.safetensors.*refusing to load it"),
    "DoRA": (lambda: peft.LoraConfig(**UPPER_QV, use_dora=True), None, PeftFormatError,
             r"LoRA options adaptbank cannot hold: use_dora=True \(DoRA's magnitude vector\)"),
    "trained biases": (lambda: peft.LoraConfig(**UPPER_QV, bias="all"), None, PeftFormatError, r"bias='all'"),
    "router layers": (lambda: peft.LoraConfig(r=2, target_modules=["query"]), None, PeftFormatError,
                      r"layer 'encoder.layer.0.attention.self.query' \(2 such\), in the layers 0..1 the bank's router reads"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_peft_folders_are_refused_clearly_and_leave_the_bank_byte_identical(case, bank, tmp_path):
    make, what, error, message = BAD[case]
    folder = tmp_path / "adapter"
    made = make() if make else peft.LoraConfig(**UPPER_QV)
    if made == "small":  # a BERT of hidden size 16, named like the bank's base
        small = tiny_backbone("bert", hidden=16).model
        small.name_or_path = "elsewhere/" + Path(bank.base["name"]).name  # the same name, in another place
        saved_peft(small, peft.LoraConfig(r=2, target_modules=["query"]), folder)
    elif made == "gpt2":
        saved_peft(tiny_backbone("gpt2").model, peft.LoraConfig(r=2, target_modules=["c_attn"]), folder)
    else:
        bank_peft(bank, folder, made)
    if what:
        corrupt(folder, what)
    before = tree_digest(bank.path)
    with pytest.raises(error, match=message):
        import_peft(bank, folder, "weather", spec="weather", train={"max_train": 24, "max_test": 12})
    assert tree_digest(bank.path) == before


def test_an_existing_task_name_is_refused(bank, tmp_path):
    bank_peft(bank, tmp_path / "a", peft.LoraConfig(**UPPER_QV))
    before = tree_digest(bank.path)
    with pytest.raises(Exception, match="task 'topic' already exists"):
        import_peft(bank, tmp_path / "a", "topic", spec="topic")
    with pytest.raises(ValueError, match="needs the task's training data to fit its head on.*--spec"):
        import_peft(bank, tmp_path / "a", "fresh")
    assert tree_digest(bank.path) == before


# ----------------------------------------------------------------------------- the CLI
def test_cli_export_peft_merged_and_import(bank, tmp_path):
    runner = CliRunner()
    out = runner.invoke(main, ["export", str(bank.path), "topic", "--format", "peft", "-o", str(tmp_path / "p")])
    assert out.exit_code == 0, out.output
    assert "as a peft adapter" in out.output and (tmp_path / "p" / "adapter_model.safetensors").is_file()
    out = runner.invoke(main, ["export", str(bank.path), "topic", "--merged", "-o", str(tmp_path / "m")])
    assert out.exit_code == 0 and (tmp_path / "m" / "model.safetensors").is_file(), out.output
    transformers_alone(tmp_path / "m")
    out = runner.invoke(main, ["export", str(bank.path), "topic", "--merged", "-o", str(tmp_path / "m")])
    assert out.exit_code == 1 and "not empty" in out.output  # nothing overwritten without --replace
    out = runner.invoke(main, ["import", str(bank.path), str(tmp_path / "p"), "--task", "topic2", "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["head"] == "file" and AdapterBank.open(bank.path).tasks() == ["topic", "topic2"]
    pm = bank_peft(bank, tmp_path / "w", peft.LoraConfig(**UPPER_QV))
    del pm
    out = runner.invoke(main, ["import", str(bank.path), str(tmp_path / "w"), "--task", "weather", "--spec", "weather",
                               "--max-train", "24", "--max-test", "12"])
    assert out.exit_code == 0 and "head from a probe fit" in out.output, out.output


def test_cli_errors_are_one_line_and_write_nothing(bank, tmp_path):
    runner = CliRunner()
    before = tree_digest(bank.path)
    out = runner.invoke(main, ["export", str(bank.path), "topic", "--format", "peft", "--merged", "-o", str(tmp_path / "x")])
    assert out.exit_code == 2 and "does not combine" in out.output
    bank.add_task("weather", BitFitConfig(), FAST, name="bits")
    before = tree_digest(bank.path)
    out = runner.invoke(main, ["export", str(bank.path), "bits", "--format", "peft", "-o", str(tmp_path / "x")])
    assert out.exit_code == 1 and "'bitfit': BitFit bias deltas" in out.output and "Traceback" not in out.output
    assert not (tmp_path / "x").exists() and tree_digest(bank.path) == before
    out = runner.invoke(main, ["export", str(bank.path), "bits", "-o", str(tmp_path / "own")])  # adaptbank's format
    assert out.exit_code == 0 and "adaptbank expert folder" in out.output, out.output
    out = runner.invoke(main, ["import", str(bank.path), str(tmp_path / "own"), "--task", "z", "--spec", "weather"])
    assert out.exit_code == 1 and "is an adaptbank expert folder" in out.output and "load_expert" in out.output
    (tmp_path / "empty").mkdir()
    out = runner.invoke(main, ["import", str(bank.path), str(tmp_path / "empty"), "--task", "z", "--spec", "weather"])
    assert out.exit_code == 1 and "holds no adapter_config.json" in out.output
    assert tree_digest(bank.path) == before
