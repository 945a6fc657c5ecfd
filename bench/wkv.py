"""Benchmark of the WKV operator on the CPU: forward + backward tokens/s, reference vs the C++ kernel.

    python bench/wkv.py            # prints a Markdown table

Tokens/s = B*T / (seconds for one forward and one backward). Median over several timed runs after warm-up runs;
the reference (a Python loop over time) is timed on fewer runs. Threads: torch's default (torch.get_num_threads()).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from finetune.ops import wkv4 as W  # noqa: E402

SHAPES = [(1, 1024, 768), (8, 512, 2048)]


def make(B, T, C, dtype):
    g = torch.Generator().manual_seed(0)
    td = (torch.randn(C, generator=g) - 0.5).requires_grad_()
    tf = torch.randn(C, generator=g).requires_grad_()
    k = torch.randn(B, T, C, generator=g).to(dtype).requires_grad_()
    v = torch.randn(B, T, C, generator=g).to(dtype).requires_grad_()
    state = W.empty_wkv_state(B, C).requires_grad_()
    gy = torch.randn(B, T, C, generator=g)
    return (td, tf, k, v, state), gy


def step(backend, inputs, gy):
    y, state = W.wkv(*inputs, backend=backend)
    loss = (y * gy).sum() + state[:, :2].sum()
    torch.autograd.grad(loss, inputs)


def time_it(backend, B, T, C, dtype, warmup, repeats):
    inputs, gy = make(B, T, C, dtype)
    for _ in range(warmup):
        step(backend, inputs, gy)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step(backend, inputs, gy)
        times.append(time.perf_counter() - t0)
    return B * T / statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--ref-repeats", type=int, default=2)
    args = ap.parse_args(argv)
    if W.kernel_for(torch.device("cpu")) is None:
        sys.exit("the CPU WKV kernel could not be built")
    print(f"WKV forward+backward on the CPU, {torch.get_num_threads()} threads, torch {torch.__version__}\n")
    print("| B | T | C | reference fp32 (tok/s) | kernel fp32 (tok/s) | speed-up fp32 | kernel bf16 (tok/s) |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for B, T, C in SHAPES:
        ref = time_it("reference", B, T, C, torch.float32, warmup=1, repeats=args.ref_repeats)
        k32 = time_it("kernel", B, T, C, torch.float32, args.warmup, args.repeats)
        k16 = time_it("kernel", B, T, C, torch.bfloat16, args.warmup, args.repeats)
        print(f"| {B} | {T} | {C} | {ref:,.0f} | {k32:,.0f} | {k32 / ref:.0f}x | {k16:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
