"""Tiny LMs for the generation tests: GPT-2, LLaMA and T5 (encoder-decoder) built from configs (no download), with the
frozen LM head, a word-level tokenizer over the built-in tasks' words, and saved Hugging Face folders."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from adaptbank.core.backbone import Backbone, LMHead

WORDS_EXTRA = ["repeat", "answer", "opposite", "of", "review", "sentiment", "topic", "weather", ":", ",", "."]


def builtin_words() -> list[str]:
    """Every word of the built-in generation and classification tasks and the shipped templates."""
    from adaptbank.data.builtin import BUILTIN_TASKS, generate
    from adaptbank.data.builtin_text import BUILTIN_GENERATION, generate_pairs

    words: set[str] = set(WORDS_EXTRA)
    for task in BUILTIN_GENERATION:
        for split in ("train", "test"):
            for text, target in generate_pairs(task, split):
                words.update(f"{text} {target}".lower().split())
    for task, labels in BUILTIN_TASKS.items():
        words.update(w.lower() for w in labels)
        for split in ("train", "test"):
            for text, _ in generate(task, split):
                words.update(re.findall(r"\w+|[^\w\s]", text.lower()))
    return sorted(words)


def word_tokenizer(words: list[str] | None = None):
    """A lower-casing word-level fast tokenizer: [PAD] 0, [UNK] 1, [EOS] 2, then ``words``."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[EOS]", *(words or builtin_words())])}
    core = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")


def _config(family: str, vocab: int, hidden: int, tied: bool, layers: int = 2):
    import transformers as tr

    if family == "gpt2":
        return tr.GPT2Config(n_embd=hidden, n_layer=layers, n_head=2, n_positions=64, vocab_size=vocab,
                             bos_token_id=2, eos_token_id=2, pad_token_id=0, tie_word_embeddings=tied,
                             initializer_range=0.3)  # the tied head: larger embeddings give logits a useful scale
    return tr.LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
                          intermediate_size=2 * hidden, max_position_embeddings=64, vocab_size=vocab,
                          bos_token_id=2, eos_token_id=2, pad_token_id=0, tie_word_embeddings=tied)


def tiny_lm(family: str, *, seed: int = 0, hidden: int = 32, vocab: int = 120, tokenizer=None,
            dtype: torch.dtype = torch.float32) -> Backbone:
    """A two-layer GPT-2 (tied LM head) or LLaMA (its own LM head) with random weights, frozen."""
    import transformers as tr

    torch.manual_seed(seed)
    if tokenizer is not None:
        vocab = len(tokenizer)
    cfg = _config(family, vocab, hidden, tied=family == "gpt2")
    model = (tr.GPT2Model if family == "gpt2" else tr.LlamaModel)(cfg).to(dtype).eval().requires_grad_(False)
    if family == "gpt2":
        head = LMHead(model.get_input_embeddings().weight)
    else:
        head = LMHead(torch.randn(vocab, hidden, dtype=dtype) * 0.5)
    return Backbone(name=f"tiny-{family}-lm", model=model, tokenizer=tokenizer, path="", lm_head=head)


def write_tiny_lm(path: Path, family: str, *, seed: int = 0, hidden: int = 32, layers: int = 2) -> Path:
    """Save a tiny causal LM (``GPT2LMHeadModel`` tied / ``LlamaForCausalLM`` untied) of ``layers`` layers
    and its tokenizer (a bank with the default router reads layers 0-1, so it needs 3 or more)."""
    import transformers as tr

    tok = word_tokenizer()
    torch.manual_seed(seed)
    cfg = _config(family, len(tok), hidden, tied=family == "gpt2", layers=layers)
    model = (tr.GPT2LMHeadModel if family == "gpt2" else tr.LlamaForCausalLM)(cfg)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _t5_config(vocab: int, hidden: int, tied: bool, layers: int = 2):
    import transformers as tr

    # tied: t5-small style (ReLU, the head is the shared embeddings, rescaled); untied: v1.1 / flan style
    return tr.T5Config(d_model=hidden, d_kv=hidden // 2, d_ff=2 * hidden, num_layers=layers, num_heads=2,
                       vocab_size=vocab, pad_token_id=0, eos_token_id=2, decoder_start_token_id=0,
                       feed_forward_proj="relu" if tied else "gated-gelu", tie_word_embeddings=tied)


def tiny_t5(*, seed: int = 0, hidden: int = 32, vocab: int = 120, tokenizer=None, dtype: torch.dtype = torch.float32,
            tied: bool = True, layers: int = 2) -> Backbone:
    """A bare ``T5Model`` (encoder and decoder, ``layers`` each) with random weights, frozen, and the LM
    head that ``load_backbone`` gives it: the shared embeddings rescaled by ``d_model**-0.5`` (tied), or
    a head of its own (untied)."""
    import transformers as tr

    torch.manual_seed(seed)
    if tokenizer is not None:
        vocab = len(tokenizer)
    model = tr.T5Model(_t5_config(vocab, hidden, tied, layers)).to(dtype).eval().requires_grad_(False)
    shared = model.get_input_embeddings().weight
    head = LMHead(shared, hidden ** -0.5) if tied else LMHead(torch.randn(vocab, hidden, dtype=dtype) * hidden ** -0.5)
    return Backbone(name="tiny-t5", model=model, tokenizer=tokenizer, path="", lm_head=head)


def write_tiny_t5(path: Path, *, tied: bool = True, seed: int = 0, hidden: int = 32, layers: int = 2) -> Path:
    """Save a tiny ``T5ForConditionalGeneration`` and the word tokenizer as a Hugging Face folder. Untied,
    the folder is a flan-t5 one: ``tie_word_embeddings: false`` and an ``lm_head.weight`` of its own
    (transformers 5 saves T5's head tied whatever the config says, so it is written in afterwards)."""
    import json

    import transformers as tr
    from safetensors.torch import load_file, save_file

    tok = word_tokenizer()
    torch.manual_seed(seed)
    model = tr.T5ForConditionalGeneration(_t5_config(len(tok), hidden, tied, layers))
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    if not tied:
        weights = load_file(str(path / "model.safetensors"))
        weights["lm_head.weight"] = torch.randn(len(tok), hidden) * hidden ** -0.5
        save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
        config = json.loads((path / "config.json").read_text())
        config.pop("scale_decoder_outputs", None)
        (path / "config.json").write_text(json.dumps(config | {"tie_word_embeddings": False}, indent=2))
    return path
