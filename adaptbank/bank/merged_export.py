"""A task merged into its base: a plain transformers checkpoint that ``AutoModel.from_pretrained`` loads alone.

Each linear layer of the task gets its expert folded into the frozen weight and bias (``Expert.merged``,
computed in fp32, the rule ``AdaptedLinear.merge`` uses)::

    LoRA     W' = W + (alpha / r) B A          b' = b
    (IA)^3   W' = diag(l) W, b' = l * b  (output)   or   W' = W diag(l), b' = b  (input, feed-forward)
    BitFit   W' = W                        b' = b + delta

and a combination of only these kinds composes them in ``core.adapted``'s order. Every other tensor is
the base's own, under the base's own parameter names (wrappers looked through: ``query.base.weight`` is
written ``query.weight``), in the layout of the base's class (GPT-2's ``Conv1D`` keeps ``(I, O)``).

A weight-only quantised base (``init --quantize``) is **dequantised**: the checkpoint holds
``dequant(Q)``, the weight the bank computes with, plus the task's update, in the base's float dtype, so
the checkpoint reproduces the bank's outputs (not those of the full-precision original). Methods that do
not act through the weights (bottleneck adapters, prompts, prefixes) are refused.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import Tensor, nn

from adaptbank.core.adapted import AdaptedLinear
from adaptbank.core.composed import expert_parts
from adaptbank.core.config import BitFitConfig, CombinedConfig, IA3Config, LoRAConfig
from adaptbank.core.experts import BitFitExpert
from adaptbank.core.inject import logical_modules
from adaptbank.core.model import AdaptBankModel

__all__ = ["MERGEABLE", "merged_state_dict", "write_merged"]

try:  # GPT-2 family projections
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers always ships it today
    Conv1D = ()  # type: ignore[assignment,misc]

MERGEABLE = (LoRAConfig, BitFitConfig, IA3Config)
"""The method kinds that fold into the base weights."""
WEIGHTS_FILE = "model.safetensors"


def _check_mergeable(model: AdaptBankModel, name: str) -> None:
    method = model._info(name).method
    parts = method.parts if isinstance(method, CombinedConfig) else (method,)
    bad = [p.kind for p in parts if not isinstance(p, MERGEABLE)]
    if bad:
        raise TypeError(f"task {name!r} uses {method.kind!r}; only LoRA, bitfit and ia3 (or combinations of only those) "
                        f"fold into the base weights, and {', '.join(bad)} does not (it acts outside the weights); "
                        "export it in adaptbank's own format (--format adaptbank) instead")


def _reference(backbone: nn.Module) -> nn.Module:
    """An empty instance of the base's own class on the meta device: its parameter names, shapes and layer types."""
    with torch.device("meta"):
        return type(backbone)(copy.deepcopy(backbone.config))


def _quantized(module: nn.Module) -> bool:
    return callable(getattr(module, "dequantized_weight", None))


def merged_state_dict(model: AdaptBankModel, name: str) -> dict[str, Tensor]:
    """The base's state dict under its own names with task ``name`` folded in (see the module docstring)."""
    _check_mergeable(model, name)
    ref_modules = dict(_reference(model.backbone).named_modules())  # the original layer classes, by path
    out: dict[str, Tensor] = {}
    linear: list[str] = []
    for path, module in logical_modules(model.backbone).items():
        if any(path.startswith(p + ".") for p in linear):
            continue  # inside a wrapped or quantised linear: its experts, its shared A, its quantised codes
        prefix = f"{path}." if path else ""
        if isinstance(module, AdaptedLinear) or _quantized(module):
            linear.append(path)
            if isinstance(module, AdaptedLinear) and module.base.bias is None and name in module.experts:
                _check_no_new_bias(module, name, path)
            conv = bool(Conv1D) and isinstance(ref_modules.get(path), Conv1D)
            out |= {prefix + k: v for k, v in _merged_linear(module, name, conv=conv).items()}
            continue
        if getattr(module, "transparent_child", None) is not None:
            continue  # a wrapper's own tensors are none: its child holds the base's under this path
        hidden = module._non_persistent_buffers_set
        out |= {prefix + k: v for k, v in module.named_parameters(recurse=False)}
        out |= {prefix + k: v for k, v in module.named_buffers(recurse=False) if v is not None and k not in hidden}
    return {k: v.detach() for k, v in out.items()}


def _check_no_new_bias(layer: AdaptedLinear, name: str, path: str) -> None:
    """BitFit on a layer the base class gives no bias: a merged checkpoint has no name to hold the delta under."""
    if any(isinstance(part, BitFitExpert) for _, part in expert_parts(layer.experts[name])):  # type: ignore[arg-type]
        raise ValueError(f"task {name!r} puts a bias on layer {path!r}, which has none in the base's checkpoint "
                         "format (BitFit on a bias-free layer); a merged checkpoint cannot hold it, use --format adaptbank")


def _merged_linear(module: nn.Module, name: str, *, conv: bool) -> dict[str, Tensor]:
    """``{"weight": W', "bias": b'}`` of one linear (wrapped or not, quantised or not), in the layout of the base
    class (``conv``: Conv1D's ``(I, O)``) and the base's float dtype."""
    base = module.base if isinstance(module, AdaptedLinear) else module
    expert = module.experts[name] if isinstance(module, AdaptedLinear) and name in module.experts else None
    if _quantized(base):  # dequantised: the weight the bank computes with, (O, I) whatever the original class
        weight, transposed, dtype = base.dequantized_weight(), False, base.weight_dtype
    else:
        weight, transposed, dtype = base.weight, conv, base.weight.dtype
    bias = base.bias
    if expert is not None:
        with torch.no_grad():
            new_w, new_b = expert.merged(weight, bias, transposed=transposed)
        weight = weight if new_w is None else new_w
        bias = bias if new_b is None else new_b
    if conv and not transposed:
        weight = weight.T  # a quantised Conv1D: back to (I, O)
    out = {"weight": weight.detach().to(dtype).contiguous()}
    if bias is not None:
        out["bias"] = bias.detach().to(dtype).contiguous()
    return out


def write_merged(model: AdaptBankModel, name: str, folder: str | Path) -> None:
    """Write the merged checkpoint of task ``name`` into the existing folder ``folder``: ``config.json``,
    ``model.safetensors`` and the tokenizer's files."""
    from safetensors.torch import save

    from adaptbank._atomic import atomic_write_bytes

    folder = Path(folder)
    state = merged_state_dict(model, name)
    seen: set[int] = set()
    for key, value in state.items():  # tied weights: safetensors refuses shared storage, each key gets its own
        if value.data_ptr() in seen:
            state[key] = value.clone()
        seen.add(value.data_ptr())
    atomic_write_bytes(folder / WEIGHTS_FILE, save(state, metadata={"format": "pt"}), sync_dir=False)
    config = copy.deepcopy(model.backbone.config)
    config.architectures = [type(model.backbone).__name__]
    config.save_pretrained(folder)
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(folder)  # type: ignore[attr-defined]
