"""The RWKV-5.2 / RWKV-6 WKV operator: reference, compiled kernels, and the dispatch between them.

One operator serves both generations: RWKV-6's decay varies per token, RWKV-5.2's is fixed per channel (the model
broadcasts it over T). Per head, with a state S [N, N] (row = key index, column = value index: the `rwkv` package's
v5/v6 layout, the transpose of its v7 one), fp32:

    y_t = r_t @ (u[:, None] * k_t[:, None] * v_t[None, :] + S_{t-1})
    S_t = k_t[:, None] * v_t[None, :] + exp(w_t)[:, None] * S_{t-1}

w = log of the decay (<= 0: -exp(time_decay) in RWKV-5.2, -exp(w) per token in RWKV-6), u = time_faaaa [H, N].
Inputs r, w, k, v are [B, T, H, N]; the state [B, H, N, N] is always float32 (float64 in the reference when the
inputs are float64); y is returned in float32.

Backends:
- `wkv6_reference`: plain PyTorch, a loop over time, autograd does the backward. The definition the tests trust.
- the C++ CPU kernel (`kernels/wkv6_cpu.cpp`) and the CUDA kernel (`kernels/wkv6_cuda.cu`), compiled on first use
  by `finetune.ops.build.load_extension`: fp32 state, any T, gradients for r, w, k, v, u and the incoming state,
  and a backward whose scratch does not grow with T * N * N (see kernels/README.md).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch.autograd.function import once_differentiable

from finetune.ops.build import eager_under_compile, load_extension

Backend = Literal["auto", "reference", "kernel"]


def empty_wkv6_state(batch: int, heads: int, head_size: int, device: torch.device | str = "cpu",
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.zeros(batch, heads, head_size, head_size, device=device, dtype=dtype)


def wkv6_reference(r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, u: torch.Tensor,
                   state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """WKV-5/6 one time step at a time in plain PyTorch; differentiable through everything, state included. The
    definition the tests trust. Returns (y [B, T, H, N], state [B, H, N, N])."""
    dtype = torch.float64 if r.dtype == torch.float64 else torch.float32
    B, T, H, N = r.shape
    S = empty_wkv6_state(B, H, N, r.device, dtype) if state is None else state.to(dtype)
    u = u.to(dtype).unsqueeze(-1)  # (H, N, 1): broadcast over the value index
    ys = []
    # unbind, not x[:, t]: the backward of T slices would build T full-size gradients (quadratic in T)
    for rt, wt, kt, vt in zip(*(x.to(dtype).unbind(1) for x in (r, w, k, v))):
        kv = kt.unsqueeze(-1) * vt.unsqueeze(-2)  # (B, H, N, N): k^T v
        ys.append((rt.unsqueeze(-1) * (u * kv + S)).sum(-2))  # (B, H, N): r @ (u k^T v + S)
        S = kv + torch.exp(wt).unsqueeze(-1) * S
    y = torch.stack(ys, dim=1) if ys else r.new_zeros(B, 0, H, N, dtype=dtype)
    return y, S


# ----------------------------------------------------------------------------------------------------------------------
# Compiled kernels
#
# Both extensions expose the same two functions (all tensors contiguous; r, k, v share one dtype, fp32 or bf16; w, u
# and the state fp32):
#   forward(r, w, k, v [B,T,H,N], u [H,N], state_in [B,H,N,N]) -> (y [B,T,H,N] fp32, state_out [B,H,N,N] fp32)
#   backward(r, w, k, v, u, state_in, gy [B,T,H,N] fp32, gstate_out [B,H,N,N] fp32)
#       -> (gr, gw, gk, gv [B,T,H,N], gu [H,N], gstate_in [B,H,N,N]), all fp32
# The CPU one also takes col_blocks and ckpt_every (0 = automatic), which the tests use to force each code path.


def kernel_for(device: torch.device):
    """The compiled extension for this device, or None (then the reference is used)."""
    if device.type not in ("cpu", "cuda"):
        return None
    return load_extension("wkv6", cpu_sources=["wkv6_cpu.cpp"],
                          cuda_sources=["wkv6_cuda_bind.cpp", "wkv6_cuda.cu"], device_type=device.type)


class WKV6Kernel(torch.autograd.Function):
    """Autograd wrapper around a compiled extension; gradients for r, w, k, v, u and the incoming state."""

    @staticmethod
    def forward(ctx, ext, r, w, k, v, u, state):
        # one dtype for r, k, v: bf16 only when all three are bf16 (fp32 loses nothing for the others)
        rkv_dtype = torch.bfloat16 if all(x.dtype == torch.bfloat16 for x in (r, k, v)) else torch.float32
        rr, kk, vv = (x.to(rkv_dtype).contiguous() for x in (r, k, v))
        ww, uu, ss = (x.float().contiguous() for x in (w, u, state))
        y, state_out = ext.forward(rr, ww, kk, vv, uu, ss)
        ctx.ext = ext
        ctx.dtypes = [x.dtype for x in (r, w, k, v, u, state)]
        ctx.save_for_backward(rr, ww, kk, vv, uu, ss)
        return y, state_out

    @staticmethod
    @once_differentiable
    def backward(ctx, gy, gstate_out):
        rr, ww, kk, vv, uu, ss = ctx.saved_tensors
        gy = torch.zeros(rr.shape, dtype=torch.float32, device=rr.device) if gy is None else gy.float().contiguous()
        gstate_out = torch.zeros_like(ss) if gstate_out is None else gstate_out.float().contiguous()
        grads = ctx.ext.backward(rr, ww, kk, vv, uu, ss, gy, gstate_out)
        return (None, *(g.to(dt) for g, dt in zip(grads, ctx.dtypes)))


@eager_under_compile
def wkv6(r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, u: torch.Tensor,
         state: torch.Tensor | None = None, backend: Backend = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """WKV-5/6 with gradients on the best backend for the inputs' device (see the module docstring for shapes).

    backend: "auto" (the compiled kernel for fp32/bf16 inputs on CPU or CUDA; the reference for float64 inputs, other
    devices, or when the build fails), "reference", or "kernel" (raise if the kernel cannot be used).
    """
    B, T, H, N = r.shape
    if state is None:
        state = empty_wkv6_state(B, H, N, r.device)
    supported = (torch.float32, torch.bfloat16)
    use_kernel = backend != "reference" and T > 0 and all(x.dtype in supported for x in (r, w, k, v, u, state))
    ext = kernel_for(r.device) if use_kernel else None
    if ext is None:
        if backend == "kernel":
            raise RuntimeError(f"no compiled WKV-5/6 kernel for {r.device} / {r.dtype}")
        return wkv6_reference(r, w, k, v, u, state)
    return WKV6Kernel.apply(ext, r, w, k, v, u, state)
