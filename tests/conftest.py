import struct

import numpy as np
import pytest

SAMPLE_TEXTS = [
    "The fox saw the grapes hanging high above and leapt, but could not reach them.",
    "Mix two cups of flour with a pinch of salt, then knead the dough for ten minutes.",
    "What is seven plus five? Twelve. What is the capital of France? Paris.",
    "Slow and steady wins the race, said the tortoise to the hare.",
    "Preheat the oven to 200 degrees and bake until golden brown.",
] * 4


def build_tokenizer_json(path, texts=SAMPLE_TEXTS, vocab_size=400):
    """A small byte-level BPE tokenizer.json with <|endoftext|> = 0, built with `tokenizers`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.save(str(path))
    return str(path)


@pytest.fixture(scope="session")
def small_tokenizer(tmp_path_factory):
    return build_tokenizer_json(tmp_path_factory.mktemp("tok") / "tokenizer.json")


DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float64, 8: np.uint16}


def read_binidx(prefix):
    """Independent reader written from the format description: returns (dtype, [item arrays], doc_idx)."""
    with open(f"{prefix}.idx", "rb") as f:
        raw = f.read()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    assert struct.unpack_from("<Q", raw, 9)[0] == 1
    dtype = np.dtype(DTYPES[raw[17]])
    n, d = struct.unpack_from("<QQ", raw, 18)
    off = 34
    sizes = np.frombuffer(raw, "<i4", n, off)
    pointers = np.frombuffer(raw, "<i8", n, off + 4 * n)
    doc_idx = np.frombuffer(raw, "<i8", d, off + 12 * n)
    assert len(raw) == off + 12 * n + 8 * d
    with open(f"{prefix}.bin", "rb") as f:
        data = f.read()
    assert len(data) == int(sizes.sum()) * dtype.itemsize
    items = [np.frombuffer(data, dtype.newbyteorder("<"), int(s), int(p)) for s, p in zip(sizes, pointers)]
    return dtype, items, doc_idx
