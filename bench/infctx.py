"""Infinite-context training vs one window: peak memory and tokens/s against ctx_len.

    python bench/infctx.py                                       # 6 x 512, vocab 65536, LoRA r=8, ctx 1k .. 16k
    python bench/infctx.py --ctx 1024 2048 --layers 2 --width 128   # a quick check

Each (mode, ctx_len) runs in its own subprocess with MALLOC_MMAP_THRESHOLD_=65536 (glibc otherwise keeps freed heap
pages, and RSS would only grow), so the high-water RSS (ru_maxrss) is that configuration's own. A subprocess does one
warm-up step (kernel load, allocator) and `--steps` timed training steps (forward + backward + AdamW on LoRA); tokens/s
is ctx_len * steps / seconds. The plain mode (one window, activations of all of it alive) is skipped where its
estimate exceeds --plain_limit_gb. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

WORKER = r"""
import json, resource, sys, time, torch
sys.path.insert(0, {root!r})
from finetune.models.rwkv4 import RWKV, RWKVConfig
from finetune.adapters import add_lora
from finetune.infctx import chunked_loss
from finetune.train.loss import lm_loss
ctx, mode, layers, width, vocab, chunk, steps = sys.argv[1:8]
ctx, layers, width, vocab, chunk, steps = map(int, (ctx, layers, width, vocab, chunk, steps))
torch.manual_seed(0)
model = add_lora(RWKV(RWKVConfig(layers, width, vocab)).train(), r=8, alpha=16)
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
def step(n):
    ids = torch.randint(0, vocab, (1, n + 1))
    mask = torch.ones(1, n)
    if mode == "infctx":
        loss = chunked_loss(model, ids[:, :-1], ids[:, 1:], mask, chunk_len=chunk)
    else:
        loss = lm_loss(model(ids[:, :-1]), ids[:, 1:], mask)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
step(min(ctx, chunk))  # warm-up
t0 = time.perf_counter()
for _ in range(steps):
    step(ctx)
dt = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({{"peak": peak, "tok_s": ctx * steps / dt}}))
"""


def plain_estimate_gb(ctx: int, layers: int, width: int, vocab: int) -> float:
    """Rough activation bytes of one fp32 window: ~40 C-wide tensors per layer per token, plus logits (x3: logits,
    softmax, grad)."""
    return 4 * ctx * (40 * layers * width + 3 * vocab) / 2 ** 30


def run_one(script: Path, ctx: int, mode: str, a) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, str(script), str(ctx), mode, str(a.layers), str(a.width), str(a.vocab),
                          str(a.chunk_len), str(a.steps)], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1][:80]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ctx", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--vocab", type=int, default=65536)
    p.add_argument("--chunk_len", type=int, default=512)
    p.add_argument("--steps", type=int, default=1, help="timed steps per configuration")
    p.add_argument("--plain_limit_gb", type=float, default=8.0, help="skip the plain mode above this estimate")
    a = p.parse_args(argv)
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        script = Path(d) / "worker.py"
        script.write_text(WORKER.format(root=str(ROOT)))
        print(f"RWKV-4 {a.layers} x {a.width}, vocab {a.vocab}, LoRA r=8, batch 1, fp32, chunk_len {a.chunk_len}, "
              f"{os.cpu_count()} CPUs\n")
        print("| ctx_len | plain peak RSS | plain tok/s | infctx peak RSS | infctx tok/s |")
        print("|---:|---:|---:|---:|---:|")
        for ctx in a.ctx:
            cells = []
            for mode in ("plain", "infctx"):
                if mode == "plain" and plain_estimate_gb(ctx, a.layers, a.width, a.vocab) > a.plain_limit_gb:
                    cells += ["skipped (> %g GB)" % a.plain_limit_gb, "-"]
                    continue
                r = run_one(script, ctx, mode, a)
                if "error" in r:
                    cells += [f"failed: {r['error']}", "-"]
                else:
                    cells += [f"{r['peak'] / 2 ** 20:,.0f} MiB", f"{r['tok_s']:,.0f}"]
            print(f"| {ctx} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
