"""Generation benchmark: tokens/s of our RNN step against the `rwkv` pip package (cpu fp32), same checkpoint.

    python bench/generate.py [--n-layer 12 --n-embd 768 --vocab 65536] [--tokens 48]

A random fp32 RWKV-4 (12 x 768, vocab 65536) is written once. Measured one token at a time, batch 1, after a short
warm-up: the rwkv package's `model.forward([token], state)`, ours without an adapter (`model.step`, the model's own forward), and ours
with an r=16 att+ffn adapter plugged in unmerged (`attach_adapters`). Writes bench/RESULTS-generate.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("RWKV_JIT_ON", "0")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def tok_per_s(step, n: int, warmup: int = 4) -> float:
    state = None
    for i in range(warmup):
        state = step(i + 1, state)
    t0 = time.perf_counter()
    for i in range(n):
        state = step((i * 7919) % 60000 + 1, state)
    return n / (time.perf_counter() - t0)


def main() -> None:
    import torch

    from conftest import random_rwkv4_state_dict
    from finetune.adapter_format import write_adapter
    from finetune.models.rwkv4 import FAMILY
    from finetune.checkpoint import fingerprint
    from finetune import load_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--n-layer", type=int, default=12)
    ap.add_argument("--n-embd", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=65536)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", default="/tmp/bench-generate")
    args = ap.parse_args()
    d = Path(args.dir)
    d.mkdir(parents=True, exist_ok=True)
    base = d / "base.pth"
    sd = random_rwkv4_state_dict(args.n_layer, args.n_embd, args.vocab, seed=0)
    if not base.exists():
        torch.save(sd, base)
    g = torch.Generator().manual_seed(1)
    lora = {}
    for i in range(args.n_layer):
        for part, mods in FAMILY.lora_parts.items():
            for m in mods:
                out_f, in_f = sd[f"blocks.{i}.{part}.{m}.weight"].shape
                lora[f"blocks.{i}.{part}.{m}"] = (torch.randn(args.r, in_f, generator=g) * 0.01,
                                                  torch.randn(out_f, args.r, generator=g) * 0.01)
    meta = {"base": {"fingerprint": fingerprint(sd)}, "tokenizer": "world", "r": args.r, "alpha": 2 * args.r,
            "parts": ["att", "ffn"], "train": []}
    adapter = write_adapter(d / "adapter", meta, lora, {})
    del sd

    from rwkv.model import RWKV as BlinkRWKV

    blink = BlinkRWKV(str(base), strategy="cpu fp32", verbose=False)
    plain = load_model(base, dtype="fp32")
    plugged = load_model(base, adapters=[adapter], dtype="fp32")
    engines = {
        "rwkv package 0.8.32 (cpu fp32)": lambda t, s: blink.forward([t], s)[1],
        "rwkv-lora model.step, no adapter": lambda t, s: plain.step([t], s)[1],
        f"rwkv-lora model.step, r={args.r} att+ffn adapter unmerged": lambda t, s: plugged.step([t], s)[1],
    }
    # interleaved rounds, best of each: the machine is shared, so any one run can be slowed by other jobs
    runs: dict[str, list[float]] = {k: [] for k in engines}
    for _ in range(args.rounds):
        for k, f in engines.items():
            runs[k].append(tok_per_s(f, args.tokens))
    results = {k: max(v) for k, v in runs.items()}
    ref = results["rwkv package 0.8.32 (cpu fp32)"]
    rows = ["# Generation benchmark", "",
            f"Random fp32 RWKV-4 {args.n_layer} x {args.n_embd}, vocab {args.vocab}; batch 1, one token per call, "
            f"{args.tokens} tokens after 4 warm-up tokens, best of {args.rounds} interleaved rounds; torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads on a 2-core machine shared with other jobs.", "",
            "| engine | tok/s | vs rwkv package |", "|---|---|---|"]
    for k, v in results.items():
        rows.append(f"| {k} | {v:.1f} | {v / ref:.2f}x |")
    rows += ["", "All rounds (tok/s): " + "; ".join(f"{k}: {[round(x, 1) for x in v]}" for k, v in runs.items()),
             "", "Targets: >= 1.0x without the adapter, >= 0.8x with it.", ""]
    (ROOT / "bench" / "RESULTS-generate.md").write_text("\n".join(rows))
    print("\n".join(rows))


if __name__ == "__main__":
    main()
