"""The WKV-5/6 operator: the reference against autograd's numerical check and the textbook sums."""

from __future__ import annotations

import pytest
import torch

from finetune.ops import wkv6 as W


def make_inputs(B: int, T: int, H: int, N: int, seed: int = 0, empty_state: bool = False,
                log_decay_range: tuple[float, float] = (-20.0, 5.0)):
    """Random float64 leaves (r, w, k, v, u, state) plus random output gradients (gy, gstate).

    w = -exp(x) with x uniform in log_decay_range, per token and channel: the default spans decays from
    exp(-exp(-20)) (1 - 2e-9, an almost perfect memory) to exp(-exp(5)) (e^-148, forgets at once)."""
    g = torch.Generator().manual_seed(seed * 1000003 + B * 10007 + T * 101 + H * 13 + N)
    lo, hi = log_decay_range

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    r, k, v = randn(B, T, H, N), randn(B, T, H, N), randn(B, T, H, N)
    w = -torch.exp(lo + (hi - lo) * torch.rand(B, T, H, N, generator=g, dtype=torch.float64))
    u = randn(H, N) * 0.5
    state = None if empty_state else randn(B, H, N, N)
    gy, gstate = randn(B, T, H, N), randn(B, H, N, N)
    return [r, w, k, v, u, state], gy, gstate


# ----------------------------------------------------------------------------------------------------------------------
# The reference


def test_reference_gradcheck():
    # moderate decays here: gradcheck's finite differences need every input to matter at eps = 1e-6
    leaves, _, _ = make_inputs(2, 5, 2, 3, seed=1, log_decay_range=(-3.0, 1.0))
    xs = [x.clone().requires_grad_() for x in leaves]
    assert torch.autograd.gradcheck(lambda *a: W.wkv6_reference(*a), xs, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_reference_gradcheck_empty_state():
    leaves, _, _ = make_inputs(1, 4, 3, 2, seed=2, empty_state=True, log_decay_range=(-3.0, 1.0))
    xs = [x.clone().requires_grad_() for x in leaves[:5]]
    assert torch.autograd.gradcheck(lambda *a: W.wkv6_reference(*a), xs, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_reference_matches_the_plain_formula():
    """The recurrence equals the unrolled sums: y_t[j] = sum_i r_t[i] (u[i] k_t[i] v_t[j]
    + sum_{s<t} prod_{s<m<t} exp(w_m[i]) k_s[i] v_s[j] + prod_{m<t} exp(w_m[i]) S_0[i, j])."""
    leaves, _, _ = make_inputs(2, 6, 2, 3, seed=3, log_decay_range=(-3.0, 1.0))
    r, w, k, v, u, s0 = leaves
    y, s_out = W.wkv6_reference(r, w, k, v, u, s0)
    T = r.shape[1]
    for t in range(T + 1):
        # the state after t tokens, from its closed form: every past token's k v^T decayed by the later decays
        S = torch.exp(w[:, :t].sum(1)).unsqueeze(-1) * s0
        for s in range(t):
            S = S + torch.exp(w[:, s + 1:t].sum(1)).unsqueeze(-1) * k[:, s].unsqueeze(-1) * v[:, s].unsqueeze(-2)
        if t == T:
            torch.testing.assert_close(s_out, S)
            break
        want = torch.einsum("bhi,bhij->bhj", r[:, t], S) + (r[:, t] * u * k[:, t]).sum(-1, keepdim=True) * v[:, t]
        torch.testing.assert_close(y[:, t], want)


def test_reference_dtypes_and_shapes():
    leaves, _, _ = make_inputs(2, 3, 2, 4, seed=4)
    y, s = W.wkv6_reference(*[x.float() for x in leaves])
    assert y.dtype == torch.float32 and s.dtype == torch.float32
    assert y.shape == (2, 3, 2, 4) and s.shape == (2, 2, 4, 4)
    y, s = W.wkv6_reference(*[x.to(torch.bfloat16) for x in leaves[:5]])  # bf16 inputs, empty state
    assert y.dtype == torch.float32 and s.dtype == torch.float32
    y, s = W.wkv6_reference(*leaves[:4], leaves[4], None)
    assert y.dtype == torch.float64 and s.dtype == torch.float64
