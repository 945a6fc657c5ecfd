"""Serving benchmark: aggregate tokens/s of the server's engine at 1, 4 and 8 concurrent streams over mixed adapters,
time to first token, and 1 stream against `generate_tokens` (what `rwkv-lora generate` runs) in the same run.

    python bench/serve.py [--n-layer 12 --n-embd 768 --vocab 65536] [--tokens 32] [--prompt 16]

A random fp32 RWKV-4 and three random r=16 att+ffn LoRA adapters are written once. Each setting submits its streams
to the engine at once (adapters assigned round-robin over the three adapters and the base; greedy, a distinct
random prompt each) and times the whole batch, prompts' prefill included: aggregate tok/s = generated tokens / wall
time. The `generate_tokens` peer runs one stream on a model with one adapter plugged in (`attach_adapters`), same
prompt length and token count. Rounds are interleaved and the best of each kept (the machine is shared).

Next to wall-clock tok/s, tok per CPU-second: generated tokens / the process's CPU time over the same run. With
`--threads 1` that is about the run's speed on a core of its own (the engine's worker and torch's one thread do all
the work): other jobs' turns on the cores do not count, their contention for memory and caches still does (one
stream: 23-25 tok per CPU-second at a load average of 4-5, 27-29 near 3), so it is steadier than wall time, not
immune. With more threads it also counts their spinning and is no speed. Writes bench/RESULTS-serve.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("RWKV_JIT_ON", "0")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    import torch

    from conftest import random_rwkv4_state_dict
    from finetune.adapter_format import write_adapter as write_adapter_dir
    from finetune.models import FAMILIES
    from finetune.plugin import attach_adapters, load_model
    from finetune.checkpoint import fingerprint
    from finetune.generate import generate_tokens
    from finetune.serve.config import ServeConfig
    from finetune.serve.engine import Engine, GenerationRequest

    ap = argparse.ArgumentParser()
    ap.add_argument("--n-layer", type=int, default=12)
    ap.add_argument("--n-embd", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=65536)
    ap.add_argument("--tokens", type=int, default=32, help="generated tokens per stream")
    ap.add_argument("--prompt", type=int, default=16, help="prompt tokens per stream")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--dir", default="/tmp/bench-serve")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    d = Path(args.dir)
    d.mkdir(parents=True, exist_ok=True)
    base = d / "base.pth"
    sd = random_rwkv4_state_dict(args.n_layer, args.n_embd, args.vocab, seed=0)
    if not base.exists():
        torch.save(sd, base)
    adapters = {}
    for k in range(3):
        g = torch.Generator().manual_seed(k + 1)
        lora = {}
        for i in range(args.n_layer):
            for part, mods in FAMILIES["4"].lora_parts.items():
                for m in mods:
                    out_f, in_f = sd[f"blocks.{i}.{part}.{m}.weight"].shape
                    lora[f"blocks.{i}.{part}.{m}"] = (torch.randn(args.r, in_f, generator=g) * 0.01,
                                                      torch.randn(out_f, args.r, generator=g) * 0.01)
        meta = {"base": {"fingerprint": fingerprint(sd)}, "tokenizer": "world", "r": args.r, "alpha": 2 * args.r,
                "parts": ["att", "ffn"], "train": []}
        path = d / f"adapter{k}"
        if not path.exists():
            write_adapter_dir(path, meta, lora, {})
        adapters[f"a{k}"] = str(path)
    del sd

    # the state cache is off: every stream's prompt is prefilled, as a first request's would be
    engine = Engine(ServeConfig(model=str(base), adapters=adapters, tokenizer="world", dtype="fp32",
                                max_batch=max(args.streams), state_cache_bytes=0,
                                max_tokens=args.tokens, default_max_tokens=args.tokens))
    names = ["a0", "a1", "a2", engine.base_name]
    peer = attach_adapters(load_model(base, dtype="fp32"), [adapters["a0"]])
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 60000, (args.prompt,), generator=g).tolist() for _ in range(max(args.streams))]

    def run_engine(n: int) -> tuple[float, float, int, float]:
        done = threading.Semaphore(0)
        usages = []

        def on_event(event) -> None:
            if event.kind == "done":
                usages.append(event.usage)
                done.release()
            elif event.kind == "error":
                raise RuntimeError(event.text)

        t0, c0 = time.perf_counter(), time.process_time()
        for i in range(n):
            engine.submit(GenerationRequest(names[i % len(names)], prompts[i], args.tokens, temperature=0.0),
                          on_event)
        for _ in range(n):
            done.acquire()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        tokens = sum(u.completion_tokens for u in usages)
        return tokens / wall, sum(u.time_to_first_token for u in usages) / n, tokens, tokens / cpu

    def run_generate() -> tuple[float, float, int, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        first = None
        n = 0
        for _ in generate_tokens(peer, prompts[0], max_tokens=args.tokens, temperature=0.0, stop_token=None):
            first = first or time.perf_counter() - t0
            n += 1
        return n / (time.perf_counter() - t0), first, n, n / (time.process_time() - c0)

    run_engine(1)  # warm-up (kernels, allocator)
    run_generate()
    settings = {"generate_tokens, 1 stream (a0)": run_generate}
    for n in args.streams:
        settings[f"engine, {n} stream{'s' if n > 1 else ''}"] = lambda n=n: run_engine(n)
    runs: dict[str, list[tuple[float, float, int, float]]] = {k: [] for k in settings}
    for _ in range(args.rounds):
        for k, f in settings.items():
            runs[k].append(f())
    best = {k: max(v) for k, v in runs.items()}
    best_cpu = {k: max(x[3] for x in v) for k, v in runs.items()}
    one = best[f"engine, 1 stream"][0]
    peer_speed = best["generate_tokens, 1 stream (a0)"][0]
    one_cpu, peer_cpu = best_cpu["engine, 1 stream"], best_cpu["generate_tokens, 1 stream (a0)"]
    rows = ["# Serving benchmark", "",
            f"Random fp32 RWKV-4 {args.n_layer} x {args.n_embd}, vocab {args.vocab}; 3 r={args.r} att+ffn LoRA "
            f"adapters plugged in unmerged, streams round-robin over them and the base; {args.prompt}-token prompts "
            f"(prefill included), {args.tokens} greedy tokens per stream; best of {args.rounds} interleaved rounds; "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads on a 2-core machine shared with other "
            f"jobs.", "",
            "Command: `python bench/serve.py " + " ".join(sys.argv[1:]) + "`", "",
            "| setting | aggregate tok/s | vs engine 1 stream | vs generate_tokens | mean time to first token "
            "| tok per CPU-second | vs engine 1 stream | vs generate_tokens |",
            "|---|---|---|---|---|---|---|---|"]
    for k, (speed, ttft, _, _) in best.items():
        c = best_cpu[k]
        rows.append(f"| {k} | {speed:.1f} | {speed / one:.2f}x | {speed / peer_speed:.2f}x | {ttft * 1000:.0f} ms "
                    f"| {c:.1f} | {c / one_cpu:.2f}x | {c / peer_cpu:.2f}x |")
    rows += ["", "All rounds (tok/s): " + "; ".join(f"{k}: {[round(x[0], 1) for x in v]}" for k, v in runs.items()),
             "", "All rounds (tok per CPU-second): "
             + "; ".join(f"{k}: {[round(x[3], 1) for x in v]}" for k, v in runs.items()),
             "", "Targets: >= 4x aggregate at 8 streams vs 1; 1 stream >= 0.9x generate_tokens.", ""]
    engine.close()
    (ROOT / "bench" / "RESULTS-serve.md").write_text("\n".join(rows))
    print("\n".join(rows))


if __name__ == "__main__":
    main()
