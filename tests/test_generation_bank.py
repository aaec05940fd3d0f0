"""Generation tasks through the product: the LM head from a saved checkpoint (tied or its own, read from
safetensors), ``AdapterBank.add_task`` / eval / load, the CLI (add-task, eval, predict), and clear errors
for specs and bases that cannot generate (the bank unchanged)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _lm import write_tiny_lm
from click.testing import CliRunner
from conftest import REPO, tree_digest

from adaptbank.bank.facade import AdapterBank
from adaptbank.cli.main import main
from adaptbank.core.backbone import fingerprint, load_backbone
from adaptbank.core.config import LoRAConfig, RouterConfig, TrainConfig
from adaptbank.data.load import generation_pairs, load_task
from adaptbank.data.specs import TaskSpec, spec_from_toml
from adaptbank.training.generation import evaluate_generation, generate_texts, new_tokens_for

LM_FAMILIES = ["gpt2", "llama"]
ANTONYM = str(REPO / "tasks" / "antonym.toml")
WEATHER_AS_GENERATION = TaskSpec(name="weather_gen", train="builtin:weather:train", test="builtin:weather:test",
                                 pose="generation", template="Weather: {text}\nAnswer:")


@pytest.fixture(scope="module")
def lm_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-lm")
    return {f: write_tiny_lm(root / f, f, hidden=64) for f in LM_FAMILIES}


def test_lm_head_comes_from_the_checkpoint_tied_or_its_own(lm_dirs) -> None:
    from safetensors.torch import load_file

    gpt2 = load_backbone(str(lm_dirs["gpt2"]))
    assert gpt2.lm_head is not None and gpt2.lm_head.weight is gpt2.model.get_input_embeddings().weight
    llama = load_backbone(str(lm_dirs["llama"]))
    saved = load_file(str(lm_dirs["llama"] / "model.safetensors"))["lm_head.weight"]
    assert torch.equal(llama.lm_head.weight, saved) and not llama.lm_head.weight.requires_grad
    assert not torch.equal(saved, llama.model.get_input_embeddings().weight)
    assert type(llama.model).__name__ == "LlamaModel"  # the backbone stays the inner base model


# LLaMA only: the tiny GPT-2's tied head learns this posed task unreliably in so few steps (it learns the
# word map of test_generation.py); GPT-2 goes through the bank in the CLI test.
@pytest.mark.parametrize("family", ["llama"])
def test_add_task_trains_a_generation_task_above_the_untrained_model(family, lm_dirs, tmp_path) -> None:
    bank = AdapterBank.init(tmp_path / "bank", base=str(lm_dirs[family]), router=RouterConfig(layers=1))
    assert bank.base["fingerprint"] == fingerprint(load_backbone(str(lm_dirs[family])).model)
    train = TrainConfig(epochs=4, lr=1e-2, max_train=200, max_test=60, max_length=48)
    data = load_task(WEATHER_AS_GENERATION, max_train=200, max_test=60, seed=0)
    untrained = bank.new_model()
    untrained.add_task("weather_gen", LoRAConfig(targets="all-linear"), data.labels, head="generation")
    before = evaluate_generation(untrained, "weather_gen", *generation_pairs(data, "test"), max_length=48,
                                 max_new_tokens=new_tokens_for(untrained, generation_pairs(data, "train")[1]))
    r = bank.add_task(WEATHER_AS_GENERATION, LoRAConfig(targets="all-linear"), train)
    assert r.test_accuracy > before["exact_match"] + 0.1, (before, r.test_accuracy)
    info = bank.info("weather_gen")
    assert info["head"] == "generation" and info["metrics"]["head_params"] == 0
    assert info["metrics"]["test_exact_match"] == r.test_accuracy and 0 <= info["metrics"]["test_f1"] <= 1
    assert "head.safetensors" in info["files"] and info["labels"] == ["sunny", "rainy", "snowy", "windy"]
    # save -> load: the stored task scores what the trained one scored, and two loads generate alike
    again = bank.evaluate_metrics()["weather_gen"]
    assert again == {"exact_match": info["metrics"]["test_exact_match"], "f1": info["metrics"]["test_f1"]}
    assert bank.evaluate() == {"weather_gen": r.test_accuracy}
    prompts = generation_pairs(data, "test")[0][:12]
    one = generate_texts(AdapterBank.open(bank.path).load(), prompts, task="weather_gen", max_new_tokens=4)
    two = generate_texts(bank.load(), prompts, task="weather_gen", max_new_tokens=4)
    assert one == two


def test_cli_add_task_eval_and_predict_generation(lm_dirs, tmp_path) -> None:
    r = CliRunner()
    bank = str(tmp_path / "bank")
    assert r.invoke(main, ["init", bank, "--base", str(lm_dirs["gpt2"]), "--router-layers", "1"]).exit_code == 0
    for spec, name in ((ANTONYM, "antonym"), (str(REPO / "tasks" / "copy.toml"), "copy")):
        res = r.invoke(main, ["add-task", bank, spec, "--max-train", "48", "--max-test", "16", "--epochs", "1",
                              "--json"])
        assert res.exit_code == 0, res.output
        assert json.loads(res.stdout)["task"] == name
    res = r.invoke(main, ["eval", bank])
    assert res.exit_code == 0 and res.output.count("exact match, F1") == 2, res.output
    res = r.invoke(main, ["eval", bank, "--json"])
    metrics = json.loads(res.stdout)["metrics"]
    assert set(metrics) == {"antonym", "copy"} and set(metrics["copy"]) == {"exact_match", "f1"}
    res = r.invoke(main, ["predict", bank, "--task", "antonym", "very hot", "rather big", "--json"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in res.stdout.strip().splitlines()]
    assert [x["task"] for x in rows] == ["antonym", "antonym"] and all(isinstance(x["generated"], str) for x in rows)
    res = r.invoke(main, ["predict", bank, "Repeat: red fox\nAnswer:", "Opposite of: very hot\nAnswer:"])
    assert res.exit_code == 0, res.output  # routed: the router picks the expert from the prompt
    assert len(res.stdout.strip().splitlines()) == 2
    assert all(line.split(":")[0] in ("antonym", "copy") for line in res.stdout.strip().splitlines())
    res = r.invoke(main, ["eval", bank, "--routed"])
    assert res.exit_code != 0 and "classification tasks only" in res.output and "Traceback" not in res.output
    res = r.invoke(main, ["predict", bank, "--task", "copy", "red fox", "--router", "token"])
    assert res.exit_code != 0 and "generation tasks route with the sequence router" in res.output
    streamed = tmp_path / "in.jsonl"
    streamed.write_text('"red fox"\n"blue sky"\n')
    res = r.invoke(main, ["predict", bank, "--task", "copy", "--input", str(streamed), "--json"])
    assert res.exit_code == 0 and len(res.stdout.strip().splitlines()) == 2  # generation inputs stream too


def test_generation_on_an_encoder_bank_is_refused_and_changes_nothing(tiny_bert_dir, tmp_path) -> None:
    bank = AdapterBank.init(tmp_path / "bank", base=str(tiny_bert_dir))
    before = tree_digest(bank.path)
    with pytest.raises(ValueError, match=r"generation task.*has no LM head"):
        bank.add_task(ANTONYM, LoRAConfig(), TrainConfig(max_train=8, max_test=4, epochs=1))
    assert tree_digest(bank.path) == before


@pytest.mark.parametrize("toml, message", [
    ('name = "g"\ntype = "generation"\n[data]\ntrain = "a.jsonl"\ntest = "b.jsonl"\ntarget_field = "y"\n',
     r"needs a prompt template with \{text\}"),
    ('name = "g"\ntype = "generation"\ntemplate = "Q: {text} A:"\n[data]\ntrain = "a.jsonl"\ntest = "b.jsonl"\n',
     r"needs target_field in \[data\]"),
    ('name = "g"\ntype = "generation"\ntemplate = "Q: {question} A:"\n[data]\ntrain = "a.jsonl"\ntest = "b.jsonl"\n'
     'target_field = "y"\n', r"must use the field \{text\} exactly once.*\['question'\]"),
    ('name = "g"\npose = "generation"\n[data]\ntrain = "builtin:weather:train"\ntest = "builtin:weather:test"\n',
     "needs a prompt template"),
    ('name = "g"\ntemplate = "Q: {text}"\n[data]\ntrain = "builtin:weather:train"\ntest = "builtin:weather:test"\n',
     "template is for generation tasks only"),
    ('name = "g"\npose = "summarize"\ntemplate = "{text}"\n[data]\ntrain = "builtin:weather:train"\n'
     'test = "builtin:weather:test"\n', r"unknown pose 'summarize'; allowed: \['classification', 'generation'\]"),
    ('name = "g"\ntype = "generation"\ntemplate = "{text}"\n[data]\ntrain = "builtin:weather:train"\n'
     'test = "builtin:weather:test"\n', "'weather' is a classification generator"),
])
def test_bad_generation_specs_say_what_is_wrong_and_allowed(toml, message) -> None:
    with pytest.raises(ValueError, match=message):
        spec_from_toml(toml, origin="t.toml")


def test_generation_records_need_a_target_text(tmp_path) -> None:
    from adaptbank.data.load import DataError

    (tmp_path / "train.jsonl").write_text('{"text": "a b", "y": "b a"}\n{"text": "c", "y": ""}\n')
    (tmp_path / "test.jsonl").write_text('{"text": "d e", "y": "e d"}\n')
    spec = TaskSpec(name="rev", type="generation", template="Reverse: {text}\nAnswer:", target_field="y",
                    train=str(tmp_path / "train.jsonl"), test=str(tmp_path / "test.jsonl"))
    with pytest.raises(DataError, match=r"train.jsonl:2: target field 'y' must hold a non-empty string"):
        load_task(spec)
    (tmp_path / "train.jsonl").write_text('{"text": "a b", "y": "b a"}\n')
    data = load_task(spec)
    assert data.labels == () and generation_pairs(data, "train") == (["Reverse: a b\nAnswer:"], ["b a"])
