"""Print a continuation from the base model and from base + adapter, side by side (the demo's last step).

    python scripts/demo_compare.py BASE.pth ADAPTER_DIR TOKENIZER [--prompt TEXT] [--tokens N] [--seed S]

Sampling is a small local loop (temperature + top-p, fixed seed) over the model's RNN mode (`prefill`, `step`).
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from finetune import load_model  # noqa: E402
from finetune.tokenizer import load_tokenizer  # noqa: E402


def sample(model, prompt_ids, n, temperature=0.8, top_p=0.9, seed=0, stop=0):
    g = torch.Generator().manual_seed(seed)
    logits, state = model.prefill(prompt_ids)
    out = []
    for _ in range(n):
        probs = torch.softmax(logits[0].float() / temperature, dim=-1)
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, 0) - sorted_p < top_p
        sorted_p = sorted_p * keep
        tok = int(order[torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=g)])
        if tok == stop:
            break
        out.append(tok)
        logits, state = model.step([tok], state)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("base")
    ap.add_argument("adapter")
    ap.add_argument("tokenizer")
    ap.add_argument("--prompt", default="The ")
    ap.add_argument("--tokens", type=int, default=80)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    tok = load_tokenizer(args.tokenizer)
    ids = tok.encode(args.prompt)
    with torch.no_grad():
        base = sample(load_model(args.base), ids, args.tokens, seed=args.seed)
        tuned = sample(load_model(args.base, adapters=[args.adapter]), ids, args.tokens, seed=args.seed)
    width = 58
    left = textwrap.wrap((args.prompt + tok.decode(base)).replace("\n", " / "), width)
    right = textwrap.wrap((args.prompt + tok.decode(tuned)).replace("\n", " / "), width)
    print(f"{'base (pretrained on fables)':<{width}} | base + LoRA adapter (recipes)")
    print(f"{'-' * width}-+-{'-' * width}")
    for i in range(max(len(left), len(right))):
        a = left[i] if i < len(left) else ""
        b = right[i] if i < len(right) else ""
        print(f"{a:<{width}} | {b}")


if __name__ == "__main__":
    main()
