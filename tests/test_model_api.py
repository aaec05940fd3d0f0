"""The model's one call (task=, task_ids=, routed=True -> ModelOutput), models the caller owns, and
seeds that never touch the global RNG."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_backbone

from adaptbank import AdaptBankModel, LoRAConfig
from adaptbank.bank.facade import AdapterBank
from adaptbank.core.config import TrainConfig
from adaptbank.core.seeding import seeded
from adaptbank.training.loop import train_task

FAST = TrainConfig(epochs=1, max_train=60, max_test=30, max_length=32)


def two_task_model() -> AdaptBankModel:
    model = AdaptBankModel(tiny_backbone("bert"))
    model.add_task("two", LoRAConfig(rank=2, dropout=0.0), ["x", "y"], seed=1)
    model.add_task("three", LoRAConfig(rank=2, dropout=0.0), ["p", "q", "r"], seed=2)
    with torch.no_grad():  # non-zero experts, so the rows' experts matter
        for name, p in model.named_parameters():
            if name.endswith(".B"):
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    return model.eval()


def test_task_ids_pad_narrow_heads_and_rows_equal_single_task_calls(inputs):
    model = two_task_model()
    rows = ["three", "two", "two", "three"]
    out = model(**inputs, task_ids=rows)
    assert out.tasks == tuple(rows) and out.logits.shape == (4, 3) and out.pooled.shape == (4, 32)
    for i, task in enumerate(rows):
        one = {k: v[i: i + 1] for k, v in inputs.items()}
        single = model(**one, task=task)
        n = len(model.tasks[task].labels)
        torch.testing.assert_close(out.logits[i, :n], single.logits[0], atol=1e-5, rtol=1e-5)
        assert torch.isneginf(out.logits[i, n:]).all()  # the 2-class rows are padded
    loss = torch.nn.functional.cross_entropy(out.logits, torch.tensor([2, 1, 0, 0]))
    assert torch.isfinite(loss)  # -inf padding is harmless for the loss of a valid label


def test_forward_needs_exactly_one_routing_and_names_unknown_tasks(inputs):
    model = two_task_model()
    with pytest.raises(ValueError, match="exactly one of task=, task_ids= or routed=True"):
        model(**inputs)
    with pytest.raises(ValueError, match="exactly one"):
        model(**inputs, task="two", routed=True)
    with pytest.raises(KeyError, match="unknown task 'nope'"):
        model(**inputs, task="nope")
    with pytest.raises(ValueError, match="task_ids has 2 entries for a batch of 4 rows"):
        model(**inputs, task_ids=["two", "three"])
    with pytest.raises(RuntimeError, match="no router attached"):
        model(**inputs, routed=True)


def test_loaded_models_belong_to_their_caller(tiny_bert_dir, tmp_path, inputs):
    bank = AdapterBank.init(tmp_path / "bank", base=str(tiny_bert_dir))
    bank.add_task("weather", LoRAConfig(rank=4), FAST)
    bank.add_task("topic", LoRAConfig(rank=4), FAST)
    one = bank.load(["weather"])
    routed = bank.load_routed()
    assert one is not routed and list(one.tasks) == ["weather"] and list(routed.tasks) == ["weather", "topic"]
    assert one.router is None and routed.router is not None
    batch = {k: v.clamp(max=100) for k, v in inputs.items()}
    before = one(**batch, task="weather").logits.clone()
    routed.merge("weather")  # merging into one model must not reach the other's (shared, frozen) weights
    torch.testing.assert_close(one(**batch, task="weather").logits, before, atol=0, rtol=0)
    one.remove_task("weather")
    assert "weather" in routed.tasks and "weather" in bank.load().tasks
    # the frozen weights are shared, not copied
    w1 = next(p for n, p in bank.load().backbone.named_parameters() if n.endswith("word_embeddings.weight"))
    w2 = next(p for n, p in bank.load().backbone.named_parameters() if n.endswith("word_embeddings.weight"))
    assert w1 is w2


def test_merge_unmerge_restores_the_exact_base_weight_object(inputs):
    model = two_task_model()
    layer = next(m for m in model.modules() if hasattr(m, "merged") and m is not model)
    original = layer.base.weight
    model.merge("two")
    assert layer.base.weight is not original  # merged into a new tensor
    model.unmerge()
    assert layer.base.weight is original


def test_library_calls_leave_the_global_rng_alone():
    model = AdaptBankModel(tiny_backbone("bert"))
    model.tokenizer = _WordIds()
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    model.add_task("t", LoRAConfig(rank=2), ["a", "b"], seed=5)
    train_task(model, "t", ["w1 w2", "w3", "w4 w5 w6", "w7"] * 4, [0, 1, 0, 1] * 4,
               TrainConfig(epochs=1, batch_size=4, probe_init=False, seed=3))
    assert torch.equal(torch.random.get_rng_state(), state)
    with seeded(7):
        a = torch.rand(3)
    with seeded(7):
        b = torch.rand(3)
    assert torch.equal(a, b) and torch.equal(torch.random.get_rng_state(), state)


class _WordIds:
    """A whitespace tokenizer over ids 1..119 (the tiny models' vocabulary), enough for train_task."""

    pad_token_id = 0

    def __call__(self, texts, truncation=True, max_length=None, **_):
        ids = [[1 + sum(map(ord, w)) % 119 for w in t.split()][:max_length] for t in texts]
        return {"input_ids": ids}
