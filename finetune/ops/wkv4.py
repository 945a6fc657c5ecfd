"""The RWKV-4 WKV operator: reference, compiled kernels, and the dispatch between them.

Per channel c, with w = -exp(time_decay) and u = time_first:

    wkv_t = (sum_{i<t} e^{(t-1-i)w + k_i} v_i + e^{u + k_t} v_t) / (sum_{i<t} e^{(t-1-i)w + k_i} + e^{u + k_t})

computed with the numerically stable running-max recurrence over a state (a, b, p): the true numerator and
denominator are a*e^p and b*e^p, so nothing overflows whatever the decays and keys.

State layout (one tensor so it can be carried between chunks and trained): `[B, 3, C]` float32 holding a, b, p.
The empty state is a = b = 0, p = -1e38 (see `empty_wkv_state`).

Everything here runs in float32 (float64 for the reference when given float64 inputs), whatever the dtype of k and v:
the decays and the state never leave fp32. `wkv` returns y in float32; the model casts it back.

Backends:
- `wkv_reference`: plain PyTorch, a loop over time, autograd does the backward. The definition the tests trust.
- the C++ CPU kernel (`kernels/wkv_cpu.cpp`) and the CUDA kernel (`kernels/wkv_cuda.cu`): compiled on first use with
  `torch.utils.cpp_extension.load` and cached by torch; no compile-time sequence length, any T and any B*C.
"""

from __future__ import annotations

from typing import Literal

import torch

from finetune.ops.build import eager_under_compile, load_extension

P_EMPTY = -1e38  # the running max of an empty state: exp(P_EMPTY - anything) == 0 in fp32

Backend = Literal["auto", "reference", "kernel"]


def empty_wkv_state(batch: int, channels: int, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The state before the first token: a = b = 0, p = -1e38. Shape [B, 3, C]."""
    state = torch.zeros(batch, 3, channels, device=device, dtype=dtype)
    state[:, 2] = P_EMPTY
    return state


# ----------------------------------------------------------------------------------------------------------------------
# Reference


def wkv_step(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor,
             b: torch.Tensor, p: torch.Tensor):
    """One step of the stable recurrence (w = -exp(time_decay), u = time_first; every tensor [..., C]):
    returns (wkv_t, a, b, p) after the token. Shared by the reference and the one-token generation path."""
    ww = u + k
    q = torch.maximum(p, ww)
    e1 = torch.exp(p - q)
    e2 = torch.exp(ww - q)
    y = (e1 * a + e2 * v) / (e1 * b + e2)
    ww = p + w
    q = torch.maximum(ww, k)
    e1 = torch.exp(ww - q)
    e2 = torch.exp(k - q)
    return y, e1 * a + e2 * v, e1 * b + e2, q


def wkv_reference(time_decay: torch.Tensor, time_first: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """WKV by the stable recurrence, one time step at a time; differentiable through everything, state included.

    time_decay, time_first: [C]; k, v: [B, T, C]; state: [B, 3, C] or None. Returns (y [B, T, C], state [B, 3, C]).
    Runs in float64 when k is float64, else in float32.
    """
    dtype = torch.float64 if k.dtype == torch.float64 else torch.float32
    B, T, C = k.shape
    w = -torch.exp(time_decay.to(dtype))
    u = time_first.to(dtype)
    k = k.to(dtype)
    v = v.to(dtype)
    if state is None:
        state = empty_wkv_state(B, C, k.device, dtype)
    a, b, p = state.to(dtype).unbind(1)
    ys = []
    # unbind, not k[:, t]: the backward of T slices would build T full-size [B, T, C] gradients (quadratic in T)
    for kt, vt in zip(k.unbind(1), v.unbind(1)):
        y, a, b, p = wkv_step(w, u, kt, vt, a, b, p)
        ys.append(y)
    y = torch.stack(ys, dim=1) if ys else k.new_zeros(B, 0, C)
    return y, torch.stack([a, b, p], dim=1)


# ----------------------------------------------------------------------------------------------------------------------
# Compiled kernels
#
# Both extensions expose the same two functions (all tensors contiguous; w is -exp(time_decay), fp32):
#   forward(w[C], u[C], k[B,T,C], v[B,T,C], state_in[B,3,C]) -> (y[B,T,C] fp32, state_out[B,3,C])
#   backward(w, u, k, v, state_in, gy[B,T,C] fp32, gstate_out[B,3,C]) -> (gw[C], gu[C], gk[B,T,C], gv[B,T,C],
#                                                                         gstate_in[B,3,C])
# gw is the gradient with respect to w; the chain rule to time_decay (times w) is applied here in Python.
# k and v may be fp32 or bf16; the CPU kernel returns gk and gv in their dtype, the CUDA kernel in fp32 (the .to() in
# WKVKernel.backward is then a no-op on the CPU).

def kernel_for(device: torch.device):
    """The compiled extension for this device, or None (then the reference is used)."""
    if device.type not in ("cpu", "cuda"):
        return None
    return load_extension("wkv4", cpu_sources=["wkv_cpu.cpp"], cuda_sources=["wkv_cuda_bind.cpp", "wkv_cuda.cu"],
                          device_type=device.type)


def fold_state_grad(gstate_out: torch.Tensor, state_out: torch.Tensor) -> torch.Tensor:
    """The gradient reaching a state (a, b, p), written the way both compiled kernels take it.

    (a, b, p) stands for the pair (A, B) = (a e^p, b e^p): whatever follows the state (the next chunk, the next
    token) depends on A and B only, so the gradient p receives is exactly ga * a + gb * b. The p row of the incoming
    gradient is replaced by that, once, here: the CUDA kernel never reads it and the CPU kernel's extra path for it
    then carries zero, so every backend returns the same gradients (and those of the reference for any loss that
    depends on what the state means).
    """
    g = gstate_out.clone()
    g[:, 2] = g[:, 0] * state_out[:, 0] + g[:, 1] * state_out[:, 1]
    return g


class WKVKernel(torch.autograd.Function):
    """Autograd wrapper around a compiled extension; gradients for decay, bonus, k, v and the incoming state."""

    @staticmethod
    def forward(ctx, ext, time_decay, time_first, k, v, state):
        w = -torch.exp(time_decay.float()).contiguous()
        u = time_first.float().contiguous()
        k = k.contiguous()
        v = v.contiguous()
        state = state.float().contiguous()
        y, state_out = ext.forward(w, u, k, v, state)
        ctx.ext = ext
        ctx.k_dtype, ctx.v_dtype = k.dtype, v.dtype
        ctx.save_for_backward(w, u, k, v, state, state_out)
        return y, state_out

    @staticmethod
    def backward(ctx, gy, gstate_out):
        w, u, k, v, state, state_out = ctx.saved_tensors
        gy = torch.zeros_like(k, dtype=torch.float32) if gy is None else gy.float().contiguous()
        if gstate_out is None:
            gstate_out = torch.zeros_like(state)
        else:
            gstate_out = fold_state_grad(gstate_out.float(), state_out).contiguous()
        gw, gu, gk, gv, gstate = ctx.ext.backward(w, u, k, v, state, gy, gstate_out)
        return None, gw * w, gu, gk.to(ctx.k_dtype), gv.to(ctx.v_dtype), gstate


@eager_under_compile
def wkv(time_decay: torch.Tensor, time_first: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
        state: torch.Tensor | None = None, backend: Backend = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """WKV with gradients, on the best backend for k's device. See the module docstring for shapes.

    backend: "auto" (compiled kernel for fp32/bf16 on CPU or CUDA, the reference otherwise or when the build fails),
    "reference", or "kernel" (raise if the kernel cannot be built).
    """
    B, T, C = k.shape
    if state is None:
        state = empty_wkv_state(B, C, k.device)
    use_kernel = backend != "reference" and k.dtype in (torch.float32, torch.bfloat16) and T > 0
    ext = kernel_for(k.device) if use_kernel else None
    if ext is None:
        if backend == "kernel":
            raise RuntimeError(f"no compiled WKV kernel for {k.device} / {k.dtype}")
        return wkv_reference(time_decay, time_first, k, v, state)
    v = v.to(k.dtype)
    return WKVKernel.apply(ext, time_decay, time_first, k, v, state)
