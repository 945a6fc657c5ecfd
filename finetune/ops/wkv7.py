"""The RWKV-7 WKV operator ("generalised delta rule"): reference, compiled kernels, and the dispatch between them.

Per head, with a state S [N, N] (row = value index, column = key index: the `rwkv` package's v7 layout), fp32:

    S_t = S_{t-1} * exp(w_t)[None, :] + (S_{t-1} @ a_t)[:, None] * b_t[None, :] + v_t[:, None] * k_t[None, :]
    y_t = S_t @ r_t

The model passes w = log of the decay (<= 0; RWKV-7 uses -exp(-0.5) * sigmoid(...)), a = -kk and b = kk * iclr
(BlinkDL's kernel convention). Inputs r, w, k, v, a, b are [B, T, H, N]; the state [B, H, N, N] is always float32
(float64 in the reference when the inputs are float64); y is returned in float32.

Backends:
- `wkv7_reference`: plain PyTorch, a loop over time, autograd does the backward. The definition the tests trust.
- the C++ CPU kernel (`kernels/wkv7_cpu.cpp`) and the CUDA kernel (`kernels/wkv7_cuda.cu`): compiled on first use
  by `finetune.ops.build.load_extension`, any T, gradients for every input and the incoming state. Their backward is
  memory-bounded: the forward keeps the state every K steps (plus the [N] vector S @ a of each step), the backward
  recomputes the states of one block of K steps at a time.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch.autograd.function import once_differentiable

from finetune.ops.build import eager_under_compile, load_extension

Backend = Literal["auto", "reference", "kernel"]
KERNEL_DTYPES = (torch.float32, torch.bfloat16)
CUDA_HEAD_SIZES = (64,)  # the CUDA kernel splits each row of the state over 4 threads, N fixed at compile time


def empty_wkv7_state(batch: int, heads: int, head_size: int, device: torch.device | str = "cpu",
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.zeros(batch, heads, head_size, head_size, device=device, dtype=dtype)


def wkv7_reference(r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor,
                   b: torch.Tensor, state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """WKV-7 one time step at a time in plain PyTorch; differentiable through everything, state included. The
    definition the tests trust. Returns (y [B, T, H, N], state [B, H, N, N])."""
    dtype = torch.float64 if r.dtype == torch.float64 else torch.float32
    B, T, H, N = r.shape
    S = empty_wkv7_state(B, H, N, r.device, dtype) if state is None else state.to(dtype)
    ys = []
    # unbind, not x[:, t]: the backward of T slices would build T full-size gradients (quadratic in T)
    for rt, wt, kt, vt, at, bt in zip(*(x.to(dtype).unbind(1) for x in (r, w, k, v, a, b))):
        sa = (S * at.unsqueeze(-2)).sum(-1, keepdim=True)  # (B, H, N, 1): S @ a
        S = S * torch.exp(wt).unsqueeze(-2) + sa * bt.unsqueeze(-2) + vt.unsqueeze(-1) * kt.unsqueeze(-2)
        ys.append((S * rt.unsqueeze(-2)).sum(-1))  # (B, H, N): S @ r
    y = torch.stack(ys, dim=1) if ys else r.new_zeros(B, 0, H, N, dtype=dtype)
    return y, S


# ----------------------------------------------------------------------------------------------------------------------
# Compiled kernels
#
# Both extensions expose (all tensors contiguous; r, k, v, a, b one dtype, fp32 or bf16; w that dtype or fp32):
#   forward(r, w, k, v, a, b [B,T,H,N], state_in [B,H,N,N] fp32, save)
#       -> (y [B,T,H,N] fp32, state_out [B,H,N,N] fp32, ckpt [B,H,ceil(T/K),N,N] fp32, sa [B,T,H,N] fp32)
#   backward(r, w, k, v, a, b, ckpt, sa, gy [B,T,H,N] fp32, gstate_out [B,H,N,N] fp32)
#       -> (gr, gw, gk, gv, ga, gb [B,T,H,N] in the dtype of their input, gstate_in [B,H,N,N] fp32)
#   checkpoint_interval() -> K
# ckpt and sa are what the backward recomputes from (empty when save is false): the state before every K-th step
# and S @ a at every step. Memory for one call with gradients: B*H*N*N*4*ceil(T/K) + B*T*H*N*4 bytes.


def kernel_for(device: torch.device):
    """The compiled extension for this device, or None (then the reference is used)."""
    if device.type not in ("cpu", "cuda"):
        return None
    return load_extension("wkv7", cpu_sources=["wkv7_cpu.cpp"],
                          cuda_sources=["wkv7_cuda_bind.cpp", "wkv7_cuda.cu"], device_type=device.type)


def _kernel_inputs(*xs: torch.Tensor) -> list[torch.Tensor]:
    """r, w, k, v, a, b as the extensions take them: one compute dtype for r, k, v, a, b (bf16 only when all five
    are bf16; fp32 otherwise, exact for bf16); w may stay fp32 beside bf16 inputs, so that a model keeping its decays
    in fp32 does not lose them. Contiguous. Tensors already so are passed through (no dispatch: one-token steps
    count their operations)."""
    dtype = torch.bfloat16 if all(x.dtype == torch.bfloat16 for i, x in enumerate(xs) if i != 1) else torch.float32
    wdtype = dtype if xs[1].dtype == dtype else torch.float32
    return [x if x.dtype == (wdtype if i == 1 else dtype) and x.is_contiguous()
            else x.to(wdtype if i == 1 else dtype).contiguous() for i, x in enumerate(xs)]


class WKV7Kernel(torch.autograd.Function):
    """Autograd wrapper around a compiled extension; gradients for r, w, k, v, a, b and the incoming state."""

    @staticmethod
    def forward(ctx, ext, save, r, w, k, v, a, b, state):
        """save: whether a backward will follow (then the checkpoints are kept). Decided by the caller, from the
        grad mode outside this function: ctx.needs_input_grad says True under torch.no_grad() too."""
        ctx.dtypes = [x.dtype for x in (r, w, k, v, a, b)]
        xs = _kernel_inputs(r, w, k, v, a, b)
        y, state_out, ckpt, sa = ext.forward(*xs, state.float().contiguous(), save)
        ctx.ext = ext
        if save:
            ctx.save_for_backward(*xs, ckpt, sa)
        return y, state_out

    @staticmethod
    @once_differentiable  # the kernels' backward is not itself differentiable: say so rather than give zeros
    def backward(ctx, gy, gstate_out):
        *xs, ckpt, sa = ctx.saved_tensors
        B, T, H, N = xs[0].shape
        gy = xs[0].new_zeros(B, T, H, N, dtype=torch.float32) if gy is None else gy.float().contiguous()
        gstate_out = (xs[0].new_zeros(B, H, N, N, dtype=torch.float32) if gstate_out is None
                      else gstate_out.float().contiguous())
        *grads, gstate = ctx.ext.backward(*xs, ckpt, sa, gy, gstate_out)
        return None, None, *(g.to(dt) for g, dt in zip(grads, ctx.dtypes)), gstate


@eager_under_compile
def wkv7(r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
         state: torch.Tensor | None = None, backend: Backend = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """WKV-7 with gradients on the best backend for the inputs' device (see the module docstring for shapes).

    backend: "auto" (the compiled kernel for fp32/bf16 inputs on the CPU, or on CUDA with head size 64; the
    reference otherwise or when the build fails, with one warning), "reference", or "kernel" (raise if the kernel
    cannot serve these inputs).
    """
    B, T, H, N = r.shape
    xs = (r, w, k, v, a, b)
    why_not = None
    if backend not in ("auto", "reference", "kernel"):
        raise ValueError(f"wkv7: backend must be 'auto', 'reference' or 'kernel', got {backend!r}")
    if backend == "reference":
        why_not = "the reference was asked for"
    elif any(x.dtype not in KERNEL_DTYPES for x in xs):
        why_not = f"dtypes {sorted({str(x.dtype) for x in xs})} (the kernels take float32 and bfloat16)"
    elif r.device.type == "cuda" and N not in CUDA_HEAD_SIZES:
        why_not = f"head size {N} (the CUDA kernel is built for {CUDA_HEAD_SIZES})"
    elif T == 0:
        why_not = "an empty sequence"
    ext = kernel_for(r.device) if why_not is None else None
    if ext is None:
        if backend == "kernel":
            raise RuntimeError(f"wkv7: no compiled kernel for {r.device} / {r.dtype}: "
                               f"{why_not or 'the kernel did not build (see the warning above)'}")
        return wkv7_reference(r, w, k, v, a, b, state)
    if state is None:
        state = empty_wkv7_state(B, H, N, r.device)
    if torch.is_grad_enabled() and any(x.requires_grad for x in (*xs, state)):
        return WKV7Kernel.apply(ext, True, r, w, k, v, a, b, state)
    # no backward can follow (generation, prefill, evaluation): the extension itself, without an autograd node or
    # checkpoints; at one token per call the autograd wrapper would cost more than the step
    y, state_out, _, _ = ext.forward(*_kernel_inputs(*xs), state if state.dtype == torch.float32 and
                                     state.is_contiguous() else state.float().contiguous(), False)
    return y, state_out


def checkpoint_bytes(batch: int, seq_len: int, heads: int, head_size: int, interval: int) -> int:
    """What a kernel forward keeps for its backward: the state every `interval` steps plus sa (fp32)."""
    return 4 * batch * heads * (math.ceil(seq_len / interval) * head_size ** 2 + seq_len * head_size)
