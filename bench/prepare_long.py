"""Peak memory of `rwkv-lora prepare` on one huge document; prints a Markdown table (bench/RESULTS-prepare-long.md).

Input: one line of generated text (English-like words with some Chinese, accents and digits, no newline inside), as
a .jsonl record {"text": ...} and as a plain .txt file. Each case runs `python -m finetune.cli prepare` of the
checkout given by --root (default: this one) in its own process; its peak RSS comes from wait4(). The same command
on a 10-byte document gives the fixed cost (Python, numpy, the tokenizer), so the difference is what the document
itself costs.

Usage: python bench/prepare_long.py [--mb 50] [--root OTHER_CHECKOUT] [--formats jsonl,txt]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZERS = [("demo BPE (1024)", os.path.join(ROOT, "data", "demo-tokenizer", "tokenizer.json")),
              ("World (65536)", "world")]


def one_line_text(mb: float, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    letters = list("abcdefghijklmnopqrstuvwxyz")
    words = ["".join(rng.choice(letters, size=rng.integers(1, 10))) for _ in range(5000)]
    words += ["the", "of", "and", "a", "to", "in", "is", "café", "naïve", "12", "2024", "你好", "世界", ",", ".", "!"]
    n = int(mb * 1e6 / 6)
    return " ".join(words[i] for i in rng.integers(0, len(words), size=n))


def peak_rss(root: str, src: str, tokenizer: str, out: str) -> tuple[float, float]:
    """(peak RSS in MiB, seconds) of one `prepare` run of the checkout at `root`."""
    env = dict(os.environ, PYTHONPATH=root)
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "finetune.cli", "prepare", src, "--tokenizer", tokenizer,
                             "--out", out, "--no-progress"], cwd=root, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    err = proc.stderr.read().decode()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"prepare failed ({proc.returncode}): {err.strip()}")
    return usage.ru_maxrss / 1024, seconds  # ru_maxrss is in KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=50)
    ap.add_argument("--root", default=ROOT, help="the checkout whose prepare is measured (default: this one)")
    ap.add_argument("--formats", default="jsonl,txt")
    ap.add_argument("--results", default=os.path.join(ROOT, "bench", "RESULTS-prepare-long.md"))
    args = ap.parse_args()
    text = one_line_text(args.mb)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tiny = os.path.join(d, "tiny.txt")
        with open(tiny, "w", encoding="utf-8") as f:
            f.write("hello there")
        for fmt in args.formats.split(","):
            src = os.path.join(d, f"long.{fmt}")
            with open(src, "w", encoding="utf-8") as f:
                f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n" if fmt == "jsonl" else text + "\n")
            size_mb = os.path.getsize(src) / 1e6
            for label, spec in TOKENIZERS:
                base, _ = peak_rss(args.root, tiny, spec, os.path.join(d, f"tiny-{fmt}-{len(rows)}"))
                peak, secs = peak_rss(args.root, src, spec, os.path.join(d, f"out-{fmt}-{len(rows)}"))
                rows.append(f"| {size_mb:.1f} MB one-line .{fmt} | {label} | {peak:,.0f} MiB | {base:,.0f} MiB | "
                            f"{peak - base:,.0f} MiB | {secs:.1f} s |")
                print(rows[-1], flush=True)
    lines = [f"`python bench/prepare_long.py --mb {args.mb:g}` (checkout: {os.path.abspath(args.root)})", "",
             "| input | tokenizer | peak RSS | fixed cost (10-byte doc) | the document's cost | time |",
             "|---|---|---:|---:|---:|---:|"] + rows
    with open(args.results, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
