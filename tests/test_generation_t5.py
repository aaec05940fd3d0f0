"""Generation tasks on an encoder-decoder (T5): the LM head of a saved checkpoint (tied and rescaled, or its
own) and greedy decoding against ``T5ForConditionalGeneration``, experts in the encoder and the decoder,
decoding with the decoder's cache against recomputing, mixed batches and the router against single-task
runs, training, the bank and the CLI, and clear errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from _lm import tiny_t5, word_tokenizer, write_tiny_t5
from click.testing import CliRunner
from conftest import REPO, tree_digest
from test_generation import prompts, randomize

from adaptbank.bank.facade import AdapterBank
from adaptbank.cli.main import main
from adaptbank.core.backbone import fingerprint, load_backbone
from adaptbank.core.config import (
    AdapterConfig,
    IA3Config,
    LoRAConfig,
    PromptTuningConfig,
    RouterConfig,
    TrainConfig,
)
from adaptbank.core.generate import generate, position_limit
from adaptbank.core.model import AdaptBankModel
from adaptbank.core.seq2seq import seq2seq_loss
from adaptbank.routing.lda import LDARouter
from adaptbank.routing.taps import layer_list
from adaptbank.training.generation import encode_pairs, exact_match, generate_texts, train_generation

HEADS = ["tied", "untied"]


@pytest.fixture(scope="module")
def t5_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-t5")
    return {k: write_tiny_t5(root / k, tied=k == "tied") for k in HEADS}


def t5_model(tasks: dict[str, object], *, reserved: int = 0, tied: bool = True) -> AdaptBankModel:
    """A float64 tiny T5 (ties in argmax are then out of reach of rounding) with randomised generation tasks."""
    model = AdaptBankModel(tiny_t5(dtype=torch.float64, tied=tied))
    model.reserved_layers = reserved
    for i, (name, method) in enumerate(tasks.items()):
        model.add_task(name, method, (), head="generation", seed=i)  # type: ignore[arg-type]
        randomize(model, name, seed=10 + i)
    return model


@pytest.mark.parametrize("kind", HEADS)
def test_lm_head_loss_and_greedy_decoding_match_t5_for_conditional_generation(kind, t5_dirs) -> None:
    import transformers as tr
    from safetensors.torch import load_file

    folder = t5_dirs[kind]
    b = load_backbone(str(folder))
    assert type(b.model).__name__ == "T5Model"  # the backbone stays the bare T5Model: fingerprints as before
    assert fingerprint(b.model) == fingerprint(tr.T5Model.from_pretrained(folder, use_safetensors=True))
    shared = b.model.get_input_embeddings().weight
    if kind == "tied":  # t5-small style: the shared embeddings, after the d_model**-0.5 rescale
        assert b.lm_head.weight is shared and b.lm_head.scale == 32 ** -0.5
    else:  # flan-t5 style: the checkpoint's own lm_head.weight, no rescale
        assert torch.equal(b.lm_head.weight, load_file(str(folder / "model.safetensors"))["lm_head.weight"])
        assert not torch.equal(b.lm_head.weight, shared) and b.lm_head.scale == 1.0
    assert not b.lm_head.weight.requires_grad
    ref = tr.T5ForConditionalGeneration.from_pretrained(folder).eval()
    model = AdaptBankModel(b)
    model.add_task("a", LoRAConfig(), (), head="generation")  # B = 0: the base model's outputs
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    mask = (ids != 0).long()
    targets = [[11, 12, 2], [13, 2]]
    labels = torch.tensor([[11, 12, 2], [13, 2, -100]])
    model.route(task="a")
    memory = model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, D)
    want = ref(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert torch.allclose(seq2seq_loss(model, memory, mask, targets), want, atol=1e-5)
    batch = prompts([4, 2, 6], seed=1)
    ours = generate(model, batch, task="a", max_new_tokens=8, eos_token_id=-1).tokens
    for p, row in zip(batch, ours):
        theirs = ref.generate(torch.tensor([p]), do_sample=False, num_beams=1, max_new_tokens=8, min_new_tokens=8)
        assert row == theirs[0, 1:].tolist()  # their output starts with the decoder start token


def test_generation_experts_sit_in_encoder_and_decoder_classification_ones_in_the_encoder() -> None:
    model = AdaptBankModel(tiny_t5())
    gen = model.add_task("g", LoRAConfig(targets="qv"), (), head="generation")
    cls = model.add_task("c", LoRAConfig(targets="qv"), ("x", "y"))
    folded = {re.sub(r"\.\d+\.", ".*.", p) for p in gen.paths}
    assert folded == {f"{stack}.block.*.layer.*.{attn}.{w}" for w in "qv" for stack, attn in
                      (("encoder", "SelfAttention"), ("decoder", "SelfAttention"), ("decoder", "EncDecAttention"))}
    assert cls.paths and all(p.startswith("encoder.") for p in cls.paths)


@pytest.mark.parametrize("tied", [True, False])
def test_cached_decoding_equals_recomputing_and_encoder_padding_is_masked(tied: bool) -> None:
    model = t5_model({"a": LoRAConfig(rank=4, targets="all-linear")}, tied=tied)
    batch = prompts([5, 9, 2, 7])
    cached = generate(model, batch, task="a", max_new_tokens=10, eos_token_id=-1)
    full = generate(model, batch, task="a", max_new_tokens=10, eos_token_id=-1, use_cache=False)
    assert cached.tokens == full.tokens
    assert all(len(t) == 10 for t in cached.tokens) and cached.stopped == [False] * 4
    assert len({tuple(t) for t in cached.tokens}) > 1  # not one degenerate continuation
    # the padding's token id does not matter: masked in the encoder and in the decoder's cross-attention
    assert generate(model, batch, task="a", max_new_tokens=10, eos_token_id=-1, pad_token_id=7).tokens == cached.tokens
    assert model.state.active is None and model.state.index is None  # the gates are reset afterwards


def test_the_cross_attention_cache_is_filled_once_and_the_self_attention_cache_grows() -> None:
    model = t5_model({"a": LoRAConfig(rank=4)})  # q and v wrapped; k stays the plain linear counted here
    block = model.backbone.decoder.block[1]
    calls: dict[str, list[int]] = {"self": [], "cross": []}
    hooks = [block.layer[0].SelfAttention.k.register_forward_hook(lambda m, i, o: calls["self"].append(i[0].shape[1])),
             block.layer[1].EncDecAttention.k.register_forward_hook(lambda m, i, o: calls["cross"].append(i[0].shape[1]))]
    try:
        generate(model, prompts([6, 3]), task="a", max_new_tokens=5, eos_token_id=-1)
        cached = {k: list(v) for k, v in calls.items()}
        calls["self"].clear(), calls["cross"].clear()
        generate(model, prompts([6, 3]), task="a", max_new_tokens=5, eos_token_id=-1, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    assert cached == {"self": [1] * 5, "cross": [6]}  # one new position per step; the prompt's keys once
    assert calls == {"self": [1, 2, 3, 4, 5], "cross": [6] * 5}  # recomputing: everything at every step


def test_decoding_stops_at_eos_and_leaves_it_out() -> None:
    model = t5_model({"a": LoRAConfig(rank=4, targets="all-linear")}, tied=False)
    batch = prompts([4, 6, 5])
    free = generate(model, batch, task="a", max_new_tokens=6, eos_token_id=-1).tokens
    eos = next(t for row in free for j, t in enumerate(row) if j and t not in row[:j])  # a token new after step 1
    out = generate(model, batch, task="a", max_new_tokens=6, eos_token_id=eos)
    for row, got, stopped in zip(free, out.tokens, out.stopped):
        assert got == row[: row.index(eos)] if eos in row else got == row
        assert stopped == (eos in row)
    assert any(0 < len(got) < 6 for got in out.tokens)  # one row stopped after writing something


def test_mixed_batch_of_generation_tasks_equals_single_task_runs() -> None:
    tasks = {"a": LoRAConfig(rank=4), "b": LoRAConfig(rank=2, targets="all-linear"), "c": IA3Config(),
             "d": AdapterConfig(bottleneck=4)}
    model = t5_model(tasks)
    batch = prompts([3, 8, 5, 6, 2, 7, 4], seed=3)
    ids = ["a", "b", "c", "b", "d", "c", "a"]
    mixed = generate(model, batch, task_ids=ids, max_new_tokens=8, eos_token_id=-1)
    assert mixed.tasks == tuple(ids)
    for i, (p, t) in enumerate(zip(batch, ids)):
        assert mixed.tokens[i] == generate(model, [p], task=t, max_new_tokens=8, eos_token_id=-1).tokens[0]
    assert generate(model, batch, task="a", max_new_tokens=8, eos_token_id=-1).tokens != mixed.tokens


def test_routed_generation_chooses_in_the_encoder_pass_and_keeps_the_choice() -> None:
    tasks = {"a": LoRAConfig(rank=4), "b": AdapterConfig(bottleneck=4), "c": LoRAConfig(rank=2, targets="all-linear")}
    model = t5_model(tasks, reserved=1)  # experts above encoder layer 0, which the router reads
    assert layer_list(model.encoder) is model.backbone.encoder.block
    assert not [p for t in model.tasks.values() for p in t.paths if p.startswith("encoder.block.0.")]
    assert any(p.startswith("decoder.block.0.") for p in model.tasks["a"].paths)  # the decoder's layers all hold them
    batch = prompts([4, 9, 6, 3, 7, 5, 8, 2], seed=7)
    weight = torch.randn(3, 2 * 32, generator=torch.Generator().manual_seed(5), dtype=torch.float64)  # (E, F)
    feats = torch.cat([_router_features(model, p) for p in batch])  # (B, F)
    model.attach_router(LDARouter(list(tasks), weight, -(feats.mean(0) @ weight.T), layers=1), top_k=1)
    routed = generate(model, batch, routed=True, max_new_tokens=8, eos_token_id=-1)
    assert len(set(routed.tasks)) >= 2 and routed.scores is not None  # the router chose from the prompt
    scores = feats @ weight.T - feats.mean(0) @ weight.T  # (B, E) what the router computes from these features
    assert list(routed.tasks) == [list(tasks)[int(i)] for i in scores.argmax(1)]
    chosen = generate(model, batch, task_ids=list(routed.tasks), max_new_tokens=8, eos_token_id=-1)
    assert routed.tokens == chosen.tokens
    nocache = generate(model, batch, routed=True, max_new_tokens=8, eos_token_id=-1, use_cache=False)
    assert nocache.tokens == routed.tokens and nocache.tasks == routed.tasks
    assert model.state.index is None and model.trace.mask is None


def _router_features(model: AdaptBankModel, ids: list[int]) -> torch.Tensor:
    """The router's features of one prompt: mean-pooled embeddings and encoder layer-0 output (1, 2 D)."""
    model.route()
    hidden = model.encoder(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
    return torch.cat([hidden[0].mean(1), hidden[1].mean(1)], -1)


def test_layer_list_picks_the_encoder_blocks_of_a_one_layer_t5() -> None:
    encoder = tiny_t5(layers=1).model.encoder  # its block list (1) is shorter than a block's sub-layers (2)
    assert layer_list(encoder) is encoder.block


def test_training_a_t5_generation_task_raises_its_exact_match() -> None:
    """A tiny learnable mapping: each prompt word maps to one fixed answer word."""
    words = [f"w{i}" for i in range(12)]
    model = AdaptBankModel(tiny_t5(tokenizer=word_tokenizer(["ask", ":", *words])))
    model.add_task("map", LoRAConfig(targets="all-linear"), (), head="generation", seed=0)
    answer = {w: words[(i * 5 + 3) % 12] for i, w in enumerate(words)}
    prompts_, targets = [f"ask : {w} :" for w in words] * 8, [answer[w] for w in words] * 8
    before = sum(map(exact_match, generate_texts(model, prompts_[:12], task="map", max_new_tokens=3)[0],
                     targets[:12])) / 12
    train_generation(model, "map", prompts_, targets, TrainConfig(epochs=12, lr=1e-2, batch_size=16, warmup=0.0))
    after = sum(map(exact_match, generate_texts(model, prompts_[:12], task="map", max_new_tokens=3)[0],
                    targets[:12])) / 12
    assert before <= 1 / 12 and after >= 0.5, (before, after)
    expert = {id(p) for p in model.expert_parameters("map")}
    assert all(p.grad is None for p in model.backbone.parameters() if id(p) not in expert)  # the base stays frozen
    assert not model.lm_head.weight.requires_grad


def test_export_import_gives_identical_generations() -> None:
    methods = {"a": LoRAConfig(rank=4), "b": IA3Config()}
    model = t5_model(methods)
    files = {n: model.export_task(n) for n in methods}
    assert files["a"]["head"] == {} and any(k.startswith("decoder.") for k in files["a"]["adapter"])
    fresh = AdaptBankModel(tiny_t5(dtype=torch.float64))
    for n, method in methods.items():
        fresh.import_task(n, method, (), files[n], head="generation")
    batch = prompts([3, 6, 4], seed=2)
    for ids in (["a", "b", "a"], ["b", "b", "a"]):
        assert (generate(fresh, batch, task_ids=ids, max_new_tokens=6).tokens
                == generate(model, batch, task_ids=ids, max_new_tokens=6).tokens)


def test_bank_and_cli_add_task_eval_predict_on_t5(t5_dirs, tmp_path) -> None:
    r = CliRunner()
    bank = str(tmp_path / "bank")
    assert r.invoke(main, ["init", bank, "--base", str(t5_dirs["untied"]), "--router-layers", "1"]).exit_code == 0
    for name in ("antonym", "copy"):
        res = r.invoke(main, ["add-task", bank, str(REPO / "tasks" / f"{name}.toml"), "--max-train", "48",
                              "--max-test", "16", "--epochs", "1", "--json"])
        assert res.exit_code == 0, res.output
        assert json.loads(res.stdout)["task"] == name
    b = AdapterBank.open(bank)
    assert b.base["fingerprint"] == fingerprint(load_backbone(str(t5_dirs["untied"])).model)
    info = b.info("copy")
    assert info["head"] == "generation" and info["metrics"]["head_params"] == 0
    # save -> load: the stored tasks score what the trained ones scored, and two loads generate alike
    again = b.evaluate_metrics()
    assert again["copy"] == {"exact_match": info["metrics"]["test_exact_match"], "f1": info["metrics"]["test_f1"]}
    texts = ["Repeat: red fox\nAnswer:", "Opposite of: very hot\nAnswer:", "Repeat: cat\nAnswer:"]
    one = generate_texts(AdapterBank.open(bank).load(), texts, task_ids=["copy", "antonym", "copy"], max_new_tokens=4)
    assert one == generate_texts(b.load(), texts, task_ids=["copy", "antonym", "copy"], max_new_tokens=4)
    res = r.invoke(main, ["eval", bank])
    assert res.exit_code == 0 and res.output.count("exact match, F1") == 2, res.output
    res = r.invoke(main, ["predict", bank, "--task", "antonym", "very hot", "rather big", "--json"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in res.stdout.strip().splitlines()]
    assert [x["task"] for x in rows] == ["antonym", "antonym"] and all(isinstance(x["generated"], str) for x in rows)
    res = r.invoke(main, ["predict", bank, *texts[:2]])  # routed: the router picks from the prompt
    assert res.exit_code == 0, res.output
    assert [line.split(":")[0] in ("antonym", "copy") for line in res.stdout.strip().splitlines()] == [True, True]


def test_bad_input_is_refused_clearly_and_t5_has_no_position_limit() -> None:
    words = [f"w{i}" for i in range(5)]
    model = AdaptBankModel(tiny_t5(tokenizer=word_tokenizer(words)))
    model.add_task("g", LoRAConfig(), (), head="generation")
    with pytest.raises(ValueError, match=r"target of example 2 is 21 tokens long with its EOS, above max_length 16"):
        encode_pairs(model, "g", ["w1", "w2"], ["w3", " ".join(["w4"] * 20)], max_length=16)
    rows = encode_pairs(model, "g", ["w1 " * 40], ["w2 w3"], max_length=16)  # the prompt keeps its last 16
    assert len(rows[0].ids) == 16 and rows[0].target == (*model.tokenizer.convert_tokens_to_ids(["w2", "w3"]), 2)
    assert position_limit(model) is None  # relative positions: a long prompt leaves max_new_tokens as asked
    assert len(generate(model, [[3] * 100], task="g", max_new_tokens=70, eos_token_id=-1).tokens[0]) == 70
    with pytest.raises(ValueError, match="linear experts only.*not 'prompt'"):
        model.add_task("p", PromptTuningConfig(prompt_length=2), (), head="generation")
    assert list(model.tasks) == ["g"]


def test_generation_on_a_t5_bank_without_decoder_start_is_refused_and_changes_nothing(t5_dirs, tmp_path) -> None:
    import shutil

    folder = tmp_path / "t5"
    shutil.copytree(t5_dirs["tied"], folder)
    config = json.loads((folder / "config.json").read_text())
    config.pop("decoder_start_token_id")
    (folder / "config.json").write_text(json.dumps(config))
    bank = AdapterBank.init(tmp_path / "bank", base=str(folder), router=RouterConfig(layers=1))
    before = tree_digest(bank.path)
    with pytest.raises(ValueError, match=r"generation task.*no decoder_start_token_id.*T5: the pad token, 0"):
        bank.add_task(str(REPO / "tasks" / "copy.toml"), LoRAConfig(), TrainConfig(max_train=8, max_test=4, epochs=1))
    assert tree_digest(bank.path) == before
