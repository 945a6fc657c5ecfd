"""`rwkv-lora prepare`: tokenize text, instruction or chat data into binidx files for training.

Python API (used by recipes and tests):

    manifest = prepare(["data/fables/*.txt"], "world", "out/fables", template="world", workers=2)

Output for PREFIX (see `finetune.binidx` for the format):
  PREFIX.bin / PREFIX.idx            tokens, one item per document, each document ending with token 0
  PREFIX.mask.bin / PREFIX.mask.idx  (instruction/chat data only) uint8 loss mask aligned with the tokens:
                                     1 = learn this token (answers and the closing 0), 0 = prompt
  PREFIX.json                        manifest: counts, skipped records, tokenizer, vocab_size, template,
                                     sources with sha256, shards, has_mask
With `shard_tokens=N`: PREFIX-00000.bin/.idx, PREFIX-00001..., a new shard once a shard holds >= N tokens
(documents are never split), all listed in PREFIX.json.

Token dtype: uint16 when vocab_size < 65500, else int32, as json2binidx picks (World data, 65536, is int32).
Everything is written under temporary names and renamed together at the end (indexes after data files, the manifest
last), so an interrupted run never leaves a complete-looking `.bin`/`.idx` pair, and a failed one no temporary. No
output may be one of the inputs (`prepare d.json --out d` would write the manifest over d.json); existing outputs
are replaced only with `force=True` (--force), and then the old run's shards and masks the new one does not
rewrite are removed. Temporaries that a run killed outright (SIGKILL) left for the same prefix are removed by the next
run once their writer is gone (`remove_dead_temps`).
"""

from __future__ import annotations

import argparse
import collections
import glob
import hashlib
import itertools
import json
import multiprocessing
import os
import pickle
import re
import signal
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from finetune.atomic import atomic_file, check_output, write_error
from finetune.binidx import BinidxWriter, token_dtype
from finetune.errors import FinetuneError, Terminated, first_line
from finetune.templates import (ASSISTANT_ROLES, TEMPLATE_CHOICES, USER_ROLES, ChatTemplate, clean_message,
                                ESCAPES_HELP, resolve_template, unescape)
from finetune.tokenizer import PIECE_CHARS, HFTokenizer, Tokenizer, load_tokenizer

MANIFEST_FORMAT = "rwkv-lora-binidx"

def record_segments(record: Any, template: ChatTemplate | None) -> list[tuple[str, bool]] | str:
    """A record -> [(text, learn), ...], or the reason it is skipped.

    {"text": ...} -> the text, learned. {"instruction", "input"?, "output"} -> one exchange (instruction and input
    joined by a newline). {"messages": [{"role", "content"}, ...]} -> the conversation (roles system, user/human,
    assistant/gpt/bot). Only the assistant turns are learned."""
    if isinstance(record, str):
        return [(record, True)] if record.strip() else "empty"
    if not isinstance(record, dict):
        return "not_an_object"
    if None in record.values():  # datasets and parquet give every row every column, None where a record has none
        record = {k: v for k, v in record.items() if v is not None}
    turns: list[tuple[str, str]]
    if "messages" in record or "conversations" in record:
        msgs = record.get("messages", record.get("conversations"))
        if not isinstance(msgs, list) or not msgs:
            return "bad_messages"
        turns = []
        for m in msgs:
            if not isinstance(m, dict):
                return "bad_messages"
            role, content = m.get("role", m.get("from")), m.get("content", m.get("value"))
            if not isinstance(role, str) or not isinstance(content, str):
                return "bad_messages"
            role = role.lower()
            kind = "user" if role in USER_ROLES else "assistant" if role in ASSISTANT_ROLES else role
            if kind not in ("user", "assistant", "system"):
                return "bad_messages"
            turns.append((kind, clean_message(content)))
        if not any(k == "assistant" and c for k, c in turns):
            return "no_answer"
    elif "instruction" in record or "output" in record:
        inst, inp, out = record.get("instruction"), record.get("input", ""), record.get("output")
        if not isinstance(inst, str) or not isinstance(out, str) or not isinstance(inp, str):
            return "missing_fields"
        question = clean_message(inst) + ("\n" + clean_message(inp) if inp.strip() else "")
        if not question.strip() or not out.strip():
            return "empty"
        turns = [("user", question), ("assistant", clean_message(out))]
    elif "text" in record:
        text = record["text"]
        if not isinstance(text, str):
            return "missing_fields"
        return [(text, True)] if text.strip() else "empty"
    else:
        return "missing_fields"
    if template is None:
        return "needs_template"
    segments: list[tuple[str, bool]] = []
    prompt = ""
    for kind, content in turns:
        if kind == "assistant":
            before, answer = template.assistant_parts(content)
            segments.append((prompt + before, False))
            segments.append((answer, True))
            prompt = ""
        else:
            prompt += getattr(template, kind).replace("{text}", content)
    # a trailing user turn with no answer carries nothing to learn: drop it
    return [s for s in segments if s[0]]


# ----------------------------------------------------------------------------------------------------- reading


@dataclass
class Stats:
    skipped: collections.Counter = field(default_factory=collections.Counter)
    examples: dict = field(default_factory=dict)  # reason -> first few "file:line"
    invalid_utf8: int = 0
    invalid_utf8_where: list = field(default_factory=list)
    strict: bool = False

    def skip(self, reason: str, where: str) -> None:
        if self.strict and reason != "empty":
            raise FinetuneError(f"{where}: {REASONS.get(reason, reason)} (--strict)")
        self.skipped[reason] += 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < 5:
            ex.append(where)

    def event(self, reason: str, where: str) -> None:
        """A worker's report: "invalid_utf8" or a skip reason."""
        if reason == "invalid_utf8":
            self.bad_utf8(where)
        else:
            self.skip(reason, where)

    def bad_utf8(self, where: str) -> None:
        if self.strict:
            raise FinetuneError(f"{where}: invalid UTF-8 (--strict)")
        self.invalid_utf8 += 1
        if len(self.invalid_utf8_where) < 5:
            self.invalid_utf8_where.append(where)


REASONS = {
    "malformed_json": "malformed JSON line",
    "not_an_object": "record is not a JSON object",
    "missing_fields": "record has no usable 'text', 'instruction'/'output' or 'messages' fields",
    "bad_messages": "'messages' is not a list of {role, content} with roles system/user/assistant",
    "no_answer": "conversation has no assistant message",
    "needs_template": "instruction/chat record but --template none",
    "empty": "empty document",
}

def _scrub(obj):
    """Replace lone surrogates (JSON "\\udc80" escapes) that no tokenizer can encode."""
    if isinstance(obj, str):
        return obj.encode("utf-8", errors="replace").decode("utf-8")
    if isinstance(obj, list):
        return [_scrub(x) for x in obj]
    if isinstance(obj, dict):
        return {k: _scrub(v) for k, v in obj.items()}
    return obj


TEXT_EXT = (".txt", ".text", ".md")
UTF8_BOM = b"\xef\xbb\xbf"
JSONL_EXT = (".jsonl", ".ndjson")
DATASETS_EXT = {".json": "json", ".csv": "csv", ".arrow": "arrow"}


def output_prefix(out: str) -> str:
    """--out as the prefix of the files prepare writes: `data/novel`, whether given so or as one of them
    (`data/novel.bin`, `.idx`, `.json`)."""
    for ext in (".bin", ".idx", ".json"):
        if out.endswith(ext):
            return out[: -len(ext)]
    return out


def expand_inputs(inputs: Sequence[str]) -> list[str]:
    """Files and directories named or matched by globs, in order; one given twice (`a.txt ./a.txt`, or matched by
    two globs) is read once."""
    paths: list[str] = []
    for item in inputs:
        if any(c in item for c in "*?["):
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                raise FinetuneError(f"{item}: no file matches this pattern")
            paths.extend(matches)
        elif os.path.exists(item):
            paths.append(item)
        else:
            raise FinetuneError(f"{item}: input not found")
    first: dict[str, str] = {}  # real path -> the first name it was given under, in order
    for p in paths:
        first.setdefault(os.path.realpath(p), p)
    paths = list(first.values())
    for p in paths:
        if not os.path.isdir(p) and not p.lower().endswith(TEXT_EXT + JSONL_EXT + (".parquet",) + tuple(DATASETS_EXT)):
            raise FinetuneError(f"{p}: unknown input type (expected .txt, .md, .jsonl, .ndjson, .json, .csv, "
                                ".parquet, .arrow or a datasets save_to_disk directory)")
    return paths


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    files = [path] if not os.path.isdir(path) else sorted(
        os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)
    for p in files:
        if os.path.isdir(path):
            h.update(os.path.relpath(p, path).encode() + b"\0")
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _rows(columns: dict) -> Iterator[dict]:
    keys = list(columns)
    for values in zip(*(columns[k] for k in keys)):
        yield dict(zip(keys, values))


def _read_parquet(path: str) -> Iterator[tuple[Any, str]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise FinetuneError(f"{path}: cannot read parquet ({str(e).splitlines()[0]})") from None
    row = 0
    for columns in _reading(path, "parquet", (b.to_pydict() for b in pf.iter_batches(batch_size=1024))):
        for record in _rows(columns):
            yield record, f"{path}:row {row}"
            row += 1


def _reading(path: str, what: str, batches: Iterator) -> Iterator:
    """`batches` as they come, with a damaged file (found only when its data is read, after it opened well) turned
    into one line naming it."""
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except Exception as e:
            raise FinetuneError(f"{path}: cannot read {what} ({first_line(e)})") from None
        yield batch


@contextmanager
def _quiet_datasets(datasets: Any) -> Iterator[None]:
    """datasets' own progress bars and log lines ("Generating train split", "Failed to load JSON from file ...")
    off while it opens an input: prepare reports progress and errors itself, in one line."""
    verbosity, bars_off = datasets.logging.get_verbosity(), datasets.are_progress_bars_disabled()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)
        if not bars_off:
            datasets.enable_progress_bars()


def _read_datasets(path: str) -> Iterator[tuple[Any, str]]:
    import datasets

    try:
        with _quiet_datasets(datasets):
            ds = _open_datasets(datasets, path)
    except FinetuneError:
        raise
    except Exception as e:
        raise FinetuneError(f"{path}: datasets cannot open it ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    row = 0
    for batch in _reading(path, "this datasets input", ds.iter(batch_size=1024)):
        for record in _rows(batch):
            yield record, f"{path}:row {row}"
            row += 1


def _open_datasets(datasets: Any, path: str) -> Any:
    if os.path.isdir(path):
        ds = datasets.load_from_disk(path)
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise FinetuneError(f"{path}: a DatasetDict without a 'train' split (has {', '.join(ds)})")
            ds = ds["train"]
        return ds
    builder = DATASETS_EXT[os.path.splitext(path)[1].lower()]
    return datasets.load_dataset(builder, data_files=path, split="train")


def iter_records(path: str) -> Iterator[tuple[Any, str]]:
    """(record, "file:row N") for every row of a parquet file or a datasets input, in order. (.txt and .jsonl inputs
    are read as raw chunks by `raw_chunks` and parsed in the workers.)"""
    if not os.path.isdir(path) and path.lower().endswith(".parquet"):
        return _read_parquet(path)
    return _read_datasets(path)


def raw_chunks(path: str, separator: str | None, chunk_bytes: int, chunk_records: int,
               source: dict | None = None) -> Iterator[tuple]:
    """Cheap work for the main process: one input -> chunks of raw bytes (or, for parquet/datasets, of records) for
    `process_chunk`, in order. Each chunk holds about `chunk_bytes` bytes of whole records, so memory stays bounded.

      ("jsonl", path, first_line, blob)        whole lines (the last one may lack its newline at the end of the file)
      ("text", path, first_line, docs, nl)     documents split on the separator (bytes, not decoded); nl = the
                                               separator's newline count; first_line None = the whole file is one
      ("records", path, None, [(record, where), ...])

    `source`, when given, gets the input's "sha256" once it is read (from the bytes read here: one pass over .txt and
    .jsonl files, not two).
    """
    low = path.lower()
    if os.path.isdir(path) or not low.endswith(TEXT_EXT + JSONL_EXT):
        if source is not None:
            source["sha256"] = sha256_of(path)
        batch = []
        for item in iter_records(path):
            batch.append(item)
            if len(batch) >= chunk_records:
                yield ("records", path, None, batch)
                batch = []
        if batch:
            yield ("records", path, None, batch)
        return
    h = hashlib.sha256()
    with open(path, "rb") as f:
        head = f.read(len(UTF8_BOM))
        if head == UTF8_BOM:  # written by Windows editors: a mark, not text (datasets drops it too in .json/.csv)
            h.update(head)
        else:
            f.seek(0)
        if low.endswith(JSONL_EXT):
            line = 1
            while True:
                blob = f.read(chunk_bytes)
                if not blob:
                    break
                if not blob.endswith(b"\n"):
                    blob += f.readline()
                h.update(blob)
                yield ("jsonl", path, line, blob)
                line += blob.count(b"\n")
        elif separator is None:
            blob = f.read()
            h.update(blob)
            yield ("text", path, None, [blob], 0)
        else:
            yield from _separated_chunks(f, path, separator, chunk_bytes, h)
    if source is not None:
        source["sha256"] = h.hexdigest()


def _separated_chunks(f, path: str, separator: str, chunk_bytes: int, h) -> Iterator[tuple]:
    """Documents split on `separator`, read `chunk_bytes` at a time; `h` hashes every byte read. A separator with
    newlines also matches its Windows form (\\r\\n line ends), so one command splits files from either system."""
    seps = {separator.encode("utf-8"), separator.replace("\r\n", "\n").replace("\n", "\r\n").encode("utf-8")}
    sep = re.compile(b"|".join(re.escape(s) for s in sorted(seps, key=len, reverse=True)))
    longest = max(map(len, seps))
    nl = separator.count("\n")
    buf, line = b"", 1
    while True:
        block = f.read(chunk_bytes)
        h.update(block)
        if not block:
            yield ("text", path, line, [buf], nl)  # the rest, even empty (it counts as an empty document)
            return
        buf += block
        if not sep.search(buf, max(0, len(buf) - len(block) - longest)):
            continue  # inside a long document: wait for its end
        docs = sep.split(buf)
        rest = docs.pop()
        consumed = len(buf) - len(rest)
        yield ("text", path, line, docs, nl)
        line += buf.count(b"\n", 0, consumed)
        buf = rest


# ----------------------------------------------------------------------------------------------------- encoding

_worker_ctx: tuple | None = None  # (tokenizer, template, dtype) in a worker process
_worker_parent: int | None = None  # the main process's pid, in a worker process


def _worker_sigterm(signum, frame) -> None:
    """SIGTERM in a worker. Sent to the whole process group (a scheduler, `kill -- -PGID`), it reaches the main
    process too, which lets the chunks in flight finish and shuts the workers down: dying now, half-way through
    sending a result, would leave the main process waiting for the rest of it for ever. A worker whose main process
    is gone (killed outright) has nobody to wait for: it exits."""
    if os.getppid() != _worker_parent:
        os._exit(1)


def _init_worker(ctx: bytes | None) -> None:
    global _worker_ctx, _worker_parent
    # Ctrl-C reaches every process of the terminal's group: the main process alone reacts (it stops the workers
    # and removes the temporaries); a worker must not die half-way through sending a result nor print a traceback
    _worker_parent = os.getppid()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _worker_sigterm)
    # one thread per worker process: the pool is the parallelism (Rust thread pools would oversubscribe the cores)
    os.environ["RAYON_NUM_THREADS"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if ctx is not None:
        _worker_ctx = pickle.loads(ctx)


def _encode_serial(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
    """Encoding in a worker process. A forked child must never touch a Rust thread pool that the parent may have
    started (its threads do not exist in the child: a deadlock): the World encoder (pyrwkv-tokenizer, rayon)
    encodes one text at a time; Hugging Face tokenizers read TOKENIZERS_PARALLELISM ("false", set by
    `_init_worker`) on every batch call and then encode the batch serially, so its batch call is safe."""
    if isinstance(tokenizer, HFTokenizer) and os.environ.get("TOKENIZERS_PARALLELISM") == "false":
        return tokenizer.encode_batch(texts)
    return [tokenizer.encode(t) for t in texts]


def _decode(raw: bytes) -> tuple[str, bool]:
    try:
        return raw.decode("utf-8"), False
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="replace"), True


def _chunk_records(chunk: tuple, events: list) -> Iterator[tuple[Any, str]]:
    """The records of a chunk, in order; invalid UTF-8 and malformed JSON go to `events` as (reason, where)."""
    kind, path = chunk[0], chunk[1]
    if kind == "records":
        yield from chunk[3]
        return
    if kind == "text":
        line, docs, nl = chunk[2], chunk[3], chunk[4]
        for raw in docs:
            where = path if line is None else f"{path}:{line}"
            text, bad = _decode(raw)
            if bad:
                events.append(("invalid_utf8", where))
            yield text, where
            if line is not None:
                line += raw.count(b"\n") + nl
        return
    first, blob = chunk[2], chunk[3]
    try:  # the whole chunk at once; line by line only when it holds invalid UTF-8
        lines = blob.decode("utf-8").split("\n")
        bad_lines = ()
    except UnicodeDecodeError:
        lines, bad_lines = [], set()
        for i, raw in enumerate(blob.split(b"\n")):
            text, bad = _decode(raw)
            lines.append(text)
            if bad:
                bad_lines.add(i)
    if blob.endswith(b"\n"):
        lines.pop()
    surrogates = b"\\ud" in blob or b"\\uD" in blob
    loads = json.loads
    for i, line in enumerate(lines):
        lines[i] = None  # parsed once: a 50 MB line must not stay held beside its record
        if i in bad_lines:
            events.append(("invalid_utf8", f"{path}:{first + i}"))
        if not line.strip():
            continue
        try:
            record = loads(line)
        except ValueError:
            events.append(("malformed_json", f"{path}:{first + i}"))
            continue
        if surrogates and ("\\ud" in line or "\\uD" in line):  # a JSON escape may have produced a lone surrogate
            scrubbed = _scrub(record)
            if scrubbed != record:
                events.append(("invalid_utf8", f"{path}:{first + i}"))
                record = scrubbed
        yield record, f"{path}:{first + i}"


def _segments(chunk: tuple, template: ChatTemplate | None, events: list) -> tuple[list[str], list[bool], list[int]]:
    """The chunk's documents as segments: (texts, learn flags, segments per document). A function of its own so
    that no loop variable keeps a huge record alive once its text is encoded."""
    texts: list[str] = []
    flags: list[bool] = []
    nseg: list[int] = []
    for record, where in _chunk_records(chunk, events):
        segs = record_segments(record, template)
        if isinstance(segs, str):
            events.append((segs, where))
            continue
        nseg.append(len(segs))
        for text, learn in segs:
            texts.append(text)
            flags.append(learn)
    return texts, flags, nseg


def process_chunk(chunk: tuple, tokenizer: Tokenizer, template: ChatTemplate | None, dtype, serial: bool = False):
    """The per-record work, run in the workers: parse, apply the template, encode, pack.

    Returns (tokens[T] in `dtype`, sizes int32[D], mask uint8[T] or None when every token is learned, max token id
    (-1 when none), events): events = [(reason, "file:line"), ...] in input order, reason "invalid_utf8" or a skip
    reason; the main process merges them (and applies --strict). Each document's segments are encoded separately
    (so masks are exact) and followed by the eod token."""
    events: list = []
    texts, flags, nseg = _segments(chunk, template, events)
    all_learned = all(flags)
    long = [i for i, t in enumerate(texts) if len(t) > PIECE_CHARS]
    if long:  # one huge document (a 50 MB line) must not be encoded in one go
        return _pack_segments(_encode_with_long(tokenizer, texts, long, serial), nseg, flags, all_learned,
                              tokenizer.eod_id, dtype) + (events,)
    encoded = _encode_serial(tokenizer, texts) if serial else tokenizer.encode_batch(texts) if texts else []
    lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
    flat = np.fromiter(itertools.chain.from_iterable(encoded), dtype=np.int32, count=int(lengths.sum()))
    doc_tokens = _doc_tokens(lengths, nseg)
    ends = np.cumsum(doc_tokens)
    tokens = np.insert(flat, ends, tokenizer.eod_id)  # the eod after each document
    max_id = int(tokens.max()) if tokens.size else -1
    mask = None
    if not all_learned:
        mask = np.insert(np.repeat(np.asarray(flags, dtype=np.uint8), lengths), ends, 1)
    sizes = (doc_tokens + 1).astype(np.int32)
    return tokens.astype(dtype, copy=False), sizes, mask, max_id, events


def _doc_tokens(lengths: np.ndarray, nseg: list[int]) -> np.ndarray:
    """Tokens per document (without the eod) from tokens per segment and segments per document."""
    nseg_a = np.asarray(nseg, dtype=np.int64)
    if nseg_a.size and int(nseg_a.min()) == 1 and int(nseg_a.max()) == 1:
        return lengths
    seg_doc = np.repeat(np.arange(nseg_a.size), nseg_a)
    return np.bincount(seg_doc, weights=lengths, minlength=nseg_a.size).astype(np.int64)


def _encode_with_long(tokenizer: Tokenizer, texts: list[str], long: list[int], serial: bool) -> list:
    """Ids of every text: the long ones (indexes `long`) piece by piece with `encode_long` (int32 arrays), the others
    in one batch as usual (lists)."""
    encoded: list = [None] * len(texts)
    for i in long:
        encoded[i] = tokenizer.encode_long(texts[i])
        texts[i] = ""  # the ids are all we need from here: let the text go as soon as nothing else holds it
    short = [i for i in range(len(texts)) if encoded[i] is None]
    short_texts = [texts[i] for i in short]
    batch = _encode_serial(tokenizer, short_texts) if serial else tokenizer.encode_batch(short_texts) if short else []
    for i, ids in zip(short, batch):
        encoded[i] = ids
    return encoded


def _pack_segments(encoded: list, nseg: list[int], flags: list[bool], all_learned: bool, eod: int,
                   dtype) -> tuple:
    """`process_chunk`'s packing written for a few huge segments: each segment's ids are copied once into the output
    array (no flat int32 copy, no np.insert copy) and dropped as soon as they are. Returns (tokens, sizes, mask,
    max_id)."""
    lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
    doc_tokens = _doc_tokens(lengths, nseg)
    total = int(doc_tokens.sum()) + len(nseg)
    tokens = np.empty(total, dtype=dtype)
    mask = None if all_learned else np.empty(total, dtype=np.uint8)
    max_id = -1
    pos = seg = 0
    for k in nseg:
        for _ in range(k):
            ids = encoded[seg]
            encoded[seg] = None
            n = len(ids)
            if n:
                # checked before the copy: an id beyond the dtype would wrap silently in the assignment
                max_id = max(max_id, int(np.max(ids)))
                tokens[pos:pos + n] = ids
                if mask is not None:
                    mask[pos:pos + n] = flags[seg]
            pos += n
            seg += 1
        tokens[pos] = eod
        if mask is not None:
            mask[pos] = 1
        pos += 1
    max_id = max(max_id, eod) if total else -1
    return tokens, (doc_tokens + 1).astype(np.int32), mask, max_id


def _process_in_worker(chunk):
    tokenizer, template, dtype = _worker_ctx
    return process_chunk(chunk, tokenizer, template, dtype, serial=True)


# ----------------------------------------------------------------------------------------------------- writing

OUTPUT_SUFFIXES = (".bin", ".idx", ".mask.bin", ".mask.idx")


def _output_name_pattern(prefix: str) -> re.Pattern:
    """File names this command writes for `prefix` besides the manifest: PREFIX[-NNNNN][.mask].bin/.idx."""
    return re.compile(re.escape(os.path.basename(prefix)) + r"(-\d{5})?(\.mask)?\.(bin|idx)")


def _is_output_name(path: str, prefix: str) -> bool:
    same_dir = os.path.dirname(os.path.abspath(path)) == os.path.dirname(os.path.abspath(prefix))
    return same_dir and _output_name_pattern(prefix).fullmatch(os.path.basename(path)) is not None


_TEMP_NAME = re.compile(r"\.(?P<stem>.+)\.file-(?P<pid>\d+)-[0-9a-f]{8}\.tmp")  # atomic_file's temporaries


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_dead_temps(prefix: str) -> list[str]:
    """Remove the temporaries that a run for `prefix` killed outright (SIGKILL, a power cut) left behind: only
    names of our outputs for this prefix, and only when the process that wrote them is gone (a prepare running now
    into the same prefix keeps its own)."""
    directory = os.path.dirname(os.path.abspath(prefix))
    stems = {n.encode()[:32].decode(errors="ignore") for n in
             [os.path.basename(prefix) + ".json"] + [os.path.basename(prefix) + s for s in OUTPUT_SUFFIXES]}
    removed = []
    for name in os.listdir(directory):
        m = _TEMP_NAME.fullmatch(name)
        if m is None or int(m["pid"]) == os.getpid() or _pid_alive(int(m["pid"])):
            continue
        stem = m["stem"]
        if stem in stems or _is_output_name(os.path.join(directory, stem), prefix):
            os.remove(os.path.join(directory, name))
            removed.append(name)
    return removed


def check_outputs(prefix: str, inputs: Sequence[str], force: bool, sharded: bool = False) -> None:
    """Refuse, before any work, to write over an input or (without `force`) over existing outputs. The shard count
    is not known yet, so the candidates are: the manifest, the unsharded files, every shard file already on disk,
    and any input named like one of our outputs."""
    directory = os.path.dirname(os.path.abspath(prefix))
    name = os.path.basename(prefix)
    if name in ("", ".", ".."):  # `--out .` or `--out dir/` would write hidden files named ".bin", "..json"
        raise FinetuneError(f"{prefix}: not a valid output prefix (give a name, e.g. data/novel)")
    longest = f"{name}{'-00000' if sharded else ''}.mask.bin"
    if len(longest.encode()) > os.pathconf(directory, "PC_NAME_MAX"):  # found now, not when renaming at the end
        raise FinetuneError(f"{prefix}: output prefix too long (its outputs, such as {longest[-30:]!r}, would exceed "
                            f"the file-name limit)")
    candidates = [f"{prefix}.json"] + [prefix + s for s in OUTPUT_SUFFIXES]
    candidates += sorted(os.path.join(os.path.dirname(prefix), n) for n in os.listdir(directory)
                         if _is_output_name(os.path.join(directory, n), prefix))
    candidates += [p for p in inputs if _is_output_name(p, prefix)]
    for path in dict.fromkeys(candidates):
        check_output(path, force=force, inputs=inputs)


def _previous_outputs(prefix: str) -> set[str]:
    """The data files a previous run wrote for `prefix`, as its manifest lists them (none without a manifest of
    ours): with --force, those the new run does not rewrite are removed, so that no stale shard or mask from the
    old run is left beside the new data. Only names of our own pattern are ever returned."""
    try:
        with open(f"{prefix}.json", encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return set()
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        return set()
    base = os.path.dirname(os.path.abspath(f"{prefix}.json"))
    found = set()
    for shard in manifest.get("shards") or []:
        for key in ("prefix", "mask_prefix"):
            p = shard.get(key) if isinstance(shard, dict) else None
            if isinstance(p, str):
                found.update(os.path.join(base, p) + s for s in (".bin", ".idx"))
    return {p for p in found if _is_output_name(p, prefix)}


@dataclass
class _Part:
    """One binidx pair being written: its writer (on a temporary `.bin`) and the prefix it is published under."""

    writer: BinidxWriter
    prefix: str

    def add(self, values: np.ndarray, sizes: np.ndarray) -> None:
        try:
            self.writer.add_documents(values, sizes)
        except OSError as e:  # a full disk: name the file we were writing, not a temporary
            raise write_error(Path(f"{self.prefix}.bin"), e) from None

    def finish(self) -> None:
        try:
            self.writer.close()  # the last flush can be the write that fails
        except OSError as e:
            raise write_error(Path(f"{self.prefix}.bin"), e) from None


class ShardedOutput:
    """Token (and mask) files for PREFIX, split into shards. Every data file is written under a temporary name by
    `atomic.atomic_file`; used as a context manager, any failure (a bad record, a full disk, Ctrl-C, SIGTERM)
    removes them all. `commit()` publishes: the data files first, then the indexes, the manifest last, so that an
    interrupted run never leaves a complete-looking `.bin`/`.idx` pair.

    Mask files exist only when some document has a prompt part: they start at the first masked chunk, with ones
    (learn everything) written for the documents before it."""

    def __init__(self, prefix: str, dtype, shard_tokens: int | None) -> None:
        self.prefix = prefix
        self.dtype = dtype
        self.shard_tokens = shard_tokens
        self.shards: list[dict] = []
        self.parts: list[tuple[_Part, _Part | None]] = []
        self.has_mask = False
        self.current = False  # a shard is open for more documents
        self.written: list[str] = []  # every file published by commit()
        self._files = ExitStack()

    def __enter__(self) -> "ShardedOutput":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            for tok, mask in self.parts:
                tok.writer.abort()
                if mask is not None:
                    mask.writer.abort()
        return self._files.__exit__(exc_type, exc, tb)

    def _part(self, prefix: str, dtype) -> _Part:
        tmp = self._files.enter_context(atomic_file(f"{prefix}.bin"))
        try:
            return _Part(BinidxWriter(None, dtype, bin_path=tmp), prefix)
        except OSError as e:
            raise write_error(Path(f"{prefix}.bin"), e) from None

    def _open(self) -> None:
        i = len(self.parts)
        p = self.prefix if self.shard_tokens is None else f"{self.prefix}-{i:05d}"
        tok = self._part(p, self.dtype)
        self.parts.append((tok, self._part(f"{p}.mask", np.uint8) if self.has_mask else None))
        self.shards.append({"prefix": p})
        self.current = True

    def _start_masks(self) -> None:
        self.has_mask = True
        for i, (tok, _) in enumerate(self.parts):
            mask = self._part(f"{tok.prefix}.mask", np.uint8)
            for sizes in tok.writer.size_batches():  # batch by batch: memory stays that of one chunk
                mask.add(np.ones(int(sizes.sum()), dtype=np.uint8), sizes)
            self.parts[i] = (tok, mask)

    def add(self, tokens: np.ndarray, sizes: np.ndarray, mask: np.ndarray | None) -> None:
        if mask is not None and not self.has_mask:
            self._start_masks()
        start_doc, start_tok = 0, 0
        while start_doc < sizes.size:
            if not self.current:
                self._open()
            tok, mask_part = self.parts[-1]
            end_doc = sizes.size
            if self.shard_tokens is not None:
                room = self.shard_tokens - tok.writer.num_tokens
                cum = np.cumsum(sizes[start_doc:])
                end_doc = start_doc + min(int(np.searchsorted(cum, room)) + 1, cum.size)
            n = int(sizes[start_doc:end_doc].sum())
            tok.add(tokens[start_tok:start_tok + n], sizes[start_doc:end_doc])
            if mask_part is not None:
                values = mask[start_tok:start_tok + n] if mask is not None else np.ones(n, dtype=np.uint8)
                mask_part.add(values, sizes[start_doc:end_doc])
            start_doc, start_tok = end_doc, start_tok + n
            if self.shard_tokens is not None and tok.writer.num_tokens >= self.shard_tokens:
                self.current = False

    def commit(self, manifest: dict) -> None:
        """Publish: close the data files and rename them into place (each fsync'ed), write the indexes, then the
        manifest (completed with the shard list) last."""
        parts = [p for pair in self.parts for p in pair if p is not None]
        for part in parts:
            part.finish()
        self._files.close()
        self.written += [f"{p.prefix}.bin" for p in parts]
        for part in parts:
            with atomic_file(f"{part.prefix}.idx") as tmp:
                part.writer.write_index(tmp)
            self.written.append(f"{part.prefix}.idx")
        manifest_path = f"{self.prefix}.json"
        base = os.path.dirname(os.path.abspath(manifest_path))
        for shard, (tok, mask) in zip(self.shards, self.parts):
            shard["documents"] = tok.writer.num_documents
            shard["tokens"] = tok.writer.num_tokens
            shard["prefix"] = os.path.relpath(os.path.abspath(tok.prefix), base)
            shard["mask_prefix"] = os.path.relpath(os.path.abspath(mask.prefix), base) if mask else None
        manifest["shards"] = self.shards
        manifest["has_mask"] = self.has_mask
        with atomic_file(manifest_path) as tmp:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(manifest, f, indent=1, ensure_ascii=False)
                f.write("\n")
        self.written.append(manifest_path)


# ----------------------------------------------------------------------------------------------------- driver


def start_pool(tokenizer: Tokenizer, template: ChatTemplate | None, dtype, workers: int) -> ProcessPoolExecutor:
    """Worker processes for the per-record work. Forked where the platform can (they inherit the loaded tokenizer,
    nothing to import or load), else spawned (each rebuilds the tokenizer from its spec). See `_encode_serial` for
    why workers never use a Rust thread pool.

    A ProcessPoolExecutor rather than a multiprocessing.Pool: Pool.terminate() hangs for good when a worker is in
    the middle of writing a large result into the result pipe while the pool's result thread has stopped reading
    (Ctrl-C or a --strict error with chunks in flight), and a Pool whose worker dies (the OOM killer) waits for the
    lost chunk for ever; the executor keeps reading results until it is shut down and reports a worker that died
    between results as BrokenProcessPool. (A worker killed half-way through sending a result can still hang it:
    hence `_worker_sigterm`.)"""
    global _worker_ctx
    if "fork" in multiprocessing.get_all_start_methods():
        _worker_ctx = (tokenizer, template, dtype)
        return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                                   initializer=_init_worker, initargs=(None,))
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
                               initargs=(pickle.dumps((tokenizer, template, dtype)),))


def _processed_chunks(chunks: Iterator[tuple], tokenizer: Tokenizer, template: ChatTemplate | None, dtype,
                      workers: int) -> Iterator[tuple]:
    """`process_chunk` of every chunk, in order: inline, or on `workers` processes with a bounded look-ahead. Close
    the generator when done with it (also on an error): that stops the workers."""
    if workers <= 1:  # no pool: the same work inline, batch-encoding (the Rust thread pool is fine here)
        for c in chunks:
            yield process_chunk(c, tokenizer, template, dtype)
        return
    pool = start_pool(tokenizer, template, dtype, workers)
    pending: collections.deque = collections.deque()
    try:
        for c in chunks:  # bounded look-ahead keeps memory constant and the order of documents
            pending.append(pool.submit(_process_in_worker, c))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    except BrokenProcessPool:
        raise FinetuneError("a prepare worker process died (killed, or out of memory?); nothing written") from None
    finally:
        # the chunks being worked on finish (well under a second), the queued ones are dropped
        pool.shutdown(wait=True, cancel_futures=True)


def prepare(
    inputs: Sequence[str],
    tokenizer,
    out: str,
    *,
    template="auto",
    doc_separator: str | None = None,
    workers: int = 1,
    shard_tokens: int | None = None,
    strict: bool = False,
    progress: bool | None = None,
    batch_chars: int | None = None,
    force: bool = False,
) -> dict:
    """Tokenize `inputs` into binidx files at prefix `out`; returns the manifest (also written to `out`.json).

    `tokenizer`: "world", a tokenizer.json path or a Tokenizer. `template`: "raven", "world", "none", "auto" or a
    dict {"user": "...{text}...", "assistant": "...{text}..."}. Existing outputs are replaced only with `force`, an
    input never. Raises FinetuneError on bad input; on any failure no output file (nor temporary) is left."""
    tok = load_tokenizer(tokenizer)
    tmpl = resolve_template(template, tok)
    out = output_prefix(out)
    if shard_tokens is not None and shard_tokens < 1:
        raise FinetuneError(f"--shard-tokens must be positive (got {shard_tokens})")
    if workers < 1:
        raise FinetuneError(f"--workers must be at least 1 (got {workers})")
    paths = expand_inputs(inputs)
    out_dir = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(out_dir):
        raise FinetuneError(f"{out}: output directory {out_dir} does not exist")
    check_outputs(out, paths, force, sharded=shard_tokens is not None)
    remove_dead_temps(out)
    previous = _previous_outputs(out) if force else set()
    stats = Stats(strict=strict)
    sources = []

    def chunks(chunk_bytes):
        for path in paths:
            sources.append({"path": path, "sha256": None})
            yield from raw_chunks(path, doc_separator, chunk_bytes, max(16, chunk_bytes // 512), sources[-1])

    dtype = token_dtype(tok.vocab_size)
    from tqdm import tqdm

    t0 = time.perf_counter()
    n_docs = n_tokens = 0
    with ShardedOutput(out, dtype, shard_tokens) as output:
        bar = tqdm(unit="doc", disable=(not progress) if progress is not None else None, desc="prepare",
                   file=sys.stderr)
        if workers > 1 and batch_chars is None:
            batch_chars = 1 << 18  # smaller chunks keep every worker busy from the start
        results = _processed_chunks(chunks(batch_chars or (1 << 20)), tok, tmpl, dtype, workers)
        try:
            for tokens, sizes, mask, max_id, events in results:
                for reason, where in events:
                    stats.event(reason, where)
                if max_id >= tok.vocab_size:
                    raise FinetuneError(f"token id {max_id} >= vocab_size {tok.vocab_size} of {tok.name}")
                if sizes.size:
                    output.add(tokens, sizes, mask)
                n_docs += sizes.size
                n_tokens += int(tokens.size)
                bar.update(sizes.size)
                bar.set_postfix_str(f"{n_tokens / max(time.perf_counter() - t0, 1e-9):,.0f} tok/s", refresh=False)
        finally:
            results.close()
            bar.close()
        seconds = time.perf_counter() - t0
        if n_docs == 0:
            raise FinetuneError(f"{', '.join(paths)}: no documents to write ({_skip_text(stats) or 'inputs are empty'})")
        manifest = {
            "format": MANIFEST_FORMAT,
            "version": 1,
            "documents": n_docs,
            "tokens": n_tokens,
            "skipped": dict(stats.skipped),
            "skipped_examples": stats.examples,
            "invalid_utf8_records": stats.invalid_utf8,
            "invalid_utf8_examples": stats.invalid_utf8_where,
            "tokenizer": tok.name,
            "vocab_size": tok.vocab_size,
            "eod_id": tok.eod_id,
            "dtype": np.dtype(dtype).name,
            "template": tmpl.name if tmpl else "none",
            "doc_separator": doc_separator,
            "shard_tokens": shard_tokens,
            "sources": sources,
            "seconds": round(seconds, 3),
        }
        output.commit(manifest)
    for stale in previous - {os.path.abspath(p) for p in output.written}:
        if os.path.isfile(stale):
            os.remove(stale)
    return manifest


def _skip_text(stats: Stats) -> str:
    parts = [f"{r} {n} (e.g. {stats.examples[r][0]})" for r, n in stats.skipped.most_common()]
    return f"skipped {sum(stats.skipped.values())} records: " + ", ".join(parts) if parts else ""


def summary_line(manifest: dict, out: str) -> str:
    secs = max(manifest["seconds"], 1e-9)
    line = (f"prepare: {manifest['documents']:,} documents, {manifest['tokens']:,} tokens in {secs:.2f}s "
            f"({manifest['tokens'] / secs:,.0f} tokens/s) -> {out}.bin/.idx")
    if manifest["shard_tokens"] is not None:
        line = line.replace(f"{out}.bin/.idx", f"{len(manifest['shards'])} shards {out}-NNNNN.bin/.idx")
    if manifest["has_mask"]:
        line += " + loss masks"
    skipped = manifest["skipped"]
    if skipped:
        ex = manifest["skipped_examples"]
        line += f"; skipped {sum(skipped.values())} records (" + ", ".join(
            f"{r}: {n}, e.g. {ex[r][0]}" for r, n in sorted(skipped.items(), key=lambda kv: -kv[1])) + ")"
    else:
        line += "; skipped 0 records"
    if manifest["invalid_utf8_records"]:
        line += (f"; replaced invalid UTF-8 in {manifest['invalid_utf8_records']} records "
                 f"(e.g. {manifest['invalid_utf8_examples'][0]})")
    return line


# ----------------------------------------------------------------------------------------------------- CLI

DESCRIPTION = """\
Tokenize text, instruction or chat data into binidx files (PREFIX.bin + PREFIX.idx) for training.

Inputs (several at once; globs are expanded):
  .txt/.md        one document per file, or several split on --doc-separator
  .jsonl          one record per line: {"text": ...} (or just a JSON string)
                  | {"instruction": ..., "input": ... (optional), "output": ...}
                  | {"messages": [{"role": "system|user|assistant", "content": ...}, ...]}
  .parquet        the same records as columns
  .json/.csv/.arrow, or a directory written by datasets' save_to_disk: opened with Hugging Face datasets

Instruction and chat records are rendered with --template:
  raven   Bob: {question}\\n\\nAlice: {answer}\\n\\n
  world   User: {question}\\n\\nAssistant: {answer}\\n\\n
  none    plain "text" records only (instruction/chat records are skipped)
  auto    world with the World tokenizer, raven otherwise (default)
  Blank lines inside a message become single newlines (a blank line ends a turn); instruction and input are
  joined by a newline. Every document ends with token 0.

Output:
  PREFIX.bin/.idx       Megatron MMapIndexedDataset, one item per document (as RWKV-LM and json2binidx use).
                        Token dtype: uint16 when vocab_size < 65500, else int32 (World, 65536, is int32).
  PREFIX.mask.bin/.idx  instruction/chat data: uint8 loss mask, 1 = learn (answers and the closing 0), 0 = prompt.
  PREFIX.json           manifest: counts, skipped records, tokenizer, vocab_size, template, sources + sha256, shards.
  With --shard-tokens N: PREFIX-00000.bin/.idx, PREFIX-00001... (documents are never split across shards).
  Files are written under temporary names and renamed together at the end; a failed or interrupted run (a bad
  record with --strict, a full disk, Ctrl-C, SIGTERM) leaves neither outputs nor temporaries. An output that is
  one of the inputs is refused; existing outputs are replaced only with --force.

Bad records (malformed JSON, missing fields) are skipped and counted with file:line; invalid UTF-8 is replaced and
counted. --strict makes each of these an error. An empty result is an error.

Example:
  rwkv-lora prepare data/instruct/*.jsonl --tokenizer world --template world --out out/instruct --workers 2
"""


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "prepare", help="tokenize text/jsonl/parquet/datasets into binidx training data",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="input files, directories or glob patterns")
    p.add_argument("--tokenizer", required=True, metavar="world|PATH",
                   help='"world" (RWKV World, rwkv_vocab_v20230424) or a Hugging Face tokenizer.json')
    p.add_argument("--out", required=True, metavar="PREFIX", help="output prefix: writes PREFIX.bin, .idx, .json")
    p.add_argument("--template", default="auto", choices=TEMPLATE_CHOICES,
                   help="chat format for instruction/chat records (default: auto)")
    p.add_argument("--doc-separator", metavar="STR", default=None,
                   help=f"split .txt files into documents on STR ({ESCAPES_HELP}; a newline also matches a Windows "
                        f"line end); default: one document per file")
    p.add_argument("--workers", type=int, default=1, metavar="N", help="tokenizer processes (default 1)")
    p.add_argument("--shard-tokens", type=int, default=None, metavar="N",
                   help="start a new numbered shard once a shard holds N tokens")
    p.add_argument("--strict", action="store_true", help="stop at the first malformed record or invalid UTF-8")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--force", "--overwrite", action="store_true",
                   help="replace existing outputs of PREFIX (an input is never overwritten)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    sep = args.doc_separator
    if sep is not None:
        sep = unescape(sep)
        if not sep:
            raise FinetuneError("--doc-separator must not be empty")
    try:  # SIGTERM raises Terminated here: the CLI's handler (finetune.cli.main), so the temporaries are removed
        manifest = prepare(
            args.inputs, args.tokenizer, args.out, template=args.template, doc_separator=sep, workers=args.workers,
            shard_tokens=args.shard_tokens, strict=args.strict, progress=False if args.no_progress else None,
            force=args.force,
        )
    except Terminated:
        print("rwkv-lora prepare: terminated (SIGTERM); nothing written", file=sys.stderr)
        return 128 + signal.SIGTERM
    out = output_prefix(args.out)
    print(summary_line(manifest, out))
    return 0
