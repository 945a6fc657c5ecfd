"""The WKV operator: the reference against autograd's numerical check, the CPU kernel against the reference."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch

from finetune.ops import build
from finetune.ops import wkv4 as W

FWD_SHAPES = [(B, T, C) for T in (1, 7, 512, 4096) for B in (1, 3) for C in (96, 768)]
# the float64 reference with autograd is slow at long T: the gradients are compared on a subset that still covers
# every T, B and C value
BWD_SHAPES = [(1, 1, 96), (3, 1, 768), (1, 7, 768), (3, 7, 96), (3, 512, 768), (1, 512, 96), (1, 4096, 768)]

TOL = 1e-5


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Max-abs error relative to the max-abs of the reference tensor."""
    return ((got.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


def make_inputs(B: int, T: int, C: int, seed: int = 0, empty_state: bool = False):
    """Random float64 leaves (time_decay, time_first, k, v, state) plus random output gradients (gy, gstate)."""
    g = torch.Generator().manual_seed(seed * 1000003 + B * 10007 + T * 101 + C)
    td = torch.randn(C, generator=g, dtype=torch.float64) - 0.5
    tf = torch.randn(C, generator=g, dtype=torch.float64)
    k = torch.randn(B, T, C, generator=g, dtype=torch.float64)
    v = torch.randn(B, T, C, generator=g, dtype=torch.float64)
    state = W.empty_wkv_state(B, C, dtype=torch.float64)
    if not empty_state:
        state[:, :2] = torch.rand(B, 2, C, generator=g, dtype=torch.float64) + 0.1
        state[:, 2] = torch.randn(B, C, generator=g, dtype=torch.float64)
    gy = torch.randn(B, T, C, generator=g, dtype=torch.float64)
    gstate = torch.randn(B, 3, C, generator=g, dtype=torch.float64)
    return [td, tf, k, v, state], gy, gstate


def continuation_loss(state: torch.Tensor, gstate: torch.Tensor) -> torch.Tensor:
    """A loss on the state through what it means: one more token (k, v = the first two rows of gstate) run by the
    reference from it, weighted by the third row. (a, b, p) is one redundant pair (a e^p, b e^p); a loss on its raw
    rows would not be a loss on the state."""
    C = state.shape[-1]
    td = torch.linspace(-1, 1, C, dtype=state.dtype)
    tf = torch.linspace(0.5, -0.5, C, dtype=state.dtype)
    g = gstate.to(state.dtype)
    y2, _ = W.wkv_reference(td, tf, g[:, 0:1], g[:, 1:2], state)
    return (y2[:, 0] * g[:, 2]).sum()


def run(fn, leaves, gy, gstate, dtype, grads=True, kv_dtype=None):
    """y, state and (if grads) the gradients of sum(y*gy) + continuation_loss(state) for all five leaves."""
    xs = [x.detach().to(dtype) for x in leaves]
    if kv_dtype is not None:
        xs[2], xs[3] = xs[2].to(kv_dtype), xs[3].to(kv_dtype)
    with torch.set_grad_enabled(grads):
        xs = [x.requires_grad_(grads) for x in xs]
        y, state = fn(*xs)
        if not grads:
            return y, state, None
        loss = (y * gy.to(y.dtype)).sum() + continuation_loss(state, gstate)
        return y, state, torch.autograd.grad(loss, xs)


def kernel(*args):
    return W.wkv(*args, backend="kernel")


@functools.lru_cache(maxsize=None)
def reference_case(B: int, T: int, C: int):
    leaves, gy, gstate = make_inputs(B, T, C)
    y, state, grads = run(W.wkv_reference, leaves, gy, gstate, torch.float64, grads=(B, T, C) in BWD_SHAPES)
    return leaves, gy, gstate, y.detach(), state.detach(), grads


# ----------------------------------------------------------------------------------------------------------------------
# The reference


def test_reference_gradcheck():
    leaves, _, _ = make_inputs(2, 5, 3, seed=1)
    xs = [x.clone().requires_grad_() for x in leaves]
    assert torch.autograd.gradcheck(lambda *a: W.wkv_reference(*a), xs, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_reference_gradcheck_empty_state():
    leaves, _, _ = make_inputs(1, 4, 3, seed=2, empty_state=True)
    xs = [x.clone().requires_grad_() for x in leaves[:4]]
    assert torch.autograd.gradcheck(lambda *a: W.wkv_reference(*a), xs, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_reference_matches_the_plain_formula():
    """The stable recurrence equals the textbook sums (small values, no overflow) from the empty state."""
    leaves, _, _ = make_inputs(2, 6, 4, seed=3, empty_state=True)
    td, tf, k, v, _ = leaves
    w, u = -torch.exp(td), tf
    y, _ = W.wkv_reference(td, tf, k, v)
    T = k.shape[1]
    for t in range(T):
        num = torch.exp(u + k[:, t]) * v[:, t]
        den = torch.exp(u + k[:, t])
        for i in range(t):
            e = torch.exp((t - 1 - i) * w + k[:, i])
            num, den = num + e * v[:, i], den + e
        torch.testing.assert_close(y[:, t], num / den)


# ----------------------------------------------------------------------------------------------------------------------
# The CPU kernel against the reference


@pytest.mark.parametrize("B,T,C", FWD_SHAPES, ids=[f"B{b}-T{t}-C{c}" for b, t, c in FWD_SHAPES])
def test_kernel_forward(B, T, C):
    leaves, gy, gstate, y_ref, s_ref, _ = reference_case(B, T, C)
    y, state, _ = run(kernel, leaves, gy, gstate, torch.float32, grads=False)
    assert y.dtype == torch.float32 and state.dtype == torch.float32
    assert y.shape == (B, T, C) and state.shape == (B, 3, C)
    assert rel_err(y, y_ref) < TOL
    assert rel_err(state, s_ref) < TOL


@pytest.mark.parametrize("B,T,C", BWD_SHAPES, ids=[f"B{b}-T{t}-C{c}" for b, t, c in BWD_SHAPES])
def test_kernel_backward(B, T, C):
    leaves, gy, gstate, _, _, ref = reference_case(B, T, C)
    _, _, got = run(kernel, leaves, gy, gstate, torch.float32)
    for name, g, r in zip(("time_decay", "time_first", "k", "v", "state"), got, ref):
        assert g.shape == r.shape, name
        assert rel_err(g, r) < TOL, f"{name}: {rel_err(g, r):.2e}"


def test_kernel_backward_empty_state():
    leaves, gy, gstate = make_inputs(2, 33, 80, seed=4, empty_state=True)
    _, _, ref = run(W.wkv_reference, leaves, gy, gstate, torch.float64)
    _, _, got = run(kernel, leaves, gy, gstate, torch.float32)
    for name, g, r in zip(("time_decay", "time_first", "k", "v", "state"), got, ref):
        assert rel_err(g, r) < TOL, f"{name}: {rel_err(g, r):.2e}"


def test_kernel_bf16_inputs():
    B, T, C = 2, 64, 96
    leaves, gy, gstate = make_inputs(B, T, C, seed=5)
    rounded = list(leaves)
    rounded[2], rounded[3] = leaves[2].to(torch.bfloat16).double(), leaves[3].to(torch.bfloat16).double()
    y_ref, s_ref, g_ref = run(W.wkv_reference, rounded, gy, gstate, torch.float64)
    y, state, got = run(kernel, leaves, gy, gstate, torch.float32, kv_dtype=torch.bfloat16)
    assert y.dtype == torch.float32
    assert got[2].dtype == torch.bfloat16 and got[3].dtype == torch.bfloat16
    assert rel_err(y, y_ref) < 1e-2
    assert rel_err(state, s_ref) < 1e-2
    for name, g, r in zip(("time_decay", "time_first", "k", "v", "state"), got, g_ref):
        assert rel_err(g, r) < 1e-2, f"{name}: {rel_err(g, r):.2e}"


def test_kernel_extreme_values_stay_finite():
    B, T, C = 2, 300, 64
    leaves, gy, gstate = make_inputs(B, T, C, seed=6)
    g = torch.Generator().manual_seed(7)
    leaves[0] = torch.where(torch.arange(C) % 2 == 0, 20.0, -20.0).double()  # w = -4.9e8 and w = -2e-9
    leaves[1] = torch.linspace(-60, 60, C, dtype=torch.float64)
    leaves[2] = (torch.rand(B, T, C, generator=g, dtype=torch.float64) * 2 - 1) * 60
    leaves[2][:, ::7] = 60.0
    leaves[2][:, 3::11] = -60.0
    for empty in (False, True):
        if empty:
            leaves[4] = W.empty_wkv_state(B, C, dtype=torch.float64)
        y, state, grads = run(kernel, leaves, gy, gstate, torch.float32)
        assert torch.isfinite(y).all() and torch.isfinite(state).all()
        for name, gr in zip(("time_decay", "time_first", "k", "v", "state"), grads):
            assert torch.isfinite(gr).all(), name
        y_ref, s_ref, _ = run(W.wkv_reference, leaves, gy, gstate, torch.float64, grads=False)
        assert rel_err(y, y_ref) < 1e-4


def test_kernel_state_carried_across_calls():
    B, T1, T2, C = 2, 37, 50, 96
    leaves, gy, gstate = make_inputs(B, T1 + T2, C, seed=8)
    xs = [x.float().requires_grad_() for x in leaves]
    gy, gstate = gy.float(), gstate.float()

    y, s = kernel(*xs)
    whole = torch.autograd.grad((y * gy).sum() + (s * gstate).sum(), xs)

    td, tf, k, v, s0 = xs
    y1, s1 = kernel(td, tf, k[:, :T1], v[:, :T1], s0)
    y2, s2 = kernel(td, tf, k[:, T1:], v[:, T1:], s1)
    assert rel_err(torch.cat([y1, y2], 1), y) < TOL
    assert rel_err(s2, s) < TOL
    split = torch.autograd.grad((torch.cat([y1, y2], 1) * gy).sum() + (s2 * gstate).sum(), xs)
    for name, g, r in zip(("time_decay", "time_first", "k", "v", "state"), split, whole):
        assert rel_err(g, r) < TOL, f"{name}: {rel_err(g, r):.2e}"


def test_auto_backend_uses_the_kernel_on_cpu():
    assert W.kernel_for(torch.device("cpu")) is not None
    leaves, gy, gstate = make_inputs(1, 16, 32, seed=9)
    y_auto, s_auto, g_auto = run(W.wkv, leaves, gy, gstate, torch.float32)
    y_k, s_k, g_k = run(kernel, leaves, gy, gstate, torch.float32)
    assert torch.equal(y_auto, y_k) and torch.equal(s_auto, s_k)
    for a, b in zip(g_auto, g_k):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------------------------------
# The fallback when the kernel cannot be built


def test_fallback_to_reference_warns_once(monkeypatch):
    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler here")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    monkeypatch.setattr(build, "_extensions", {})  # restored by monkeypatch: the built kernel stays cached for the rest
    leaves, gy, gstate = make_inputs(2, 9, 16, seed=10)
    y_ref, s_ref, g_ref = run(W.wkv_reference, leaves, gy, gstate, torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = run(W.wkv, leaves, gy, gstate, torch.float32)
        second = run(W.wkv, leaves, gy, gstate, torch.float32)
    ours = [w for w in caught if "wkv4 kernel" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    assert "no C++ compiler here" in str(ours[0].message)
    for y, s, grads in (first, second):
        assert torch.equal(y, y_ref) and torch.equal(s, s_ref)
        for a, b in zip(grads, g_ref):
            assert torch.equal(a, b)
    with pytest.raises(RuntimeError):
        W.wkv(*[x.float() for x in leaves], backend="kernel")
