"""Merge benchmark: time and peak memory of `rwkv-lora merge` on a 1.5B-shaped checkpoint, against the floor.

    python bench/merge.py [--n-layer 24 --n-embd 2048 --vocab 50277] [--dir /tmp/bench-merge] [--keep]

A random fp16 checkpoint (24 x 2048, vocab 50277: ~1.5B parameters, ~3 GB) and an r=16 att+ffn adapter (with the
time/ln tensors trained in full) are written first. Then, each in its own subprocess (so the peak RSS is its own):
- floor: read the checkpoint's bytes and write them to a new file (fsync'd), the least any merge must do;
- merge: `merge_adapters` to a .pth.
Writes bench/RESULTS-merge.md.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CHILD_FLOOR = r"""
import os, resource, sys, time
src, dst = sys.argv[1], sys.argv[2]
t0 = time.perf_counter()
with open(src, "rb") as f, open(dst, "wb") as g:
    while True:
        b = f.read(64 << 20)
        if not b:
            break
        g.write(b)
    g.flush(); os.fsync(g.fileno())
dt = time.perf_counter() - t0
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
print({"seconds": dt, "peak_rss": int(hwm.split()[1]) * 1024})
"""

CHILD_MERGE = r"""
import resource, sys, time
sys.path.insert(0, sys.argv[4])
t_import = time.perf_counter()
import torch
from finetune.merge import merge_adapters
def hwm():
    return int([l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]) * 1024
base_rss = hwm()
t0 = time.perf_counter()
merge_adapters(sys.argv[1], [sys.argv[2]], sys.argv[3])
dt = time.perf_counter() - t0
print({"seconds": dt, "peak_rss": hwm(), "import_rss": base_rss})
"""


def build(d: Path, n_layer: int, n_embd: int, vocab: int, r: int) -> tuple[Path, Path]:
    import torch

    from finetune.adapter_format import write_adapter
    from finetune.models.rwkv4 import FAMILY
    from finetune.checkpoint import fingerprint
    from finetune.models.rwkv4 import expected_shapes
    from finetune.models.rwkv4 import RWKVConfig

    base, adapter = d / "base-fp16.pth", d / "adapter-r16"
    if base.exists() and adapter.exists():
        return base, adapter
    cfg = RWKVConfig(n_layer=n_layer, n_embd=n_embd, vocab_size=vocab)
    g = torch.Generator().manual_seed(0)
    sd = {}
    for k, shape in expected_shapes(cfg).items():
        sd[k] = (torch.randn(shape, generator=g, dtype=torch.float16) * 0.02)
    torch.save(sd, base)
    lora, full = {}, {}
    for i in range(n_layer):
        for part, mods in FAMILY.lora_parts.items():
            for m in mods:
                out_f, in_f = sd[f"blocks.{i}.{part}.{m}.weight"].shape
                lora[f"blocks.{i}.{part}.{m}"] = (torch.randn(r, in_f, generator=g) * 0.01,
                                                  torch.randn(out_f, r, generator=g) * 0.01)
    for k, v in sd.items():
        if FAMILY.full_groups["time"](k) or FAMILY.full_groups["ln"](k):
            full[k] = v.float() + 0.01
    meta = {"base": {"fingerprint": fingerprint(sd), "n_layer": n_layer, "n_embd": n_embd, "vocab_size": vocab,
                     "dim_ffn": cfg.dim_ffn, "path": str(base)}, "tokenizer": None, "r": r, "alpha": 2 * r,
            "parts": ["att", "ffn"], "train": ["time", "ln"], "recipe": {"bench": True}}
    write_adapter(adapter, meta, lora, full)
    del sd
    return base, adapter


def run(code: str, *args: str) -> dict:
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(r.stderr)
    import ast

    return ast.literal_eval(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-layer", type=int, default=24)
    ap.add_argument("--n-embd", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=50277)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--dir", default="/tmp/bench-merge")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    d = Path(args.dir)
    d.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    base, adapter = build(d, args.n_layer, args.n_embd, args.vocab, args.r)
    print(f"built in {time.perf_counter() - t0:.1f}s: {base} ({base.stat().st_size / 1e9:.2f} GB)", flush=True)
    size = base.stat().st_size
    floors, merges = [], []
    for _ in range(2):  # alternate, so both see the same page-cache conditions
        floors.append(run(CHILD_FLOOR, str(base), str(d / "copy.pth")))
        (d / "copy.pth").unlink()
        merges.append(run(CHILD_MERGE, str(base), str(adapter), str(d / "merged.pth"), str(ROOT)))
        (d / "merged.pth").unlink()
        print(floors[-1], merges[-1], flush=True)
    floor = min(floors, key=lambda x: x["seconds"])
    merge = min(merges, key=lambda x: x["seconds"])
    rows = [
        "# Merge benchmark",
        "",
        f"Base: random fp16 RWKV-4 {args.n_layer} x {args.n_embd}, vocab {args.vocab} ({size / 1e9:.2f} GB); adapter "
        f"r={args.r} on att+ffn (7 matrices per layer) plus time/ln tensors trained in full. 2 CPU cores shared, "
        "file in the page cache; best of 2 runs, each in its own subprocess; peak = VmHWM of that process "
        "(includes the ~0.3 GB of the Python + torch import).",
        "",
        "| run | time (s) | vs floor | peak RSS (GB) | vs checkpoint size |",
        "|---|---|---|---|---|",
        f"| floor: read + write the same bytes (fsync) | {floor['seconds']:.2f} | 1.00x | "
        f"{floor['peak_rss'] / 1e9:.2f} | {floor['peak_rss'] / size:.2f}x |",
        f"| `merge_adapters` -> .pth (fsync) | {merge['seconds']:.2f} | {merge['seconds'] / floor['seconds']:.2f}x | "
        f"{merge['peak_rss'] / 1e9:.2f} | {merge['peak_rss'] / size:.2f}x |",
        "",
        f"Targets: time <= 2x the floor, peak memory <= 1.3x the checkpoint. All runs: floors "
        f"{[round(x['seconds'], 2) for x in floors]}, merges {[round(x['seconds'], 2) for x in merges]}.",
        "",
    ]
    (ROOT / "bench" / "RESULTS-merge.md").write_text("\n".join(rows))
    print("\n".join(rows))
    if not args.keep:
        for p in (base,):
            p.unlink()
        import shutil

        shutil.rmtree(adapter, ignore_errors=True)


if __name__ == "__main__":
    main()
