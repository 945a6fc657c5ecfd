"""Tokenize the bundled fables corpus: python data/fables/prepare.py [--tokenizer world|PATH] [--out PREFIX]"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import prepare_bundled  # noqa: E402

if __name__ == "__main__":
    prepare_bundled.main("fables", "fables.txt", prepare_bundled.DEMO_TOKENIZER, template="none", doc_separator="\n***\n")
