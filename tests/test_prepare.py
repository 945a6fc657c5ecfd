"""`rwkv-lora prepare`: outputs decoded with an independent binidx reader and compared with direct tokenization."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import read_binidx
from finetune import cli
from finetune.errors import FinetuneError
from finetune.prepare import prepare, record_segments, resolve_template
from finetune.tokenizer import load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

INSTRUCT = [
    {"instruction": "What is 2 + 3?", "output": "2 + 3 = 5."},
    {"instruction": "Translate to French.", "input": "cat", "output": "chat"},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
                  {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another?"},
                  {"role": "assistant", "content": "Red."}]},
    {"text": "A plain document inside an instruction file."},
]


def write_jsonl(path, records, extra_lines=()):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        for line in extra_lines:
            f.write(line + "\n")
    return str(path)


def expected_document(tok, segments):
    ids, mask = [], []
    for text, learn in segments:
        t = tok.encode(text)
        ids += t
        mask += [int(learn)] * len(t)
    return ids + [0], mask + [1]


def test_plain_text_world_int32(tmp_path):
    texts = ["First document: héllo 你好 🎉\n", "Second one,\n  with code: x = [1, 2]\n"]
    for i, t in enumerate(texts):
        (tmp_path / f"doc{i}.txt").write_text(t, encoding="utf-8")
    m = prepare([str(tmp_path / "doc*.txt")], "world", str(tmp_path / "out"), progress=False)
    dtype, items, doc_idx = read_binidx(tmp_path / "out")
    tok = load_tokenizer("world")
    assert dtype == np.int32
    assert [it.tolist() for it in items] == [tok.encode(t) + [0] for t in texts]
    assert doc_idx.tolist() == [0, 1, 2]
    assert not os.path.exists(tmp_path / "out.mask.bin") and m["has_mask"] is False
    assert m["documents"] == 2 and m["tokens"] == sum(len(it) for it in items)
    assert m["tokenizer"] == "world" and m["vocab_size"] == 65536 and m["dtype"] == "int32"
    assert len(m["sources"]) == 2 and all(len(s["sha256"]) == 64 for s in m["sources"])
    assert json.load(open(tmp_path / "out.json")) == m


def test_doc_separator_and_small_vocab_uint16(tmp_path, small_tokenizer):
    docs = ["The fox and the grapes.", "Slow and steady.\nWins the race.", "Bake until golden."]
    (tmp_path / "all.txt").write_text("\n===\n".join(docs), encoding="utf-8")
    prepare([str(tmp_path / "all.txt")], small_tokenizer, str(tmp_path / "out"), doc_separator="\n===\n",
            progress=False)
    dtype, items, _ = read_binidx(tmp_path / "out")
    tok = load_tokenizer(small_tokenizer)
    assert dtype == np.uint16
    assert [it.tolist() for it in items] == [tok.encode(d) + [0] for d in docs]


@pytest.mark.parametrize("template", ["world", "raven"])
def test_instruction_and_chat_masks(tmp_path, template):
    path = write_jsonl(tmp_path / "data.jsonl", INSTRUCT)
    m = prepare([path], "world", str(tmp_path / "out"), template=template, progress=False)
    tok = load_tokenizer("world")
    _, items, _ = read_binidx(tmp_path / "out")
    mdtype, masks, _ = read_binidx(tmp_path / "out.mask")
    assert mdtype == np.uint8 and m["has_mask"] and m["template"] == template
    user, bot = ("User", "Assistant") if template == "world" else ("Bob", "Alice")
    expected_segments = [
        [(f"{user}: What is 2 + 3?\n\n{bot}:", False), (" 2 + 3 = 5.\n\n", True)],
        [(f"{user}: Translate to French.\ncat\n\n{bot}:", False), (" chat\n\n", True)],
        [(("System: " if template == "world" else "") + f"Be brief.\n\n{user}: Name a colour.\n\n{bot}:", False),
         (" Blue.\n\n", True), (f"{user}: Another?\n\n{bot}:", False), (" Red.\n\n", True)],
        [("A plain document inside an instruction file.", True)],
    ]
    for item, mask, segs in zip(items, masks, expected_segments):
        ids, msk = expected_document(tok, segs)
        assert item.tolist() == ids
        assert mask.tolist() == msk
    # the learned tokens decode to exactly the answers
    learned = tok.decode([t for t, k in zip(items[0].tolist(), masks[0].tolist()) if k and t])
    assert learned == " 2 + 3 = 5.\n\n"


def test_custom_template_dict():
    t = resolve_template({"user": "Q: {question}\n", "assistant": "A: {answer}\n"})
    assert record_segments({"instruction": "hi", "output": "yo"}, t) == [("Q: hi\nA:", False), (" yo\n", True)]
    with pytest.raises(FinetuneError):
        resolve_template({"user": "no placeholder", "assistant": "{text}"})


def test_sharded_equals_unsharded(tmp_path, small_tokenizer):
    records = [{"text": f"Document number {i}: " + "the fox and the grapes " * (i % 7 + 1)} for i in range(60)]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    one = prepare([path], small_tokenizer, str(tmp_path / "one"), progress=False)
    many = prepare([path], small_tokenizer, str(tmp_path / "many"), shard_tokens=300, workers=2,
                   batch_chars=500, progress=False)
    assert len(many["shards"]) > 2 and one["tokens"] == many["tokens"]
    _, items, _ = read_binidx(tmp_path / "one")
    sharded = []
    for shard in many["shards"]:
        assert shard["prefix"].startswith("many-")
        _, its, _ = read_binidx(tmp_path / shard["prefix"])
        assert sum(len(i) for i in its) == shard["tokens"]
        sharded += its
    assert [i.tolist() for i in sharded] == [i.tolist() for i in items]
    assert all(s["tokens"] >= 300 for s in many["shards"][:-1])


def test_workers_preserve_order(tmp_path):
    records = [{"text": f"record {i} " + "混合 text " * (i % 5)} for i in range(300)]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    prepare([path], "world", str(tmp_path / "a"), workers=1, progress=False)
    prepare([path], "world", str(tmp_path / "b"), workers=2, batch_chars=400, progress=False)
    _, a, _ = read_binidx(tmp_path / "a")
    _, b, _ = read_binidx(tmp_path / "b")
    assert [x.tolist() for x in a] == [x.tolist() for x in b] and len(a) == 300


def test_bad_records_skipped_and_counted(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", INSTRUCT[:2], ["{broken", '{"foo": 1}', "[1, 2]", '{"text": "   "}'])
    with open(path, "ab") as f:
        f.write(b'{"text": "bad \xff byte"}\n')
    m = prepare([path], "world", str(tmp_path / "out"), progress=False)
    assert m["documents"] == 3
    assert m["skipped"] == {"malformed_json": 1, "missing_fields": 1, "not_an_object": 1, "empty": 1}
    assert m["skipped_examples"]["malformed_json"] == [f"{path}:3"]
    assert m["invalid_utf8_records"] == 1 and m["invalid_utf8_examples"] == [f"{path}:7"]
    _, items, _ = read_binidx(tmp_path / "out")
    assert load_tokenizer("world").decode(items[2].tolist()[:-1]) == "bad \ufffd byte"


def test_strict_is_fatal(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", INSTRUCT[:1], ["{broken"])
    with pytest.raises(FinetuneError, match=r"d\.jsonl:2"):
        prepare([path], "world", str(tmp_path / "out"), strict=True, progress=False)
    assert not any(p.name.startswith("out") for p in tmp_path.iterdir())


def test_empty_result_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"foo": 1}], ["{broken"])
    with pytest.raises(FinetuneError, match="no documents"):
        prepare([path], "world", str(tmp_path / "out"), progress=False)
    with pytest.raises(FinetuneError, match="needs|no documents"):
        prepare([write_jsonl(tmp_path / "i.jsonl", INSTRUCT[:1])], "world", str(tmp_path / "o"), template="none",
                progress=False)


def test_interrupted_run_leaves_no_complete_pair(tmp_path):
    from finetune.tokenizer import WorldTokenizer

    class Exploding(WorldTokenizer):
        calls = 0

        def encode_batch(self, texts):
            Exploding.calls += 1
            if Exploding.calls == 3:
                raise RuntimeError("boom")
            return super().encode_batch(texts)

    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "some text " * 20}] * 50)
    with pytest.raises(RuntimeError, match="boom"):
        prepare([path], Exploding(), str(tmp_path / "out"), batch_chars=300, shard_tokens=100, progress=False)
    assert Exploding.calls == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl"]


def test_token_id_out_of_range_is_an_error(tmp_path):
    from finetune.tokenizer import WorldTokenizer

    class Liar(WorldTokenizer):
        def __init__(self):
            super().__init__()
            self.vocab_size = 100

    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "hello world, this has big ids"}])
    with pytest.raises(FinetuneError, match="vocab_size 100"):
        prepare([path], Liar(), str(tmp_path / "out"), progress=False)


def test_parquet_and_datasets_inputs(tmp_path, small_tokenizer):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = ["The fox and the grapes.", "Bake until golden."]
    pq.write_table(pa.table({"text": texts}), tmp_path / "d.parquet")
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "d.json").write_text(json.dumps([{"text": t} for t in texts]))
    tok = load_tokenizer(small_tokenizer)
    for name, src in [("pq", "d.parquet"), ("disk", "saved"), ("js", "d.json")]:
        prepare([str(tmp_path / src)], small_tokenizer, str(tmp_path / name), progress=False)
        _, items, _ = read_binidx(tmp_path / name)
        assert [i.tolist() for i in items] == [tok.encode(t) + [0] for t in texts], name


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "finetune.cli", "prepare", *args], cwd=ROOT,
                          capture_output=True, text=True)


def test_cli_success_and_one_line_errors(tmp_path, capsys):
    path = write_jsonl(tmp_path / "d.jsonl", INSTRUCT, ["{broken"])
    ok = run_cli(path, "--tokenizer", "world", "--out", str(tmp_path / "out"))  # the real console entry point
    assert ok.returncode == 0, ok.stderr
    assert "4 documents" in ok.stdout and "malformed_json: 1" in ok.stdout and "tokens/s" in ok.stdout
    assert cli.main(["prepare", path, "--tokenizer", "world", "--out", str(tmp_path / "out2"), "--strict"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "d.jsonl:5" in lines[0] and lines[0].startswith("rwkv-lora prepare: error:")
    assert cli.main(["prepare", str(tmp_path / "nope.jsonl"), "--tokenizer", "world", "--out",
                     str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "nope.jsonl" in err
    # a malformed .json goes through Hugging Face datasets, whose progress bar and log lines stay quiet
    (tmp_path / "b.json").write_text('{"text": "a"')
    broken = run_cli(str(tmp_path / "b.json"), "--tokenizer", "world", "--out", str(tmp_path / "o"), "--no-progress")
    assert broken.returncode == 1 and len(broken.stderr.strip().splitlines()) == 1, broken.stderr
    assert "b.json: datasets cannot open it" in broken.stderr
    helptext = run_cli("--help").stdout
    assert "int32" in helptext and "--shard-tokens" in helptext and "Bob:" in helptext


def test_bundled_corpora(tmp_path):
    demo = os.path.join(ROOT, "data", "demo-tokenizer", "tokenizer.json")
    tok = load_tokenizer(demo)
    assert tok.vocab_size == 1024 and tok.encode("<|endoftext|>") == [0]
    m = prepare([os.path.join(ROOT, "data", "recipes", "recipes.txt")], demo, str(tmp_path / "r"),
                doc_separator="\n***\n", progress=False)
    assert m["documents"] > 50 and m["dtype"] == "uint16" and not m["skipped"]
    m = prepare([os.path.join(ROOT, "data", "instruct", "instruct.jsonl")], demo, str(tmp_path / "i"),
                template="world", progress=False)
    assert m["documents"] >= 300 and not m["skipped"] and m["has_mask"]
    assert os.path.getsize(os.path.join(ROOT, "data", "fables", "fables.txt")) > 60_000


def test_worker_chunks_keep_positions_and_strict_order(tmp_path):
    # .txt split on a separator: invalid UTF-8 is reported at the line where its document starts
    (tmp_path / "t.txt").write_bytes(b"one\ntwo\n===\nthree\n===\nbad \xff\nbyte\n===\nend")
    for workers in (1, 2):
        m = prepare([str(tmp_path / "t.txt")], "world", str(tmp_path / f"t{workers}"), doc_separator="\n===\n",
                    workers=workers, batch_chars=8, progress=False)
        assert m["documents"] == 4 and m["invalid_utf8_examples"] == [f"{tmp_path / 't.txt'}:6"]
    # --strict with several chunks in flight: the first bad record in input order is the one reported
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": f"record {i}"} for i in range(40)],
                       ["{broken", '{"foo": 1}', "{broken"])
    with pytest.raises(FinetuneError, match=r"d\.jsonl:41: malformed"):
        prepare([path], "world", str(tmp_path / "s"), strict=True, workers=2, batch_chars=30, progress=False)


# ---- data safety: no output over an input, --force to replace, nothing left behind by a failed run


def temporaries(directory):
    return [p.name for p in directory.iterdir() if p.name.startswith(".") or ".tmp" in p.name]


def test_output_over_an_input_is_refused(tmp_path, small_tokenizer):
    # `prepare d.json --out d` used to write the manifest d.json over its own input
    data = tmp_path / "d.json"
    data.write_text(json.dumps([{"text": "The fox and the grapes."}, {"text": "Bake until golden."}]))
    before = data.read_bytes()
    r = run_cli(str(data), "--tokenizer", small_tokenizer, "--out", str(tmp_path / "d"), "--force")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    assert f"{data}: is also an input of this command" in lines[0]
    with pytest.raises(FinetuneError, match="is also an input"):
        prepare([str(data)], small_tokenizer, str(tmp_path / "d"), progress=False)
    assert data.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.json"]
    # nor inside an input directory (a datasets save_to_disk folder holds state.json, which PREFIX state would
    # replace), even with --force
    import datasets

    ds = tmp_path / "ds"
    datasets.Dataset.from_dict({"text": ["a b " * 9]}).save_to_disk(str(ds))
    files = {p.name: p.read_bytes() for p in ds.iterdir()}
    with pytest.raises(FinetuneError, match="inside one"):
        prepare([str(ds)], small_tokenizer, str(ds / "state"), progress=False, force=True)
    assert {p.name: p.read_bytes() for p in ds.iterdir()} == files


def test_existing_outputs_are_replaced_only_with_force(tmp_path, small_tokenizer):
    chat = write_jsonl(tmp_path / "chat.jsonl", INSTRUCT)
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": f"plain document {i} " * 30} for i in range(40)])
    prepare([chat], small_tokenizer, str(tmp_path / "out"), progress=False)
    first = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("out")}
    assert set(first) == {"out.json", "out.bin", "out.idx", "out.mask.bin", "out.mask.idx"}
    with pytest.raises(FinetuneError, match=r"out\.json: exists; pass --force to replace it"):
        prepare([text], small_tokenizer, str(tmp_path / "out"), progress=False)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("out")} == first
    # with force: replaced, and the old run's masks (which the new data has not) do not linger beside it
    m = prepare([text], small_tokenizer, str(tmp_path / "out"), progress=False, force=True)
    assert not m["has_mask"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat.jsonl", "out.bin", "out.idx", "out.json",
                                                          "text.jsonl"]
    # a sharded run replaced by fewer shards: the old shards it listed are removed, files it did not write stay
    prepare([text], small_tokenizer, str(tmp_path / "sh"), shard_tokens=500, progress=False)
    old_shards = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("sh-"))
    assert len(old_shards) > 4
    (tmp_path / "sh-notes.txt").write_text("mine")
    m = prepare([text], small_tokenizer, str(tmp_path / "sh"), shard_tokens=5000, progress=False, force=True)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("sh-")) == sorted(
        [f"{s['prefix']}.{x}" for s in m["shards"] for x in ("bin", "idx")] + ["sh-notes.txt"])
    # a shard file on disk (no manifest) is an existing output too
    (tmp_path / "lone-00003.bin").write_bytes(b"x")
    with pytest.raises(FinetuneError, match=r"lone-00003\.bin: exists"):
        prepare([text], small_tokenizer, str(tmp_path / "lone"), shard_tokens=500, progress=False)


def test_full_disk_is_one_line_and_leaves_the_previous_output(tmp_path, small_tokenizer):
    import resource

    src = tmp_path / "big.txt"
    src.write_text("the fox and the grapes, slow and steady. " * 20000)
    small = tmp_path / "small.txt"
    small.write_text("The fox and the grapes.")
    prepare([str(small)], small_tokenizer, str(tmp_path / "out"), progress=False)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def full_disk():  # in the child: writes past 64 KB fail with EFBIG (Python ignores SIGXFSZ)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))

    r = subprocess.run([sys.executable, "-m", "finetune.cli", "prepare", str(src), "--tokenizer", small_tokenizer,
                        "--out", str(tmp_path / "out"), "--force"], cwd=ROOT, capture_output=True, text=True,
                       preexec_fn=full_disk)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    assert lines[0] == (f"rwkv-lora prepare: error: {tmp_path / 'out.bin'}: cannot write (File too large; the "
                        f"previous output, if any, is unchanged)")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temporary, old output intact


@pytest.mark.parametrize("sig,workers,rc,message", [(signal.SIGINT, 2, 130, "interrupted"),
                                                   (signal.SIGTERM, 1, 143, "terminated (SIGTERM); nothing written")])
def test_interrupt_and_terminate_leave_nothing(tmp_path, sig, workers, rc, message):
    # 20 MB takes many seconds to tokenize: the signal comes as soon as the first output file is open
    line = json.dumps({"text": "a line of text to tokenize " * 20}).encode() + b"\n"
    (tmp_path / "in.jsonl").write_bytes(line * (20_000_000 // len(line)))
    proc = subprocess.Popen([sys.executable, "-m", "finetune.cli", "prepare", str(tmp_path / "in.jsonl"),
                             "--tokenizer", "world", "--out", str(tmp_path / "out"), "--workers", str(workers),
                             "--no-progress"],
                            cwd=ROOT, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            # a background job's SIGINT is ignored (and Python then leaves it so): be a terminal's
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while not temporaries(tmp_path):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        os.killpg(proc.pid, sig)  # as a terminal's Ctrl-C does: the whole process group, workers included
        err = proc.communicate(timeout=120)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == rc and err.strip() == f"rwkv-lora prepare: {message}", err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


# ---- long documents: encoded piece by piece, exactly as a whole, in bounded memory

LONG_PARTS = ["the", "fox", " ", "  ", "   ", "\n", "\n\n", "\t", ",", ".", "!", "?", "，", "。", "、", "你好", "世界",
              "123", "2024", "🎉", "e\u0301", "café", "naïve", "it's", "'s", "_", "a_b", "—", "...", "<|endoftext|>",
              "=" * 40, " " * 150, "x" * 300, "\u00a0", "Ω", "ｆｕｌｌ"]


def random_text(rng, n):
    return "".join(rng.choice(LONG_PARTS) + (" " if rng.random() < 0.5 else "") for _ in range(n))


def tokenizer_variant(src, path, **changes):
    config = json.load(open(src))
    config.update(changes)
    path.write_text(json.dumps(config))
    return str(path)


def test_encode_long_equals_encode(tmp_path, small_tokenizer):
    import random

    from finetune.tokenizer import _cut_points

    demo = os.path.join(ROOT, "data", "demo-tokenizer", "tokenizer.json")
    specs = {
        "world": None,
        demo: True,
        small_tokenizer: True,
        tokenizer_variant(demo, tmp_path / "nfc.json", normalizer={"type": "NFKC"}): True,
        # not cuttable (the fallback encodes whole): a prefix space, or a pre-tokenizer we have no proof for
        tokenizer_variant(demo, tmp_path / "prefix.json", pre_tokenizer={
            "type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}): False,
        tokenizer_variant(demo, tmp_path / "ws.json", pre_tokenizer={"type": "Whitespace"}): False,
    }
    rng = random.Random(0)
    texts = [random_text(rng, rng.randint(200, 1500)) for _ in range(12)]
    assert all(len(_cut_points(t, 50)) > 5 for t in texts)  # the pieces really are cut
    for spec, cuttable in specs.items():
        tok = load_tokenizer(spec)
        assert getattr(tok, "cuttable", None) is cuttable, spec
        for text in texts:
            whole = tok.encode(text)
            for piece_chars in (7, 50, 700):  # World windows are at least 4 x 128 characters whatever is asked
                assert tok.encode_long(text, piece_chars).tolist() == whole, (spec, piece_chars)


def test_long_documents_in_prepare_are_exact(tmp_path, small_tokenizer):
    import random

    from finetune.tokenizer import PIECE_CHARS

    rng = random.Random(1)
    long_text = random_text(rng, 3 * PIECE_CHARS // 8)
    long_answer = random_text(rng, 2 * PIECE_CHARS // 8).replace("\n", " ").strip()  # as the template keeps it
    assert len(long_text) > 2 * PIECE_CHARS and len(long_answer) > PIECE_CHARS
    records = [{"text": "A short one."}, {"text": long_text},
               {"instruction": "Say a lot.", "output": long_answer}, {"text": "The end."}]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    for spec in ("world", small_tokenizer):
        tok = load_tokenizer(spec)
        out = tmp_path / f"out-{len(spec)}"
        prepare([path], spec, str(out), template="world", progress=False)
        _, items, _ = read_binidx(out)
        _, masks, _ = read_binidx(f"{out}.mask")
        expected = [[(r["text"], True)] if "text" in r else
                    [(f"User: {r['instruction']}\n\nAssistant:", False), (f" {r['output']}\n\n", True)]
                    for r in records]
        for item, mask, segs in zip(items, masks, expected):
            ids, msk = expected_document(tok, segs)
            assert item.tolist() == ids and mask.tolist() == msk


def test_one_huge_line_has_bounded_memory(tmp_path):
    # before: the whole line went to the tokenizer at once, ~180 bytes of memory per character with a byte-level
    # BPE (5 MB -> +880 MB, 50 MB -> 9 GB); now its working set is that of a few pieces
    script = f"""
import json, resource, sys
sys.path.insert(0, {ROOT!r})
sys.path.insert(0, {os.path.join(ROOT, 'bench')!r})
from finetune.prepare import prepare
from finetune.tokenizer import load_tokenizer
from prepare_long import one_line_text
tok = load_tokenizer({os.path.join(ROOT, 'data', 'demo-tokenizer', 'tokenizer.json')!r})
with open({str(tmp_path / 'line.jsonl')!r}, "w", encoding="utf-8") as f:
    f.write(json.dumps({{"text": one_line_text(4)}}, ensure_ascii=False) + "\\n")
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
m = prepare([{str(tmp_path / 'line.jsonl')!r}], tok, {str(tmp_path / 'out')!r}, progress=False)
print(m["documents"], m["tokens"], (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    docs, tokens, grown_mib = r.stdout.split()
    assert int(docs) == 1 and int(tokens) > 2_000_000
    assert float(grown_mib) < 200, f"a 4 MB line took {grown_mib} MiB more"


def test_temporaries_of_a_killed_run_are_removed_by_the_next(tmp_path, small_tokenizer):
    # SIGKILL leaves no chance to clean up: the next run for the same prefix removes what the dead process wrote
    dead = subprocess.Popen(["true"])
    dead.wait()
    alive = subprocess.Popen(["sleep", "60"])
    try:
        names = {f".out.bin.file-{dead.pid}-0123abcd.tmp": False,  # ours, writer gone: removed
                 f".out-00002.idx.file-{dead.pid}-0123abcd.tmp": False,
                 f".out.json.file-{alive.pid}-0123abcd.tmp": True,  # a run in progress: kept
                 f".other.bin.file-{dead.pid}-0123abcd.tmp": True,  # another prefix's: kept
                 "notes.txt": True}
        for name in names:
            (tmp_path / name).write_text("x")
        (tmp_path / "in.txt").write_text("The fox and the grapes.")
        prepare([str(tmp_path / "in.txt")], small_tokenizer, str(tmp_path / "out"), progress=False)
    finally:
        alive.kill()
        alive.wait()
    left = {p.name for p in tmp_path.iterdir()}
    assert {n for n, keep in names.items() if keep} <= left
    assert not {n for n, keep in names.items() if not keep} & left


@pytest.mark.parametrize("out,reason", [(".", "not a valid output prefix"), ("sub/", "not a valid output prefix"),
                                        ("x" * 247, "output prefix too long")])
def test_bad_output_prefixes_are_refused_before_work(tmp_path, small_tokenizer, out, reason):
    (tmp_path / "sub").mkdir()
    (tmp_path / "in.txt").write_text("The fox and the grapes.")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        with pytest.raises(FinetuneError, match=reason):
            prepare(["in.txt"], small_tokenizer, out, progress=False)
    finally:
        os.chdir(cwd)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["in.txt", "sub"]


def test_rows_with_every_column_keep_their_own_kind(tmp_path, small_tokenizer):
    """datasets and parquet give every row every column (None where a record has none): a text row with
    instruction=None is still a text record, read as the same lines in .jsonl are."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [{"text": "The fox and the grapes."}, {"instruction": "Bake?", "output": "Until golden."},
               {"messages": [{"role": "user", "content": "Slow?"}, {"role": "assistant", "content": "Steady."}]},
               {"text": "Wins the race."}]
    write_jsonl(tmp_path / "m.jsonl", records)
    (tmp_path / "m.json").write_text(json.dumps(records))
    pq.write_table(pa.table({k: [r.get(k) for r in records] for k in ("text", "instruction", "output", "messages")}),
                   tmp_path / "m.parquet")
    want = None
    for name in ("m.jsonl", "m.json", "m.parquet"):
        m = prepare([str(tmp_path / name)], small_tokenizer, str(tmp_path / name.replace(".", "_")), progress=False)
        _, items, _ = read_binidx(tmp_path / name.replace(".", "_"))
        assert m["documents"] == 4 and m["skipped"] == {}, (name, m["skipped"])
        want = want or [i.tolist() for i in items]
        assert [i.tolist() for i in items] == want, name


def test_damaged_parquet_and_datasets_data_are_one_line(tmp_path, capsys):
    """The files open (their headers are whole) and break only when their data is read."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [f"hello world {i}" for i in range(1000)]}), tmp_path / "bad.parquet",
                   compression="snappy")
    data = bytearray((tmp_path / "bad.parquet").read_bytes())
    data[100:600] = b"\xff" * 500
    (tmp_path / "bad.parquet").write_bytes(bytes(data))
    datasets.Dataset.from_dict({"text": [f"s{i}" for i in range(20000)]}).save_to_disk(str(tmp_path / "ds"))
    arrow = next((tmp_path / "ds").glob("*.arrow"))
    data = bytearray(arrow.read_bytes())
    data[len(data) // 3: len(data) // 3 + 4000] = b"\xff" * 4000
    arrow.write_bytes(bytes(data))
    capsys.readouterr()  # datasets' own progress bar while saving
    for src, what in (("bad.parquet", "cannot read parquet"), ("ds", "cannot read this datasets input")):
        assert cli.main(["prepare", str(tmp_path / src), "--tokenizer", "world", "--out", str(tmp_path / "o"),
                         "--no-progress"]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"rwkv-lora prepare: error: {tmp_path / src}: {what} ("), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.parquet", "ds"]


def test_byte_order_marks_crlf_separators_and_inputs_given_twice(tmp_path, small_tokenizer, monkeypatch):
    tok = load_tokenizer(small_tokenizer)
    (tmp_path / "bom.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "The fox."}\n{"text": "Slow and steady."}\n')
    (tmp_path / "bom.txt").write_bytes("\ufeffBake until golden.".encode())
    (tmp_path / "crlf.txt").write_bytes(b"line one\r\nline two\r\n***\r\ndoc two\r\n")
    m = prepare([str(tmp_path / "bom.jsonl"), str(tmp_path / "bom.txt")], small_tokenizer, str(tmp_path / "b"),
                progress=False)
    _, items, _ = read_binidx(tmp_path / "b")
    assert [i.tolist() for i in items] == [tok.encode(t) + [0] for t in
                                           ("The fox.", "Slow and steady.", "Bake until golden.")]
    assert m["sources"][1]["sha256"] == hashlib.sha256((tmp_path / "bom.txt").read_bytes()).hexdigest()
    prepare([str(tmp_path / "crlf.txt")], small_tokenizer, str(tmp_path / "c"), doc_separator="\n***\n",
            progress=False)
    _, items, _ = read_binidx(tmp_path / "c")
    assert [i.tolist() for i in items] == [tok.encode(t) + [0] for t in ("line one\r\nline two", "doc two\r\n")]
    monkeypatch.chdir(tmp_path)
    m = prepare(["bom.txt", "./bom.txt", "bo?.txt"], small_tokenizer, "twice", progress=False)
    assert m["documents"] == 1 and len(m["sources"]) == 1


def test_input_must_be_text_and_out_may_name_the_manifest(tmp_path, small_tokenizer):
    write_jsonl(tmp_path / "n.jsonl", [{"instruction": "Even?", "input": 0, "output": "Yes."},
                                       {"instruction": "Even?", "input": None, "output": "Yes."}])
    m = prepare([str(tmp_path / "n.jsonl")], small_tokenizer, str(tmp_path / "n.json"), progress=False)
    assert m["documents"] == 1 and m["skipped"] == {"missing_fields": 1}
    assert sorted(p.name for p in tmp_path.glob("n.*")) == ["n.bin", "n.idx", "n.json", "n.jsonl", "n.mask.bin",
                                                             "n.mask.idx"]
