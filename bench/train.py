"""LoRA training speed and peak memory on the CPU: rwkv-lora against Hugging Face transformers + peft.

Same shape (169M: 12 x 768, vocab 50277), LoRA r=8 on att+ffn (key, value, receptance, output / key, value,
receptance), fp32, batch 1, the same random batches, AdamW on the LoRA weights; each (implementation, ctx) runs in a
fresh subprocess so peak RSS is its own. Prints a Markdown table with the ratios.

    python bench/train.py                 # ctx 256 and 1024, 3 timed steps each
    python bench/train.py --ctx 256 --steps 5
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
N_LAYER, N_EMBD, VOCAB = 12, 768, 50277


def build_ours():
    import torch

    from finetune.adapters import add_lora
    from finetune.models.rwkv4 import RWKV, RWKVConfig, init_rwkv_lm_

    model = init_rwkv_lm_(RWKV(RWKVConfig(N_LAYER, N_EMBD, VOCAB)))
    for p in model.parameters():  # RWKV-LM zero-inits some matrices; give them values so all paths do real work
        if p.dim() == 2 and p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.02)
    model = add_lora(model, r=8, alpha=16, parts=("att", "ffn"))
    return model.train(), lambda idx: model(idx)


def build_hf():
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import RwkvConfig, RwkvForCausalLM

    config = RwkvConfig(vocab_size=VOCAB, hidden_size=N_EMBD, num_hidden_layers=N_LAYER,
                        attention_hidden_size=N_EMBD, intermediate_size=4 * N_EMBD, context_length=4096,
                        rescale_every=0, use_cache=False)
    model = RwkvForCausalLM(config)
    for p in model.parameters():
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.02)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["key", "value", "receptance",
                                                                                  "output"]))
    return model.train(), lambda idx: model(input_ids=idx).logits


def worker(impl: str, ctx: int, steps: int, warmup: int) -> dict:
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(ROOT))
    torch.manual_seed(0)
    model, logits_of = (build_ours if impl == "rwkv-lora" else build_hf)()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, VOCAB, (1, ctx + 1), generator=g) for _ in range(warmup + steps)]
    times, losses = [], []
    for i, batch in enumerate(batches):
        t0 = time.perf_counter()
        logits = logits_of(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, VOCAB).float(), batch[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times.sort()
    return {"impl": impl, "ctx": ctx, "tok_s": ctx / times[len(times) // 2], "peak_gb": peak_kb / 2 ** 20,
            "first_loss": losses[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ctx", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--steps", type=int, default=3, help="timed steps per case (median reported)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--impl", choices=["rwkv-lora", "hf"], nargs="+", default=["rwkv-lora", "hf"])
    ap.add_argument("--worker", nargs=2, metavar=("IMPL", "CTX"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args.steps, args.warmup)))
        return

    rows = {}
    for ctx in args.ctx:
        for impl in args.impl:
            cmd = [sys.executable, __file__, "--worker", impl, str(ctx), "--steps", str(args.steps),
                   "--warmup", str(args.warmup)]
            out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
            if out.returncode != 0:
                print(out.stderr[-2000:], file=sys.stderr)
                raise SystemExit(f"{impl} ctx {ctx} failed")
            rows[impl, ctx] = json.loads(out.stdout.strip().splitlines()[-1])
            r = rows[impl, ctx]
            print(f"  {impl:10s} ctx {ctx:5d}: {r['tok_s']:7.1f} tok/s, peak RSS {r['peak_gb']:.2f} GB", file=sys.stderr)

    import torch

    print(f"\nLoRA r=8 att+ffn training step, 12 x 768, vocab 50277, fp32, batch 1, "
          f"{torch.get_num_threads()} threads, median of {args.steps} steps\n")
    print("| ctx | rwkv-lora tok/s | HF+peft tok/s | speed ratio | rwkv-lora peak RSS | HF+peft peak RSS |")
    print("|---|---|---|---|---|---|")
    for ctx in args.ctx:
        a, b = rows.get(("rwkv-lora", ctx)), rows.get(("hf", ctx))
        if a and b:
            print(f"| {ctx} | {a['tok_s']:.1f} | {b['tok_s']:.1f} | {a['tok_s'] / b['tok_s']:.2f}x | "
                  f"{a['peak_gb']:.2f} GB | {b['peak_gb']:.2f} GB |")


if __name__ == "__main__":
    main()
