"""What batching can buy when decoding on this CPU: the head's matmul (vocab 65536 x 768) by batch size and layout.

    python bench/gemm_floor.py [--threads 1] [--vocab 65536] [--n-embd 768]

Decoding one token per stream multiplies a [B, C] activation by every weight matrix. At B = 1 that is bound by
memory (the matrix is streamed once per token); batching streams reuses each streamed weight for B rows, so on a
machine with spare arithmetic B rows cost little more than one. This prints the time and GFLOPS of x @ W^T for
B = 1..16 with W row-major (as stored in checkpoints) and column-major (how the models keep their tall matrices,
`finetune.models.family.tall_weights_column_major_`): where GFLOPS stop growing with B, batching stops paying and
the aggregate throughput of `rwkv-lora serve` at B streams is bounded by B x (time at 1) / (time at B).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--vocab", type=int, default=65536)
    ap.add_argument("--n-embd", type=int, default=768)
    ap.add_argument("--repeat", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    W = torch.randn(args.vocab, args.n_embd)
    layouts = {"row-major": W, "column-major": W.t().contiguous().t()}
    print(f"x [B, {args.n_embd}] @ W^T, W {args.vocab} x {args.n_embd} fp32, {args.threads} thread(s), "
          f"best of 3 x {args.repeat}\n")
    print("| B | " + " | ".join(f"{k} ms | {k} GFLOPS" for k in layouts) + " | B x t(1) / t(B), best layout |")
    print("|---:|" + "---:|---:|" * len(layouts) + "---:|")
    first = None
    for B in (1, 2, 4, 8, 16):
        x = torch.randn(B, args.n_embd)
        row = []
        best = float("inf")
        for w in layouts.values():
            F.linear(x, w)
            times = []
            for _ in range(3):
                t = time.perf_counter()
                for _ in range(args.repeat):
                    F.linear(x, w)
                times.append((time.perf_counter() - t) / args.repeat)
            dt = min(times)
            best = min(best, dt)
            row += [f"{dt * 1e3:.2f}", f"{2 * B * args.vocab * args.n_embd / dt / 1e9:.1f}"]
        first = first or best
        print(f"| {B} | " + " | ".join(row) + f" | {B * first / best:.2f}x |")


if __name__ == "__main__":
    main()
