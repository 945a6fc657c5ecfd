"""Tokenize the bundled instruct corpus: python data/instruct/prepare.py [--tokenizer world|PATH] [--out PREFIX]"""

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.dirname(HERE)
sys.path.insert(0, os.path.dirname(DATA))

from finetune.prepare import prepare, summary_line  # noqa: E402

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokenizer", default="world")
    ap.add_argument("--out", default=os.path.join(DATA, "..", "out", "instruct"))
    args = ap.parse_args()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    manifest = prepare([os.path.join(HERE, "instruct.jsonl")], args.tokenizer, args.out, template="world", doc_separator=None)
    print(summary_line(manifest, args.out))
