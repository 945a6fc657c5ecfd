"""Tokenizers: the RWKV World tokenizer and Hugging Face `tokenizer.json` files behind one small interface.

    tok = load_tokenizer("world")                    # rwkv_vocab_v20230424, vocab_size 65536
    tok = load_tokenizer("data/demo-tokenizer/tokenizer.json")
    ids = tok.encode("Hello")                        # list[int]
    tok.decode(ids) == "Hello"

Every tokenizer has `.encode(text)`, `.encode_batch(texts)`, `.decode(ids)`, `.vocab_size` (the model's embedding
rows), `.eod_id` (always 0: the end-of-document token appended after every document in binidx data) and `.name` (a
stable description recorded in data manifests and checkpoints: "world", or "tokenizer.json sha256:<16 hex>").
Tokenizer objects pickle as their spec and rebuild themselves, so they can be sent to worker processes.

World: greedy longest match over the UTF-8 bytes of the text with the `rwkv_vocab_v20230424` vocabulary (ids
1..65529; 0 = end of document), encoded by the Rust `pyrwkv-tokenizer`; the ids are the same as the `rwkv` pip
package's `TRIE_TOKENIZER` (tests/test_tokenizer.py checks this). Decoding is done here from the vocabulary file,
because the Rust decoder panics on ids that end inside a UTF-8 character; incomplete characters decode to U+FFFD.
"""

from __future__ import annotations

import ast
import hashlib
import os
from typing import Iterable, Sequence

from finetune.errors import FinetuneError

WORLD_VOCAB_SIZE = 65536  # the embedding size of World models (the vocabulary file itself ends at id 65529)
EOD_ID = 0


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
        self.name = "world"
        self.spec = "world"
        self.vocab_size = WORLD_VOCAB_SIZE

    def encode(self, text: str) -> list[int]:
        return self._rust.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._rust.encode_batch(list(texts))

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        if self._id_to_bytes is None:
            table = read_world_vocab(self.vocab_path)
            lookup = [b""] * WORLD_VOCAB_SIZE
            for i, raw in table.items():
                lookup[i] = raw
            self._id_to_bytes = lookup
        lookup = self._id_to_bytes
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

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # encode_batch_fast (tokenizers >= 0.20) skips the character offsets we do not need
        fast = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        return [e.ids for e in fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)


def load_tokenizer(spec: str) -> Tokenizer:
    """`spec` = "world" (RWKV World, vocab 65536) or a path to a Hugging Face tokenizer.json."""
    if isinstance(spec, Tokenizer):
        return spec
    if spec == "world":
        return WorldTokenizer()
    return HFTokenizer(spec)
