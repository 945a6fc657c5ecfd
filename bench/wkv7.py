"""Benchmark of the RWKV-7 WKV operator on the CPU: the C++ kernel against the reference, and against a chunked
(matrix-form) formulation.

    python bench/wkv7.py                  # prints two Markdown tables
    python bench/wkv7.py --threads 1 --cpu-time   # one thread, timed in CPU seconds of this process: on a busy
                                                  # shared machine, the least disturbed by the other processes

Table 1: tokens/s (B*T per second) of the forward alone (no gradients) and of forward + backward (gradients of every
input and of the incoming state), kernel fp32 / bf16 against the reference fp32. The reference is a Python loop
over time whose cost is linear in T: it is timed on the first `--ref-steps` steps only.

Table 2: training cost (forward + backward) of the sequential kernel against `wkv7_chunked` below, at T = 1024,
B = 1, H = 12, N = 64, for chunk sizes 16, 32 and 64.

Median over `--repeats` timed runs after a warm-up; the candidates of one shape are timed in turn inside each
repeat, so that load from other processes falls on all of them alike. Quote the ratios on a busy machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from finetune.ops import wkv7 as W  # noqa: E402

SHAPES = [(1, 1024, 12), (4, 512, 16), (1, 2048, 32)]  # (B, T, H): 0.1B, 0.4B and 1.5B-wide RWKV-7 layers
N = 64
CHUNKS = (16, 32, 64)


def wkv7_chunked(r, w, k, v, a, b, state=None, chunk=16):
    """WKV-7 in chunked matrix form (the "WY / UT" representation of a product of identity-plus-rank-one
    transitions), plain PyTorch; autograd does the backward. Same contract as `wkv7_reference`.

    Per head and chunk of L steps, with g_t = w_1 + ... + w_t (log of the cumulative decay inside the chunk) and S0
    the state entering the chunk, S_t = S_{t-1} (diag(e^{w_t}) + a_t b_t^T) + v_t k_t^T becomes, divided column-wise
    by e^{g_t}, a sum of rank-one terms: S_t e^{-g_t} = S0 + sum_{s<=t} (u_s (b_s e^{-g_s})^T + v_s (k_s e^{-g_s})^T)
    with u_t = S_{t-1} a_t (the kernel's sa). The u_t of a chunk solve one unit lower-triangular L x L system,
        (I - M_ab) U = A^ S0^T + M_ak V,   M_ab[t, s] = (a_t e^{g_{t-1}}) . (b_s e^{-g_s}),  s < t  (M_ak: k for b),
    written U = W_ S0^T + U_v. Then Y = P S0^T + Y0 and S_L = S0 e^{g_L} + U^T Bbar + V^T Kbar (rows of Bbar, Kbar:
    b_s, k_s times e^{g_L - g_s}). Everything but the last three products is computed for all chunks at once; those
    run chunk after chunk (L N^2 each, no N^3 chunk-to-chunk matrix). About 9 L N + 4 N^2 multiply-adds per token
    and head, against 5 N^2 for the sequential recurrence. e^{-g} is at most e^{0.61 L} (RWKV-7's decays): fine in
    fp32 up to L = 128.
    """
    B, T, H, N_ = r.shape
    dt = torch.float64 if r.dtype == torch.float64 else torch.float32
    L = chunk
    nc = -(-T // L)
    pad = nc * L - T  # padding steps with w = k = v = a = b = 0 leave the state as it is

    def prep(x):
        x = x.to(dt)
        if pad:
            x = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad))
        return x.view(B, nc, L, H, N_).permute(1, 0, 3, 2, 4)  # [nc, B, H, L, N]

    r, w, k, v, a, b = map(prep, (r, w, k, v, a, b))
    S = torch.zeros(B, H, N_, N_, dtype=dt, device=r.device) if state is None else state.to(dt)
    g = w.cumsum(-2)
    g_last = g[..., -1:, :]
    a_hat = a * torch.exp(g - w)
    b_til = b * torch.exp(-g)
    k_til = k * torch.exp(-g)
    r_hat = r * torch.exp(g)
    b_bar = b * torch.exp(g_last - g)
    k_bar = k * torch.exp(g_last - g)
    strict = torch.ones(L, L, dtype=torch.bool, device=r.device).tril(-1)
    incl = torch.ones(L, L, dtype=torch.bool, device=r.device).tril()
    m_ab = (a_hat @ b_til.transpose(-1, -2)).masked_fill(~strict, 0)
    m_ak = (a_hat @ k_til.transpose(-1, -2)).masked_fill(~strict, 0)
    q_rb = (r_hat @ b_til.transpose(-1, -2)).masked_fill(~incl, 0)
    q_rk = (r_hat @ k_til.transpose(-1, -2)).masked_fill(~incl, 0)
    eye = torch.eye(L, dtype=dt, device=r.device)
    x = torch.linalg.solve_triangular(eye - m_ab, torch.cat([a_hat, m_ak @ v], -1), upper=False, unitriangular=True)
    w_, u_v = x[..., :N_], x[..., N_:]
    p = r_hat + q_rb @ w_
    y0 = q_rb @ u_v + q_rk @ v
    ys = []
    # unbind, not x[c]: the backward of nc slices would build nc full-size gradients
    for wc, uvc, pc, y0c, dc, bc, vc, kc in zip(*(t.unbind(0) for t in (w_, u_v, p, y0, torch.exp(g_last), b_bar, v,
                                                                         k_bar))):
        st = S.transpose(-1, -2)
        u = wc @ st + uvc
        ys.append(pc @ st + y0c)
        S = S * dc + u.transpose(-1, -2) @ bc + vc.transpose(-1, -2) @ kc
    y = torch.stack(ys, 0).permute(1, 0, 3, 2, 4).reshape(B, nc * L, H, N_)[:, :T]
    return y, S


def make(B, T, H, dtype=torch.float32, seed=0):
    """Inputs shaped as the RWKV-7 model makes them (w in [-0.61, 0], a = -kk, b = kk * iclr), and output grads."""
    g = torch.Generator().manual_seed(seed)
    shape = (B, T, H, N)
    r = torch.randn(shape, generator=g)
    w = -0.6065306597 * torch.sigmoid(torch.randn(shape, generator=g) * 2)
    k = torch.randn(shape, generator=g) * 0.5
    v = torch.randn(shape, generator=g)
    kk = torch.nn.functional.normalize(torch.randn(shape, generator=g), dim=-1)
    a, b = -kk, kk * torch.sigmoid(torch.randn(shape, generator=g))
    state = torch.randn(B, H, N, N, generator=g) * 0.1
    xs = [x.to(dtype) for x in (r, w, k, v, a, b)] + [state]
    return xs, torch.randn(shape, generator=g), torch.randn(B, H, N, N, generator=g)


def forward_only(fn, xs):
    with torch.no_grad():
        fn(*xs)


def forward_backward(fn, xs, gy, gs):
    leaves = [x.detach().requires_grad_() for x in xs]
    y, s = fn(*leaves)
    torch.autograd.grad((y * gy).sum() + (s * gs).sum(), leaves)


CLOCK = time.perf_counter


def time_cases(cases: dict, repeats: int, warmup: int = 1) -> dict:
    """Median seconds per call of each zero-argument callable, timed in turn within each repeat."""
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            t0 = CLOCK()
            fn()
            times[name].append(CLOCK() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def kernel(*a):
    return W.wkv7(*a, backend="kernel")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--ref-steps", type=int, default=64, help="steps on which the reference is timed")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--shapes", default=None, help="B,T,H;B,T,H;... instead of the default shapes")
    ap.add_argument("--cpu-time", action="store_true",
                    help="time in CPU seconds of this process (time.process_time) instead of wall-clock seconds")
    ap.add_argument("--skip-chunked", action="store_true")
    args = ap.parse_args(argv)
    global CLOCK
    CLOCK = time.process_time if args.cpu_time else time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = ([tuple(int(x) for x in s.split(",")) for s in args.shapes.split(";")] if args.shapes else SHAPES)
    if W.kernel_for(torch.device("cpu")) is None:
        sys.exit("the CPU WKV-7 kernel could not be built")
    ext = W.kernel_for(torch.device("cpu"))
    print(f"WKV-7 on the CPU, N = {N}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"state checkpoint every {ext.checkpoint_interval()} steps, "
          f"{'CPU' if args.cpu_time else 'wall-clock'} time\n")

    print("| B | T | H | pass | reference fp32 (tok/s) | kernel fp32 (tok/s) | speed-up | kernel bf16 (tok/s) |")
    print("|---:|---:|---:|---|---:|---:|---:|---:|")
    for B, T, H in shapes:
        xs32, gy, gs = make(B, T, H)
        xs16 = [x.to(torch.bfloat16) for x in xs32[:6]] + [xs32[6]]
        t_ref = min(T, args.ref_steps)
        ref_xs = [x[:, :t_ref] for x in xs32[:6]] + [xs32[6]]
        for name, runner in (("forward", forward_only), ("forward+backward", forward_backward)):
            extra = (gy, gs) if runner is forward_backward else ()
            extra_ref = (gy[:, :t_ref], gs) if runner is forward_backward else ()
            sec = time_cases({
                "ref": lambda: runner(W.wkv7_reference, ref_xs, *extra_ref),
                "k32": lambda: runner(kernel, xs32, *extra),
                "k16": lambda: runner(kernel, xs16, *extra),
            }, repeats=args.repeats)
            ref, k32, k16 = B * t_ref / sec["ref"], B * T / sec["k32"], B * T / sec["k16"]
            print(f"| {B} | {T} | {H} | {name} | {ref:,.0f} | {k32:,.0f} | {k32 / ref:,.0f}x | {k16:,.0f} |",
                  flush=True)

    if args.skip_chunked:
        return
    B, T, H = 1, 1024, 12
    print(f"\nTraining cost, sequential kernel vs chunked (PyTorch matrix form), B={B} T={T} H={H} N={N}, fp32\n")
    print("| method | forward (tok/s) | forward+backward (tok/s) | fwd+bwd time vs kernel | max rel. diff of y "
          "vs kernel |")
    print("|---|---:|---:|---:|---:|")
    xs, gy, gs = make(B, T, H)
    methods = {"sequential kernel": kernel}
    for L in CHUNKS:
        methods[f"chunked, L = {L}"] = (lambda L: lambda *a: wkv7_chunked(*a, chunk=L))(L)
    fwd = time_cases({m: (lambda fn: lambda: forward_only(fn, xs))(fn) for m, fn in methods.items()}, args.repeats)
    fb = time_cases({m: (lambda fn: lambda: forward_backward(fn, xs, gy, gs))(fn) for m, fn in methods.items()},
                    args.repeats)
    with torch.no_grad():
        y_k, _ = kernel(*xs)
        for m, fn in methods.items():
            y, _ = fn(*xs)
            diff = ((y - y_k).abs().max() / y_k.abs().max()).item()
            print(f"| {m} | {B * T / fwd[m]:,.0f} | {B * T / fb[m]:,.0f} | "
                  f"{fb[m] / fb['sequential kernel']:.2f}x | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
