"""The WKV-5/6 operator: the reference against autograd's numerical check and the unrolled sums, the CPU kernel against
the float64 reference."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch

from finetune.ops import build
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


# ----------------------------------------------------------------------------------------------------------------------
# The CPU kernel against the float64 reference

TOL = 1e-5
NAMES = ("r", "w", "k", "v", "u", "state")

# every value of each axis (T in 1, 7, 512, 4096; B in 1, 3; H in 1, 8; N = 64) without the full cross product: the
# float64 reference is a Python loop over time, and its autograd graph holds T states of B*H*N*N
FWD_SHAPES = [(1, 1, 1, 64), (3, 1, 8, 64), (1, 7, 8, 64), (3, 7, 1, 64), (1, 128, 8, 64), (3, 512, 1, 64),
              (1, 4096, 1, 64), (3, 4096, 1, 64)]
BWD_SHAPES = [(1, 1, 1, 64), (3, 1, 8, 64), (1, 7, 8, 64), (3, 7, 1, 64), (3, 512, 1, 64)]
SLOW_BWD_SHAPES = [(1, 4096, 1, 64)]  # ~10 s of float64 autograd


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Max-abs error relative to the max-abs of the reference tensor."""
    return ((got.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


def run(fn, leaves, gy, gstate, dtype, grads=True, rkv_dtype=None):
    """y, state and (if grads) the gradients of sum(y*gy) + sum(state*gstate) for the six leaves (five when the
    state is None)."""
    xs = [x.detach().to(dtype) for x in leaves if x is not None]
    if rkv_dtype is not None:
        for i in (0, 2, 3):
            xs[i] = xs[i].to(rkv_dtype)
    with torch.set_grad_enabled(grads):
        xs = [x.requires_grad_(grads) for x in xs]
        y, state = fn(*xs)
        if not grads:
            return y, state, None
        loss = (y * gy.to(y.dtype)).sum() + (state * gstate.to(state.dtype)).sum()
        return y, state, torch.autograd.grad(loss, xs)


def kernel(*args):
    return W.wkv6(*args, backend="kernel")


@functools.lru_cache(maxsize=None)
def reference_case(B: int, T: int, H: int, N: int, grads: bool):
    leaves, gy, gstate = make_inputs(B, T, H, N)
    y, state, g = run(W.wkv6_reference, leaves, gy, gstate, torch.float64, grads=grads)
    return leaves, gy, gstate, y.detach(), state.detach(), g


def check_grads(got, ref, tol=TOL):
    for name, g, r in zip(NAMES, got, ref):
        assert g.shape == r.shape, name
        assert torch.isfinite(g).all(), name
        assert rel_err(g, r) < tol, f"{name}: {rel_err(g, r):.2e}"


@pytest.mark.parametrize("B,T,H,N", FWD_SHAPES, ids=[f"B{b}-T{t}-H{h}-N{n}" for b, t, h, n in FWD_SHAPES])
def test_kernel_forward(B, T, H, N):
    leaves, gy, gstate, y_ref, s_ref, _ = reference_case(B, T, H, N, (B, T, H, N) in BWD_SHAPES)
    y, state, _ = run(kernel, leaves, gy, gstate, torch.float32, grads=False)
    assert y.dtype == torch.float32 and state.dtype == torch.float32
    assert y.shape == (B, T, H, N) and state.shape == (B, H, N, N)
    assert rel_err(y, y_ref) < TOL
    assert rel_err(state, s_ref) < TOL


@pytest.mark.parametrize("B,T,H,N", BWD_SHAPES + [pytest.param(*s, marks=pytest.mark.slow) for s in SLOW_BWD_SHAPES],
                         ids=[f"B{b}-T{t}-H{h}-N{n}" for b, t, h, n in BWD_SHAPES + SLOW_BWD_SHAPES])
def test_kernel_backward(B, T, H, N):
    leaves, gy, gstate, _, _, ref = reference_case(B, T, H, N, True)
    _, _, got = run(kernel, leaves, gy, gstate, torch.float32)
    check_grads(got, ref)


@pytest.mark.parametrize("col_blocks", [1, 2, 4])
@pytest.mark.parametrize("ckpt_every", [1, 3, 16, 40, 1000])
def test_kernel_column_blocks_and_checkpoints(col_blocks, ckpt_every):
    """Every way of cutting the work: heads split into 1, 2 or 4 column blocks (partial sums added up), checkpoints
    every step, every 3 (T not a multiple), 16, 40 (= T) and 1000 (> T) steps."""
    ext = W.kernel_for(torch.device("cpu"))
    leaves, gy, gstate, y_ref, s_ref, ref = reference_case(2, 40, 3, 64, True)
    xs = [x.float().contiguous() for x in leaves]
    y, s = ext.forward(*xs, col_blocks)
    assert rel_err(y, y_ref) < TOL and rel_err(s, s_ref) < TOL
    check_grads(ext.backward(*xs, gy.float(), gstate.float(), col_blocks, ckpt_every), ref)


@pytest.mark.parametrize("N", [1, 5, 48])
def test_kernel_other_head_sizes(N):
    leaves, gy, gstate, y_ref, s_ref, ref = reference_case(2, 19, 2, N, True)
    y, state, got = run(kernel, leaves, gy, gstate, torch.float32)
    assert rel_err(y, y_ref) < TOL and rel_err(state, s_ref) < TOL
    check_grads(got, ref)


def test_kernel_empty_state():
    leaves, gy, gstate = make_inputs(2, 33, 2, 64, seed=4, empty_state=True)
    y_ref, s_ref, ref = run(W.wkv6_reference, leaves, gy, gstate, torch.float64)
    y, state, got = run(kernel, leaves, gy, gstate, torch.float32)
    assert rel_err(y, y_ref) < TOL and rel_err(state, s_ref) < TOL
    check_grads(got, ref[:5])


def test_kernel_bf16_inputs():
    """r, k, v in bf16: the kernel computes in fp32 from the same rounded values, so y and the state stay at fp32
    accuracy; the gradients of r, k, v come back in bf16 (one rounding, 2^-9 relative)."""
    leaves, gy, gstate = make_inputs(2, 64, 2, 64, seed=5)
    rounded = list(leaves)
    for i in (0, 2, 3):
        rounded[i] = leaves[i].to(torch.bfloat16).double()
    y_ref, s_ref, ref = run(W.wkv6_reference, rounded, gy, gstate, torch.float64)
    y, state, got = run(kernel, leaves, gy, gstate, torch.float32, rkv_dtype=torch.bfloat16)
    assert y.dtype == torch.float32 and state.dtype == torch.float32
    assert rel_err(y, y_ref) < TOL and rel_err(state, s_ref) < TOL
    assert [g.dtype for g in got] == [torch.bfloat16, torch.float32, torch.bfloat16, torch.bfloat16, torch.float32,
                                      torch.float32]
    for name, g, r in zip(NAMES, got, ref):
        assert rel_err(g, r) < (4e-3 if g.dtype == torch.bfloat16 else TOL), f"{name}: {rel_err(g, r):.2e}"


def test_kernel_all_bf16():
    """Everything in bf16 (w, u and the state too): accepted, computed in fp32, gradients in the inputs' dtypes."""
    leaves, gy, gstate = make_inputs(1, 16, 2, 64, seed=11, log_decay_range=(-3.0, 1.0))
    rounded = [x.to(torch.bfloat16).double() for x in leaves]
    y_ref, s_ref, ref = run(W.wkv6_reference, rounded, gy, gstate, torch.float64)
    y, state, got = run(kernel, rounded, gy, gstate, torch.bfloat16)
    assert y.dtype == torch.float32 and rel_err(y, y_ref) < TOL and rel_err(state, s_ref) < TOL
    assert all(g.dtype == torch.bfloat16 for g in got)
    for name, g, r in zip(NAMES, got, ref):
        assert rel_err(g, r) < 4e-3, f"{name}: {rel_err(g, r):.2e}"


def test_kernel_extreme_values_stay_finite():
    """Decays from exactly 1 (w = 0) and 1 - 2e-9 to e^-148 and exactly 0 (w = -inf), large r, k, v and state."""
    B, T, H, N = 2, 300, 2, 64
    leaves, gy, gstate = make_inputs(B, T, H, N, seed=6)
    g = torch.Generator().manual_seed(7)
    w = leaves[1]
    w[..., 0] = 0.0
    w[..., 1] = -float("inf")
    w[:, ::5, :, 2:10] = -torch.exp(torch.tensor(5.0, dtype=torch.float64))
    for i in (0, 2, 3):
        leaves[i] = leaves[i] * 30
    leaves[2][:, ::7] = 60.0
    leaves[5] = torch.randn(B, H, N, N, generator=g, dtype=torch.float64) * 1e4
    y_ref, s_ref, ref = run(W.wkv6_reference, leaves, gy, gstate, torch.float64)
    assert all(torch.isfinite(x).all() for x in (y_ref, s_ref, *ref))  # the case is well posed
    y, state, got = run(kernel, leaves, gy, gstate, torch.float32)
    assert torch.isfinite(y).all() and torch.isfinite(state).all()
    assert rel_err(y, y_ref) < TOL and rel_err(state, s_ref) < TOL
    check_grads(got, ref)


def test_kernel_state_carried_across_calls():
    """Two calls carrying the state give the one-call outputs and gradients (what chunked training relies on)."""
    B, T1, T2, H, N = 2, 37, 50, 2, 64
    leaves, gy, gstate = make_inputs(B, T1 + T2, H, N, seed=8)
    xs = [x.float().requires_grad_() for x in leaves]
    gy, gstate = gy.float(), gstate.float()
    y, s = kernel(*xs)
    whole = torch.autograd.grad((y * gy).sum() + (s * gstate).sum(), xs)
    r, w, k, v, u, s0 = xs
    y1, s1 = kernel(r[:, :T1], w[:, :T1], k[:, :T1], v[:, :T1], u, s0)
    y2, s2 = kernel(r[:, T1:], w[:, T1:], k[:, T1:], v[:, T1:], u, s1)
    assert rel_err(torch.cat([y1, y2], 1), y) < TOL
    assert rel_err(s2, s) < TOL
    split = torch.autograd.grad((torch.cat([y1, y2], 1) * gy).sum() + (s2 * gstate).sum(), xs)
    check_grads(split, whole)


def test_kernel_non_contiguous_inputs():
    """Inputs as the model produces them (views of [B, T, C] projections, a transposed state) are accepted."""
    B, T, H, N = 2, 9, 2, 64
    leaves, gy, gstate = make_inputs(B, T, H, N, seed=9)
    y_ref, s_ref, ref = run(W.wkv6_reference, leaves, gy, gstate, torch.float64)
    xs = [x.float() for x in leaves]
    wide = torch.cat([xs[0], xs[2]], -1)  # r and k as slices of one wider tensor: not contiguous
    r, k = wide[..., :N], wide[..., N:]
    state = xs[5].transpose(-1, -2).contiguous().transpose(-1, -2)
    assert not (r.is_contiguous() or k.is_contiguous() or state.is_contiguous())
    y, s = kernel(r, xs[1], k, xs[3], xs[4], state)
    assert rel_err(y, y_ref) < TOL and rel_err(s, s_ref) < TOL


def test_zero_length_sequence():
    leaves, _, _ = make_inputs(2, 0, 2, 8, seed=10)
    y, s = W.wkv6(*[x.float() for x in leaves])
    assert y.shape == (2, 0, 2, 8) and torch.equal(s, leaves[5].float())


def test_auto_backend_uses_the_kernel_on_cpu():
    assert W.kernel_for(torch.device("cpu")) is not None
    leaves, gy, gstate = make_inputs(1, 16, 2, 32, seed=12)
    y_auto, s_auto, g_auto = run(W.wkv6, leaves, gy, gstate, torch.float32)
    y_k, s_k, g_k = run(kernel, leaves, gy, gstate, torch.float32)
    assert torch.equal(y_auto, y_k) and torch.equal(s_auto, s_k)
    for a, b in zip(g_auto, g_k):
        assert torch.equal(a, b)
    # float64 inputs go to the reference, which is then exact
    y64, s64, _ = run(W.wkv6, leaves, gy, gstate, torch.float64, grads=False)
    assert y64.dtype == torch.float64
    with pytest.raises(RuntimeError):
        W.wkv6(*leaves, backend="kernel")


# ----------------------------------------------------------------------------------------------------------------------
# The fallback when the kernel cannot be built


def test_fallback_to_reference_warns_once(monkeypatch):
    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler here")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    monkeypatch.setattr(build, "_extensions", {})  # restored by monkeypatch: the built kernel stays cached for the rest
    leaves, gy, gstate = make_inputs(2, 9, 2, 16, seed=13)
    y_ref, s_ref, g_ref = run(W.wkv6_reference, leaves, gy, gstate, torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = run(W.wkv6, leaves, gy, gstate, torch.float32)
        second = run(W.wkv6, leaves, gy, gstate, torch.float32)
    ours = [w for w in caught if "wkv6 kernel" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    assert "no C++ compiler here" in str(ours[0].message)
    for y, s, grads in (first, second):
        assert torch.equal(y, y_ref) and torch.equal(s, s_ref)
        for a, b in zip(grads, g_ref):
            assert torch.equal(a, b)
    with pytest.raises(RuntimeError):
        W.wkv6(*[x.float() for x in leaves], backend="kernel")
