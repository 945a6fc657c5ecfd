"""Which learning rate works for RWKV-7 state tuning: a sweep on a small pretrained RWKV-7.

    python bench/state_lr_rwkv7.py                        # lr 1e-3, 1e-2, 1e-1, 1; a few minutes on 2 cores
    python bench/state_lr_rwkv7.py --lrs 0.03 0.3 --steps 100

A small RWKV-7 (`rwkv-lora init --arch 7`, 4 x 128, 2 heads of 64, the demo tokenizer's vocabulary of 1024) is
pretrained in full on the bundled fables (so it is a language model, not noise), then state-tuned (`train_type:
state`: only the start WKV state learns, as RWKV-PEFT does) on the bundled recipes at each learning rate, with the
same schedule (warmup, cosine to lr / 10), data and seed. For each run: the held-out loss on the recipes (what state
tuning is for) and on the fables (what the model knew before: a start state that wrecks it shows here), against
the base with no state. The tokens of a window after the first few see the tuned state only through the
recurrence, so the held-out loss is also split into the window's first 16 targets and the rest.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
TOKENIZER = ROOT / "data" / "demo-tokenizer" / "tokenizer.json"
HEAD_TARGETS = 16


def prepare_corpora(work: Path) -> dict[str, str]:
    """fables / recipes split into train and the last tenth of their documents for validation (as scripts/demo.sh)."""
    from finetune.prepare import prepare

    out = {}
    for name in ("fables", "recipes"):
        docs = (ROOT / "data" / name / f"{name}.txt").read_text(encoding="utf-8").split("\n***\n")
        cut = len(docs) - max(len(docs) // 10, 2)
        for part, chunk in (("train", docs[:cut]), ("val", docs[cut:])):
            text = work / f"{name}-{part}.txt"
            text.write_text("\n***\n".join(chunk), encoding="utf-8")
            prefix = work / f"{name}-{part}"
            if not Path(f"{prefix}.json").is_file():
                prepare([str(text)], str(TOKENIZER), str(prefix), doc_separator="\n***\n", progress=False)
            out[f"{name}-{part}"] = f"{prefix}.json"
    return out


def train(overrides: dict[str, Any]) -> dict[str, Any]:
    from finetune.train.config import load_config
    from finetune.train.main import main as train_main

    return train_main(load_config(None, dict(overrides)), quiet=True)


def held_out(model_path: Path, adapter: str | None, data: str, ctx: int, windows: int) -> tuple[float, float, float]:
    """(mean loss, loss of the first HEAD_TARGETS targets, loss of the rest) over `windows` fixed windows."""
    import torch
    import torch.nn.functional as F

    from finetune import load_model
    from finetune.data import WindowDataset, open_corpus

    model = load_model(model_path, adapters=[adapter] if adapter else [])
    ds = WindowDataset(open_corpus(data), ctx, schedule="random", seed=123, epoch_steps=windows)
    total = torch.zeros(ctx)
    with torch.no_grad():
        for j in range(windows):
            w = ds[j]
            logits = model(w["input_ids"].unsqueeze(0))[0]
            total += F.cross_entropy(logits.float(), w["targets"], reduction="none")
    per = total / windows
    return per.mean().item(), per[:HEAD_TARGETS].mean().item(), per[HEAD_TARGETS:].mean().item()


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 1e-2, 1e-1, 1.0])
    ap.add_argument("--steps", type=int, default=60, help="state-tuning steps per learning rate")
    ap.add_argument("--pretrain-steps", type=int, default=300)
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--windows", type=int, default=32, help="held-out windows per evaluation")
    ap.add_argument("--work", default="/tmp/bench-state-lr-rwkv7")
    args = ap.parse_args()
    torch.set_num_threads(1)  # a tiny model: a second thread only waits at barriers on a shared machine
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data = prepare_corpora(work)
    base = work / "pretrained.pth"
    if not base.is_file():
        from finetune.cli import main as cli

        init = work / "init.pth"
        if not init.is_file():
            assert cli(["init", "--arch", "7", "--n-layer", "4", "--n-embd", "128", "--vocab", "1024",
                        "--seed", "0", "--out", str(init)]) == 0
        res = train({"model": str(init), "data": data["fables-train"], "tokenizer": str(TOKENIZER),
                     "out_dir": str(work / "pretrain"), "method": "full", "max_steps": args.pretrain_steps,
                     "ctx_len": args.ctx, "micro_bsz": 8, "lr": 3e-3, "lr_final": 3e-4, "warmup_steps": 10,
                     "precision": "32", "seed": 0, "logger": "none"})
        Path(res["final"]).replace(base)
    common = {"model": str(base), "data": data["recipes-train"], "tokenizer": str(TOKENIZER), "train_type": "state",
              "max_steps": args.steps, "ctx_len": args.ctx, "micro_bsz": 8, "warmup_steps": 5,
              "schedule": "cosine", "precision": "32", "seed": 0, "logger": "none"}
    rows = [("base (no state)", None, None)]
    for lr in args.lrs:
        out = work / f"state-lr{lr:g}"
        res = train({**common, "out_dir": str(out), "lr": lr, "lr_final": lr / 10})
        losses = [res["losses"][s] for s in sorted(res["losses"])]
        rows.append((f"lr {lr:g}", res["final"], (losses[0], losses[-1])))
    results = []
    for name, adapter, curve in rows:
        rec = held_out(base, adapter, data["recipes-val"], args.ctx, args.windows)
        fab = held_out(base, adapter, data["fables-val"], args.ctx, args.windows)
        results.append({"run": name, "train": curve, "recipes": rec, "fables": fab})
        print(json.dumps(results[-1]), file=sys.stderr)
    print(f"\nRWKV-7 state tuning, 4 x 128 (2 heads of 64), vocab 1024, pretrained {args.pretrain_steps} steps on the "
          f"fables; state-tuned {args.steps} steps on the recipes (8 x {args.ctx} tokens, warmup 5, cosine to lr/10, "
          f"Adam on the WKV state only); held-out loss over {args.windows} windows of {args.ctx}\n")
    print(f"| run | train loss first -> last | recipes val (all / first {HEAD_TARGETS} / rest) | "
          f"fables val (all / first {HEAD_TARGETS} / rest) |")
    print("|---|---|---|---|")
    for r in results:
        curve = "-" if r["train"] is None else f"{r['train'][0]:.3f} -> {r['train'][1]:.3f}"
        rec, fab = r["recipes"], r["fables"]
        print(f"| {r['run']} | {curve} | {rec[0]:.3f} / {rec[1]:.3f} / {rec[2]:.3f} | "
              f"{fab[0]:.3f} / {fab[1]:.3f} / {fab[2]:.3f} |")


if __name__ == "__main__":
    main()
