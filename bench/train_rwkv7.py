"""RWKV-7 LoRA training speed and peak memory on the CPU: rwkv-lora against rwkv7-hf 0.9.0 + peft.

    python bench/train_rwkv7.py                          # the README table (several minutes per configuration)
    python bench/train_rwkv7.py --cases ours:256 hf:256 --steps 3
    python bench/train_rwkv7.py --cases ours:1024:ckpt ours:4096:ckpt:chunk512 ours:256:bf16 ours:256:compile

One random fp32 RWKV-7 checkpoint (12 x 768, 12 heads of 64, RWKV-LM's low-rank widths, vocab 65536) is written once
and converted with rwkv7-hf's own converter (`rwkv7-hf convert --precision fp32`), so both sides run the same
weights. Both get LoRA r=8 (alpha 16) on att receptance/key/value/output and ffn key/value (rwkv7-hf calls them
attn.r_proj/k_proj/v_proj/o_proj and ffn.key/value) through peft, AdamW on the LoRA weights, batch 1, the same random
batches, the same next-token loss computed from the logits. LoRA's B starts at zero, so the first step's loss is the
base model's on both sides: the table shows it as a check that they compute the same model.

Each case runs in a fresh subprocess (its own peak RSS, `ru_maxrss`), capped by an address-space limit so that a case
that would need more memory fails alone instead of starving the machine. Case syntax `IMPL:CTX[:FLAGS]` with IMPL
`ours` or `hf` and flags `ckpt` (gradient checkpointing per block: ours `model.gradient_checkpointing`, theirs
`gradient_checkpointing_enable()`), `chunkN` (ours: train_type infctx, the window in chunks of N tokens with the state
carried, each chunk recomputed in the backward pass), `bf16` (ours: bf16 base weights under
`torch.autocast(bfloat16)`, fp32 LoRA weights: what `precision: bf16-mixed` runs) and `compile` (ours: every block
through torch.compile, as `compile: true` does; the warm-up step compiles, its wall time is reported). Reports
tokens/s by the wall clock (median over the timed steps) and CPU seconds per token (steadier on a shared machine), and
the ratios against the peer measured in the same run. On a shared machine run one thread (the default): with two,
every parallel region of these thousands of small ops waits for a descheduled sibling thread, and both the wall clock
and the CPU time (spinning threads) then measure the machine's load rather than the code.
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
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
N_LAYER, N_EMBD, HEAD, VOCAB = 12, 768, 64, 65536
LORA_R, LORA_ALPHA = 8, 16
HF_TARGETS = r".*\.attn\.(r_proj|k_proj|v_proj|o_proj)|.*\.ffn\.(key|value)"
DEFAULT_CASES = ["ours:256", "hf:256", "ours:1024:ckpt", "ours:4096:ckpt:chunk1024", "ours:256:bf16",
                 "ours:256:compile", "ours:1024:ckpt:compile"]


def make_checkpoint(work: Path) -> tuple[Path, Path]:
    """The fp32 .pth (written once) and rwkv7-hf's conversion of it (made once, by its own converter)."""
    import torch

    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "tests"))
    from finetune.models.rwkv7 import low_rank_width
    from finetune.tokenizer import _world_vocab_path
    from rwkv7_helpers import random_rwkv7_state_dict

    work.mkdir(parents=True, exist_ok=True)
    pth, hf_dir = work / "rwkv7-12x768.pth", work / "rwkv7-12x768-hf"
    if not pth.is_file():
        widths = (low_rank_width(N_EMBD, 2.5), low_rank_width(N_EMBD, 2.5), low_rank_width(N_EMBD, 1.7),
                  low_rank_width(N_EMBD, 5.0))
        torch.save(random_rwkv7_state_dict(N_LAYER, N_EMBD, VOCAB, HEAD, seed=0, widths=widths), pth)
    if not (hf_dir / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "rwkv7_hf.cli", "convert", "--input", str(pth), "--output",
                        str(hf_dir), "--precision", "fp32", "--vocab-file", _world_vocab_path()], check=True,
                       capture_output=True)
    return pth, hf_dir


def build_ours(pth: Path, flags: set[str]) -> tuple[Any, Callable]:
    import torch

    sys.path.insert(0, str(ROOT))
    from finetune import load_model
    from finetune.adapters import add_lora, unwrap
    from finetune.infctx import chunked_loss

    base = load_model(pth)
    if "bf16" in flags:
        base.cast(torch.bfloat16)
    base.gradient_checkpointing = "ckpt" in flags
    if "compile" in flags:  # as the trainer's `compile: true`
        for block in base.blocks:
            block.compile()
    model = add_lora(base, r=LORA_R, alpha=LORA_ALPHA, parts=("att", "ffn")).train()
    for p in model.parameters():  # trained tensors in fp32, as the trainer keeps them
        if p.requires_grad:
            p.data = p.data.float()
    assert unwrap(model) is base
    chunk = next((int(f[5:]) for f in flags if f.startswith("chunk")), 0)

    def loss_of(ids: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled="bf16" in flags):
            if chunk:
                return chunked_loss(model, ids[:, :-1], ids[:, 1:], torch.ones(ids[:, 1:].shape), chunk_len=chunk)
            return lm_loss(model(ids[:, :-1]), ids[:, 1:])

    return model, loss_of


def build_hf(hf_dir: Path, flags: set[str]) -> tuple[Any, Callable]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(hf_dir), trust_remote_code=True, dtype=torch.float32)
    base.config.use_cache = False
    if "ckpt" in flags:
        base.gradient_checkpointing_enable()
    model = get_peft_model(base, LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, target_modules=HF_TARGETS)).train()

    def loss_of(ids: torch.Tensor) -> torch.Tensor:
        return lm_loss(model(input_ids=ids[:, :-1], use_cache=False).logits, ids[:, 1:])

    return model, loss_of


def lm_loss(logits: Any, targets: Any) -> Any:
    import torch.nn.functional as F

    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


def worker(case: str, pth: Path, hf_dir: Path, steps: int, warmup: int, mem_gb: float,
           threads: int) -> dict[str, Any]:
    """One case in this (fresh) process."""
    cap = int(mem_gb * 2 ** 30)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))  # fail this case alone rather than push others into swap/OOM
    import torch

    if threads:
        torch.set_num_threads(threads)

    impl, ctx, *flag_list = case.split(":")
    ctx, flags = int(ctx), set(flag_list)
    torch.manual_seed(0)
    model, loss_of = (build_ours(pth, flags) if impl == "ours" else build_hf(hf_dir, flags))
    params = [p for p in model.parameters() if p.requires_grad]
    n_lora = sum(1 for n, _ in model.named_modules() if n.endswith(".lora_A"))
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, VOCAB, (1, ctx + 1), generator=g) for _ in range(warmup + steps)]
    walls, cpus, losses = [], [], []
    for i, batch in enumerate(batches):
        t0, c0 = time.perf_counter(), time.process_time()
        loss = loss_of(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i == 0:
            first_step = time.perf_counter() - t0
        if i >= warmup:
            walls.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
        losses.append(loss.item())
    walls.sort()
    return {"case": case, "impl": impl, "ctx": ctx, "flags": sorted(flags), "tok_s": ctx / walls[len(walls) // 2],
            "cpu_ms_per_tok": 1e3 * sorted(cpus)[len(cpus) // 2] / ctx, "peak_gb": resource.getrusage(
                resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, "first_loss": losses[0], "first_step_s": first_step,
            "lora_modules": n_lora, "trained_params": sum(p.numel() for p in params),
            "threads": torch.get_num_threads()}


def describe(case: str) -> str:
    impl, ctx, *flags = case.split(":")
    words = {"ckpt": "grad checkpointing", "bf16": "bf16-mixed", "compile": "torch.compile"}
    extra = [words.get(f, f"infctx chunks of {f[5:]}" if f.startswith("chunk") else f) for f in flags]
    name = "rwkv-lora" if impl == "ours" else "rwkv7-hf + peft"
    return f"{name}{' (' + ', '.join(extra) + ')' if extra else ''}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=DEFAULT_CASES, help="IMPL:CTX[:ckpt][:chunkN][:bf16]")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per case (median reported)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--mem-gb", type=float, default=14.0, help="address-space cap per case")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per case (0: torch's default)")
    ap.add_argument("--work", default="/tmp/bench-train-rwkv7", help="where the checkpoint and its HF copy go")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    pth, hf_dir = make_checkpoint(Path(args.work))
    if args.worker:
        print(json.dumps(worker(args.worker, pth, hf_dir, args.steps, args.warmup, args.mem_gb, args.threads)))
        return

    rows: dict[str, dict[str, Any] | None] = {}
    for case in args.cases:
        cmd = [sys.executable, __file__, "--worker", case, "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--mem-gb", str(args.mem_gb), "--threads", str(args.threads), "--work", args.work]
        t0 = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
        if out.returncode != 0:
            tail = out.stderr.strip().splitlines()[-1:] or ["?"]
            print(f"  {case}: failed ({tail[0][:160]})", file=sys.stderr)
            rows[case] = None
            continue
        rows[case] = r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"  {case}: {r['tok_s']:.1f} tok/s, {r['cpu_ms_per_tok']:.1f} CPU ms/token, peak {r['peak_gb']:.2f} GB, "
              f"first loss {r['first_loss']:.5f}, first step {r['first_step_s']:.0f} s, "
              f"{r['lora_modules']} LoRA modules ({time.perf_counter() - t0:.0f}s)", file=sys.stderr)

    peer = next((r for r in rows.values() if r and r["impl"] == "hf" and r["ctx"] == 256 and not r["flags"]), None)
    threads = next((r["threads"] for r in rows.values() if r), 0)
    print(f"\nRWKV-7 LoRA r=8 (att r/k/v/o, ffn key/value) training step, 12 x 768, vocab 65536, batch 1, "
          f"{threads} threads, median of {args.steps} steps after {args.warmup} warm-up\n")
    print("| configuration | ctx | tok/s | CPU ms/token | peak RSS | vs rwkv7-hf+peft ctx 256 (tok/s, RSS) | "
          "first loss |")
    print("|---|---:|---:|---:|---:|---|---:|")
    for case, r in rows.items():
        ctx = case.split(":")[1]
        if r is None:
            print(f"| {describe(case)} | {ctx} | failed | - | > {args.mem_gb:g} GB or error | - | - |")
            continue
        vs = "-"
        if peer and r is not peer:
            vs = f"{r['tok_s'] / peer['tok_s']:.2f}x, {r['peak_gb'] / peer['peak_gb']:.2f}x"
        print(f"| {describe(case)} | {ctx} | {r['tok_s']:.1f} | {r['cpu_ms_per_tok']:.1f} | {r['peak_gb']:.2f} GB | "
              f"{vs} | {r['first_loss']:.5f} |")
    print()
    for flag, name in (("bf16", "bf16-mixed"), ("compile", "torch.compile")):
        for ctx, base_flags in ((256, []), (1024, ["ckpt"])):
            plain = next((r for r in rows.values() if r and r["impl"] == "ours" and r["ctx"] == ctx
                          and r["flags"] == base_flags), None)
            r = next((r for r in rows.values() if r and r["impl"] == "ours" and r["ctx"] == ctx
                      and r["flags"] == sorted(base_flags + [flag])), None)
            if r and plain:
                print(f"{name} vs without at ctx {ctx}: {r['tok_s'] / plain['tok_s']:.2f}x tok/s, "
                      f"{plain['cpu_ms_per_tok'] / r['cpu_ms_per_tok']:.2f}x by CPU time; first step "
                      f"{r['first_step_s']:.0f} s vs {plain['first_step_s']:.0f} s")


if __name__ == "__main__":
    main()
