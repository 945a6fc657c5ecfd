"""Quantized frozen bases (QLoRA): the block projections held in int8 or NF4, dequantized on the fly.

    model = load_model("base.pth", quant="nf4")             # generation, or the base of a QLoRA run
    model = build_model(state_dict, path, dtype=torch.bfloat16, quant="int8")

Every `nn.Linear` inside the model's `blocks` (RWKV-4: att key/value/receptance/output, ffn key/value/receptance;
whatever a family declares there) becomes a `QuantLinear`: its weight is the quantized tensor of `torchao` (the
PyTorch team's library; its NF4Tensor is what torchtune's QLoRA uses), quantized one tensor at a time while the
checkpoint is read, so the full-precision base never exists in memory. Everything else (emb, head, layer norms,
token-shift mixes, decays) keeps the model dtype; LoRA weights and tensors trained in full stay fp32.

    int8   torchao `Int8Tensor`, symmetric per output row: W ~ q * s, q in [-128, 127], s = max|W_row| / 127.5
    nf4    torchao `NF4Tensor` (QLoRA's NormalFloat4): blocks of 64 scaled by their absmax, the 16 NF4 levels, the
           block scales themselves quantized to int8 in groups of 256 ("double quantization")

The forward and backward passes dequantize the weight to the compute dtype (`compute_dtype`), multiply, and let it
go: the backward pass keeps only the quantized weight, not a dequantized copy. (PyTorch's `_weight_int8pack_mm` CPU
kernel was measured and left out: on an AVX2 CPU it is 30x slower than converting q and using fp32 matmul at 1024
tokens, and no faster for one token.)

peft finds a `QuantLinear` by its name as it finds any `nn.Linear` (it is one), and wraps it; the plug-in
`LoRALinear` of `finetune.plugin` computes its base product through `linear` here.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from finetune import checkpoint
from finetune.errors import FinetuneError
from finetune.models import detect, parse_dtype

MODES = ("none", "int8", "nf4")
NF4_BLOCK = 64  # torchao's (and QLoRA's) defaults: 64 weights per absmax, 256 absmaxes per int8 scale group
NF4_SCALER_BLOCK = 256


class _DropNoise(logging.Filter):
    """Drops known import-time log lines of torchao on CPU builds of torch (peft and transformers import it whenever
    it is installed): the CUDA-only extensions it cannot load, its note that Triton (a GPU compiler) is absent, and a
    torch deprecation note about its enums. They are expected on a CPU and say nothing about the paths used here;
    every other record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not (("Could not load this library" in msg and "torchao" in msg)
                    or "Detected no triton" in msg
                    or "Calling register_constant() on Enum subclasses is deprecated" in msg)


# attached when this module is imported (finetune.adapters imports it before it imports peft)
for _name in ("torchao", "torchao.kernel.intmm", "torch.utils._pytree"):  # filters do not reach child loggers
    logging.getLogger(_name).addFilter(_DropNoise())


def _torchao():
    """The torchao tensor types, imported on first use (an optional dependency: `pip install 'rwkv-lora[quant]'`)."""
    try:
        from torchao.quantization import Int8Tensor, NF4Tensor, to_nf4
        from torchao.quantization.granularity import PerRow
    except ImportError as e:
        raise FinetuneError(f"quantized bases need torchao (pip install 'rwkv-lora[quant]'): {e}") from None
    return Int8Tensor, NF4Tensor, to_nf4, PerRow


def check_mode(mode: str | None, where: str = "base_quant") -> str:
    """'none', 'int8' or 'nf4' (None means 'none'); anything else is a one-line FinetuneError."""
    mode = "none" if mode is None else str(mode)
    if mode not in MODES:
        raise FinetuneError(f"{where}: {mode!r} is not one of {', '.join(MODES)}")
    return mode


def quantize(t: torch.Tensor, mode: str, name: str = "tensor") -> torch.Tensor:
    """A 2-D weight as torchao's int8 or NF4 tensor (its dtype, shape and the dtype it dequantizes to stay t's)."""
    Int8Tensor, NF4Tensor, to_nf4, PerRow = _torchao()
    if t.dim() != 2:
        raise FinetuneError(f"{name}: only matrices are quantized, got shape {tuple(t.shape)}")
    if mode == "int8":
        return Int8Tensor.from_hp(t.contiguous(), PerRow())
    if mode == "nf4":
        if t.numel() % (NF4_BLOCK * NF4_SCALER_BLOCK):
            raise FinetuneError(f"{name} ({' x '.join(map(str, t.shape))}) cannot be held in NF4: torchao's NF4 "
                                f"needs a multiple of {NF4_BLOCK * NF4_SCALER_BLOCK} weights (any width that is a "
                                f"multiple of 128); use int8")
        return to_nf4(t.contiguous(), NF4_BLOCK, NF4_SCALER_BLOCK)
    raise FinetuneError(f"unknown quantization {mode!r}; choose from int8, nf4")


def is_quantized(t: torch.Tensor) -> bool:
    return type(t).__name__ in ("Int8Tensor", "NF4Tensor")


def quant_mode(t: torch.Tensor) -> str:
    return {"Int8Tensor": "int8", "NF4Tensor": "nf4"}.get(type(t).__name__, "none")


def dequantize(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The full-precision matrix of a quantized weight (the library's own dequantization), in `dtype`."""
    dtype = dtype or t.dtype
    if quant_mode(t) == "int8":
        return t.dequantize(dtype)
    if quant_mode(t) == "nf4":
        w = t.get_original_weight()
        return w if w.dtype == dtype else w.to(dtype)
    return t if t.dtype == dtype else t.to(dtype)


def quantized_bytes(t: torch.Tensor) -> int:
    """Bytes a (quantized or plain) tensor holds."""
    if quant_mode(t) == "int8":
        return t.qdata.nbytes + t.scale.nbytes
    if quant_mode(t) == "nf4":
        return sum(x.nbytes for x in (t.quantized_data, t.quantized_scalers, t.quantization_factor, t.scaler_mean,
                                      t.nf4))
    return t.numel() * t.element_size()


# ----------------------------------------------------------------------------------------------------------------------
# Compute dtype


def fast_bf16(device: torch.device | str = "cpu") -> bool:
    """Whether bf16 matmuls are native (fast) on this device: CUDA with bf16 support, or a CPU whose oneDNN has bf16
    kernels (AVX-512 / AMX). On AVX2-only CPUs bf16 matmuls are emulated and several times slower than fp32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def default_dtype(device: torch.device | str = "cpu") -> torch.dtype:
    """bf16 where this device multiplies it natively (half the memory, faster), else fp32."""
    return torch.bfloat16 if fast_bf16(device) else torch.float32


def output_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype F.linear would return for `x`: autocast's when it is on (bf16-mixed training), else x's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a quantized product is dequantized to and multiplied in: the output dtype, except bf16 on a CPU
    without native bf16, where fp32 is used instead (emulated bf16 matmuls run several times slower than fp32 there,
    and the weights are int8/nf4 either way, so nothing is held in fp32). Said once, in a warning."""
    dtype = output_dtype(x)
    if dtype == torch.bfloat16 and x.device.type == "cpu" and not fast_bf16(x.device):
        _warn_once("bf16", "this CPU has no native bf16 instructions (bf16 matmuls are emulated and several times "
                           "slower than fp32 here): quantized layers dequantize to fp32 and multiply in fp32; the "
                           "weights stay quantized")
        return torch.float32
    if dtype == torch.float32 and fast_bf16(x.device):
        _warn_once("fp32", "quantized layers dequantize to fp32 and multiply in fp32 (fp32 input, autocast off); "
                           "bf16 is faster on this machine: precision bf16-mixed (training) or --dtype bf16")
    return dtype


_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=4)


# ----------------------------------------------------------------------------------------------------------------------
# The quantized linear layer


class _DequantLinear(torch.autograd.Function):
    """y = x W^T + b with W quantized: dequantized (to `dtype`) for the product and dropped; the backward pass
    dequantizes again, so only the quantized weight is kept between the passes. W is frozen: no gradient for it.
    y comes out in `out_dtype` (what F.linear would give), the input gradient in x's dtype."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype,
                out_dtype: torch.dtype):
        ctx.weight, ctx.dtype, ctx.x_dtype = weight, dtype, x.dtype
        ctx.has_bias = bias is not None
        with torch.autocast(x.device.type, enabled=False):
            if quant_mode(weight) == "int8":
                # torchao's own weight-only product: (x q^T) * s, the int8 matrix converted but never rescaled
                y = F.linear(x.to(dtype), weight)
            else:
                y = F.linear(x.to(dtype), dequantize(weight, dtype))
            if bias is not None:
                y = y + bias.to(dtype)
        return y.to(out_dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gx = gb = None
        with torch.autocast(grad.device.type, enabled=False):
            if ctx.needs_input_grad[0]:
                gx = (grad.to(ctx.dtype) @ dequantize(ctx.weight, ctx.dtype)).to(ctx.x_dtype)
            if ctx.has_bias and ctx.needs_input_grad[2]:
                gb = grad.reshape(-1, grad.shape[-1]).sum(0)
        return gx, None, gb, None, None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear that also takes a quantized weight (dequantized on the fly, see `_DequantLinear`)."""
    if not is_quantized(weight):
        return F.linear(x, weight, bias)
    return _DequantLinear.apply(x, weight, bias, compute_dtype(x), output_dtype(x))


class QuantLinear(nn.Linear):
    """An nn.Linear whose frozen weight is a torchao quantized tensor (same name, shape and dtype as before, so the
    state dict's keys and shapes, peft's targets and adapters' shape checks see the original layer)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        nn.Module.__init__(self)
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=bias.requires_grad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, quant={quant_mode(self.weight)}"


# ----------------------------------------------------------------------------------------------------------------------
# Building quantized models


def block_linear_weights(model: nn.Module) -> set[str]:
    """Parameter names of the weights of every nn.Linear inside the model's `blocks` (the frozen projections a
    quantized base holds quantized; emb, head and the small per-channel tensors are not in this set)."""
    return {f"{name}.weight" for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.startswith("blocks.")}


def swap_quantized_linears(model: nn.Module) -> nn.Module:
    """Every nn.Linear whose weight is quantized becomes a QuantLinear (same tensors, no copy)."""
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.Linear) and not isinstance(m, QuantLinear) and is_quantized(m.weight):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, QuantLinear(m.weight.data, m.bias))
    return model


def build_model(state_dict: dict[str, torch.Tensor], path: str | Path = "<memory>",
                dtype: torch.dtype | str | None = None, quant: str | None = "none") -> nn.Module:
    """The checkpoint's model in `dtype` (None: the device's default, see `default_dtype`), its block projections
    quantized (`quant` int8 / nf4) one tensor at a time while it is built: the peak memory is the model as it will
    be held, plus one tensor. quant none gives the plain model (still cast tensor by tensor)."""
    mode = check_mode(quant, "quant")
    dtype = default_dtype("cpu") if dtype is None else parse_dtype(dtype)
    if mode == "none" and dtype == torch.bfloat16 and not torch.cuda.is_available() and not fast_bf16("cpu"):
        _warn_once("bf16-base", "bf16 weights on a CPU without native bf16 instructions: bf16 matmuls are emulated "
                                "here and several times slower than fp32 (precision 32 is faster but holds twice "
                                "the memory; base_quant int8/nf4 holds less and multiplies in fp32 here)")
    if mode == "none":
        model = checkpoint.build_from_state_dict(state_dict, path, dtype=dtype)
    else:
        family = detect(state_dict, path)
        with torch.device("meta"):
            skeleton = family.model_class(family.config_from_state_dict(state_dict, path))
        targets = block_linear_weights(skeleton)
        del skeleton

        def convert(name: str, t: torch.Tensor) -> torch.Tensor:
            return quantize(t, mode, name) if name in targets else t

        model = swap_quantized_linears(checkpoint.build_from_state_dict(state_dict, path, dtype=dtype,
                                                                        convert=convert))
    model.base_quant = mode
    return model


def load_model(path: str | Path, dtype: torch.dtype | str | None = None, quant: str | None = "none",
               device: str | torch.device = "cpu") -> nn.Module:
    """Load a checkpoint with its block projections quantized (see `build_model`), in eval mode, on `device`."""
    sd = checkpoint.read_state_dict(path)
    model = build_model(sd, path, dtype=dtype, quant=quant)
    model.base_fingerprint = checkpoint.fingerprint(sd)  # of the file, before quantization
    return model.to(device).eval()
