"""Tokenize the bundled recipes corpus: python data/recipes/prepare.py [--tokenizer world|PATH] [--out PREFIX]"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import prepare_bundled  # noqa: E402

if __name__ == "__main__":
    prepare_bundled.main("recipes", "recipes.txt", prepare_bundled.DEMO_TOKENIZER, template="none", doc_separator="\n***\n")
