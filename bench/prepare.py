"""Benchmark the data pipeline; prints a Markdown table (saved in bench/RESULTS-prepare.md).

1. `prepare` (1 and 2 workers) against a plain single-process loop (json.loads, tokenizer.encode per document,
   numpy writes of .bin/.idx) over the same input and tokenizer: the World tokenizer and the demo BPE, each
   loaded inside the timed run (as the CLI does) and loaded beforehand (the pipeline alone).
2. The World tokenizer (`finetune.tokenizer`, Rust pyrwkv-tokenizer) against the `rwkv` package's TRIE_TOKENIZER.

Input: a few MB of generated mixed text (English prose, Chinese, code, numbers) as a .jsonl of {"text"} records.
Usage: python bench/prepare.py [--mb 4] [--repeat 2]
"""

import argparse
import json
import os
import random
import struct
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from finetune.prepare import prepare  # noqa: E402
from finetune.tokenizer import load_tokenizer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ("the fox river stone winter bread quickly under although seven market garden letter answer window "
         "remember carry bright silver morning question patient").split()
CHINESE = "人工智能正在改变世界我们今天去公园散步吧天气很好山高水长学习使人进步"
CODE = ["def f(x):\n    return x * 2\n", "for i in range(10):\n    print(i, i ** 2)\n",
        "if (a && b) { return -1; }\n", "    let v: Vec<u32> = Vec::new();\n"]


def make_input(path, mb, seed=0):
    rng = random.Random(seed)
    size = 0
    with open(path, "w", encoding="utf-8") as f:
        while size < mb * 1_000_000:
            parts = []
            for _ in range(rng.randint(5, 30)):
                kind = rng.random()
                if kind < 0.6:
                    parts.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 25))).capitalize() + ".")
                elif kind < 0.75:
                    parts.append("".join(rng.choice(CHINESE) for _ in range(rng.randint(5, 40))) + "。")
                elif kind < 0.9:
                    parts.append(rng.choice(CODE))
                else:
                    parts.append(" ".join(str(rng.randint(0, 10 ** 6)) for _ in range(rng.randint(2, 10))))
            line = json.dumps({"text": " ".join(parts)}, ensure_ascii=False) + "\n"
            f.write(line)
            size += len(line.encode("utf-8"))


def plain_loop(inp, spec, out):
    """What one would write by hand: one process, one encode call per document, numpy writes."""
    tok = load_tokenizer(spec)
    dtype = np.uint16 if tok.vocab_size < 65500 else np.int32
    sizes = []
    with open(inp, encoding="utf-8") as f, open(out + ".bin", "wb") as b:
        for line in f:
            ids = tok.encode(json.loads(line)["text"]) + [0]
            np.asarray(ids, dtype=dtype).tofile(b)
            sizes.append(len(ids))
    sizes = np.asarray(sizes, dtype=np.int32)
    ptr = np.concatenate([[0], np.cumsum(sizes[:-1].astype(np.int64))]) * np.dtype(dtype).itemsize
    with open(out + ".idx", "wb") as x:
        x.write(b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 4 if dtype == np.int32 else 8, sizes.size, sizes.size + 1))
        x.write(sizes.tobytes() + ptr.astype(np.int64).tobytes() + np.arange(sizes.size + 1, dtype=np.int64).tobytes())
    return int(sizes.sum())


def best(fn, repeat):
    times, result = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return min(times), result


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=4)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        inp = os.path.join(d, "mixed.jsonl")
        make_input(inp, args.mb)
        size_mb = os.path.getsize(inp) / 1e6
        specs = [("World", "world"), ("demo BPE 1024", os.path.join(ROOT, "data/demo-tokenizer/tokenizer.json"))]
        # first as the CLI runs (each run loads its tokenizer: ~0.4 s for World), then with the tokenizer loaded
        # beforehand (a Tokenizer object), which shows the pipeline itself
        for label, spec in specs + [(f"{lb}, loaded beforehand", load_tokenizer(sp)) for lb, sp in specs]:
            t_plain, n = best(lambda: plain_loop(inp, spec, os.path.join(d, "plain")), args.repeat)
            rows.append((f"plain loop, {label}", n / t_plain, 1.0))
            for w in (1, 2):
                t, m = best(lambda: prepare([inp], spec, os.path.join(d, f"w{w}"), workers=w, progress=False,
                                           force=True),
                            args.repeat)
                assert m["tokens"] == n, "prepare and the plain loop disagree"
                rows.append((f"`prepare --workers {w}`, {label}", n / t, t_plain / t))
        import rwkv.rwkv_tokenizer as rt

        text = "".join(json.loads(line)["text"] + "\n" for line in open(inp, encoding="utf-8"))
        trie = rt.TRIE_TOKENIZER(os.path.join(os.path.dirname(rt.__file__), "rwkv_vocab_v20230424.txt"))
        world = load_tokenizer("world")
        sample = text[: 1_000_000]  # the pure-Python trie is slow: time it on the first MB
        t_trie, ids_trie = best(lambda: trie.encode(sample), 1)
        t_ours, ids_ours = best(lambda: world.encode(sample), args.repeat)
        assert ids_trie == ids_ours, "World tokenizer differs from TRIE_TOKENIZER"
        rows.append(("rwkv package TRIE_TOKENIZER (World)", len(ids_trie) / t_trie, 1.0))
        rows.append(("finetune.tokenizer World `encode`", len(ids_ours) / t_ours, t_trie / t_ours))
    lines = [f"Input: {size_mb:.1f} MB of generated mixed text (English, Chinese, code, numbers) as .jsonl; "
             f"{os.cpu_count()} CPU cores; load average at the end {os.getloadavg()[0]:.1f} (other jobs share "
             f"the cores); best of {args.repeat}. Times include loading the tokenizer unless marked "
             "\"loaded beforehand\".", "",
             "| what | tokens/s | ratio |", "|---|---:|---:|"]
    lines += [f"| {name} | {tps:,.0f} | {ratio:.2f}x |" for name, tps, ratio in rows]
    lines += ["", "Ratios: `prepare` rows against the plain loop with the same tokenizer; the World `encode` row "
              "against TRIE_TOKENIZER (same ids, checked)."]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
