"""Tokenizers: the RWKV World tokenizer and Hugging Face `tokenizer.json` files behind one small interface.

    tok = load_tokenizer("world")                    # rwkv_vocab_v20230424, vocab_size 65536
    tok = load_tokenizer("data/demo-tokenizer/tokenizer.json")
    ids = tok.encode("Hello")                        # list[int]
    tok.decode(ids) == "Hello"

Every tokenizer has `.encode(text)`, `.encode_batch(texts)`, `.decode(ids)`, `.vocab_size` (the model's embedding
rows), `.eod_id` (always 0: the end-of-document token appended after every document in binidx data) and `.name` (a
stable description recorded in data manifests and checkpoints: "world", or "tokenizer.json sha256:<16 hex>").
Tokenizer objects pickle as their spec and rebuild themselves, so they can be sent to worker processes.

`.encode_long(text)` gives exactly `encode(text)` as an int32 array, but encodes a long text (one 50 MB line) piece
by piece, so that memory stays near the size of the text and its ids instead of the tokenizer's working set for the
whole text (Hugging Face tokenizers keep ~180 bytes per character: 9 GB for 50 MB). The pieces are cut only where the
cut provably changes nothing: see `WorldTokenizer.encode_long` and `HFTokenizer.encode_long`.

World: greedy longest match over the UTF-8 bytes of the text with the `rwkv_vocab_v20230424` vocabulary (ids
1..65529; 0 = end of document), encoded by the Rust `pyrwkv-tokenizer`; the ids are the same as the `rwkv` pip
package's `TRIE_TOKENIZER` (tests/test_tokenizer.py checks this). Decoding is done here from the vocabulary file,
because the Rust decoder panics on ids that end inside a UTF-8 character; incomplete characters decode to U+FFFD.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
from typing import Iterable, Sequence

import numpy as np

from finetune.errors import FinetuneError, first_line

WORLD_VOCAB_SIZE = 65536  # the embedding size of World models (the vocabulary file itself ends at id 65529)
EOD_ID = 0
PIECE_CHARS = 1 << 16  # `encode_long` encodes texts longer than this in pieces of about this many characters
PIECES_PER_CALL = 4  # pieces a Hugging Face tokenizer encodes at once (in parallel): ~45 MB of working set


class Tokenizer:
    """Common interface. Subclasses implement `encode_batch`, `decode_bytes` and set the attributes."""

    name: str
    spec: str
    vocab_size: int
    eod_id: int = EOD_ID

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def encode_long(self, text: str, piece_chars: int = PIECE_CHARS) -> np.ndarray:
        """`encode(text)` as int32. Tokenizers that know where a text can be cut without changing its ids encode a
        long text piece by piece (bounded memory); this fallback encodes it whole."""
        return np.asarray(self.encode(text), dtype=np.int32)

    def __reduce__(self):
        return (load_tokenizer, (self.spec,))

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} vocab_size={self.vocab_size}>"


def _world_vocab_path() -> str:
    import pyrwkv_tokenizer

    return os.path.join(os.path.dirname(pyrwkv_tokenizer.__file__), "rwkv_vocab_v20230424.txt")


def read_world_vocab(path: str) -> dict[int, bytes]:
    """Parse an RWKV vocabulary file: one `ID REPR LENGTH` line per token (REPR: a Python str or bytes literal)."""
    table: dict[int, bytes] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line:
                continue
            first, last = line.index(" "), line.rindex(" ")
            value = ast.literal_eval(line[first + 1 : last])
            raw = value.encode("utf-8") if isinstance(value, str) else value
            if not isinstance(raw, bytes) or len(raw) != int(line[last + 1 :]):
                raise FinetuneError(f"{path}:{lineno}: malformed vocabulary line")
            table[int(line[:first])] = raw
    return table


class WorldTokenizer(Tokenizer):
    """The RWKV World tokenizer (`rwkv_vocab_v20230424`), through the Rust `pyrwkv-tokenizer`."""

    def __init__(self) -> None:
        try:
            import pyrwkv_tokenizer
        except ImportError as e:  # pragma: no cover - it is a dependency
            raise FinetuneError("the World tokenizer needs the pyrwkv-tokenizer package (pip install pyrwkv-tokenizer)") from e
        self.vocab_path = _world_vocab_path()
        self._rust = pyrwkv_tokenizer.WorldTokenizer(self.vocab_path)
        self._id_to_bytes: list[bytes] | None = None
        self._id_to_length: np.ndarray | None = None  # bytes per token id
        self.name = "world"
        self.spec = "world"
        self.vocab_size = WORLD_VOCAB_SIZE

    def encode(self, text: str) -> list[int]:
        return self._rust.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._rust.encode_batch(list(texts))

    def _vocab(self) -> list[bytes]:
        if self._id_to_bytes is None:
            table = read_world_vocab(self.vocab_path)
            lookup = [b""] * WORLD_VOCAB_SIZE
            for i, raw in table.items():
                lookup[i] = raw
            self._id_to_bytes = lookup
            self._id_to_length = np.array([len(b) for b in lookup], dtype=np.int64)
        return self._id_to_bytes

    def encode_long(self, text: str, piece_chars: int = PIECE_CHARS) -> np.ndarray:
        """`encode(text)` as int32, a window of `piece_chars` characters at a time.

        World tokenization is a greedy longest match from the left: the token at byte q is decided by the bytes
        q .. q + L - 1 alone (L = the longest token, 128 bytes), and the next one starts where it ends. So in a
        window that starts at a token boundary of the whole text, every token that starts at least L bytes before
        the window's end is the whole text's token; the next window starts after the last of them that ends on a
        character boundary (a str cannot be cut inside a character)."""
        longest = int(self._vocab_lengths().max())
        piece_chars = max(piece_chars, 4 * longest)  # room for many tokens besides the look-ahead
        parts: list[np.ndarray] = []
        start = 0
        while len(text) - start > piece_chars:
            window = text[start:start + piece_chars]
            raw = np.frombuffer(window.encode("utf-8"), dtype=np.uint8)
            ids = np.asarray(self._rust.encode(window), dtype=np.int32)
            ends = np.cumsum(self._id_to_length[ids])
            starts = ends - self._id_to_length[ids]
            decided = int(np.searchsorted(starts, raw.size - longest, side="right"))  # tokens starting early enough
            at_char = (raw[np.minimum(ends[:decided], raw.size - 1)] & 0xC0) != 0x80  # next byte starts a character
            keep = int(np.flatnonzero(at_char)[-1]) + 1 if at_char.any() else 0
            if keep == 0:  # no usable cut in this window (cannot happen with real text): encode the rest whole
                break
            parts.append(ids[:keep])
            cut_bytes = int(ends[keep - 1])
            start += int(np.count_nonzero((raw[:cut_bytes] & 0xC0) != 0x80))  # characters = bytes that start one
        parts.append(np.asarray(self._rust.encode(text[start:]), dtype=np.int32))
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def _vocab_lengths(self) -> np.ndarray:
        self._vocab()
        return self._id_to_length

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        lookup = self._vocab()
        try:
            return b"".join([lookup[i] for i in ids])
        except (IndexError, TypeError) as e:
            raise ValueError(f"token id out of range for the World vocabulary ({WORLD_VOCAB_SIZE})") from e

    def decode(self, ids: Iterable[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizer.json` (GPT-NeoX 20B for Pile/Raven models, or the demo BPE)."""

    def __init__(self, path: str) -> None:
        from tokenizers import Tokenizer as _Tok

        if not os.path.isfile(path):
            raise FinetuneError(f"{path}: tokenizer file not found (use 'world' or a path to a tokenizer.json)")
        try:
            self._tok = _Tok.from_file(path)
        except Exception as e:  # tokenizers raises plain Exception subclasses
            raise FinetuneError(f"{path}: not a Hugging Face tokenizer.json ({str(e).splitlines()[0]})") from None
        eot = self._tok.token_to_id("<|endoftext|>")
        if eot is not None and eot != EOD_ID:
            raise FinetuneError(
                f"{path}: <|endoftext|> has id {eot}, but RWKV data uses id 0 as the end-of-document token"
            )
        self.path = path
        self.spec = os.path.abspath(path)
        self.name = f"tokenizer.json sha256:{_sha256_file(path)[:16]}"
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.cuttable = _cuttable(json.loads(self._tok.to_str()))

    def encode(self, text: str) -> list[int]:
        try:
            return self._tok.encode(text, add_special_tokens=False).ids
        except Exception as e:  # e.g. a WordLevel model without [UNK] meeting an unknown word
            raise self._cannot_encode(e) from None

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # encode_batch_fast (tokenizers >= 0.20) skips the character offsets we do not need
        fast = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        try:
            return [e.ids for e in fast(list(texts), add_special_tokens=False)]
        except Exception as e:
            raise self._cannot_encode(e) from None

    def _cannot_encode(self, e: Exception) -> FinetuneError:
        return FinetuneError(f"{self.path}: this tokenizer cannot encode the text ({first_line(e)})")

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def encode_long(self, text: str, piece_chars: int = PIECE_CHARS) -> np.ndarray:
        """`encode(text)` as int32; with a byte-level BPE tokenizer (GPT-2, GPT-NeoX 20B, the demo tokenizer: see
        `_cuttable`), piece by piece, cut only where the whole text's pre-tokenization has a boundary too
        (`_cut_points`): the model encodes each pre-token on its own, so the ids are the same."""
        if not self.cuttable or len(text) <= piece_chars:
            return np.asarray(self.encode(text), dtype=np.int32)
        bounds = [0] + _cut_points(text, piece_chars) + [len(text)]
        parts = []
        for i in range(0, len(bounds) - 1, PIECES_PER_CALL):  # a few pieces per call: parallel, memory bounded
            pieces = [text[a:b] for a, b in zip(bounds[i:i + PIECES_PER_CALL], bounds[i + 1:i + PIECES_PER_CALL + 1])]
            parts += [np.asarray(ids, dtype=np.int32) for ids in self.encode_batch(pieces)]
        return np.concatenate(parts)


# Where a byte-level BPE text may be cut. The GPT-2 pre-tokenizer regex ('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+|
# ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+) matches left to right, and
#  - before a single space between two non-spaces ("a b"), no match can run on: a letter, number or punctuation
#    run does not take a space after its first character, and a whitespace run starts at the space itself;
#  - before one of these punctuation marks right after a letter or digit ("word,"), the letter/number run ends
#    (punctuation is neither) and the mark starts a new match (it is not an apostrophe, which starts "'s").
# The whole text's matches therefore have a boundary there, the piece after the cut is matched as the whole text is
# from that point, and BPE works on each match alone. NFC/NFKC cannot join characters across these cuts either
# (a space or these marks never compose with a neighbour, and their NFKC forms are in the same set).
_CUT_MARKS = ".,;:!?，。；：！？、"
_CUT = re.compile(r"(?<=\S) (?=\S)|(?<=[^\W_])[" + re.escape(_CUT_MARKS) + "]")
_LOCAL_NORMALIZERS = {"NFC", "NFD", "NFKC", "NFKD", "Lowercase"}


def _cuttable(config: dict) -> bool:
    """Whether `_cut_points` is exact for this tokenizer.json: a ByteLevel pre-tokenizer with the GPT-2 regex and no
    prefix space, no normalizer or only character-local ones, and no added token that a cut could split (added
    tokens are matched in the raw text before pre-tokenization): one with neither whitespace nor a cut mark cannot
    span a cut, nor can a whitespace-only one (both cuts have a non-space before them)."""
    pre = config.get("pre_tokenizer") or {}
    if pre.get("type") != "ByteLevel" or pre.get("add_prefix_space") or not pre.get("use_regex", True):
        return False
    norm = config.get("normalizer")
    norms = [] if norm is None else norm.get("normalizers", []) if norm.get("type") == "Sequence" else [norm]
    if any(n.get("type") not in _LOCAL_NORMALIZERS for n in norms):
        return False
    for tok in config.get("added_tokens") or []:
        content = tok.get("content", "")
        if tok.get("lstrip") or tok.get("rstrip") or tok.get("single_word"):
            return False  # these absorb the whitespace next to them
        if not content.isspace() and any(c.isspace() or c in _CUT_MARKS for c in content):
            return False
    return True


def _cut_points(text: str, piece_chars: int) -> list[int]:
    """Cut positions about `piece_chars` apart: the last `_CUT` in the second half of each stretch, else the first
    one after it (a stretch without any, such as one huge word, stays whole)."""
    cuts: list[int] = []
    start = 0
    while len(text) - start > piece_chars:
        best = None
        for m in _CUT.finditer(text, start + piece_chars // 2, start + piece_chars):
            best = m.start()
        if best is None:
            m = _CUT.search(text, start + piece_chars)
            if m is None:
                break
            best = m.start()
        cuts.append(best)
        start = best
    return cuts


def load_tokenizer(spec: str) -> Tokenizer:
    """`spec` = "world" (RWKV World, vocab 65536) or a path to a Hugging Face tokenizer.json."""
    if isinstance(spec, Tokenizer):
        return spec
    if spec == "world":
        return WorldTokenizer()
    return HFTokenizer(spec)
