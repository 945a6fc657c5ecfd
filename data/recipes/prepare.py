"""Tokenize the bundled recipes corpus: python data/recipes/prepare.py [--tokenizer world|PATH] [--out PREFIX]"""

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.dirname(HERE)
sys.path.insert(0, os.path.dirname(DATA))

from finetune.prepare import prepare, summary_line  # noqa: E402

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokenizer", default=os.path.join(DATA, "demo-tokenizer", "tokenizer.json"))
    ap.add_argument("--out", default=os.path.join(DATA, "..", "out", "recipes"))
    args = ap.parse_args()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    manifest = prepare([os.path.join(HERE, "recipes.txt")], args.tokenizer, args.out, template="none", doc_separator="\n***\n")
    print(summary_line(manifest, args.out))
