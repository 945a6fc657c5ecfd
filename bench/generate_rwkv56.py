"""Generation benchmark for RWKV-5.2 and RWKV-6: tokens/s of our one-token step against the `rwkv` pip package.

    python bench/generate_rwkv56.py [--version 6] [--n-layer 12 --n-embd 768 --vocab 65536] [--tokens 32] [--jit 1]

A random fp32 checkpoint of the given generation (BlinkDL's layout, head size 64) is written once. Measured one token
at a time, batch 1, after a short warm-up, the engines stepped in turn token by token (best of a few rounds; the
machine is shared): the rwkv
package's `model.forward([token], state)` (cpu fp32, TorchScript on unless --jit 0) and our `model.step([token],
state)`. Prints a Markdown table (and writes it to bench/RESULTS-generate-rwkv<5|6>.md with --write).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def interleaved_tok_per_s(engines: dict[str, Callable[[int, Any], Any]], n: int, clock: Callable[[], float],
                          warmup: int = 4) -> dict[str, float]:
    """Tokens/s of each engine, stepping them in turn one token at a time (so a shared machine's load falls on all
    of them alike)."""
    states: dict[str, Any] = {k: None for k in engines}
    spent = {k: 0.0 for k in engines}
    for i in range(warmup + n):
        token = (i * 7919) % 997 + 1
        for k, step in engines.items():
            t0 = clock()
            states[k] = step(token, states[k])
            if i >= warmup:
                spent[k] += clock() - t0
    return {k: n / spent[k] for k in engines}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--version", choices=["5", "6"], default="6")
    ap.add_argument("--n-layer", type=int, default=12)
    ap.add_argument("--n-embd", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=65536)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--jit", choices=["0", "1"], default="1", help="the rwkv package's RWKV_JIT_ON (default 1)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    ap.add_argument("--cpu-time", action="store_true",
                    help="time by this process's CPU time instead of the wall clock (for a loaded, shared machine; "
                         "best with --threads 1)")
    ap.add_argument("--dir", default="/tmp/bench-generate-rwkv56")
    ap.add_argument("--write", action="store_true", help="write bench/RESULTS-generate-rwkv<5|6>.md")
    args = ap.parse_args()
    os.environ["RWKV_JIT_ON"] = args.jit  # read by the rwkv package at import
    os.environ.setdefault("RWKV_CUDA_ON", "0")

    import torch

    from finetune import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.cpu_time else time.perf_counter
    from rwkv56_checkpoints import random_rwkv5_state_dict, random_rwkv6_state_dict

    d = Path(args.dir)
    d.mkdir(parents=True, exist_ok=True)
    base = d / f"rwkv{args.version}-{args.n_layer}x{args.n_embd}-{args.vocab}.pth"
    if not base.exists():
        make = random_rwkv5_state_dict if args.version == "5" else random_rwkv6_state_dict
        extra = {} if args.version == "5" else {"d_mix": 32, "d_decay": 64}
        torch.save(make(args.n_layer, args.n_embd, args.vocab, 64, seed=0, **extra), base)

    from rwkv.model import RWKV as BlinkRWKV

    blink = BlinkRWKV(str(base), strategy="cpu fp32", verbose=False)
    ours = load_model(base, dtype="fp32")
    ref_name = f"rwkv package 0.8.32 (cpu fp32, JIT {'on' if args.jit == '1' else 'off'})"
    engines: dict[str, Callable[[int, Any], Any]] = {
        ref_name: lambda t, s: blink.forward([t], s)[1],
        "rwkv-lora model.step": lambda t, s: ours.step([t], s)[1],
    }
    runs: dict[str, list[float]] = {k: [] for k in engines}
    for _ in range(args.rounds):
        for k, v in interleaved_tok_per_s(engines, args.tokens, clock).items():
            runs[k].append(v)
    results = {k: max(v) for k, v in runs.items()}
    ref = results[ref_name]
    title = "RWKV-5.2" if args.version == "5" else "RWKV-6"
    rows = [f"# Generation benchmark: {title}", "",
            f"Random fp32 {title} {args.n_layer} x {args.n_embd} (head size 64), vocab {args.vocab}; batch 1, one "
            f"token per call, the engines stepped in turn, {args.tokens} tokens after 4 warm-up tokens, best of "
            f"{args.rounds} rounds; "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads, timed by "
            f"{'CPU time' if args.cpu_time else 'wall clock'}.", "",
            "| engine | tok/s | vs rwkv package |", "|---|---|---|"]
    rows += [f"| {k} | {v:.1f} | {v / ref:.2f}x |" for k, v in results.items()]
    rows += ["", "All rounds (tok/s): " + "; ".join(f"{k}: {[round(x, 1) for x in v]}" for k, v in runs.items()), ""]
    if args.write:
        (ROOT / "bench" / f"RESULTS-generate-rwkv{args.version}.md").write_text("\n".join(rows))
    print("\n".join(rows))


if __name__ == "__main__":
    main()
