"""peft's format both ways and the merged export (issue 12, items 4 and 5), on tiny models and a tiny bank.

Every equality is against peft itself (``PeftModel.from_pretrained``, ``get_peft_model``) or transformers
alone (``AutoModel.from_pretrained``), on the real tokens (attention mask respected), within 1e-5.
"""

from __future__ import annotations

import copy
import json
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
            for key, p in expert.named_parameters():
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
    keep = mask.bool()
    torch.testing.assert_close(a[keep], b[keep], atol=atol, rtol=0)


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
    "prefix": PrefixConfig(prefix_length=3, reparam_hidden=8),
    "ptuning-v2": PTuningV2Config(prefix_length=2),
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
