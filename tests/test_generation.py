"""Generation tasks in the model: greedy decoding with the KV cache against recomputing, mixed batches of
generation tasks (task ids and the router) against single-task runs, the loss on target tokens, the
task's tensors round-tripping, and clear errors for what cannot generate."""

from __future__ import annotations

import pytest
import torch
from _lm import tiny_lm, word_tokenizer
from conftest import randomize_expert, tiny_backbone

from adaptbank.core.config import AdapterConfig, IA3Config, LoRAConfig, PromptTuningConfig, TrainConfig
from adaptbank.core.generate import generate
from adaptbank.core.model import AdaptBankModel
from adaptbank.routing.lda import LDARouter
from adaptbank.training.generation import (
    encode_pairs,
    exact_match,
    generation_labels,
    generation_loss,
    token_f1,
    train_generation,
)
from adaptbank.training.loop import Row

LM_FAMILIES = ["gpt2", "llama"]


def randomize(model: AdaptBankModel, name: str, seed: int) -> None:
    """Non-zero values in every tensor of task ``name``'s expert (B and up-projections start at zero)."""
    randomize_expert(model, name, seed, scale=0.5)


def lm_model(family: str, tasks: dict[str, object], *, reserved: int = 0) -> AdaptBankModel:
    """A float64 tiny LM (ties in argmax are then out of reach of rounding) with randomised generation tasks."""
    model = AdaptBankModel(tiny_lm(family, dtype=torch.float64))
    model.reserved_layers = reserved
    for i, (name, method) in enumerate(tasks.items()):
        model.add_task(name, method, (), head="generation", seed=i)  # type: ignore[arg-type]
        randomize(model, name, seed=10 + i)
    return model


def prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 120, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("family", LM_FAMILIES)
def test_cached_decoding_equals_recomputing_every_step(family: str) -> None:
    model = lm_model(family, {"a": LoRAConfig(rank=4)})
    batch = prompts([5, 9, 2, 7])
    cached = generate(model, batch, task="a", max_new_tokens=10, eos_token_id=-1)
    full = generate(model, batch, task="a", max_new_tokens=10, eos_token_id=-1, use_cache=False)
    assert cached.tokens == full.tokens
    assert all(len(t) == 10 for t in cached.tokens) and cached.stopped == [False] * 4
    assert len({tuple(t) for t in cached.tokens}) > 1  # not one degenerate continuation
    assert model.state.active is None and model.state.index is None  # the gates are reset afterwards


@pytest.mark.parametrize("family", LM_FAMILIES)
def test_fixed_experts_decode_as_the_base_one_task_or_their_sum(family: str) -> None:
    """``experts=()`` is the base model, ``experts=("a",)`` is ``task="a"``, and several experts on together
    (O-LoRA's inference) decode alike with and without the cache."""
    model = lm_model(family, {"a": LoRAConfig(rank=4), "b": LoRAConfig(rank=4)})
    base = AdaptBankModel(tiny_lm(family, dtype=torch.float64))  # the same seed: the same weights, no experts
    batch = prompts([5, 9, 2, 7])
    kw = {"max_new_tokens": 8, "eos_token_id": -1}
    plain = generate(base, batch, experts=(), **kw)
    assert generate(model, batch, experts=(), **kw).tokens == plain.tokens
    assert generate(model, batch, experts=("a",), **kw).tokens == generate(model, batch, task="a", **kw).tokens
    both = generate(model, batch, experts=("a", "b"), **kw)
    assert both.tokens == generate(model, batch, experts=("a", "b"), use_cache=False, **kw).tokens
    assert both.tokens != generate(model, batch, task="a", **kw).tokens and both.tasks == ("a+b",) * 4
    with pytest.raises(ValueError, match="exactly one of"):
        generate(model, batch, task="a", experts=("b",))


@pytest.mark.parametrize("family", LM_FAMILIES)
def test_decoding_stops_at_eos_and_leaves_it_out(family: str) -> None:
    model = lm_model(family, {"a": LoRAConfig(rank=4)})
    batch = prompts([4, 6])
    free = generate(model, batch, task="a", max_new_tokens=6, eos_token_id=-1)
    row = free.tokens[0]
    j = next(j for j in range(1, 6) if row[j] not in row[:j])  # make a new token of row 0 the EOS
    out = generate(model, batch, task="a", max_new_tokens=6, eos_token_id=row[j])
    eos = row[j]
    assert out.tokens[0] == row[:j] and out.stopped[0]
    cut = free.tokens[1].index(eos) if eos in free.tokens[1] else 6
    assert out.tokens[1] == free.tokens[1][:cut]


@pytest.mark.parametrize("family", LM_FAMILIES)
def test_mixed_batch_of_generation_tasks_equals_single_task_runs(family: str) -> None:
    tasks = {"a": LoRAConfig(rank=4), "b": LoRAConfig(rank=2, targets="all-linear"), "c": IA3Config()}
    model = lm_model(family, tasks)
    batch = prompts([3, 8, 5, 6, 2, 7], seed=3)
    ids = ["a", "b", "c", "b", "a", "c"]
    mixed = generate(model, batch, task_ids=ids, max_new_tokens=8, eos_token_id=-1)
    assert mixed.tasks == tuple(ids)
    for i, (p, t) in enumerate(zip(batch, ids)):
        assert mixed.tokens[i] == generate(model, [p], task=t, max_new_tokens=8, eos_token_id=-1).tokens[0]
    # the experts differ: every row under task a is not the mixed batch
    assert generate(model, batch, task="a", max_new_tokens=8, eos_token_id=-1).tokens != mixed.tokens


@pytest.mark.parametrize("family", LM_FAMILIES)
def test_routed_generation_keeps_the_prefill_choice_for_the_whole_continuation(family: str) -> None:
    tasks = {"a": LoRAConfig(rank=4), "b": AdapterConfig(bottleneck=4), "c": LoRAConfig(rank=2)}
    model = lm_model(family, tasks, reserved=1)  # experts above layer 0, which the router reads
    batch = prompts([4, 9, 6, 3, 7, 5, 8, 2], seed=7)
    g = torch.Generator().manual_seed(5)
    weight = torch.randn(3, 2 * 32, generator=g, dtype=torch.float64)  # (E, F) a random router, centred on
    feats = torch.cat([_router_features(model, p) for p in batch])  # (B, F) this batch, so that it mixes
    router = LDARouter(list(tasks), weight, -(feats.mean(0) @ weight.T), layers=1)
    model.attach_router(router, top_k=1)
    routed = generate(model, batch, routed=True, max_new_tokens=8, eos_token_id=-1)
    assert len(set(routed.tasks)) >= 2 and routed.scores is not None  # the router chose from the prompt
    chosen = generate(model, batch, task_ids=list(routed.tasks), max_new_tokens=8, eos_token_id=-1)
    assert routed.tokens == chosen.tokens
    nocache = generate(model, batch, routed=True, max_new_tokens=8, eos_token_id=-1, use_cache=False)
    assert nocache.tokens == routed.tokens and nocache.tasks == routed.tasks
    assert model.state.index is None and model.trace.mask is None


def _router_features(model: AdaptBankModel, ids: list[int]) -> torch.Tensor:
    """The router's features of one prompt: mean-pooled embeddings and layer-0 output (1, 2 D)."""
    model.route()
    hidden = model.backbone(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
    return torch.cat([hidden[0].mean(1), hidden[1].mean(1)], -1)


@pytest.mark.parametrize("family", LM_FAMILIES)
def test_loss_is_on_target_tokens_only_and_matches_masked_cross_entropy(family: str) -> None:
    model = lm_model(family, {"a": LoRAConfig(rank=4)})
    rows = [Row([5, 6, 7, 8, 9], 0, "a", target_from=3), Row([10, 11, 12], 0, "a", target_from=1)]
    labels = generation_labels(rows, 5)
    assert labels.tolist() == [[-100, -100, -100, 8, 9], [-100, 11, 12, -100, -100]]
    batch = {"input_ids": torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 0, 0]]),
             "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])}
    model.route(task="a")
    hidden = model.backbone(**batch).last_hidden_state  # (B, T, D)
    logits = model.lm_head(hidden)  # (B, T, V)
    want = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
    assert torch.allclose(generation_loss(model, rows, hidden), want.float(), atol=1e-6)


@pytest.mark.parametrize("family", LM_FAMILIES)
def test_training_a_generation_task_raises_its_exact_match(family: str) -> None:
    """A tiny learnable mapping: each prompt word maps to one fixed answer word (a lookup the expert learns)."""
    words = [f"w{i}" for i in range(12)]
    tok = word_tokenizer(["ask", ":", *words])
    model = AdaptBankModel(tiny_lm(family, tokenizer=tok, hidden=64))
    model.add_task("map", LoRAConfig(targets="all-linear"), (), head="generation", seed=0)
    answer = {w: words[(i * 5 + 3) % 12] for i, w in enumerate(words)}
    prompts_, targets = [f"ask : {w} :" for w in words] * 8, [answer[w] for w in words] * 8
    before = sum(map(exact_match, _texts(model, prompts_[:12]), targets[:12])) / 12
    train_generation(model, "map", prompts_, targets, TrainConfig(epochs=12, lr=1e-2, batch_size=16, warmup=0.0))
    after = sum(map(exact_match, _texts(model, prompts_[:12]), targets[:12])) / 12
    assert before <= 1 / 12 and after >= 0.5, (before, after)
    expert = {id(p) for p in model.expert_parameters("map")}
    assert all(p.grad is None for p in model.backbone.parameters() if id(p) not in expert)  # the base stays frozen
    assert not model.lm_head.weight.requires_grad  # the shared head stays frozen


def _texts(model: AdaptBankModel, ps: list[str]) -> list[str]:
    from adaptbank.training.generation import generate_texts

    return generate_texts(model, ps, task="map", max_new_tokens=3)[0]


@pytest.mark.parametrize("family", LM_FAMILIES)
def test_export_import_gives_identical_generations(family: str) -> None:
    model = lm_model(family, {"a": LoRAConfig(rank=4), "b": AdapterConfig(bottleneck=4)})
    files = {n: model.export_task(n) for n in ("a", "b")}
    assert files["a"]["head"] == {} and files["a"]["adapter"]  # no head of its own: the LM head is shared
    fresh = AdaptBankModel(tiny_lm(family, dtype=torch.float64))
    for n, method in (("a", LoRAConfig(rank=4)), ("b", AdapterConfig(bottleneck=4))):
        fresh.import_task(n, method, (), files[n], head="generation")
    assert fresh.tasks["a"].head == "generation" and "a" not in fresh.heads
    batch = prompts([3, 6, 4], seed=2)
    for ids in (["a", "b", "a"], ["b", "b", "a"]):
        assert (generate(fresh, batch, task_ids=ids, max_new_tokens=6).tokens
                == generate(model, batch, task_ids=ids, max_new_tokens=6).tokens)
    fresh.remove_task("a")
    assert list(fresh.tasks) == ["b"]


def test_generation_on_an_encoder_is_refused_naming_the_model() -> None:
    model = AdaptBankModel(tiny_backbone("bert"))
    with pytest.raises(ValueError, match=r"has no LM head.*decoder-only"):
        model.add_task("g", LoRAConfig(), (), head="generation")
    assert not model.tasks
    with pytest.raises(ValueError, match="unknown head kind 'regression'"):
        model.add_task("g", LoRAConfig(), ("x", "y"), head="regression")  # type: ignore[arg-type]


def test_generation_refuses_prompt_experts_and_classification_rows() -> None:
    model = AdaptBankModel(tiny_lm("gpt2"))
    with pytest.raises(ValueError, match="linear experts only.*not 'prompt'"):
        model.add_task("p", PromptTuningConfig(prompt_length=2), (), head="generation")
    model.add_task("g", LoRAConfig(), (), head="generation")
    model.add_task("c", LoRAConfig(), ("x", "y"))
    ids = torch.tensor([[4, 5, 6]])
    with pytest.raises(TypeError, match=r"\['g'\] are generation tasks"):
        model(ids, torch.ones_like(ids), task="g")
    with pytest.raises(TypeError, match=r"\['c'\] are classification tasks"):
        generate(model, [[4, 5]], task_ids=["c"])
    with pytest.raises(ValueError, match="prompt 1 has no tokens"):
        generate(model, [[4], []], task="g")


def test_a_target_longer_than_the_position_limit_is_refused() -> None:
    words = [f"w{i}" for i in range(5)]
    model = AdaptBankModel(tiny_lm("llama", tokenizer=word_tokenizer(words)))  # 64 positions
    model.add_task("g", LoRAConfig(), (), head="generation")
    with pytest.raises(ValueError, match=r"target of example 2 is 71 tokens long.*64 positions"):
        encode_pairs(model, "g", ["w1", "w2"], ["w3", " ".join(["w4"] * 70)], max_length=16)
    rows = encode_pairs(model, "g", ["w1 " * 40], ["w2 " * 30], max_length=48)  # the prompt is cut to fit
    assert len(rows[0].ids) == 64 and rows[0].target_from == 33
    with pytest.raises(ValueError, match="no room to generate within the model's 64 positions"):
        generate(model, [[3] * 64], task="g")


def test_exact_match_and_f1_normalise_case_punctuation_and_spaces() -> None:
    assert exact_match(" Paris.", "paris") == 1.0 and exact_match("paris france", "paris") == 0.0
    assert token_f1("the red fox", "red fox") == pytest.approx(0.8)
    assert token_f1("", "") == 1.0 and token_f1("a", "") == 0.0 and token_f1("x", "y") == 0.0
