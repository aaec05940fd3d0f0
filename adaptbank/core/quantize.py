"""A weight-only quantised frozen base (QLoRA style): NF4 or int8 linear layers, experts in full precision.

Letters in shape comments: B batch, T tokens, D hidden size, I input features, O output features,
N = O * I weights of a layer, G blocks of a layer.

QLoRA (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs", arXiv:2305.14314)
keeps the frozen base weights in 4 bits and trains LoRA experts in full precision on top; the
forward dequantises each weight and runs an ordinary matmul::

    y = x dequant(Q)^T + b  (+ the experts of the AdaptedLinear that wraps this layer)

``nf4``: the weight ``(O, I)``, flattened row-major, is cut into blocks of 64; block ``g`` keeps its
absmax ``c_g = max |w|`` and each weight the index of the nearest of the 16 NormalFloat levels
``q_j`` (quantiles of N(0, 1) scaled to [-1, 1], with an exact 0):
``code(w) = argmin_j |w / c_g - q_j|``, ``dequant = q_code * c_g``. Double quantisation (also QLoRA)
stores the G absmax values themselves in 8 bits (bitsandbytes' dynamic map, blocks of 256, after
subtracting their mean): 4 + 8/64 + 32/(64 * 256) ~ 4.13 bits a weight, 7.7x less than fp32.

``int8``: row-wise absmax, the vector-wise quantisation of LLM.int8() without its outlier split
(Dettmers et al. 2022, arXiv:2208.07339): ``s_o = max_i |W_oi|``, ``code = round(127 W_oi / s_o)``,
``dequant = code * s_o / 127``: 8 + 32/I bits a weight (3.6x at I = 32, 3.96x at I = 384).

The arithmetic is bitsandbytes' (its CPU backend; ``pip install 'adaptbank[quantize]'``):
``quantize_4bit``/``dequantize_4bit`` and ``int8_vectorwise_quant``/``int8_vectorwise_dequant``. Its
fused CPU 4-bit gemm is fetched from a model hub at import, so it is never used here: dequantise +
``F.linear`` is the forward on every device. The code tables (16 NF4 levels, 256 dynamic-map
values) are constants of the format, shared by every layer, and not stored per layer.

Only the linear layers (``nn.Linear``, GPT-2's ``Conv1D``) inside the transformer layers are
quantised (of an encoder-decoder, the encoder's, which is what adaptbank runs): embeddings, norms,
a pooler and an LM head stay as they are. A :class:`QuantizedLinear`
is adaptable by :class:`~adaptbank.core.adapted.AdaptedLinear` like the linear it replaced; merging
a LoRA expert into it dequantises, adds the update and quantises again (:meth:`QuantizedLinear.
requantized`), which loses what re-quantisation rounds away: :func:`merge_into_quantized` merges
and reports that error.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adaptbank.core.backbone import Backbone
from adaptbank.routing.taps import layer_list

if TYPE_CHECKING:
    from adaptbank.core.model import AdaptBankModel

__all__ = ["QUANT_KINDS", "MissingQuantizeBackend", "QuantizedLinear", "QuantReport", "MergeReport",
           "check_kind", "quantize_backbone", "quantize_loaded", "quantization_of", "merge_into_quantized"]

QUANT_KINDS = ("nf4", "int8")
"""The weight-only quantisations a frozen base can use."""
NF4_BLOCK = 64
"""Weights per NF4 absmax block (QLoRA's choice)."""
_ABSMAX_BLOCK = 256
"""Absmax values per block of the double quantisation (QLoRA's choice)."""

try:  # GPT-2 family projections
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers always ships it today
    Conv1D = ()  # type: ignore[assignment,misc]


class MissingQuantizeBackend(ImportError, RuntimeError):
    """bitsandbytes, which does the quantisation arithmetic, is not installed."""


def check_kind(kind: str) -> str:
    """``kind`` if it is a known quantisation, else a ValueError naming it and the allowed ones."""
    if kind not in QUANT_KINDS:
        raise ValueError(f"unknown quantisation {kind!r}; allowed: {', '.join(QUANT_KINDS)} "
                         "(weight-only, of the frozen base's linear layers)")
    return kind


def _bnb() -> Any:
    """``bitsandbytes.functional``, imported on first use."""
    quiet = logging.getLogger("bitsandbytes.backends.cpu.ops")  # warns that the hub-fetched gemm is missing
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        import bitsandbytes.functional as bnbf
    except ImportError as err:
        raise MissingQuantizeBackend(
            "a quantised base (nf4, int8) needs bitsandbytes, which is not installed: "
            "pip install 'adaptbank[quantize]' (or pip install --no-deps bitsandbytes next to your torch)") from err
    finally:
        quiet.setLevel(level)
    return bnbf


class QuantizedLinear(nn.Module):
    """A frozen linear layer ``y = x W^T + b`` whose weight ``(O, I)`` is held quantised.

    The quantised tensors are buffers (``codes`` and the scales of ``kind``); ``bias`` stays in its
    own precision. Build one with :meth:`from_module` (an ``nn.Linear`` or a GPT-2 ``Conv1D``, whose
    ``(I, O)`` weight is transposed: every QuantizedLinear computes like an ``nn.Linear``)."""

    def __init__(self, kind: str, in_features: int, out_features: int, tensors: dict[str, Tensor],
                 bias: nn.Parameter | None, weight_dtype: torch.dtype) -> None:
        super().__init__()
        self.kind = check_kind(kind)
        self.in_features, self.out_features = in_features, out_features
        self.weight_dtype = weight_dtype
        """The dtype of the weight it replaced, which the dequantised weight comes back in."""
        for key, value in tensors.items():
            self.register_buffer(key, value)
        self.bias = bias

    @classmethod
    def from_weight(cls, weight: Tensor, bias: nn.Parameter | None, kind: str,
                    weight_dtype: torch.dtype | None = None) -> QuantizedLinear:
        """Quantise ``weight`` ``(O, I)`` (computed in fp32) as ``kind``."""
        check_kind(kind)
        bnbf = _bnb()
        out_features, in_features = weight.shape
        W = weight.detach().float().contiguous()  # (O, I)
        if kind == "nf4":
            # (N,) padded to even length: bitsandbytes sends an odd N to a torch.compile path, compiled per shape
            flat = F.pad(W.reshape(-1), (0, W.numel() % 2))
            codes, state = bnbf.quantize_4bit(flat, blocksize=NF4_BLOCK, quant_type="nf4", compress_statistics=True)
            tensors = {"codes": codes,  # (ceil(N/2), 1) uint8: two 4-bit codes a byte
                       "absmax": state.absmax,  # (G,) uint8: the blocks' absmax, double-quantised
                       "absmax_scale": state.state2.absmax,  # (ceil(G/256),) fp32
                       "absmax_offset": state.offset}  # () fp32: the mean absmax, subtracted before
        else:
            codes, scale, _ = bnbf.int8_vectorwise_quant(W)
            tensors = {"codes": codes, "scale": scale}  # (O, I) int8, (O,) fp32 row absmax
        return cls(kind, in_features, out_features, tensors, bias, weight_dtype or weight.dtype)

    @classmethod
    def from_module(cls, module: nn.Module, kind: str) -> QuantizedLinear:
        """The quantised twin of a frozen ``nn.Linear`` or ``Conv1D`` (same bias Parameter)."""
        if isinstance(module, nn.Linear):
            weight = module.weight  # (O, I)
        elif bool(Conv1D) and isinstance(module, Conv1D):
            weight = module.weight.T  # Conv1D stores (I, O)
        else:
            raise TypeError(f"can quantise nn.Linear or Conv1D, got {type(module).__name__}")
        return cls.from_weight(weight, module.bias, kind)

    def quantized_nbytes(self) -> int:
        """Bytes of the stored quantised tensors (codes and scales; the bias not counted)."""
        return sum(b.numel() * b.element_size() for b in self.buffers(recurse=False))

    def dequantized_weight(self) -> Tensor:
        """The weight ``(O, I)`` the layer computes with, in ``weight_dtype`` (a new tensor)."""
        bnbf = _bnb()
        shape = (self.out_features, self.in_features)
        if self.kind == "nf4":
            absmax = bnbf.dequantize_blockwise(self.absmax, absmax=self.absmax_scale, blocksize=_ABSMAX_BLOCK)
            absmax = absmax + self.absmax_offset  # (G,) fp32
            # Flat, as quantised: bitsandbytes 0.50's CPU kernel misplaces blocks that span rows of a
            # 2-D shape (e.g. I = 32 or 96 with blocks of 64); the flat layout is the same bytes.
            n = math.prod(shape)
            state = bnbf.QuantState(absmax=absmax, shape=torch.Size((n + n % 2,)), blocksize=NF4_BLOCK,
                                    quant_type="nf4", dtype=torch.float32)
            W = bnbf.dequantize_4bit(self.codes, state).reshape(-1)[:n].reshape(shape)  # (O, I)
        else:
            W = bnbf.int8_vectorwise_dequant(self.codes, self.scale)  # (O, I)
        return W.to(self.weight_dtype)

    @property
    def weight(self) -> Tensor:
        """The dequantised weight ``(O, I)``, computed on each access and read-only in effect: model
        code (T5 reads ``.weight.dtype``) and ``AdaptedLinear`` (experts take its device and dtype)
        read ``.weight`` of the layers they hold."""
        return self.dequantized_weight()

    def forward(self, x: Tensor) -> Tensor:
        W = self.dequantized_weight().to(x.dtype)  # (O, I); no gradient reaches the codes
        return F.linear(x, W, self.bias)  # (B, T, O)

    def requantized(self, delta: Tensor) -> QuantizedLinear:
        """A new layer holding ``quant(dequant(W) + delta)``, ``delta`` ``(O, I)``: how a LoRA update is
        merged (``AdaptedLinear.merge`` keeps this layer aside, so unmerge restores it exactly)."""
        if tuple(delta.shape) != (self.out_features, self.in_features):
            raise ValueError(f"delta of shape {tuple(delta.shape)} does not fit a ({self.out_features}, "
                             f"{self.in_features}) weight")
        with torch.no_grad():
            merged = self.dequantized_weight().float() + delta.to(self.codes.device).float()  # (O, I)
        return QuantizedLinear.from_weight(merged, self.bias, self.kind, self.weight_dtype)

    def extra_repr(self) -> str:
        return (f"kind={self.kind!r}, in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}")


@dataclass(frozen=True)
class QuantReport:
    """What :func:`quantize_backbone` did."""

    kind: str
    layers: tuple[str, ...]
    """Module paths of the quantised layers."""
    full_bytes: int
    """Bytes their weights took before, in their dtype."""
    quantized_bytes: int
    """Bytes of the stored quantised tensors, scales included."""
    weight_rel_error: float
    """``||dequant(Q) - W||_F / ||W||_F`` over all quantised weights together."""

    @property
    def ratio(self) -> float:
        """How many times smaller the frozen linear weights are."""
        return self.full_bytes / self.quantized_bytes if self.quantized_bytes else float("nan")


def quantization_of(model: nn.Module) -> str | None:
    """The quantisation of ``model``'s frozen linear layers, or None when it holds no quantised layer."""
    kinds = {m.kind for m in model.modules() if isinstance(m, QuantizedLinear)}
    if len(kinds) > 1:
        raise ValueError(f"the model mixes quantisations {sorted(kinds)}; expected one")
    return next(iter(kinds), None)


def quantize_backbone(model: nn.Module, kind: str) -> QuantReport:
    """Replace, in place, every frozen ``nn.Linear``/``Conv1D`` of ``model``'s transformer layers by a
    :class:`QuantizedLinear` of ``kind`` (``nf4`` or ``int8``). Quantise the bare backbone, before
    any task is added; the result is deterministic, so a freshly loaded base quantises to the same
    bytes (and the same fingerprint)."""
    check_kind(kind)
    _bnb()
    if (found := quantization_of(model)) is not None:
        raise ValueError(f"the backbone is already quantised ({found!r}); quantise a freshly loaded one")
    config = getattr(model, "config", None)
    encoder_decoder = getattr(config, "is_encoder_decoder", False) and hasattr(model, "get_encoder")
    layers = layer_list(model.get_encoder() if encoder_decoder else model)  # type: ignore[operator]
    path_of = {id(m): n for n, m in model.named_modules()}
    names: list[str] = []
    full = packed = 0
    err2 = ref2 = 0.0
    for parent in list(layers.modules()):
        for child_name, child in list(parent.named_children()):
            if getattr(child, "transparent_child", None) is not None:
                raise ValueError(f"{path_of[id(child)]} is already wrapped ({type(child).__name__}); "
                                 "quantise the backbone before adding tasks or routers")
            if not (isinstance(child, nn.Linear) or (bool(Conv1D) and isinstance(child, Conv1D))):
                continue
            path = path_of[id(child)]
            if child.weight.requires_grad:
                raise ValueError(f"{path}: its weight requires grad; only frozen linear layers are quantised")
            q = QuantizedLinear.from_module(child, kind)
            W = child.weight if isinstance(child, nn.Linear) else child.weight.T  # (O, I)
            with torch.no_grad():
                err2 += float((q.dequantized_weight().float() - W.float()).pow(2).sum())
                ref2 += float(W.float().pow(2).sum())
            full += W.numel() * W.element_size()
            packed += q.quantized_nbytes()
            setattr(parent, child_name, q)
            names.append(path)
    if not names:
        raise ValueError(f"found no nn.Linear or Conv1D in the transformer layers of {type(model).__name__}")
    return QuantReport(kind=kind, layers=tuple(names), full_bytes=full, quantized_bytes=packed,
                       weight_rel_error=math.sqrt(err2 / ref2) if ref2 else 0.0)


def quantize_loaded(backbone: Backbone, kind: str | None) -> Backbone:
    """``backbone`` with its model quantised in place as ``kind`` (:func:`quantize_backbone`); None:
    left as it is. How a bank holds its base (``AdapterBank.init(quantize=...)``, recorded with the
    base in the manifest, and redone on every load, which gives the same bytes)."""
    if kind is not None:
        quantize_backbone(backbone.model, kind)
    return backbone


@dataclass(frozen=True)
class MergeReport:
    """The error a merge into a quantised base introduced, against the exact fp32 merge
    ``dequant(Q) + delta`` (what the unmerged model computes with)."""

    weight_max_abs: float
    """max |merged - exact| over every weight of the merged layers."""
    weight_rel_error: float
    """||merged - exact||_F / ||exact||_F over the merged layers together."""
    update_rel_size: float
    """||delta||_F / ||exact||_F: the LoRA update's size, to set the error against (an error this
    large means re-quantisation rounded the update away)."""
    output_max_abs: float
    """max |merged - unmerged| of the pooled features ``(B, D)`` on the batch given."""
    output_rel_error: float
    """||merged - unmerged||_F / ||unmerged||_F of those features."""
    layers: dict[str, tuple[float, float]]
    """Per layer path: (max abs, relative Frobenius) weight error."""


def merge_into_quantized(model: AdaptBankModel, name: str, input_ids: Tensor, attention_mask: Tensor) -> MergeReport:
    """Merge LoRA task ``name`` into ``model``'s quantised base (``model.merge``: each layer becomes
    ``quant(dequant(Q) + (alpha/r) B A)``) and report the error that introduced, on the weights and on
    the pooled features of the batch ``input_ids``, ``attention_mask`` ``(B, T)``. ``unmerge()``
    restores the quantised base exactly."""
    kind = model.tasks[name].method.kind if name in model.tasks else None
    if kind != "lora":
        raise TypeError(f"merge_into_quantized reports the error of a LoRA merge; task {name!r} uses {kind!r} "
                        "(model.merge folds BitFit and (IA)^3 into a quantised base too, without the report)")
    layers = model.layers_of(name)
    plain = [p for p, layer in layers.items() if not isinstance(layer.base, QuantizedLinear)]
    if plain:
        raise ValueError(f"task {name!r} has experts on layers that are not quantised ({plain[:3]}); "
                         "use model.merge, which is exact there")
    model.route(task=name)
    with torch.no_grad():
        before = model.features(input_ids, attention_mask).float()  # (B, D)
        exact = {p: layer.base.dequantized_weight().float() + layer.experts[name].delta_weight()  # (O, I)
                 for p, layer in layers.items()}
        delta2 = sum(float(layer.experts[name].delta_weight().pow(2).sum()) for layer in layers.values())
        model.merge(name)
        after = model.features(input_ids, attention_mask).float()  # (B, D)
        per: dict[str, tuple[float, float]] = {}
        err2 = ref2 = 0.0
        for p, layer in layers.items():
            diff = layer.base.dequantized_weight().float() - exact[p]  # (O, I)
            e2, r2 = float(diff.pow(2).sum()), float(exact[p].pow(2).sum())
            per[p] = (float(diff.abs().max()), math.sqrt(e2 / r2) if r2 else 0.0)
            err2, ref2 = err2 + e2, ref2 + r2
    out_ref = float(before.norm())
    return MergeReport(weight_max_abs=max(v[0] for v in per.values()),
                       weight_rel_error=math.sqrt(err2 / ref2) if ref2 else 0.0,
                       update_rel_size=math.sqrt(delta2 / ref2) if ref2 else 0.0,
                       output_max_abs=float((after - before).abs().max()),
                       output_rel_error=float((after - before).norm()) / out_ref if out_ref else 0.0,
                       layers=per)
