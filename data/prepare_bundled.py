"""Shared by data/<name>/prepare.py: tokenize one bundled corpus into out/<name> with `finetune.prepare`."""

import argparse
import os
import sys

DATA = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(DATA))

from finetune.prepare import prepare, summary_line  # noqa: E402

DEMO_TOKENIZER = os.path.join(DATA, "demo-tokenizer", "tokenizer.json")


def main(name: str, filename: str, tokenizer: str, template: str, doc_separator: str | None) -> None:
    ap = argparse.ArgumentParser(
        description=f"Tokenize the bundled {name} corpus: python data/{name}/prepare.py [--tokenizer world|PATH] "
                    f"[--out PREFIX] [--force]")
    ap.add_argument("--tokenizer", default=tokenizer)
    ap.add_argument("--out", default=os.path.join(DATA, "..", "out", name))
    ap.add_argument("--force", action="store_true", help="replace an earlier output")
    args = ap.parse_args()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    manifest = prepare([os.path.join(DATA, name, filename)], args.tokenizer, args.out, template=template,
                       doc_separator=doc_separator, force=args.force)
    print(summary_line(manifest, args.out))
