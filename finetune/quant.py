"""Quantized frozen bases (QLoRA): the block projections held in int8 or NF4, dequantized on the fly.

    model = load_model("base.pth", quant="nf4")             # generation, or the base of a QLoRA run
    model = build_model(state_dict, path, dtype=torch.bfloat16, quant="int8")

Every `nn.Linear` inside the model's `blocks` (RWKV-4: att key/value/receptance/output, ffn key/value/receptance;
whatever a family declares there) becomes a `QuantLinear`: its weight is the quantized tensor of `torchao` (the
PyTorch team's library; its NF4Tensor is what torchtune's QLoRA uses), quantized one tensor at a time while the
checkpoint is read, so the full-precision base never exists in memory. emb and head, a big model's largest frozen
matrices, stay in the checkpoint's dtype when that is narrower than the model's (published checkpoints are bf16:
held as stored, nothing is rounded; `HeldEmbedding`, and a `QuantLinear` holding a plain bf16 weight). Everything
else (layer norms, token-shift mixes, decays) keeps the model dtype; LoRA weights and tensors trained in full stay
fp32.

    bf16   plain bf16 weights, widened to the compute dtype for each product: half of fp32's memory at fp32's
           speed on CPUs whose bf16 matmuls are emulated (AVX2); exact for bf16 checkpoints (all published ones)
    int8   torchao `Int8Tensor`, symmetric per output row: W ~ q * s, q in [-128, 127], s = max|W_row| / 127.5
    nf4    torchao `NF4Tensor` (QLoRA's NormalFloat4): blocks of 64 scaled by their absmax, the 16 NF4 levels, the
           block scales themselves quantized to int8 in groups of 256 ("double quantization")

The forward and backward passes dequantize the weight to the compute dtype (`compute_dtype`) a block of rows at a
time (`DEQUANT_BLOCK`), multiply, and let it go: the backward pass keeps only the quantized weight, not a
dequantized copy. (PyTorch's `_weight_int8pack_mm` CPU
kernel was measured and left out: on an AVX2 CPU it is 30x slower than converting q and using fp32 matmul at 1024
tokens, and no faster for one token.)

peft finds a `QuantLinear` by its name as it finds any `nn.Linear` (it is one), and wraps it; the plug-in
`LoRALinear` of `finetune.plugin` computes its base product through `linear` here.
"""

from __future__ import annotations

import functools
import logging
import warnings
from pathlib import Path
from typing import Container

import torch
import torch.nn as nn
import torch.nn.functional as F

from finetune import checkpoint, pages
from finetune.errors import FinetuneError
from finetune.models import detect, parse_dtype

MODES = ("none", "bf16", "int8", "nf4")
MODES_HELP = ("hold the block projections narrower than the compute dtype, widened for each product (bf16: half "
              "of fp32 at fp32 speed on CPUs without native bf16; int8: ~1/2 of bf16, nf4: ~1/4, need torchao)")
HELD_AS_STORED = ("emb.weight", "head.weight")
"""Frozen tensors a quantized base holds in the checkpoint's own 16-bit dtype rather than the model's fp32."""
NF4_BLOCK = 64  # torchao's (and QLoRA's) defaults: 64 weights per absmax, 256 absmaxes per int8 scale group
NF4_SCALER_BLOCK = 256


class _DropNoise(logging.Filter):
    """Drops known import-time log lines of torchao and bitsandbytes on CPU builds of torch (peft and transformers
    import them whenever they are installed): the CUDA-only extensions torchao cannot load, its note that Triton (a
    GPU compiler) is absent, a torch deprecation note about its enums, and bitsandbytes' note that the optional
    `kernels` package (a 4-bit CPU matmul) is missing. They are expected on a CPU and say nothing about the paths
    used here; every other record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not (("Could not load this library" in msg and "torchao" in msg)
                    or "Detected no triton" in msg
                    or "Calling register_constant() on Enum subclasses is deprecated" in msg
                    or ("from kernels-community" in msg and "kernels" in msg))


# attached when this module is imported: training, generation and the server import it before peft, torchao
# or bitsandbytes are
for _name in ("torchao", "torchao.kernel.intmm", "torch.utils._pytree",
              "bitsandbytes.backends.cpu.ops"):  # filters do not reach child loggers
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
    """A 2-D weight as torchao's int8 or NF4 tensor (its dtype, shape and the dtype it dequantizes to stay t's), or
    as a plain bf16 tensor (mode bf16)."""
    if t.dim() != 2:
        raise FinetuneError(f"{name}: only matrices are quantized, got shape {tuple(t.shape)}")
    if mode == "bf16":
        return t.to(torch.bfloat16)
    Int8Tensor, NF4Tensor, to_nf4, PerRow = _torchao()
    if mode == "int8":
        return Int8Tensor.from_hp(t.contiguous(), PerRow())
    if mode == "nf4":
        if t.numel() % (NF4_BLOCK * NF4_SCALER_BLOCK):
            raise FinetuneError(f"{name} ({' x '.join(map(str, t.shape))}) cannot be held in NF4: torchao's NF4 "
                                f"needs a multiple of {NF4_BLOCK * NF4_SCALER_BLOCK} weights, this matrix has "
                                f"{t.numel()}; use int8")
        return to_nf4(t.contiguous(), NF4_BLOCK, NF4_SCALER_BLOCK)
    raise FinetuneError(f"unknown quantization {mode!r}; choose from {', '.join(MODES[1:])}")


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
        w = _nf4_weight(t)
        return w if w.dtype == dtype else w.to(dtype)
    return t if t.dtype == dtype else t.to(dtype)


def _nf4_weight(t: torch.Tensor) -> torch.Tensor:
    """torchao's `NF4Tensor.get_original_weight()`, bit for bit (tested), in its dtype.

    Written out because the library's version is the slowest part of an NF4 product on the CPU: it turns both
    nibbles of every byte into int64 indices, looks each half up, scales the halves and interleaves them (~20 bytes
    of temporaries per weight; 0.56 s for an 8192 x 2048 matrix here). A 256-row table maps a packed byte to its
    two levels at once, already in the weight's order (an int32 index and the output: 6 bytes per weight, 0.14 s);
    the block scales are the library's own `dequantize_scalers`."""
    levels = t.nf4.to(t.dtype)
    table = torch.stack([levels.repeat_interleave(16), levels.repeat(16)], dim=1)  # (256, 2): byte -> (high, low)
    w = F.embedding(t.quantized_data.to(torch.int32), table)  # (n / 2, 2)
    scalers = t.dequantize_scalers(t.quantized_scalers, t.quantization_factor, t.scaler_block_size)  # (n / block,)
    w = w.view(-1, t.block_size).mul_(scalers.unsqueeze(-1))  # each block of `block_size` weights times its scale
    return w.view(t.shape)


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


DEQUANT_BLOCK = 1 << 22
"""Weights dequantized at a time in a product (16 MB in fp32): a big matrix is widened a block of rows at a time, so
the temporaries of the library's dequantization (index tensors in int64, the scaled halves, their interleaving: ~20
bytes per weight for NF4) stay ~80 MB instead of ~330 MB for a 1.5B model's 8192 x 2048 channel-mix matrices.
Smaller blocks cost time (that matrix's forward + backward at 1024 tokens: whole 1.8-2.0 s, blocks of 4M weights
2.4-2.5 s, of 2M 2.8 s)."""


@functools.lru_cache(maxsize=None)
def _block_rows(out_features: int, in_features: int, mode: str) -> int:
    """Rows per dequantized block of an [out, in] weight (all of them when it is small)."""
    rows = max(1, DEQUANT_BLOCK // in_features)
    if rows >= out_features:
        return out_features
    if mode == "nf4":  # torchao splits NF4 only into equal parts made of whole groups of scales
        group = NF4_BLOCK * NF4_SCALER_BLOCK
        return next((r for r in range(rows, 0, -1) if out_features % r == 0 and r * in_features % group == 0),
                    out_features)
    return rows


def row_blocks(weight: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """(first row, block) covering a (quantized or plain) weight [out, in] in blocks of about DEQUANT_BLOCK weights,
    each a view of the same kind (NF4 by torchao's split, which needs equal parts; others by slicing)."""
    mode = quant_mode(weight)
    rows = _block_rows(weight.shape[0], weight.shape[1], mode)
    if rows == weight.shape[0]:
        return [(0, weight)]
    if mode == "nf4":
        return list(zip(range(0, weight.shape[0], rows), torch.split(weight, rows)))
    return [(s, weight[s:s + rows]) for s in range(0, weight.shape[0], rows)]


def _times_weight_t(x: torch.Tensor, block: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x block^T in `dtype` (x already in it)."""
    if quant_mode(block) == "int8":
        return F.linear(x, block)  # torchao's own weight-only product: (x q^T) * s, q converted but never rescaled
    return F.linear(x, dequantize(block, dtype))


class _DequantLinear(torch.autograd.Function):
    """y = x W^T + b with W quantized (or held in a narrower dtype than the product is computed in): dequantized (to
    `dtype`) a block of rows at a time for the product and dropped; the backward pass dequantizes again, so only the
    stored weight is kept between the passes. W is frozen: no gradient for it. y comes out in `out_dtype` (what
    F.linear would give), the input gradient in x's dtype."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype,
                out_dtype: torch.dtype):
        ctx.weight, ctx.dtype, ctx.x_dtype = weight, dtype, x.dtype
        ctx.has_bias = bias is not None
        with torch.autocast(x.device.type, enabled=False):
            xs = x.to(dtype)
            parts = [_times_weight_t(xs, block, dtype) for _, block in row_blocks(weight)]
            y = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
            del parts
            if bias is not None:
                y = y + bias.to(dtype)
        return y.to(out_dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gx = gb = None
        with torch.autocast(grad.device.type, enabled=False):
            if ctx.needs_input_grad[0]:
                g = grad.to(ctx.dtype)
                g2 = g.reshape(-1, g.shape[-1])  # (N, out)
                gx = None
                for s, block in row_blocks(ctx.weight):
                    w = dequantize(block, ctx.dtype)  # (rows, in)
                    if gx is None:
                        gx = g2[:, s:s + w.shape[0]] @ w
                    else:
                        gx.addmm_(g2[:, s:s + w.shape[0]], w)
                gx = gx.reshape(*g.shape[:-1], gx.shape[-1]).to(ctx.x_dtype)
            if ctx.has_bias and ctx.needs_input_grad[2]:
                gb = grad.reshape(-1, grad.shape[-1]).sum(0)
        return gx, None, gb, None, None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear that also takes a quantized weight, or a frozen one held in a narrower dtype than x (a quantized
    base's bf16 head): dequantized / widened on the fly a block at a time, see `_DequantLinear`."""
    if not is_quantized(weight) and (weight.dtype == x.dtype or weight.requires_grad
                                     or torch.is_autocast_enabled(x.device.type)):
        return F.linear(x, weight, bias)
    return _DequantLinear.apply(x, weight, bias, compute_dtype(x), output_dtype(x))


class QuantLinear(nn.Linear):
    """An nn.Linear whose frozen weight is a torchao quantized tensor, or a plain one held in a narrower dtype than
    the model computes in (same name, shape and dtype as before, so the state dict's keys and shapes, peft's targets
    and adapters' shape checks see the original layer). Its output is always x W^T (+ b) with W its weight, which
    the fused head-and-loss relies on (`plain_product`)."""

    plain_product = True

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 compute_dtype: torch.dtype | None = None) -> None:
        nn.Module.__init__(self)
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=bias.requires_grad)
        self.compute_dtype = compute_dtype or weight.dtype
        """The model's dtype, which this layer's products come out in (a torchao tensor's dtype says it; a plain
        weight held narrower does not): what LoRA factors plugged into it are held in."""
        self.in_file = type(weight) is torch.Tensor and bool(pages.file_mapping(weight))
        """A plain weight left in the checkpoint file's memory map (`build_model(in_file=True)`): its pages are
        released after each product (the fused head-and-loss releases them a block at a time)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(x, self.weight, self.bias)
        if self.in_file:  # the mapping is looked up again: a weight replaced since is no longer released
            pages.release(self.weight, pages.file_mapping(self.weight))
        return y

    def extra_repr(self) -> str:
        held = quant_mode(self.weight) if is_quantized(self.weight) else str(self.weight.dtype).replace("torch.", "")
        return f"in_features={self.in_features}, out_features={self.out_features}, held={held}"


class HeldEmbedding(nn.Embedding):
    """An nn.Embedding whose frozen table is held in a narrower dtype than the model computes in (a quantized base
    keeps the checkpoint's bf16 / fp16 table): the looked-up rows are converted, never the table. A table left in
    the checkpoint file's memory map (`build_model(in_file=True)`) is read from it: the pages of the rows just looked
    up are released again, so it costs no memory between lookups."""

    def __init__(self, weight: torch.Tensor, compute_dtype: torch.dtype) -> None:
        nn.Module.__init__(self)
        self.num_embeddings, self.embedding_dim = weight.shape
        self.padding_idx, self.max_norm, self.norm_type = None, None, 2.0
        self.scale_grad_by_freq, self.sparse = False, False
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.compute_dtype = compute_dtype
        self.in_file = bool(pages.file_mapping(weight))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(idx, self.weight).to(self.compute_dtype)
        if self.in_file:  # the mapping is looked up again: a weight replaced since is no longer released
            pages.release(self.weight, pages.file_mapping(self.weight))
        return rows

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, held={str(self.weight.dtype).replace('torch.', '')}"


# ----------------------------------------------------------------------------------------------------------------------
# Building quantized models


def block_linear_weights(model: nn.Module) -> set[str]:
    """Parameter names of the weights of every nn.Linear inside the model's `blocks` (the frozen projections a
    quantized base holds quantized; emb, head and the small per-channel tensors are not in this set)."""
    return {f"{name}.weight" for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.startswith("blocks.")}


def swap_quantized_linears(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Every nn.Linear whose weight is quantized (or, given the model's `dtype`, held in another dtype) becomes a
    QuantLinear (same tensors, no copy)."""
    for name, m in list(model.named_modules()):
        if (isinstance(m, nn.Linear) and not isinstance(m, QuantLinear)
                and (is_quantized(m.weight) or (dtype is not None and m.weight.dtype != dtype))):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, QuantLinear(m.weight.data, m.bias, dtype))
    return model


def build_model(state_dict: dict[str, torch.Tensor], path: str | Path = "<memory>",
                dtype: torch.dtype | str | None = None, quant: str | None = "none", trained: Container[str] = (),
                in_file: bool = False) -> nn.Module:
    """The checkpoint's model in `dtype` (None: the device's default, see `default_dtype`), its block projections
    quantized (`quant` int8 / nf4) one tensor at a time while it is built: the peak memory is the model as it will
    be held, plus one tensor. quant none gives the plain model (still cast tensor by tensor).

    Under a quantized (or bf16-held) base, emb and head stay in the 16-bit dtype the file stores them in, except the
    tensors named in `trained` (trained in full: held in `dtype`). With `in_file`, those two are not even copied:
    they stay in the checkpoint file's memory map, read from it a block at a time when used and released again
    (`finetune.pages`): ~0.27 GB each off a 1.5B RWKV-7's resident memory, for re-reading them (from the page cache
    while memory is free, else the disk) at every use. For training, whose steps are long; a generation step would
    re-read the head for every token."""
    mode = check_mode(quant, "quant")
    dtype = default_dtype("cpu") if dtype is None else parse_dtype(dtype)
    if mode == "bf16" and dtype == torch.bfloat16:
        mode = "none"  # the model is bf16 anyway: nothing is held narrower
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
        # emb and head (a 1.5B model's largest frozen matrices: 1.07 GB in fp32) stay as the file holds them when
        # that is 16-bit (published checkpoints are bf16: nothing is lost), widened a block at a time when used
        keep = {k for k in HELD_AS_STORED if k in state_dict and k not in trained
                and state_dict[k].dtype.itemsize < dtype.itemsize}

        def convert(name: str, t: torch.Tensor) -> torch.Tensor:
            return quantize(t, mode, name) if name in targets else t

        model = swap_quantized_linears(checkpoint.build_from_state_dict(
            state_dict, path, dtype=dtype, convert=convert, keep=keep, keep_in_file=in_file), dtype)
        if "emb.weight" in keep:
            model.emb = HeldEmbedding(model.emb.weight.data, dtype)
        for m in model.modules():
            if isinstance(m, QuantLinear) and not is_quantized(m.weight):
                # row-major again (`tall_weights_column_major_` laid the tall ones out for one-row fp32 products):
                # a narrow weight is widened a block of rows at a time, from column-major a transposing copy (the
                # 65536 x 2048 head: 2.7x the time)
                m.weight.data = m.weight.data.contiguous()
    model.base_quant = mode
    return model


def load_model(path: str | Path, dtype: torch.dtype | str | None = None, quant: str | None = "none",
               device: str | torch.device = "cpu") -> nn.Module:
    """Load a checkpoint with its block projections quantized (see `build_model`), in eval mode, on `device`."""
    sd = checkpoint.read_state_dict(path)
    model = build_model(sd, path, dtype=dtype, quant=quant)
    model.base_fingerprint = checkpoint.fingerprint(sd)  # of the file, before quantization
    return model.to(device).eval()
