"""Benchmark of the WKV-5/6 operator on the CPU: the C++ kernel against the reference, forward and forward+backward,
and against the matmuls of the RWKV-6 layer around it.

    python bench/wkv6.py                # prints Markdown tables
    python bench/wkv6.py --threads 1    # one thread (torch.set_num_threads)

Times are the median of several runs after warm-up runs (the reference, a Python loop over time that takes minutes
here, is timed once without a warm-up).
The last table times the projections of one 12 x 768 RWKV-6 layer (att receptance/key/value/gate/output, ffn
key/value/receptance; the LoRA and elementwise work left out) forward + backward on the same tokens: the WKV's share
of that is what decides how much it costs a training step (issue 13: within 1.3x of the step without it).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from finetune.ops import wkv6 as W  # noqa: E402

# (B, T, H, N, time the reference's backward too): the 12 x 768 model at ctx 1024, then a batch of 8 of the 24 x 2048
# shape (32 heads), where the reference's autograd graph would hold 8 GB
SHAPES = [(1, 1024, 12, 64, True), (8, 1024, 32, 64, False)]


def make(B, T, H, N, dtype, grad):
    g = torch.Generator().manual_seed(0)
    r, k, v = (torch.randn(B, T, H, N, generator=g).to(dtype) for _ in range(3))
    w = -torch.exp(torch.rand(B, T, H, N, generator=g) * 9 - 8)  # RWKV-6-like log decays: -exp(-8) .. -exp(1)
    u = torch.randn(H, N, generator=g) * 0.5
    state = torch.zeros(B, H, N, N)
    leaves = [x.requires_grad_(grad) for x in (r, w, k, v, u, state)]
    gy = torch.randn(B, T, H, N, generator=g)
    return leaves, gy


def step(backend, leaves, gy, backward):
    if not backward:
        with torch.no_grad():
            W.wkv6(*leaves, backend=backend)
        return
    y, s = W.wkv6(*leaves, backend=backend)
    torch.autograd.grad((y * gy).sum() + s.sum(), leaves)


def median_seconds(fn, warmup, repeats):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def layer_matmuls(T, C, warmup, repeats):
    """fwd+bwd seconds of one RWKV-6 layer's projections on T tokens (fp32): 5 C x C in the time mix, C -> 3.5C -> C
    and C x C in the channel mix."""
    F = int(3.5 * C)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, C, generator=g, requires_grad=True)
    att = [torch.randn(C, C, generator=g, requires_grad=True) for _ in range(5)]
    fk, fv, fr = (torch.randn(*s, generator=g, requires_grad=True) for s in ((F, C), (C, F), (C, C)))
    params = [x, *att, fk, fv, fr]

    def run():
        outs = [x @ m.t() for m in att] + [torch.relu(x @ fk.t()) ** 2 @ fv.t(), x @ fr.t()]
        torch.autograd.grad(sum(o.sum() for o in outs), params)

    return median_seconds(run, warmup, repeats)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--ref-repeats", type=int, default=1, help="timed runs of the reference (no warm-up)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if W.kernel_for(torch.device("cpu")) is None:
        sys.exit("the CPU WKV-5/6 kernel could not be built")
    print(f"WKV-5/6 on the CPU, {torch.get_num_threads()} threads, torch {torch.__version__}\n")
    print("| B | T | H | N | pass | reference fp32 (ms) | kernel fp32 (ms) | speed-up | kernel bf16 (ms) | "
          "kernel fp32 (tok/s) |")
    print("|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|")
    wkv_fb = {}
    for B, T, H, N, ref_bwd in SHAPES:
        for backward in (False, True):
            leaves32, gy = make(B, T, H, N, torch.float32, backward)
            leaves16, _ = make(B, T, H, N, torch.bfloat16, backward)
            ref = None
            if ref_bwd or not backward:
                ref = median_seconds(lambda: step("reference", leaves32, gy, backward), 0, args.ref_repeats)
            k32 = median_seconds(lambda: step("kernel", leaves32, gy, backward), args.warmup, args.repeats)
            k16 = median_seconds(lambda: step("kernel", leaves16, gy, backward), args.warmup, args.repeats)
            if backward:
                wkv_fb[(B, T, H, N)] = k32
            ref_s = f"{ref * 1e3:,.1f}" if ref else "-"
            up = f"{ref / k32:,.0f}x" if ref else "-"
            print(f"| {B} | {T} | {H} | {N} | {'fwd+bwd' if backward else 'fwd'} | {ref_s} | {k32 * 1e3:,.1f} | {up} | "
                  f"{k16 * 1e3:,.1f} | {B * T / k32:,.0f} |", flush=True)

    B, T, H, N, _ = SHAPES[0]
    mm = layer_matmuls(B * T, H * N, 1, 3)
    share = wkv_fb[(B, T, H, N)] / mm
    print(f"\nOne RWKV-6 layer at C = {H * N}, {B * T} tokens, fp32, forward + backward:\n")
    print("| what | ms | vs the projections |")
    print("|---|---:|---:|")
    print(f"| projections (r, k, v, g, o; ffn key, value, receptance) | {mm * 1e3:,.1f} | 1.00x |")
    print(f"| WKV-5/6 kernel | {wkv_fb[(B, T, H, N)] * 1e3:,.1f} | {share:.3f}x |")
    print(f"\nA training step with the WKV costs at most {1 + share:.2f}x the step without it (the head, LoRA and "
          "elementwise work only lower that).")


if __name__ == "__main__":
    main()
