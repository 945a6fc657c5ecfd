"""Megatron `MMapIndexedDataset` files (`PREFIX.bin` + `PREFIX.idx`), as RWKV-LM and json2binidx use them.

`.bin`: the items' values back to back, little-endian, in the index's dtype, no header.
`.idx`: magic `MMIDIDX\\x00\\x00`, u64 version 1, u8 dtype code, u64 N (items), u64 D (doc-index entries), then
int32[N] item sizes, int64[N] byte offsets of the items in `.bin`, int64[D] doc_idx (0, then the running item count
after each document). Here one item = one document, so doc_idx = 0..N.

`BinidxWriter` streams documents to disk (constant memory: sizes are kept, 4 bytes per document) and writes the
index at `close()`. It writes to the names it is given; `finetune.prepare` gives it temporary names and renames.
`BinidxReader` memory-maps both files and takes the dtype from the header.
"""

from __future__ import annotations

import os
import struct

import numpy as np

from finetune.errors import FinetuneError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_SIZE = 9 + 8 + 1 + 8 + 8  # 34 bytes

DTYPE_CODES = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float64,  # "double" in Megatron's table
    8: np.uint16,
}
CODE_OF = {np.dtype(np.uint8): 1, np.dtype(np.int8): 2, np.dtype(np.int16): 3, np.dtype(np.int32): 4,
           np.dtype(np.int64): 5, np.dtype(np.float64): 6, np.dtype(np.uint16): 8}


def token_dtype(vocab_size: int) -> np.dtype:
    """The dtype json2binidx picks: uint16 below 65500 tokens, else int32 (so World data, 65536, is int32)."""
    return np.dtype(np.uint16) if vocab_size < 65500 else np.dtype(np.int32)


class BinidxWriter:
    """Append documents to `bin_path` and write the index to `idx_path` on `close()`.

    `BinidxWriter(prefix, dtype)` writes PREFIX.bin / PREFIX.idx; `bin_path=` / `idx_path=` override the names.
    With `prefix=None` and no `idx_path`, `close()` only closes the `.bin`, and the caller writes the index where it
    wants with `write_index` (prepare writes it under a temporary name of its own).
    """

    def __init__(self, prefix: str | None, dtype, *, bin_path: str | None = None, idx_path: str | None = None):
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODE_OF:
            raise ValueError(f"dtype {self.dtype} has no binidx code")
        self.bin_path = bin_path or f"{prefix}.bin"
        self.idx_path = idx_path or (f"{prefix}.idx" if prefix is not None else None)
        self._bin = open(self.bin_path, "wb")
        self._sizes: list[np.ndarray] = []
        self.num_documents = 0
        self.num_tokens = 0
        self.closed = False

    def add_document(self, values) -> None:
        arr = np.asarray(values)
        self._write(arr.reshape(-1), np.array([arr.size], dtype=np.int64))

    def add_documents(self, flat, sizes) -> None:
        """Many documents at once: `flat` = their values back to back, `sizes` = each one's length."""
        self._write(np.asarray(flat).reshape(-1), np.asarray(sizes, dtype=np.int64).reshape(-1))

    def _write(self, flat: np.ndarray, sizes: np.ndarray) -> None:
        if int(sizes.sum()) != flat.size:
            raise ValueError("document sizes do not add up to the values given")
        if sizes.size and int(sizes.max()) > np.iinfo(np.int32).max:
            raise ValueError("a document is longer than an int32 size allows")
        values = np.ascontiguousarray(flat.astype(self.dtype.newbyteorder("<"), copy=False))
        self._bin.write(memoryview(values).cast("B"))  # the array's own bytes: no tobytes() copy of a huge document
        self._sizes.append(sizes.astype(np.int32))
        self.num_documents += sizes.size
        self.num_tokens += flat.size

    def size_batches(self) -> list[np.ndarray]:
        """The document sizes written so far, in the batches they were added (int32 arrays)."""
        return list(self._sizes)

    def close(self) -> None:
        """Close the `.bin` and write the index to `idx_path` (when there is one)."""
        if self.closed:
            return
        self._bin.close()
        self.closed = True
        if self.idx_path is not None:
            self.write_index(self.idx_path)

    def write_index(self, path: str) -> None:
        sizes = np.concatenate(self._sizes) if self._sizes else np.zeros(0, dtype=np.int32)
        pointers = np.zeros(sizes.size, dtype=np.int64)
        if sizes.size > 1:
            np.cumsum(sizes[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        doc_idx = np.arange(sizes.size + 1, dtype=np.int64)
        with open(path, "wb") as f:
            f.write(MAGIC)
            f.write(struct.pack("<Q", VERSION))
            f.write(struct.pack("<B", CODE_OF[self.dtype]))
            f.write(struct.pack("<Q", sizes.size))
            f.write(struct.pack("<Q", doc_idx.size))
            f.write(sizes.astype("<i4").tobytes())
            f.write(pointers.astype("<i8").tobytes())
            f.write(doc_idx.astype("<i8").tobytes())

    def abort(self) -> None:
        """Close and delete whatever was written. Never raises for a failed write: closing flushes the buffer, and
        on a full disk that flush fails again; the file is closed all the same and the cleanup must go on."""
        try:
            self._bin.close()
        except OSError:
            pass
        for p in (self.bin_path, self.idx_path):
            if p is not None and os.path.exists(p):
                os.remove(p)
        self.closed = True


def strip_suffix(path: str) -> str:
    for suffix in (".bin", ".idx"):
        if path.endswith(suffix):
            return path[: -len(suffix)]
    return path


class BinidxReader:
    """Memory-map PREFIX.bin / PREFIX.idx. `.tokens` is the whole `.bin` as one flat array (RWKV-LM's view);
    `reader[i]` is item i; `.sizes`, `.pointers`, `.doc_idx` come from the index."""

    def __init__(self, prefix: str):
        self.prefix = strip_suffix(prefix)
        self.idx_path = f"{self.prefix}.idx"
        self.bin_path = f"{self.prefix}.bin"
        for p in (self.idx_path, self.bin_path):
            if not os.path.isfile(p):
                raise FinetuneError(f"{p}: file not found")
        idx_size = os.path.getsize(self.idx_path)
        with open(self.idx_path, "rb") as f:
            header = f.read(HEADER_SIZE)
        if len(header) < HEADER_SIZE or header[:9] != MAGIC:
            raise FinetuneError(f"{self.idx_path}: not a binidx index (bad magic)")
        (version,) = struct.unpack("<Q", header[9:17])
        code = header[17]
        n, d = struct.unpack("<QQ", header[18:34])
        if version != VERSION:
            raise FinetuneError(f"{self.idx_path}: unsupported binidx version {version}")
        if code not in DTYPE_CODES:
            raise FinetuneError(f"{self.idx_path}: unknown dtype code {code}")
        if idx_size != HEADER_SIZE + 4 * n + 8 * n + 8 * d:
            raise FinetuneError(f"{self.idx_path}: index is {idx_size} bytes, its header says {n} items (truncated?)")
        self.dtype = np.dtype(DTYPE_CODES[code]).newbyteorder("<")
        idx = np.memmap(self.idx_path, dtype=np.uint8, mode="r")
        self.sizes = idx[HEADER_SIZE : HEADER_SIZE + 4 * n].view("<i4")
        self.pointers = idx[HEADER_SIZE + 4 * n : HEADER_SIZE + 12 * n].view("<i8")
        self.doc_idx = idx[HEADER_SIZE + 12 * n : HEADER_SIZE + 12 * n + 8 * d].view("<i8")
        bin_size = os.path.getsize(self.bin_path)
        expected = int(self.sizes.astype(np.int64).sum()) * self.dtype.itemsize
        if bin_size != expected:
            raise FinetuneError(f"{self.bin_path}: {bin_size} bytes, its index says {expected} (truncated or mismatched)")
        if bin_size:
            self.tokens = np.memmap(self.bin_path, dtype=self.dtype, mode="r")
        else:
            self.tokens = np.zeros(0, dtype=self.dtype)

    def __len__(self) -> int:
        return int(self.sizes.size)

    def __getitem__(self, i: int) -> np.ndarray:
        start = int(self.pointers[i]) // self.dtype.itemsize
        return self.tokens[start : start + int(self.sizes[i])]

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.size)
