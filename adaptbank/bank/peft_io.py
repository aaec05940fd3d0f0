"""peft's adapter format in and out: a translation layer over a task's own tensors (DESIGN.md section 3).

peft (huggingface/peft) saves one adapter as ``DIR/adapter_config.json`` (the config: ``peft_type``,
``task_type``, ``base_model_name_or_path``, the method's fields) and ``DIR/adapter_model.safetensors``.
Its layouts (peft 0.21: ``tuners/lora``, ``tuners/ia3``, ``tuners/prompt_tuning``, ``tuners/prefix_tuning``,
``utils/save_and_load.py``), with ``<path>`` a module path of the base model and letters r rank, I/O input
and output features, P virtual tokens, D hidden size, N layers, W = H d the key/value width::

    LORA           base_model.model.<path>.lora_A.weight (r, I), .lora_B.weight (O, r)
                   h = W x + s B A x,  s = lora_alpha / r  (use_rslora: lora_alpha / sqrt(r); per layer
                   under rank_pattern / alpha_pattern)
    IA3            base_model.model.<path>.ia3_l (O, 1): l * (W x + b);  (1, I) on a feedforward_modules
                   layer: W (l * x) + b
    PROMPT_TUNING  prompt_embeddings (P, D), before the input embeddings
    PREFIX_TUNING  prompt_embeddings (P, N * 2 * W): per virtual token, layer by layer, key then value
                   (with prefix_projection=True peft saves the MLP's output: the same layout)

adaptbank's own keys (``core.task_io``) hold the same numbers: ``<path>.A`` (r, I) and ``<path>.B`` (O, r)
with ``alpha / rank`` in the config, ``<path>.scale`` (O,) or (I,), ``prompt`` (P, D), ``prefix.key`` and
``prefix.value`` (N, P, W). This module only renames and reshapes; nothing here is a second format.

What peft's format cannot hold is refused by name (:class:`PeftFormatError`): bottleneck adapters, BitFit
and combined methods on export; DoRA, LoRA-trained biases, ``modules_to_save`` and the other peft types
on import. A per-layer rank or alpha (``rank_pattern``, ``alpha_pattern``) is held exactly: the task takes
the largest rank, smaller layers are padded with zero rows of A and zero columns of B, and each layer's
own scale is folded into its B.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from adaptbank._atomic import atomic_write_bytes
from adaptbank._tensorfile import check_safetensors
from adaptbank.core.adapted import AdaptedLinear, is_adaptable, linear_shape
from adaptbank.core.config import (
    CombinedConfig,
    IA3Config,
    LoRAConfig,
    MethodConfig,
    PartConfig,
    PrefixConfig,
    PromptTuningConfig,
    PTuningV2Config,
)
from adaptbank.core.experts import IA3InputExpert
from adaptbank.core.inject import logical_modules
from adaptbank.core.model import AdaptBankModel
from adaptbank.core.prefix import prefix_geometry

__all__ = ["PEFT_TYPES", "CONFIG_FILE", "WEIGHTS_FILE", "PeftAdapter", "PeftFormatError", "to_peft", "from_peft",
           "read_peft_dir", "write_peft_dir"]

PEFT_TYPES: tuple[str, ...] = ("LORA", "IA3", "PROMPT_TUNING", "PREFIX_TUNING")
"""The peft types adaptbank reads and writes."""
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_MAX_CONFIG = 1 << 20
_LORA_OFF = {"use_dora": "DoRA's magnitude vector", "lora_bias": "a trained bias on lora_B",
             "modules_to_save": "full trained copies of base modules", "layer_replication": "replicated layers",
             "target_parameters": "LoRA on bare parameters", "trainable_token_indices": "trained token embeddings",
             "use_qalora": "QA-LoRA", "alora_invocation_tokens": "activated LoRA", "arrow_config": "Arrow routing",
             "use_bdlora": "block-diagonal LoRA"}
"""LoRA options whose truthy value adaptbank cannot hold, and what each is."""


class PeftFormatError(ValueError):
    """A task peft's format cannot hold, or a peft adapter adaptbank cannot read; the message says which."""


@dataclass(frozen=True)
class PeftAdapter:
    """One peft adapter as it lies on disk: the ``adapter_config.json`` object and the tensors by peft key."""

    config: dict[str, Any]
    tensors: dict[str, Tensor]


# ----------------------------------------------------------------------------- export
def to_peft(model: AdaptBankModel, name: str, *, base_name: str | None) -> PeftAdapter:
    """Task ``name`` of ``model`` as the adapter ``get_peft_model(base, config).save_pretrained`` would
    write, for ``PeftModel.from_pretrained(AutoModel base, DIR)`` (``task_type`` FEATURE_EXTRACTION)."""
    info = model._info(name)
    method = info.method
    refuse = _export_refusal(method)
    if refuse:
        raise PeftFormatError(f"task {name!r} uses {method.kind!r}: {refuse}. Export it merged into the base "
                              "weights (--merged, for LoRA, BitFit and (IA)^3 only) or in adaptbank's own format "
                              "(--format adaptbank)")
    adapter = model.export_task(name)["adapter"]
    common = {"base_model_name_or_path": base_name, "revision": None, "task_type": "FEATURE_EXTRACTION",
              "inference_mode": True, "modules_to_save": None}
    if isinstance(method, (PromptTuningConfig, PrefixConfig)):
        return _virtual_to_peft(model, method, adapter, common)
    layers = model.layers_of(name)
    paths = sorted(layers)
    conv = model.backbone.config.model_type == "gpt2"  # GPT-2's Conv1D (I, O) weights: peft's fan_in_fan_out
    if isinstance(method, LoRAConfig):
        shared = model.export_shared(info.shared_group) if info.shared_group else {}
        tensors = {}
        for p in paths:
            tensors[f"{_PREFIX}{p}.lora_A.weight"] = shared.get(f"{p}.A", adapter.get(f"{p}.A"))  # (r, I)
            tensors[f"{_PREFIX}{p}.lora_B.weight"] = adapter[f"{p}.B"]  # (O, r)
        config = common | {"peft_type": "LORA", "r": method.rank, "lora_alpha": method.alpha,
                           "lora_dropout": method.dropout, "target_modules": paths, "fan_in_fan_out": conv,
                           "bias": "none", "use_rslora": False, "use_dora": False, "init_lora_weights": True,
                           "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None,
                           "layers_pattern": None}
        return PeftAdapter(config, tensors)
    feedforward = [p for p in paths if isinstance(layers[p].experts[name], IA3InputExpert)]
    tensors = {f"{_PREFIX}{p}.ia3_l": adapter[f"{p}.scale"].reshape((1, -1) if p in feedforward else (-1, 1))
               for p in paths}  # (1, I) scales the input, (O, 1) the output
    config = common | {"peft_type": "IA3", "target_modules": paths, "feedforward_modules": feedforward,
                       "fan_in_fan_out": conv, "init_ia3_weights": True}
    return PeftAdapter(config, tensors)


def _export_refusal(method: MethodConfig) -> str | None:
    if isinstance(method, CombinedConfig):
        return "a combination of methods, while a peft adapter holds one method"
    if isinstance(method, PrefixConfig) and method.positions != "after-prefix":
        return (f"a prefix with positions={method.positions!r} (the real tokens at positions 0..T-1), while peft's "
                "prefix tuning puts them after the prefix (P..P+T-1) and would compute other outputs; train the task "
                "with --prefix-positions after-prefix (PrefixConfig(positions='after-prefix')) to export it to peft")
    if isinstance(method, (LoRAConfig, IA3Config, PromptTuningConfig, PrefixConfig)):
        return None
    what = {"adapter": "a bottleneck adapter", "parallel-adapter": "a bottleneck adapter",
            "bitfit": "BitFit bias deltas"}.get(method.kind, method.kind)
    return f"{what}, which peft's format cannot hold (it reads {', '.join(PEFT_TYPES)})"


def _virtual_to_peft(model: AdaptBankModel, method: PromptTuningConfig | PrefixConfig, adapter: dict[str, Tensor],
                     common: dict[str, Any]) -> PeftAdapter:
    cfg = model.encoder.config
    if getattr(model.backbone.config, "is_encoder_decoder", False):
        raise PeftFormatError(f"a {method.kind} task on an encoder-decoder base cannot be exported to peft: peft puts "
                              "virtual tokens in both the encoder and the decoder, adaptbank in the encoder only")
    get = lambda *names: next(int(getattr(cfg, n)) for n in names if getattr(cfg, n, None) is not None)  # noqa: E731
    fields = {"num_transformer_submodules": 1, "num_layers": get("num_hidden_layers", "n_layer", "num_layers"),
              "num_attention_heads": get("num_attention_heads", "n_head", "num_heads")}
    if isinstance(method, PromptTuningConfig):
        prompt = adapter["prompt"]  # (P, D)
        return PeftAdapter(common | fields | {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": prompt.shape[0],
                                              "token_dim": prompt.shape[1], "prompt_tuning_init": "RANDOM"},
                           {"prompt_embeddings": prompt})
    key, value = adapter["prefix.key"], adapter["prefix.value"]  # (N, P, W) each
    N, P, W = key.shape
    _, heads, _ = prefix_geometry(cfg)
    flat = torch.stack([key, value], 1).permute(2, 0, 1, 3).reshape(P, N * 2 * W)  # (P, N 2 W): token, layer, k/v
    return PeftAdapter(common | fields | {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": P, "token_dim": W,
                                          "num_attention_heads": heads, "encoder_hidden_size": W,
                                          "prefix_projection": False},
                       {"prompt_embeddings": flat.contiguous()})


# ----------------------------------------------------------------------------- import
def from_peft(model: AdaptBankModel, adapter: PeftAdapter) -> tuple[PartConfig, dict[str, Tensor]]:
    """The adaptbank method and adapter tensors (``core.task_io`` keys) of a peft adapter for ``model``'s
    base; every module name and shape is checked against that base, with errors naming the first misfit."""
    kind = adapter.config.get("peft_type")
    if kind not in PEFT_TYPES:
        raise PeftFormatError(f"peft_type {kind!r} is not supported; adaptbank reads {', '.join(PEFT_TYPES)}")
    if kind in ("PROMPT_TUNING", "PREFIX_TUNING"):
        return _virtual_from_peft(model, adapter)
    _check_options(adapter.config)
    per_path = _per_module(model, adapter.tensors, ("lora_A.weight", "lora_B.weight") if kind == "LORA" else ("ia3_l",))
    return (_lora_from_peft if kind == "LORA" else _ia3_from_peft)(model, adapter.config, per_path)


def _check_options(config: dict[str, Any]) -> None:
    """Refuse the LoRA / IA3 options whose effect adaptbank cannot hold, all named at once."""
    kind = config["peft_type"]
    off = [f"{k}={config[k]!r} ({v})" for k, v in _LORA_OFF.items()
           if config.get(k) and (kind == "LORA" or k == "modules_to_save")]
    if kind == "LORA" and config.get("bias", "none") != "none":
        off.append(f"bias={config['bias']!r} (base biases trained with the LoRA)")
    if off:
        raise PeftFormatError(f"{'LoRA' if kind == 'LORA' else kind} options adaptbank cannot hold: {'; '.join(off)}")


def _per_module(model: AdaptBankModel, tensors: dict[str, Tensor], leaves: tuple[str, ...]) -> dict[str, dict[str, Tensor]]:
    """``{module path: {leaf: tensor}}`` with paths checked against the base's linear layers. A key made on
    a model with a head (``base_model.model.model.layers...`` of a causal LM) drops that model's prefix."""
    linear = {p for p, m in logical_modules(model.backbone).items() if is_adaptable(m) or isinstance(m, AdaptedLinear)}
    prefix = getattr(model.backbone, "base_model_prefix", "") + "."
    out: dict[str, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        leaf = next((x for x in leaves if key.endswith("." + x)), None)
        if leaf is None or not key.startswith(_PREFIX):
            raise PeftFormatError(f"tensor {key!r} is not one adaptbank can map (expected {_PREFIX}<module>."
                                  f"{' / '.join(leaves)}); {_why(key)}")
        path = key[len(_PREFIX): -len(leaf) - 1]
        if path not in linear and path.startswith(prefix) and path[len(prefix):] in linear:
            path = path[len(prefix):]
        if path not in linear:
            raise PeftFormatError(f"tensor {key!r}: the bank's base ({type(model.backbone).__name__}) has no linear "
                                  f"layer {path!r}; the adapter was made for another base model "
                                  f"(its layers are e.g. {', '.join(sorted(linear)[:3])})")
        out.setdefault(path, {})[leaf] = value
    if not out:
        raise PeftFormatError("the adapter's safetensors file holds no tensors")
    return out


_EMBEDDINGS = ("peft saved the embedding layers (a resized vocabulary, save_embedding_layers): adaptbank keeps the "
               "base's embeddings frozen")
_HINTS = {"lora_magnitude_vector": "DoRA (use_dora) is not supported", "lora_embedding": "LoRA on an embedding layer "
          "is not supported", "modules_to_save": "modules_to_save copies are not supported", ".bias": "trained biases "
          "(bias='all' / 'lora_only') are not supported", "embed": _EMBEDDINGS, "wte.": _EMBEDDINGS}
"""Why a tensor key adaptbank cannot map is there, by a substring of the key (the first that matches)."""


def _why(key: str) -> str:
    return next((v for k, v in _HINTS.items() if k in key), "adaptbank holds LoRA A/B, IA3 scales, prompts and prefixes")


def _shape_of(model: AdaptBankModel, path: str) -> tuple[int, int]:
    module = logical_modules(model.backbone)[path]
    return (module.d_in, module.d_out) if isinstance(module, AdaptedLinear) else linear_shape(module)


def _lora_from_peft(model: AdaptBankModel, config: dict[str, Any],
                    per_path: dict[str, dict[str, Tensor]]) -> tuple[LoRAConfig, dict[str, Tensor]]:
    alpha, rslora = float(config.get("lora_alpha", 8)), bool(config.get("use_rslora"))
    alphas = config.get("alpha_pattern") or {}
    scales, pairs = {}, {}
    for path, t in sorted(per_path.items()):
        if set(t) != {"lora_A.weight", "lora_B.weight"}:
            raise PeftFormatError(f"layer {path!r} has {sorted(t)}; a LoRA layer needs both lora_A and lora_B")
        A, B = t["lora_A.weight"], t["lora_B.weight"]  # (r, I), (O, r)
        d_in, d_out = _shape_of(model, path)
        r = A.shape[0] if A.dim() == 2 else -1
        if A.dim() != 2 or B.dim() != 2 or tuple(A.shape) != (r, d_in) or tuple(B.shape) != (d_out, r):
            raise PeftFormatError(f"layer {path!r}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} do not fit "
                                  f"its ({d_in} -> {d_out}) weight in the bank's base (expected (r, {d_in}) and "
                                  f"({d_out}, r)); the adapter was made for another base model")
        a = float(alphas[key]) if (key := _pattern_key(alphas, path)) is not None else alpha
        scales[path], pairs[path] = a / (math.sqrt(r) if rslora else r), (A, B)
    rank = max(A.shape[0] for A, _ in pairs.values())
    values = list(scales.values())
    ref = max(values, key=values.count)  # the commonest scale: those layers keep their B bit for bit
    cfg = LoRAConfig(rank=rank, alpha=ref * rank, dropout=float(config.get("lora_dropout", 0.0)),
                     targets=_exact_patterns(pairs))
    tensors: dict[str, Tensor] = {}
    for path, (A, B) in pairs.items():
        r = A.shape[0]
        if scales[path] != ref:  # this layer's own scale folded into B (rounded once, in float64)
            B = (B.double() * (scales[path] / ref)).to(B.dtype)
        tensors[f"{path}.A"] = torch.cat([A, A.new_zeros(rank - r, A.shape[1])])  # (R, I)
        tensors[f"{path}.B"] = torch.cat([B, B.new_zeros(B.shape[0], rank - r)], 1)  # (O, R)
    _check_paths(model, cfg, pairs)
    return cfg, tensors


def _pattern_key(patterns: dict[str, Any], path: str) -> str | None:
    """The key of peft's ``rank_pattern``/``alpha_pattern`` that names ``path`` (peft's rule: the key is a
    regex matching a trailing part of the path at a dot boundary), or None."""
    return next((k for k in patterns if re.match(rf"(.*\.)?({k})$", path)), None)


def _ia3_from_peft(model: AdaptBankModel, config: dict[str, Any],
                   per_path: dict[str, dict[str, Tensor]]) -> tuple[IA3Config, dict[str, Tensor]]:
    tensors, inputs = {}, []
    for path, t in sorted(per_path.items()):
        scale = t["ia3_l"]
        d_in, d_out = _shape_of(model, path)
        if tuple(scale.shape) == (1, d_in):
            inputs.append(path)  # (1, I): peft's feedforward layer, the input scaled
        elif tuple(scale.shape) != (d_out, 1):
            raise PeftFormatError(f"layer {path!r}: ia3_l {tuple(scale.shape)} fits neither its output ({d_out}, 1) nor "
                                  f"its input (1, {d_in}) in the bank's base; the adapter was made for another base model")
        tensors[f"{path}.scale"] = scale.reshape(-1)  # (O,) or (I,)
    others = [p for p, m in logical_modules(model.backbone).items() if is_adaptable(m) and p not in per_path]
    if not inputs and not others:
        raise PeftFormatError("an IA3 adapter on every linear layer with none scaled on its input cannot be described")
    feedforward = _exact_patterns(inputs) if inputs else _exact_patterns(others[:1])  # a pattern must match a layer
    cfg = IA3Config(targets=_exact_patterns(per_path), feedforward=feedforward)
    _check_paths(model, cfg, per_path)
    return cfg, tensors


def _exact_patterns(paths: Iterable[str]) -> tuple[str, ...]:
    """Anchored regexes selecting exactly ``paths``, one per path shape with the layer numbers as an
    alternation: ``^encoder\\.layer\\.(?:2|3)\\.attention\\.self\\.query$``."""
    groups: dict[tuple[str, str], list[str]] = {}
    for path in paths:
        m = re.search(r"\.(\d+)\.", path)
        head, num, tail = (path[: m.start() + 1], m.group(1), path[m.end() - 1:]) if m else (path, "", "")
        groups.setdefault((head, tail), []).append(num)
    out = []
    for (head, tail), nums in groups.items():
        middle = f"(?:{'|'.join(sorted(set(nums), key=int))})" if nums != [""] else ""
        out.append(f"^{re.escape(head)}{middle}{re.escape(tail)}$")
    return tuple(sorted(out))


def _check_paths(model: AdaptBankModel, cfg: MethodConfig, paths: Iterable[str]) -> None:
    """The layers the bank would give ``cfg`` must be exactly the adapter's (none dropped for the router)."""
    want = set(paths)
    got = set(model.target_paths(cfg))
    lost = sorted(want - got)
    if lost:
        raise PeftFormatError(f"the adapter has layer {lost[0]!r} ({len(lost)} such), in the layers 0..{model.reserved_layers - 1} "
                              "the bank's router reads, which hold no experts; import into a bank made with fewer "
                              "--router-layers, or an adapter made without those layers (peft layers_to_transform)")
    if got != want:
        raise PeftFormatError(f"the adapter's layers do not map one to one onto the bank's base: {sorted(got ^ want)[:3]}")


def _virtual_from_peft(model: AdaptBankModel, adapter: PeftAdapter) -> tuple[PartConfig, dict[str, Tensor]]:
    config, kind = adapter.config, adapter.config["peft_type"]
    if set(adapter.tensors) != {"prompt_embeddings"}:
        extra = sorted(set(adapter.tensors) - {"prompt_embeddings"})
        raise PeftFormatError(f"a {kind} adapter holds exactly 'prompt_embeddings'; found {extra[:3] or 'none'} "
                              f"({_why(extra[0]) if extra else 'missing'})")
    if (config.get("num_transformer_submodules") or 1) != 1:
        raise PeftFormatError(f"num_transformer_submodules={config['num_transformer_submodules']} (an encoder-decoder "
                              "adapter, virtual tokens in both halves): adaptbank puts them in the encoder only")
    emb = adapter.tensors["prompt_embeddings"]
    P = int(config.get("num_virtual_tokens") or 0)
    if kind == "PROMPT_TUNING":
        D = model.hidden_size
        if tuple(emb.shape) != (P, D):
            raise PeftFormatError(f"prompt_embeddings has shape {tuple(emb.shape)}; the bank's base needs ({P}, {D}) "
                                  f"for {P} virtual tokens of its hidden size {D}: another base model")
        return PromptTuningConfig(prompt_length=P, prompt_init="random"), {"prompt": emb}
    N, H, d = prefix_geometry(model.encoder.config)
    if tuple(emb.shape) != (P, N * 2 * H * d):
        raise PeftFormatError(f"prompt_embeddings has shape {tuple(emb.shape)}; the bank's base needs ({P}, {N * 2 * H * d}) "
                              f"for {P} prefixes over {N} layers of {H} key/value heads of size {d}: another base model")
    kv = emb.reshape(P, N, 2, H * d)  # (P, N, 2, W)
    tensors = {"prefix.key": kv[:, :, 0].transpose(0, 1).contiguous(),  # (N, P, W)
               "prefix.value": kv[:, :, 1].transpose(0, 1).contiguous()}  # (N, P, W)
    if config.get("prefix_projection"):  # peft's real tokens sit after the prefix: positions P..P+T-1
        return (PrefixConfig(prefix_length=P, reparam_hidden=int(config.get("encoder_hidden_size") or 512),
                             positions="after-prefix"), tensors)
    return PTuningV2Config(prefix_length=P, positions="after-prefix"), tensors


# ----------------------------------------------------------------------------- files
def read_peft_dir(src: str | Path) -> PeftAdapter:
    """The adapter in peft folder ``src``; a missing, oversized or corrupt file is an error naming it. Only
    safetensors weights are read (a pickled ``adapter_model.bin`` can run code when loaded)."""
    from safetensors.torch import load_file

    src = Path(src)
    path = src / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{src} holds no {CONFIG_FILE}; not a peft adapter folder")
    if path.stat().st_size > _MAX_CONFIG:
        raise PeftFormatError(f"{path}: {path.stat().st_size} bytes, larger than any adapter config")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        raise PeftFormatError(f"{path}: invalid JSON: {err}") from None
    if isinstance(config, dict) and "adaptbank_version" in config and "method" in config:
        raise PeftFormatError(f"{src} is an adaptbank expert folder (adaptbank export --format adaptbank), not a peft "
                              "adapter; load it with adaptbank.bank.expert_io.load_expert")
    if not isinstance(config, dict) or not isinstance(config.get("peft_type"), str):
        raise PeftFormatError(f"{path}: expected a JSON object with a 'peft_type' string")
    weights = src / WEIGHTS_FILE
    if not weights.is_file():
        pickled = " (only adapter_model.bin, a pickle, which adaptbank never loads)" if (src / "adapter_model.bin").exists() else ""
        raise FileNotFoundError(f"{src} holds no {WEIGHTS_FILE}{pickled}")
    check_safetensors(weights)
    return PeftAdapter(config, load_file(weights))


def write_peft_dir(adapter: PeftAdapter, folder: str | Path) -> None:
    """Write ``adapter`` into the existing folder ``folder`` as peft's two files."""
    from safetensors.torch import save

    from adaptbank._version import __version__

    folder = Path(folder)
    blob = save({k: v.detach().contiguous() for k, v in adapter.tensors.items()},
                metadata={"format": "pt", "written_by": f"adaptbank {__version__}"})
    atomic_write_bytes(folder / WEIGHTS_FILE, blob, sync_dir=False)
    atomic_write_bytes(folder / CONFIG_FILE, json.dumps(adapter.config, indent=2, sort_keys=True).encode(),
                       sync_dir=False)
