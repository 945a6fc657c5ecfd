"""The trainer in fp32 and bf16-mixed on this machine's CPU: the speed-up users get from `precision: bf16-mixed`.

    python bench/train_precision.py                       # the README table (a few minutes)
    python bench/train_precision.py --shapes 7:12:768:65536:1:256 --steps 4

bf16-mixed holds the frozen base in bf16 and runs the forward and backward passes under `torch.autocast(bfloat16)`
(LoRA weights, optimizer and WKV state stay fp32). It only pays on CPUs that multiply bf16 natively (AVX512-BF16,
AMX: `torch.ops.mkldnn._is_mkldnn_bf16_supported()`); elsewhere bf16 matmuls are emulated and slower than fp32, and
the table says so instead of timing them.

Each shape is a random checkpoint from `rwkv-lora init` (`arch:layers:width:vocab:B:T`) trained on random tokens by
the trainer itself (`finetune.train.main`, Lightning, LoRA r=8 alpha 16 on att and ffn, AdamW), fp32 then bf16-mixed
in the same run, and by the plain loop (the same model, loss and optimizer without Lightning) as a check that the
ratio is the model's and not the trainer's. Tokens/s are medians of the steps after the warm-up, as metrics.csv
records them. The GPU version of this table is in `bench/gpu_check.py --trainer-only`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpu_check import loop_run, table, trainer_run, write_random_corpus  # noqa: E402  (bench/ is not a package)

DEFAULT_SHAPES = ["7:12:768:65536:1:256", "7:12:768:65536:1:1024", "4:12:768:50277:1:256", "4:12:768:50277:1:1024"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="arch:layers:width:vocab:B:T")
    ap.add_argument("--steps", type=int, default=6, help="steps per run; the median of those after --warmup")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    print(f"CPU: {torch.backends.cpu.get_cpu_capability()}, native bf16 matmul: {native}, "
          f"{torch.get_num_threads()} threads", flush=True)
    if not native:
        print("this CPU emulates bf16 matmuls: bf16-mixed is slower than fp32 here; use precision: 32")
        return
    from finetune.cli import main as cli_main

    device = torch.device("cpu")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for shape in args.shapes:
            arch, L, C, V, B, T = shape.split(":")
            L, C, V, B, T = int(L), int(C), int(V), int(B), int(T)
            pth, data = work / f"v{arch}-{L}x{C}-{V}.pth", work / f"tokens-{V}"
            if not pth.exists():
                cli_main(["init", "--arch", arch, "--n-layer", str(L), "--n-embd", str(C), "--vocab", str(V),
                          "--out", str(pth)])
            if not data.with_suffix(".bin").exists():
                write_random_corpus(data, V, 1 << 20, seed=0)
            got, loop = {}, {}
            for precision in ("32", "bf16-mixed"):
                t0 = time.perf_counter()
                got[precision] = trainer_run(device, pth, data, work / f"out-{shape}-{precision}", precision, B, T,
                                             args.steps, args.warmup)
                loop[precision] = loop_run(device, pth, data, work / f"loop-{shape}-{precision}", precision, B, T,
                                           args.steps, args.warmup)[0]
                print(f"  RWKV-{arch} {L}x{C} B={B} T={T} {precision}: trainer {got[precision][0]:,.0f} tok/s, "
                      f"plain loop {loop[precision]:,.0f} tok/s ({time.perf_counter() - t0:.0f} s)", flush=True)
            (f32, _, l32), (b16, _, lb16) = got["32"], got["bf16-mixed"]
            rows.append([f"RWKV-{arch} {L} x {C}, vocab {V}", f"{B} x {T}", f"{f32:,.0f}", f"{b16:,.0f}",
                         f"**{b16 / f32:.2f}x**", f"{loop['32']:,.0f} / {loop['bf16-mixed']:,.0f} "
                         f"({loop['bf16-mixed'] / loop['32']:.2f}x)", f"{l32:.3f} / {lb16:.3f}"])
    print()
    print(table(["model", "B x T", "fp32 tok/s", "bf16-mixed tok/s", "bf16 / fp32", "plain loop fp32 / bf16 tok/s",
                 "last loss fp32 / bf16"], rows))


if __name__ == "__main__":
    main()
