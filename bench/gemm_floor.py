"""What batching can buy when decoding on this CPU: every weight matrix of an RWKV-4 (n_embd C, vocab V) by batch
size and layout.

    python bench/gemm_floor.py [--threads 1] [--vocab 65536] [--n-embd 768] [--hint 8]

Decoding one token per stream multiplies a [B, C] activation by every weight matrix. At B = 1 that is bound by
memory (the matrix is streamed once per token); batching streams reuses each streamed weight for B rows, so on a
machine with spare arithmetic B rows cost little more than one. This prints the time and GFLOPS of x @ W^T for
B = 1..16 and the shapes C x C (att, ffn.receptance), 4C x C (ffn.key), C x 4C (ffn.value) and V x C (head), with W
row-major (as stored in checkpoints), column-major (how the models keep their tall matrices,
`finetune.models.family.tall_weights_column_major_`), prepacked by oneDNN for batch `--hint`, and in the 24-column
panels of `finetune.ops.rows_matmul` (what the serving engine multiplies decode steps with,
`finetune.serve.engine.PackedLinear`): where GFLOPS stop growing with B,
batching stops paying and the aggregate throughput of `rwkv-lora serve` at B streams is bounded by
B x (time at 1) / (time at B).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from finetune.ops import rows_matmul


def timed(f, repeat: int) -> float:
    f()
    times = []
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(repeat):
            f()
        times.append((time.perf_counter() - t) / repeat)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--vocab", type=int, default=65536)
    ap.add_argument("--n-embd", type=int, default=768)
    ap.add_argument("--hint", type=int, default=8, help="the batch size oneDNN packs the weights for")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    C, V = args.n_embd, args.vocab
    packed = torch.backends.mkldnn.is_available()
    print(f"x [B, in] @ W^T, fp32, {args.threads} thread(s), best of 3 x (~50 ms); packed: oneDNN "
          f"`_reorder_linear_weight(W, {args.hint})` + `_linear_pointwise`; panels: `finetune.ops.rows_matmul`\n")
    for out_f, in_f, name in ((C, C, "att / ffn.receptance"), (4 * C, C, "ffn.key"), (C, 4 * C, "ffn.value"),
                              (V, C, "head")):
        W = torch.randn(out_f, in_f)
        layouts = {"row-major": lambda x, W=W: F.linear(x, W)}
        if out_f > in_f:
            Wc = W.t().contiguous().t()
            layouts["column-major"] = lambda x, Wc=Wc: F.linear(x, Wc)
        if packed:
            pw = torch.ops.mkldnn._reorder_linear_weight(W, args.hint)
            layouts["packed"] = lambda x, pw=pw: torch.ops.mkldnn._linear_pointwise(x, pw, None, "none", [], "")
        panels = rows_matmul.pack(W)
        if panels is not None:
            layouts["panels"] = lambda x, p=panels, n=out_f: rows_matmul.matmul(x, p, n)
        repeat = max(3, int(0.05 / (2 * out_f * in_f / 10e9)))
        print(f"W {out_f} x {in_f} ({name})\n")
        print("| B | " + " | ".join(f"{k} ms | {k} GFLOPS" for k in layouts) + " | B x t(1) / t(B), best layouts |")
        print("|---:|" + "---:|---:|" * len(layouts) + "---:|")
        first = None
        for B in args.batches:
            x = torch.randn(B, in_f)
            row = []
            best = float("inf")
            for f in layouts.values():
                dt = timed(lambda: f(x), repeat)
                best = min(best, dt)
                row += [f"{dt * 1e3:.3f}", f"{2 * B * out_f * in_f / dt / 1e9:.1f}"]
            first = first or best
            print(f"| {B} | " + " | ".join(row) + f" | {B * first / best:.2f}x |")
        print()


if __name__ == "__main__":
    main()
