"""Big models on small machines: loading peak memory, QLoRA training memory and speed, quantized generation speed.

    python bench/memory.py load                     # 1.5B-shaped fp16 checkpoint -> bf16 model: peak RSS, ours vs
                                                    # the old read-everything-then-cast
    python bench/memory.py train [--shapes 0.1B 0.4B 1.5B] [--bases bf16 int8 nf4] [--steps 2]
    python bench/memory.py generate [--shape 0.1B]  # generate --quant int8 tok/s vs the rwkv package's cpu fp32i8
    python bench/memory.py all                      # the three, then bench/RESULTS-memory.md
    --arch rwkv4 | rwkv7 (any family in finetune.models; RWKV-7 shapes run once finetune/models/rwkv7.py is there)

Every measurement runs in its own subprocess; peak RSS is that process's VmHWM (/proc/self/status: its own peak;
ru_maxrss would start from the parent's RSS at fork on Linux). Checkpoints are random (written tensor by tensor,
never whole in memory) in BlinkDL's layout. Training is the real trainer (`rwkv-lora train` in-process): LoRA r=64
on att+ffn, ctx 1024, batch 1, gradient checkpointing, precision bf16-mixed, AdamW, a few steps on random tokens.
Results are appended as JSON lines to DIR/results.jsonl; `report` turns them into the Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
import typing
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RWKV_JIT_ON", "0")

# (n_layer, n_embd) of the published sizes, vocab 65536 (World)
SHAPES = {"0.1B": (12, 768), "0.4B": (24, 1024), "1.5B": (24, 2048), "2.9B": (32, 2560)}  # RWKV-7 World's
VOCAB = 65536
# RWKV-PEFT's published GPU memory for RWKV-7 LoRA (bf16 base / NF4 base), GB
RWKV_PEFT = {"0.1B": (2.7, 2.4), "0.4B": (3.4, 2.7), "1.5B": (5.6, 3.9)}


def peak_bytes() -> int:
    """This process's own peak resident memory (VmHWM)."""
    with open("/proc/self/status") as f:
        return int(f.read().split("VmHWM:")[1].split()[0]) * 1024


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ----------------------------------------------------------------------------------------------------------------------
# Random checkpoints of any family, written tensor by tensor


def family_config(arch: str, n_layer: int, n_embd: int, vocab: int):
    """(family, config) for an architecture name ('rwkv4', 'rwkv7', ...), the config built from the class the
    family's model takes (every other field at its default)."""
    from finetune.models import get_family

    family = get_family(arch)
    config_class = typing.get_type_hints(family.model_class.__init__)["config"]
    return family, config_class(n_layer=n_layer, n_embd=n_embd, vocab_size=vocab)


def random_tensor(name: str, shape: tuple, seed: int):
    """Plausible random values by role: matrices ~ N(0, 1/fan_in), norms 1 / 0, decays spread, mixes in [0, 1]."""
    import torch

    g = torch.Generator().manual_seed(seed)
    if len(shape) == 2 and name != "emb.weight":
        return torch.randn(shape, generator=g) * shape[1] ** -0.5
    if name == "emb.weight":
        return torch.randn(shape, generator=g) * 0.5
    leaf = name.rsplit(".", 1)[-1]
    if ".ln" in name or name.startswith("ln_"):
        return torch.ones(shape) if leaf == "weight" else torch.zeros(shape)
    if leaf == "time_decay":
        return torch.linspace(-5, 3, math.prod(shape)).reshape(shape)
    return torch.rand(shape, generator=g) * 0.5


def write_checkpoint(path: Path, arch: str, n_layer: int, n_embd: int, dtype: str = "fp16") -> Path:
    import torch

    from finetune.merge import write_pth_streaming, write_safetensors_streaming
    from finetune.models import parse_dtype

    if path.exists():
        return path
    family, config = family_config(arch, n_layer, n_embd, VOCAB)
    dt = parse_dtype(dtype)
    plan = [(k, tuple(s), dt) for k, s in family.expected_shapes(config).items()]
    names = {k: i for i, (k, _, _) in enumerate(plan)}

    def produce(name: str, slot: int = 0):
        return random_tensor(name, dict((k, s) for k, s, _ in plan)[name], names[name]).to(dt)

    tmp = path.with_name(f".{path.name}.tmp")
    (write_safetensors_streaming if path.suffix == ".safetensors" else write_pth_streaming)(tmp, plan, produce)
    os.replace(tmp, path)
    return path


def write_corpus(prefix: Path, tokens: int = 60_000) -> Path:
    import numpy as np

    from finetune.binidx import BinidxWriter

    manifest = prefix.with_name(prefix.name + ".json")
    if manifest.exists():
        return manifest
    w = BinidxWriter(str(prefix), np.uint16)
    w.add_document(np.random.default_rng(0).integers(1, VOCAB, tokens))
    w.close()
    manifest.write_text(json.dumps({
        "format": "rwkv-lora-data", "version": 1, "documents": 1, "tokens": tokens, "tokenizer": "world",
        "vocab_size": VOCAB, "eod_id": 0, "dtype": "uint16", "template": "none",
        "shards": [{"prefix": prefix.name, "mask_prefix": None, "documents": 1, "tokens": tokens}], "has_mask": False}))
    return manifest


# ----------------------------------------------------------------------------------------------------------------------
# Workers (each in its own process)


def work_load(path: str, how: str, tiny: str) -> dict:
    import torch

    from finetune.checkpoint import build_from_state_dict, load_model, read_state_dict

    load_model(tiny, dtype="bf16")  # page in torch's code first: that is not the load's memory
    before = rss_bytes()
    t0 = time.perf_counter()
    if how == "ours":
        model = load_model(path, dtype="bf16")
    else:  # the previous load_model: read everything, build, then cast
        model = build_from_state_dict(read_state_dict(path), path)
        model.cast(torch.bfloat16)
    seconds = time.perf_counter() - t0
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"kind": "load", "how": how, "file": Path(path).name, "file_bytes": os.path.getsize(path),
            "model_bytes": size, "before": before, "peak": peak_bytes(), "seconds": seconds}


def work_train(arch: str, shape: str, base: str, ckpt: str, data: str, out: str, steps: int, ctx: int = 1024,
               precision: str = "auto", trim: str = "keep", optimizer: str = "adamw") -> dict:
    import csv

    from finetune import cli

    if precision == "auto":  # bf16 compute, as RWKV-PEFT's figures; "32" on CPUs whose bf16 is emulated
        precision = "32" if base == "fp32" else "bf16-mixed"
    quant = base if base in ("bf16", "int8", "nf4") else "none"  # bf16 with precision 32: held bf16, fp32 products
    args = ["train", "--model", ckpt, "--data", data, "--out_dir", out, "--ctx_len", str(ctx), "--micro_bsz", "1",
            "--max_steps", str(steps), "--lr", "1e-4", "--lr_final", "1e-4", "--warmup_steps", "0",
            "--precision", precision, "--base_quant", quant, "--grad_checkpoint", "true", "--logger", "csv",
            "--lora.r", "64", "--lora.alpha", "128", "--lora.parts", "[att,ffn]", "--tokenizer", "world",
            "--seed", "1", "--trim_memory", str(trim == "trim").lower(), "--optimizer", optimizer]
    t0 = time.perf_counter()
    rc = cli.main(args)
    if rc != 0:
        raise SystemExit(f"train failed ({rc})")
    rates, losses = [], []
    with open(Path(out) / "metrics.csv", newline="") as f:
        for row in csv.DictReader(f):
            if row.get("tokens_per_s"):
                rates.append(float(row["tokens_per_s"]))
                losses.append(float(row["train_loss"]))
    timed = rates[1:] or rates  # the first step also pays for warm-up
    return {"kind": "train", "arch": arch, "shape": shape, "base": base, "steps": steps, "ctx": ctx,
            "precision": precision, "trim": trim == "trim", "optimizer": optimizer, "peak": peak_bytes(),
            "tok_s": statistics.median(timed), "rates": rates, "losses": losses,
            "seconds": time.perf_counter() - t0}


def work_generate(ckpt: str, tokens: int, rounds: int) -> dict:
    import torch

    from finetune.quant import load_model as load_quantized
    from rwkv.model import RWKV as BlinkRWKV

    def rate(step) -> float:
        state = None
        for i in range(3):
            state = step(i + 1, state)
        t0 = time.perf_counter()
        for i in range(tokens):
            state = step((i * 7919) % 60000 + 1, state)
        return tokens / (time.perf_counter() - t0)

    engines = {}
    for strategy in ("cpu fp32", "cpu fp32i8"):
        m = BlinkRWKV(ckpt, strategy=strategy, verbose=False)
        engines[f"rwkv package ({strategy})"] = (lambda m: lambda t, s: m.forward([t], s)[1])(m)
    for label, dtype, q in (("fp32", "fp32", "none"), ("bf16", "bf16", "none"),
                            ("--quant bf16 (fp32 compute)", "fp32", "bf16"),
                            ("--quant int8 (fp32 compute)", "fp32", "int8"), ("--quant nf4 (fp32 compute)", "fp32", "nf4")):
        m = load_quantized(ckpt, dtype=dtype, quant=q)
        engines[f"rwkv-lora {label}"] = (lambda m: lambda t, s: m.step([t], s)[1])(m)
    runs: dict[str, list[float]] = {k: [] for k in engines}
    with torch.no_grad():
        for _ in range(rounds):  # interleaved rounds, best of each: the machine is shared
            for k, f in engines.items():
                runs[k].append(rate(f))
    return {"kind": "generate", "file": Path(ckpt).name, "tokens": tokens,
            "best": {k: max(v) for k, v in runs.items()}, "runs": runs}


def spawn(args: list[str], log: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    if out.returncode != 0:
        print(out.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"worker {args[:3]} failed")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    with open(log, "a") as f:
        f.write(json.dumps(result) + "\n")
    return result


# ----------------------------------------------------------------------------------------------------------------------
# Report


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def latest(results: list[dict]) -> list[dict]:
    """The last result of each measurement (a rerun replaces the earlier line), in first-run order."""
    keys = {"load": ("file", "how"), "train": ("arch", "shape", "base", "ctx", "precision", "trim", "optimizer"),
            "generate": ("file",)}
    last: dict[tuple, dict] = {}
    defaults = {"ctx": 1024, "trim": False, "optimizer": "adamw"}
    for r in results:
        last[(r["kind"], *(r.get(k, defaults.get(k)) for k in keys[r["kind"]]))] = r
    return list(last.values())


def report(results: list[dict]) -> str:
    import torch

    results = latest(results)

    lines = ["# Big models on small machines", "",
             f"torch {torch.__version__}, {torch.get_num_threads()} threads; CPU capability "
             f"{torch.backends.cpu.get_cpu_capability()}; native bf16: "
             f"{'yes' if torch.ops.mkldnn._is_mkldnn_bf16_supported() else 'no'}. Peak RSS is each run's own "
             f"process (VmHWM), Python and every library included. The machine is shared with other jobs: "
             f"memory figures hold, speeds are indicative.", ""]
    loads = [r for r in results if r["kind"] == "load"]
    if loads:
        lines += ["## Loading an fp16 checkpoint into a bf16 model", "",
                  "| file | loader | file size | bf16 model | peak RSS growth | growth / model | process peak | "
                  "peak / model | time |", "|---|---|---|---|---|---|---|---|---|"]
        for r in loads:
            growth = r["peak"] - r["before"]
            how = "tensor by tensor (ours)" if r["how"] == "ours" else "read, build, cast (before)"
            lines.append(f"| {r['file']} | {how} | {gb(r['file_bytes'])} | {gb(r['model_bytes'])} | {gb(growth)} | "
                         f"{growth / r['model_bytes']:.2f}x | {gb(r['peak'])} | {r['peak'] / r['model_bytes']:.2f}x | "
                         f"{r['seconds']:.1f} s |")
        lines.append("")
    trains = [r for r in results if r["kind"] == "train"]
    if trains:
        lines += ["## LoRA training: r=64 att+ffn, batch 1, gradient checkpointing", "",
                  "| arch | shape | ctx | base | compute | trim_memory | optimizer | peak RSS | tok/s | RWKV-PEFT GPU "
                  "memory (RWKV-7, ctx 1024, bf16) | ours vs theirs |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in trains:
            theirs = RWKV_PEFT.get(r["shape"], (None, None))[1 if r["base"] == "nf4" else 0]
            vs = f"{r['peak'] / 1e9 / theirs:.2f}x" if theirs and r["base"] in ("bf16", "nf4", "int8") else "-"
            if vs != "-" and r.get("ctx", 1024) != 1024:
                vs += f" (ours at ctx {r['ctx']}: not comparable)"
            theirs_s = f"{theirs} GB" if theirs and r["base"] in ("bf16", "nf4", "int8") else "-"
            lines.append(f"| {r['arch']} | {r['shape']} | {r.get('ctx', 1024)} | {r['base']} | "
                         f"{r.get('precision', 'bf16-mixed')} | {'yes' if r.get('trim') else 'no'} | "
                         f"{r.get('optimizer', 'adamw')} | {gb(r['peak'])} | "
                         f"{r['tok_s']:.1f} | "
                         f"{theirs_s} | {vs} |")
        done = {(r["shape"], r["base"]) for r in trains if r.get("ctx", 1024) == 1024}
        missing = [f"{sh} {b}" for sh in RWKV_PEFT for b in ("bf16", "int8", "nf4") if (sh, b) not in done]
        if missing:
            lines += ["", f"Not measured at ctx 1024 in these runs: {', '.join(missing)}."]
        lines += ["", "Steps per run and per-step tok/s: " + "; ".join(
            f"{r['shape']} {r['base']}{' trim' if r.get('trim') else ''}"
            f"{' ' + r['optimizer'] if r.get('optimizer', 'adamw') != 'adamw' else ''}: "
            f"{[round(x, 1) for x in r['rates']]}"
            for r in trains), ""]
    gens = [r for r in results if r["kind"] == "generate"]
    for r in gens:
        ref = r["best"]["rwkv package (cpu fp32i8)"]
        lines += [f"## Generation, one token per step ({r['file']}, {r['tokens']} tokens, best of interleaved "
                  f"rounds)", "", "| engine | tok/s | vs rwkv package cpu fp32i8 |", "|---|---|---|"]
        for k, v in r["best"].items():
            lines.append(f"| {k} | {v:.2f} | {v / ref:.2f}x |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", nargs="?", choices=["load", "train", "generate", "all", "report"], default="all")
    ap.add_argument("--arch", default="rwkv4", help="model family: rwkv4, rwkv7 (once it is in finetune.models)")
    ap.add_argument("--shapes", nargs="+", default=list(RWKV_PEFT), choices=list(SHAPES),
                    help="model shapes to train (default: those RWKV-PEFT published figures for; 2.9B on request)")
    ap.add_argument("--bases", nargs="+", default=["bf16", "int8", "nf4"], choices=["fp32", "bf16", "int8", "nf4"])
    ap.add_argument("--steps", type=int, default=2, help="optimizer steps per training run (the first is warm-up)")
    ap.add_argument("--ctx", type=int, default=1024, help="training window (1024 in the published comparison)")
    ap.add_argument("--precision", default="auto", choices=["auto", "32"],
                    help="auto: bf16-mixed (fp32 for an fp32 base); 32: fp32 compute, for CPUs without native bf16 "
                         "(more memory than bf16: an upper bound)")
    ap.add_argument("--trim-memory", nargs="+", default=["keep"], choices=["keep", "trim"],
                    help="train with trim_memory false (keep), true (trim), or both")
    ap.add_argument("--optimizer", default="adamw", choices=["adamw", "adamw8bit"],
                    help="the training runs' optimizer (adamw8bit: 8-bit moments, needs bitsandbytes)")
    ap.add_argument("--load-shape", default="1.5B", choices=list(SHAPES))
    ap.add_argument("--gen-shape", default="0.1B", choices=list(SHAPES))
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", default="/tmp/bench-memory")
    ap.add_argument("--worker", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        kind, *rest = args.worker
        fn = {"load": work_load, "train": work_train, "generate": work_generate}[kind]
        if kind == "train":
            rest[6:8] = [int(x) for x in rest[6:8]]  # steps [, ctx [, precision [, trim [, optimizer]]]]
        if kind == "generate":
            rest = [rest[0], int(rest[1]), int(rest[2])]
        print(json.dumps(fn(*rest)))
        return

    d = Path(args.dir)
    d.mkdir(parents=True, exist_ok=True)
    log = d / "results.jsonl"
    tiny = write_checkpoint(d / "tiny.pth", args.arch, 2, 128, "fp32")
    if args.what in ("load", "all"):
        L, C = SHAPES[args.load_shape]
        for suffix in (".pth", ".safetensors"):
            path = write_checkpoint(d / f"{args.arch}-{args.load_shape}-fp16{suffix}", args.arch, L, C, "fp16")
            for how in ("ours", "before"):
                r = spawn(["load", str(path), how, str(tiny)], log)
                print(f"load {path.name} {how}: growth {gb(r['peak'] - r['before'])}, model {gb(r['model_bytes'])}",
                      file=sys.stderr)
    if args.what in ("train", "all"):
        data = write_corpus(d / "corpus")
        for shape in args.shapes:  # small shapes first: the big rows last
            L, C = SHAPES[shape]
            ckpt = write_checkpoint(d / f"{args.arch}-{shape}-bf16.pth", args.arch, L, C, "bf16")
            for base in args.bases:
                for trim in args.trim_memory:
                    out = d / f"run-{args.arch}-{shape}-{base}-ctx{args.ctx}-{trim}-{args.optimizer}"
                    for f in ("last.ckpt", "metrics.csv"):
                        (out / f).unlink(missing_ok=True)
                    r = spawn(["train", args.arch, shape, base, str(ckpt), str(data), str(out), str(args.steps),
                               str(args.ctx), args.precision, trim, args.optimizer], log)
                    print(f"train {shape} {base} {trim} {args.optimizer}: peak {gb(r['peak'])}, "
                          f"{r['tok_s']:.1f} tok/s",
                          file=sys.stderr)
    if args.what in ("generate", "all"):
        L, C = SHAPES[args.gen_shape]
        ckpt = write_checkpoint(d / f"{args.arch}-{args.gen_shape}-fp32.pth", args.arch, L, C, "fp32")
        r = spawn(["generate", str(ckpt), str(args.tokens), str(args.rounds)], log)
        print(json.dumps(r["best"], indent=1), file=sys.stderr)
    results = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.exists() else []
    text = report(results)
    (ROOT / "bench" / "RESULTS-memory.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
