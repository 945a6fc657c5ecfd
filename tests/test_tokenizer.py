"""World tokenizer: ids identical to the rwkv package's TRIE_TOKENIZER; round trips; HF tokenizer.json loading."""

import os
import pickle

import pytest

from finetune.errors import FinetuneError
from finetune.tokenizer import load_tokenizer

MIXED = [
    "The quick brown fox jumps over the lazy dog. It's 3:15pm, isn't it?",
    "人工智能正在改变世界。我们今天去公园散步吧！",
    "吾輩は猫である。名前はまだ無い。カタカナとひらがな。",
    "emoji: 🎉🐍👩‍💻🇫🇷 ✓ ♥ — “quotes” … café naïve Ünïcödé",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n\n\tx = {'a': [1, 2]}",
    "spaces:          and tabs\t\t\t\tand newlines\n\n\n\n\nend   ",
    "control \x00\x01\x02\x07\x1b[0m\x7f chars \r\n windows line",
    "Здравствуй, мир! Γειά σου κόσμε! مرحبا بالعالم שלום עולם",
    "",
    " ",
    "a" * 300 + "\n" * 50 + "ab" * 100,
]


@pytest.fixture(scope="module")
def world():
    return load_tokenizer("world")


@pytest.fixture(scope="module")
def trie():
    import rwkv.rwkv_tokenizer as rt

    path = os.path.join(os.path.dirname(rt.__file__), "rwkv_vocab_v20230424.txt")
    return rt.TRIE_TOKENIZER(path)


def test_world_matches_rwkv_trie_tokenizer(world, trie):
    for text in MIXED:
        assert world.encode(text) == trie.encode(text), repr(text)
    big = "\n".join(MIXED) * 3
    assert world.encode(big) == trie.encode(big)
    assert world.encode_batch(MIXED) == [trie.encode(t) for t in MIXED]


def test_world_vocab_same_as_rwkv_package(world, trie):
    from finetune.tokenizer import read_world_vocab

    ours = read_world_vocab(world.vocab_path)
    assert ours == trie.idx2token
    assert max(ours) == 65529 and 0 not in ours


def test_world_round_trip_and_attributes(world):
    for text in MIXED:
        assert world.decode(world.encode(text)) == text
    assert world.vocab_size == 65536 and world.eod_id == 0 and world.name == "world"
    # an id sequence ending inside a character decodes with a replacement character instead of crashing
    ids = world.encode("🎉")
    assert len(ids) > 1 and world.decode(ids[:1]) == "\ufffd"
    assert world.decode([0]) == ""


def test_world_pickles(world):
    clone = pickle.loads(pickle.dumps(world))
    assert clone.encode(MIXED[1]) == world.encode(MIXED[1])


def make_small_tokenizer(path, texts=None, vocab_size=300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts or MIXED * 5, trainer)
    tok.save(str(path))
    return str(path)


def test_hf_tokenizer_json(tmp_path):
    path = make_small_tokenizer(tmp_path / "tokenizer.json")
    tok = load_tokenizer(path)
    assert tok.eod_id == 0 and tok.vocab_size <= 300
    assert tok.name.startswith("tokenizer.json sha256:") and len(tok.name.split(":")[1]) == 16
    for text in MIXED[:6]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode_batch(MIXED[:3]) == [tok.encode(t) for t in MIXED[:3]]
    assert pickle.loads(pickle.dumps(tok)).encode("hello") == tok.encode("hello")


def test_bad_tokenizer_paths(tmp_path):
    with pytest.raises(FinetuneError, match="not found"):
        load_tokenizer(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(FinetuneError, match="bad.json"):
        load_tokenizer(str(bad))
