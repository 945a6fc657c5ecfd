"""open_corpus / WindowDataset: windows are slices of the stream, masks aligned, schedules deterministic."""

import json
import pickle

import numpy as np
import pytest
import torch

from conftest import read_binidx
from finetune.data import WindowDataset, magic_prime, open_corpus, _is_prime
from finetune.errors import FinetuneError
from finetune.prepare import prepare


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def chat_corpus(tmp_path_factory, small_tokenizer):
    d = tmp_path_factory.mktemp("chat")
    records = []
    for i in range(80):
        records.append({"instruction": f"What is {i} plus {i}?", "output": f"It is {2 * i}."})
        records.append({"text": f"The fox number {i} saw the grapes and walked away."})
    path = write_jsonl(d / "d.jsonl", records)
    prepare([path], small_tokenizer, str(d / "one"), template="raven", progress=False)
    prepare([path], small_tokenizer, str(d / "sh"), template="raven", shard_tokens=700, progress=False)
    return d


def stream(prefix):
    _, items, _ = read_binidx(prefix)
    return np.concatenate(items).astype(np.int64)


def test_open_corpus_forms(chat_corpus):
    ref = stream(chat_corpus / "one")
    for spec in ["one", "one.bin", "one.json"]:
        c = open_corpus(str(chat_corpus / spec))
        assert c.num_tokens == ref.size and np.array_equal(c.tokens(), ref)
        assert c.has_mask and c.meta["template"] == "raven" and c.meta["vocab_size"] < 65500
        assert c.max_token_id() == int(ref.max())
    sharded = open_corpus(str(chat_corpus / "sh"))
    assert len(sharded.shards) > 2 and np.array_equal(sharded.tokens(), ref)
    _, m1 = open_corpus(str(chat_corpus / "one")).window(0, ref.size)
    _, m2 = sharded.window(0, ref.size)
    assert np.array_equal(m1, m2) and m1.min() == 0 and m1.max() == 1
    c2 = pickle.loads(pickle.dumps(sharded))
    assert np.array_equal(c2.tokens(), ref)


@pytest.mark.parametrize("schedule", ["random", "magic_prime"])
def test_windows_are_stream_slices(chat_corpus, schedule):
    c = open_corpus(str(chat_corpus / "sh"))
    toks, mask = c.window(0, c.num_tokens)
    ds = WindowDataset(c, 32, schedule=schedule, seed=3)
    for i in range(0, len(ds), max(1, len(ds) // 25)):
        item = ds[i]
        s = ds.start_of(i)
        assert item["input_ids"].dtype == torch.int64 and item["loss_mask"].dtype == torch.float32
        assert item["input_ids"].shape == item["targets"].shape == item["loss_mask"].shape == (32,)
        assert item["input_ids"].tolist() == toks[s : s + 32].tolist()
        assert item["targets"].tolist() == toks[s + 1 : s + 33].tolist()
        assert item["loss_mask"].tolist() == mask[s + 1 : s + 33].astype(float).tolist()


def test_plain_corpus_mask_is_ones(tmp_path, small_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "the fox and the grapes " * 20}] * 3)
    prepare([path], small_tokenizer, str(tmp_path / "p"), progress=False)
    item = WindowDataset(open_corpus(str(tmp_path / "p")), 16)[0]
    assert torch.equal(item["loss_mask"], torch.ones(16))


def test_magic_prime_visits_each_window_once(chat_corpus):
    c = open_corpus(str(chat_corpus / "one"))
    ctx = 16
    ds = WindowDataset(c, ctx, schedule="magic_prime")
    p = ds.magic_prime
    assert p == magic_prime(c.num_tokens, ctx) and p % 3 == 2 and _is_prime(p) and p < c.num_tokens / ctx - 1
    assert not any(q % 3 == 2 and _is_prime(q) for q in range(p + 1, int(np.ceil(c.num_tokens / ctx - 1))))
    assert len(ds) == p
    for epoch in (0, 1, 5):
        ds.set_epoch(epoch)
        starts = [ds.start_of(i) for i in range(len(ds))]
        assert sorted(starts) == [k * ctx for k in range(p)]
        assert max(starts) + ctx + 1 <= c.num_tokens
    # RWKV-LM's formula, written out: ii = 1 + epoch * samples_per_epoch + i
    ds.set_epoch(2)
    factor = int(p * (5 ** 0.5 - 1) / 2)
    assert ds.start_of(7) == ((factor * (1 + 2 * p + 7) ** 3) % p) * ctx


def test_primes():
    assert [n for n in range(60) if _is_prime(n)] == [2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59]
    assert _is_prime(2_147_483_647) and not _is_prime(2_147_483_649)
    assert magic_prime(1000 * 100, 100) == 983  # 997 and 991 are 1 mod 3


def test_random_schedule_deterministic(chat_corpus):
    c = open_corpus(str(chat_corpus / "one"))
    a = WindowDataset(c, 24, seed=1)
    b = WindowDataset(c, 24, seed=1)
    other = WindowDataset(c, 24, seed=2)
    assert len(a) == (c.num_tokens - 1) // 24
    sa = [a.start_of(i) for i in range(len(a))]
    assert sa == [b.start_of(i) for i in reversed(range(len(b)))][::-1]  # order of access does not matter
    assert sa != [other.start_of(i) for i in range(len(other))]
    assert all(0 <= s <= c.num_tokens - 25 for s in sa)
    assert torch.equal(a[3]["input_ids"], b[3]["input_ids"])
    a.set_epoch(1)
    assert [a.start_of(i) for i in range(len(a))] != sa
    assert len(WindowDataset(c, 24, epoch_steps=7)) == 7
    with pytest.raises(IndexError):
        a[len(a)]


def test_errors(tmp_path, chat_corpus):
    c = open_corpus(str(chat_corpus / "one"))
    with pytest.raises(FinetuneError, match="shorter than one window"):
        WindowDataset(c, c.num_tokens)
    with pytest.raises(FinetuneError, match="no prepared data"):
        open_corpus(str(tmp_path / "missing"))
    # a truncated .bin is reported with its name
    src = chat_corpus / "one"
    for ext in (".bin", ".idx"):
        (tmp_path / f"t{ext}").write_bytes((src.parent / f"one{ext}").read_bytes())
    with open(tmp_path / "t.bin", "r+b") as f:
        f.truncate(100)
    with pytest.raises(FinetuneError, match=r"t\.bin"):
        open_corpus(str(tmp_path / "t"))
    (tmp_path / "bad.idx").write_bytes(b"NOTMAGIC" * 10)
    (tmp_path / "bad.bin").write_bytes(b"")
    with pytest.raises(FinetuneError, match=r"bad\.idx.*magic"):
        open_corpus(str(tmp_path / "bad"))
    # a damaged manifest: shards that are not objects naming their files
    for shards in ([{}], [5], [{"prefix": 3}]):
        (tmp_path / "m.json").write_text(json.dumps({"shards": shards}))
        with pytest.raises(FinetuneError, match=r"m\.json: shard 0 is damaged"):
            open_corpus(str(tmp_path / "m.json"))


def test_dataloader_workers(chat_corpus):
    c = open_corpus(str(chat_corpus / "sh"))
    ds = WindowDataset(c, 16, schedule="magic_prime")
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=1)
    batch = next(iter(loader))
    assert batch["input_ids"].shape == (4, 16)
    assert torch.equal(batch["input_ids"][1], ds[1]["input_ids"])


def test_sampling_errors_name_the_setting(chat_corpus):
    # the recipe setting is `sampling` (`schedule` is the learning-rate schedule): the messages must say so
    c = open_corpus(str(chat_corpus / "one"))
    ctx = c.num_tokens // 2  # two windows: no prime p % 3 == 2 below num_tokens / ctx - 1, about 1
    with pytest.raises(FinetuneError,
                       match=r"too short for sampling: magic_prime .* use sampling: random or a smaller ctx_len$"):
        WindowDataset(c, ctx, schedule="magic_prime")
    with pytest.raises(FinetuneError, match=r"^sampling: 'cyclic' is not one of random, magic_prime$"):
        WindowDataset(c, 32, schedule="cyclic")
