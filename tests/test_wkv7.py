"""The RWKV-7 WKV operator: the float64 reference against autograd's numerical check and the plain matrix formula,
then the compiled CPU kernel against the float64 reference."""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import pytest
import torch

from finetune.ops import build
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


# ----------------------------------------------------------------------------------------------------------------------
# The CPU kernel against the float64 reference

TOL = 1e-5
# Every value of each axis (T in {1, 7, 512, 4096}, B in {1, 3}, H in {1, 12}; N = 64) without the full cross
# product: the float64 reference costs about 0.3 s of CPU per head at T = 4096 and its autograd 7 times more
# (B = 1, H = 12, T = 512 alone: over a minute on two busy cores).
FWD_SHAPES = [(1, 1, 1), (3, 1, 12), (1, 7, 12), (3, 7, 1), (3, 512, 1), (1, 512, 2), (1, 4096, 1), (3, 4096, 1)]
BWD_SHAPES = [(1, 1, 1), (3, 1, 12), (3, 7, 12), (1, 7, 1), (3, 512, 1), (1, 512, 2), (1, 4096, 1)]


def reference_run(leaves, gy, gstate, grads: bool = True, segment: int = 256):
    """float64 y, state and (if grads) the gradients of L = sum(y * gy) + sum(state * gstate) for all seven leaves,
    by the reference's own autograd, `segment` steps at a time: the state is carried forward between segments and
    its gradient passed back, so memory stays bounded at T = 4096 while the result is the reference's gradient."""
    r, w, k, v, a, b, s0 = leaves
    T = r.shape[1]
    bounds = list(range(0, T, segment)) + [T]
    states, ys = [s0], []
    with torch.no_grad():
        for t0, t1 in zip(bounds[:-1], bounds[1:]):
            y, s = W.wkv7_reference(*(x[:, t0:t1] for x in (r, w, k, v, a, b)), states[-1])
            ys.append(y)
            states.append(s)
    y, state = (torch.cat(ys, 1) if ys else r[:, :0].clone()), states[-1]
    if not grads:
        return y, state, None
    out = [torch.zeros_like(x) for x in (r, w, k, v, a, b)]
    g_state = gstate
    for i in reversed(range(len(bounds) - 1)):
        t0, t1 = bounds[i], bounds[i + 1]
        xs = [x[:, t0:t1].clone().requires_grad_() for x in (r, w, k, v, a, b)] + [states[i].clone().requires_grad_()]
        ys_, s = W.wkv7_reference(*xs)
        parts = torch.autograd.grad((ys_ * gy[:, t0:t1]).sum() + (s * g_state).sum(), xs)
        for g, part in zip(out, parts[:6]):
            g[:, t0:t1] = part
        g_state = parts[6]
    return y, state, out + [g_state]


def run(fn, leaves, gy, gstate, dtype=torch.float32, dtypes=None, grads=True):
    """y, state and (if grads) the gradients of sum(y * gy) + sum(state * gstate) for the seven leaves, each leaf
    cast to `dtype` (or to its entry of `dtypes`)."""
    dtypes = dtypes or [dtype] * 7
    xs = [x.detach().to(dt).requires_grad_(grads) for x, dt in zip(leaves, dtypes)]
    with torch.set_grad_enabled(grads):
        y, state = fn(*xs)
        if not grads:
            return y, state, None
        loss = (y * gy.to(y.dtype)).sum() + (state * gstate.to(state.dtype)).sum()
        return y, state, list(torch.autograd.grad(loss, xs))


def kernel(*args):
    return W.wkv7(*args, backend="kernel")


_cache: dict = {}


def reference_case(B, T, H, with_grads):
    key = (B, T, H, with_grads)
    if key not in _cache:
        leaves, gy, gstate = make_inputs(B, T, H, 64)
        _cache[key] = (leaves, gy, gstate, *reference_run(leaves, gy, gstate, grads=with_grads))
    return _cache[key]


def assert_close_all(got, ref, names, tol=TOL):
    for name, g, r in zip(names, got, ref):
        assert g.shape == r.shape, f"{name}: shape {tuple(g.shape)} != {tuple(r.shape)}"
        assert torch.isfinite(g).all(), f"{name}: not finite"
        err = rel_err(g, r)
        assert err < tol, f"{name}: relative error {err:.2e} (tolerance {tol:.0e})"


@pytest.mark.parametrize("B,T,H", FWD_SHAPES, ids=[f"B{b}-T{t}-H{h}" for b, t, h in FWD_SHAPES])
def test_kernel_forward(B, T, H):
    leaves, gy, gstate, y_ref, s_ref, _ = reference_case(B, T, H, with_grads=False)
    y, state, _ = run(kernel, leaves, gy, gstate, grads=False)
    assert y.dtype == torch.float32 and state.dtype == torch.float32
    assert_close_all([y, state], [y_ref, s_ref], ["y", "state"])


@pytest.mark.parametrize("B,T,H", BWD_SHAPES, ids=[f"B{b}-T{t}-H{h}" for b, t, h in BWD_SHAPES])
def test_kernel_backward(B, T, H):
    leaves, gy, gstate, y_ref, s_ref, g_ref = reference_case(B, T, H, with_grads=True)
    y, state, got = run(kernel, leaves, gy, gstate)
    assert_close_all([y, state, *got], [y_ref, s_ref, *g_ref], ["y", "state_out", *(f"d{n}" for n in NAMES)])


def test_kernel_bf16_inputs():
    """bf16 r, k, v, a, b with w in bf16 or kept in fp32: the kernel computes in fp32 from the rounded values, so y,
    the state and the fp32 gradients match the float64 reference on those values to fp32 precision; the gradients
    of bf16 inputs come back in bf16 (rounded: 2^-8 relative)."""
    B, T, H, N = 2, 40, 3, 64
    leaves, gy, gstate = make_inputs(B, T, H, N, seed=5)
    for w_dtype in (torch.bfloat16, torch.float32):
        dtypes = [torch.bfloat16, w_dtype, *[torch.bfloat16] * 4, torch.float32]
        rounded = [x.to(dt).double() for x, dt in zip(leaves, dtypes)]
        y_ref, s_ref, g_ref = reference_run(rounded, gy, gstate)
        y, state, got = run(kernel, leaves, gy, gstate, dtypes=dtypes)
        assert [g.dtype for g in got] == dtypes
        assert_close_all([y, state, got[6]], [y_ref, s_ref, g_ref[6]], ["y", "state", "dstate"])
        if w_dtype == torch.float32:
            assert_close_all([got[1]], [g_ref[1]], ["dw (fp32)"])
        assert_close_all(got[:6], g_ref[:6], [f"d{n} (bf16)" for n in NAMES[:6]], tol=1e-2)


def test_kernel_extreme_decays_and_zero_kk():
    """w from the model's formula at w0 = +20 (w = -0.6065: the fastest decay) and w0 = -20 (w = -1e-9: no decay at
    all, the state only grows), and kk = 0 (a = b = 0: no delta-rule removal) on whole heads and single steps."""
    B, T, H, N = 1, 200, 4, 64
    leaves, gy, gstate = make_inputs(B, T, H, N, seed=6)
    e = torch.exp(torch.tensor(-0.5, dtype=torch.float64))
    w0 = torch.where(torch.arange(N) % 2 == 0, 20.0, -20.0).double().expand(B, T, H, N).clone()
    w0[:, :, 1] = -20.0  # a head that never forgets
    w0[:, :, 2] = 20.0
    leaves[1] = -e * torch.sigmoid(w0)
    assert leaves[1].min() > -0.61 and leaves[1].max() < -1e-9
    for x in leaves[4:6]:  # a and b
        x[:, :, 1] = 0.0
        x[:, ::5, 3] = 0.0
    y_ref, s_ref, g_ref = reference_run(leaves, gy, gstate)
    y, state, got = run(kernel, leaves, gy, gstate)
    assert_close_all([y, state, *got], [y_ref, s_ref, *g_ref], ["y", "state_out", *(f"d{n}" for n in NAMES)])


def test_kernel_state_carried_across_calls():
    """Two calls chained through the state give the outputs and gradients of one call over the whole sequence."""
    B, T1, T2, H, N = 2, 37, 50, 3, 64
    leaves, gy, gstate = make_inputs(B, T1 + T2, H, N, seed=8)
    xs = [x.float().requires_grad_() for x in leaves]
    gy, gstate = gy.float(), gstate.float()
    y, s = kernel(*xs)
    whole = torch.autograd.grad((y * gy).sum() + (s * gstate).sum(), xs)
    y1, s1 = kernel(*(x[:, :T1] for x in xs[:6]), xs[6])
    y2, s2 = kernel(*(x[:, T1:] for x in xs[:6]), s1)
    assert rel_err(torch.cat([y1, y2], 1), y) < TOL
    assert rel_err(s2, s) < TOL
    split = torch.autograd.grad((torch.cat([y1, y2], 1) * gy).sum() + (s2 * gstate).sum(), xs)
    assert_close_all(split, whole, [f"d{n}" for n in NAMES])


@pytest.mark.parametrize("N", [5, 32, 128])
def test_kernel_other_head_sizes(N):
    """N = 32 and 128 have their own compiled code, other N the run-time-N code (N = 64 is tested above)."""
    leaves, gy, gstate = make_inputs(2, 21, 2, N, seed=9)
    y_ref, s_ref, g_ref = reference_run(leaves, gy, gstate)
    y, state, got = run(kernel, leaves, gy, gstate)
    assert_close_all([y, state, *got], [y_ref, s_ref, *g_ref], ["y", "state_out", *(f"d{n}" for n in NAMES)])


def test_kernel_memory_is_bounded_by_checkpoints():
    """What the forward keeps for the backward: the state every K steps and one [N] vector per step, never T states;
    nothing at all without gradients."""
    ext = W.kernel_for(torch.device("cpu"))
    K = ext.checkpoint_interval()
    assert K > 1
    B, T, H, N = 2, 100, 3, 64
    leaves, gy, gstate = make_inputs(B, T, H, N, seed=10)
    xs = [x.float() for x in leaves]
    _, _, ckpt, sa = ext.forward(*xs, True)
    assert ckpt.shape == (B, H, -(-T // K), N, N) and sa.shape == (B, T, H, N)
    _, _, ckpt, sa = ext.forward(*xs, False)
    assert ckpt.numel() == 0 and sa.numel() == 0
    assert W.checkpoint_bytes(B, T, H, N, K) == 4 * B * H * (-(-T // K) * N * N + T * N)

    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        y, s = kernel(*(x.requires_grad_() for x in xs))
    assert sum(saved) == 6 * B * T * H * N + B * H * -(-T // K) * N * N + B * T * H * N


def test_kernel_non_contiguous_and_partial_gradients():
    """Views (as a model makes them by splitting one projection) and gradients for the state only (state tuning)."""
    B, T, H, N = 2, 19, 3, 64
    leaves, gy, gstate = make_inputs(B, T, H, N, seed=11)
    packed = torch.stack(leaves[:6], dim=3).float()  # [B, T, H, 6, N]: each input a strided view
    views = list(packed.unbind(3))
    assert not views[0].is_contiguous()
    s0 = leaves[6].float().requires_grad_()
    y, s = kernel(*views, s0)
    (g_state,) = torch.autograd.grad((y * gy.float()).sum() + (s * gstate.float()).sum(), [s0])
    y_ref, s_ref, g_ref = reference_run(leaves, gy, gstate)
    assert_close_all([y, s, g_state], [y_ref, s_ref, g_ref[6]], ["y", "state", "dstate"])


def test_auto_backend_uses_the_kernel_on_cpu():
    assert W.kernel_for(torch.device("cpu")) is not None
    leaves, gy, gstate = make_inputs(1, 16, 2, 64, seed=12)
    y_auto, s_auto, g_auto = run(W.wkv7, leaves, gy, gstate)
    y_k, s_k, g_k = run(kernel, leaves, gy, gstate)
    assert torch.equal(y_auto, y_k) and torch.equal(s_auto, s_k)
    for a, b in zip(g_auto, g_k):
        assert torch.equal(a, b)


def test_dispatch_edge_cases():
    leaves, gy, gstate = make_inputs(1, 6, 2, 8, seed=13)
    # float64 goes to the reference under "auto", and "kernel" refuses it
    y, s = W.wkv7(*leaves)
    y_ref, s_ref = W.wkv7_reference(*leaves)
    assert y.dtype == torch.float64 and torch.equal(y, y_ref) and torch.equal(s, s_ref)
    with pytest.raises(RuntimeError, match="float64"):
        W.wkv7(*leaves, backend="kernel")
    with pytest.raises(ValueError):
        W.wkv7(*leaves, backend="fast")
    # no state: the empty one; T = 0: the state comes back unchanged
    xs = [x.float() for x in leaves]
    y, s = W.wkv7(*xs[:6])
    y0, s0 = W.wkv7(*xs[:6], torch.zeros_like(xs[6]))
    assert torch.equal(y, y0) and torch.equal(s, s0)
    y, s = W.wkv7(*(x[:, :0] for x in xs[:6]), xs[6])
    assert y.shape == (1, 0, 2, 8) and torch.equal(s, xs[6])


# ----------------------------------------------------------------------------------------------------------------------
# The fallback when the kernel cannot be built


def test_fallback_to_reference_warns_once(monkeypatch):
    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler here")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    monkeypatch.setattr(build, "_extensions", {})  # restored by monkeypatch: the built kernel stays cached for the rest
    leaves, gy, gstate = make_inputs(2, 9, 2, 16, seed=14)
    y_ref, s_ref, g_ref = run(W.wkv7_reference, leaves, gy, gstate)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = run(W.wkv7, leaves, gy, gstate)
        second = run(W.wkv7, leaves, gy, gstate)
    ours = [w for w in caught if "wkv7 kernel" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    assert "no C++ compiler here" in str(ours[0].message)
    for y, s, grads in (first, second):
        assert torch.equal(y, y_ref) and torch.equal(s, s_ref)
        for a, b in zip(grads, g_ref):
            assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match="did not build"):
        W.wkv7(*[x.float() for x in leaves], backend="kernel")


# ----------------------------------------------------------------------------------------------------------------------
# bench/wkv7.py: the chunked formulation it measures is the operator, and the script runs


def _bench():
    spec = importlib.util.spec_from_file_location("bench_wkv7", Path(__file__).resolve().parent.parent / "bench" /
                                                  "wkv7.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("T,chunk", [(37, 16), (64, 32), (50, 64)])
def test_bench_chunked_formulation_matches_reference(T, chunk):
    """In float64 the chunked form equals the reference to rounding, gradients included (T not a multiple of the
    chunk: padded), and in fp32 it stays within fp32 accuracy."""
    chunked = _bench().wkv7_chunked
    leaves, gy, gstate = make_inputs(2, T, 2, 16, seed=15)
    y_ref, s_ref, g_ref = reference_run(leaves, gy, gstate)
    names = ["y", "state_out", *(f"d{n}" for n in NAMES)]
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        y, s, got = run(lambda *a: chunked(*a, chunk=chunk), leaves, gy, gstate, dtype=dtype)
        assert_close_all([y, s, *got], [y_ref, s_ref, *g_ref], names, tol=tol)


def test_bench_script_runs(capsys):
    _bench().main(["--repeats", "1", "--shapes", "1,8,2", "--ref-steps", "4", "--skip-chunked"])
    out = capsys.readouterr().out
    assert "| 1 | 8 | 2 | forward+backward |" in out


def test_no_checkpoints_without_gradients(monkeypatch):
    """Under torch.no_grad(), or with no input requiring a gradient, the forward keeps nothing for a backward."""
    ext = W.kernel_for(torch.device("cpu"))
    saves = []

    class Spy:
        def forward(self, *args):
            saves.append(args[-1])
            return ext.forward(*args)

    monkeypatch.setattr(W, "kernel_for", lambda device: Spy())
    leaves, _, _ = make_inputs(1, 5, 2, 8, seed=16)
    xs = [x.float().requires_grad_() for x in leaves]
    with torch.no_grad():
        W.wkv7(*xs)
    W.wkv7(*(x.detach() for x in xs))
    W.wkv7(*xs[:6])
    W.wkv7(*(x.detach() for x in xs[:6]), xs[6])  # state tuning: only the state needs a gradient
    assert saves == [False, False, True, True]
