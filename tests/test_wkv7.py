"""The RWKV-7 WKV operator: the float64 reference against autograd's numerical check and the plain matrix formula,
then the compiled CPU kernel against the float64 reference."""

from __future__ import annotations

import pytest
import torch

from finetune.ops import wkv7 as W

NAMES = ("r", "w", "k", "v", "a", "b", "state")


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Max-abs error relative to the max-abs of the reference tensor."""
    return ((got.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


def make_inputs(B: int, T: int, H: int, N: int, seed: int = 0, empty_state: bool = False, w0: float | None = None):
    """Float64 leaves (r, w, k, v, a, b, state) shaped as RWKV-7 makes them, plus random output gradients (gy, gstate).

    As in the model: w = -exp(-0.5) * sigmoid(w0) (log decay in [-0.6065, 0]), kk = L2-normalised per head,
    a = -kk, b = kk * iclr with iclr in (0, 1). w0 is random unless given (then every w0 is that value).
    """
    g = torch.Generator().manual_seed(seed * 1000003 + B * 10007 + T * 101 + H * 13 + N)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    r = randn(B, T, H, N)
    w0 = randn(B, T, H, N, scale=2.0) if w0 is None else torch.full((B, T, H, N), w0, dtype=torch.float64)
    w = -torch.exp(torch.tensor(-0.5, dtype=torch.float64)) * torch.sigmoid(w0)
    k = randn(B, T, H, N, scale=0.5)
    v = randn(B, T, H, N)
    kk = torch.nn.functional.normalize(randn(B, T, H, N), dim=-1)
    iclr = torch.sigmoid(randn(B, T, H, N))
    a, b = -kk, kk * iclr
    state = torch.zeros(B, H, N, N, dtype=torch.float64) if empty_state else randn(B, H, N, N, scale=0.5)
    gy = randn(B, T, H, N)
    gstate = randn(B, H, N, N)
    return [r, w, k, v, a, b, state], gy, gstate


# ----------------------------------------------------------------------------------------------------------------------
# The reference


def test_reference_gradcheck():
    leaves, _, _ = make_inputs(2, 4, 2, 3, seed=1)
    xs = [x.clone().requires_grad_() for x in leaves]
    assert torch.autograd.gradcheck(lambda *a: W.wkv7_reference(*a), xs, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_reference_gradcheck_no_state():
    leaves, _, _ = make_inputs(1, 3, 2, 4, seed=2)
    xs = [x.clone().requires_grad_() for x in leaves[:6]]
    assert torch.autograd.gradcheck(lambda *a: W.wkv7_reference(*a), xs, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_reference_matches_the_matrix_formula():
    """The broadcasting reference equals the docstring's formula written with matmuls, head by head, step by step."""
    B, T, H, N = 2, 5, 3, 4
    (r, w, k, v, a, b, s0), _, _ = make_inputs(B, T, H, N, seed=3)
    y, s = W.wkv7_reference(r, w, k, v, a, b, s0)
    for bi in range(B):
        for h in range(H):
            S = s0[bi, h].clone()
            for t in range(T):
                x = [z[bi, t, h] for z in (r, w, k, v, a, b)]
                sa = S @ x[4]
                S = S * torch.exp(x[1])[None, :] + sa[:, None] * x[5][None, :] + x[3][:, None] * x[2][None, :]
                torch.testing.assert_close(y[bi, t, h], S @ x[0], rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(s[bi, h], S, rtol=1e-12, atol=1e-12)
