"""Train data/demo-tokenizer/tokenizer.json: a byte-level BPE (vocab 1024, <|endoftext|> = id 0) on the two demo
corpora, for the tiny demo models. Deterministic for a given `tokenizers` version: python data/demo-tokenizer/make.py
"""

import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.dirname(HERE)
SOURCES = [os.path.join(DATA, "fables", "fables.txt"), os.path.join(DATA, "recipes", "recipes.txt")]


def documents():
    for path in SOURCES:
        with open(path, encoding="utf-8") as f:
            yield from f.read().split("\n***\n")


def main():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(documents(), trainer)
    assert tok.token_to_id("<|endoftext|>") == 0
    out = os.path.join(HERE, "tokenizer.json")
    tok.save(out)
    print(f"{out}: vocab {tok.get_vocab_size()}")


if __name__ == "__main__":
    main()
