"""Training data: a prepared corpus as one memory-mapped token stream, and the windows the trainer draws from it.

    corpus = open_corpus("out/fables")           # PREFIX, PREFIX.bin, or the manifest PREFIX.json
    corpus.meta["tokenizer"], corpus.meta["vocab_size"], corpus.num_tokens, corpus.max_token_id()
    ds = WindowDataset(corpus, ctx_len=256, schedule="magic_prime", seed=0)
    ds.set_epoch(epoch)                           # before each epoch (the schedule depends on it)
    item = ds[i]   # {"input_ids": int64[T], "targets": int64[T], "loss_mask": float32[T]}

As in RWKV-LM, all documents (and all shards) form one stream and windows of ctx_len + 1 tokens cross document
boundaries (each document ends with token 0). Windows are a pure function of (seed, epoch, i).

Schedules:
- "random": window i of an epoch starts at a uniform offset drawn from numpy's PCG64 seeded with (seed, epoch, i);
  an epoch has (num_tokens - 1) // ctx_len windows.
- "magic_prime": RWKV-LM's deterministic schedule (RWKV-v4neo/src/dataset.py, MyDataset.__getitem__ with
  my_pile_stage > 0): p = the largest prime with p % 3 == 2 below num_tokens / ctx_len - 1, factor = int(p * (sqrt(5)
  - 1) / 2), and sample ii = 1 + epoch * samples_per_epoch + i (RWKV-LM adds idx * world_size + rank; here a
  distributed sampler hands out the i) starts at ((factor * ii^3) mod p) * ctx_len. Since p % 3 == 2, x -> x^3 is a
  bijection mod p, so an epoch of p samples visits each of the p windows exactly once. An epoch has p samples;
  the seed does not enter (as in RWKV-LM).
`epoch_steps` overrides the epoch length (the schedule then simply continues in ii).
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import torch
from torch.utils.data import Dataset

from finetune.binidx import BinidxReader, strip_suffix
from finetune.errors import FinetuneError


class Corpus:
    """Memory-mapped shards (tokens and optional masks) seen as one token stream. Build it with `open_corpus`.

    Pickles as its path (DataLoader workers reopen the memory maps instead of copying the data)."""

    def __init__(self, path: str, shards: list[tuple[BinidxReader, BinidxReader | None]], meta: dict):
        self.path = path
        self.shards = shards
        self.meta = meta
        sizes = np.array([t.num_tokens for t, _ in shards], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)])
        self.num_tokens = int(self.offsets[-1])
        self.has_mask = any(m is not None for _, m in shards)
        self.num_documents = sum(len(t) for t, _ in shards)

    def __getstate__(self):
        return {"path": self.path}

    def __setstate__(self, state):
        self.__dict__.update(open_corpus(state["path"]).__dict__)

    def __len__(self) -> int:
        return self.num_tokens

    def __repr__(self) -> str:
        return (f"<Corpus {self.path}: {self.num_tokens:,} tokens, {self.num_documents:,} documents, "
                f"{len(self.shards)} shard(s), mask={self.has_mask}>")

    def window(self, start: int, length: int) -> tuple[np.ndarray, np.ndarray | None]:
        """tokens[start:start+length] as int64 (crossing shards), and the mask (uint8) or None without masks."""
        if start < 0 or start + length > self.num_tokens:
            raise IndexError(f"window [{start}, {start + length}) outside the corpus ({self.num_tokens} tokens)")
        tokens = np.empty(length, dtype=np.int64)
        mask = np.ones(length, dtype=np.uint8) if self.has_mask else None
        pos = start
        s = int(np.searchsorted(self.offsets, start, side="right")) - 1
        while pos < start + length:
            tok, msk = self.shards[s]
            lo = pos - int(self.offsets[s])
            n = min(tok.num_tokens - lo, start + length - pos)
            tokens[pos - start : pos - start + n] = tok.tokens[lo : lo + n]
            if msk is not None:
                mask[pos - start : pos - start + n] = msk.tokens[lo : lo + n]
            pos += n
            s += 1
        return tokens, mask

    def tokens(self, start: int = 0, length: int | None = None) -> np.ndarray:
        return self.window(start, self.num_tokens - start if length is None else length)[0]

    def max_token_id(self) -> int:
        return max((int(t.tokens.max()) for t, _ in self.shards if t.num_tokens), default=-1)


def _open_shard(prefix: str, mask_prefix: str | None) -> tuple[BinidxReader, BinidxReader | None]:
    tok = BinidxReader(prefix)
    if mask_prefix is None:
        return tok, None
    mask = BinidxReader(mask_prefix)
    if mask.num_tokens != tok.num_tokens:
        raise FinetuneError(f"{mask.bin_path}: {mask.num_tokens} mask values for {tok.num_tokens} tokens")
    return tok, mask


def open_corpus(path: str) -> Corpus:
    """Open prepared data: a manifest `PREFIX.json`, or a binidx PREFIX (with or without `.bin`/`.idx`); PREFIX.json
    is used when present. Without a manifest, `meta` holds only what the files say (tokenizer None)."""
    path = os.fspath(path)
    if path.endswith(".json"):
        manifest_path = path
    else:
        prefix = strip_suffix(path)
        manifest_path = f"{prefix}.json"
        if not os.path.isfile(manifest_path):
            if not os.path.isfile(f"{prefix}.bin") and not os.path.isfile(f"{prefix}.idx"):
                raise FinetuneError(f"{path}: no prepared data here (expected {prefix}.json or {prefix}.bin/.idx)")
            mask_prefix = f"{prefix}.mask" if os.path.isfile(f"{prefix}.mask.idx") else None
            tok, mask = _open_shard(prefix, mask_prefix)
            meta = {"tokenizer": None, "vocab_size": None, "documents": len(tok), "tokens": tok.num_tokens,
                    "dtype": tok.dtype.name, "has_mask": mask is not None,
                    "shards": [{"prefix": prefix, "mask_prefix": mask_prefix}]}
            return Corpus(path, [(tok, mask)], meta)
    try:
        with open(manifest_path, encoding="utf-8") as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise FinetuneError(f"{manifest_path}: file not found") from None
    except ValueError as e:
        raise FinetuneError(f"{manifest_path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("shards"), list) or not meta["shards"]:
        raise FinetuneError(f"{manifest_path}: not a prepare manifest (no 'shards' list)")
    base = os.path.dirname(os.path.abspath(manifest_path))
    shards = []
    for n, shard in enumerate(meta["shards"]):
        if not (isinstance(shard, dict) and isinstance(shard.get("prefix"), str) and
                isinstance(shard.get("mask_prefix") or "", str)):
            raise FinetuneError(f"{manifest_path}: shard {n} is damaged (no 'prefix' file name); prepare the data "
                                f"again")
        prefix = os.path.join(base, shard["prefix"])
        mask_prefix = os.path.join(base, shard["mask_prefix"]) if shard.get("mask_prefix") else None
        tok, mask = _open_shard(prefix, mask_prefix)
        if "tokens" in shard and tok.num_tokens != shard["tokens"]:
            raise FinetuneError(f"{tok.bin_path}: {tok.num_tokens} tokens, the manifest {manifest_path} says "
                                f"{shard['tokens']!r}")
        shards.append((tok, mask))
    return Corpus(manifest_path, shards, meta)


# ----------------------------------------------------------------------------------------------------- windows


def _is_prime(n: int) -> bool:
    """Deterministic Miller-Rabin (exact for n < 3.3e24)."""
    if n < 2:
        return False
    small = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)
    for p in small:
        if n % p == 0:
            return n == p
    d, r = n - 1, 0
    while d % 2 == 0:
        d //= 2
        r += 1
    for a in small:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def magic_prime(num_tokens: int, ctx_len: int) -> int | None:
    """The largest prime p with p % 3 == 2 and p < num_tokens / ctx_len - 1 (None if there is none)."""
    bound = num_tokens / ctx_len - 1
    p = math.ceil(bound) - 1
    while p >= 2:
        if p % 3 == 2 and _is_prime(p):
            return p
        p -= 1
    return None


class WindowDataset(Dataset):
    """Map-style dataset of ctx_len windows over a Corpus (see the module docstring for the schedules).

    Item i -> {"input_ids": int64[ctx_len], "targets": int64[ctx_len], "loss_mask": float32[ctx_len]}, from the
    ctx_len + 1 tokens at `start_of(i)`: input_ids = w[:-1], targets = w[1:], loss_mask = mask[1:] (or ones)."""

    def __init__(self, corpus: Corpus, ctx_len: int, schedule: str = "random", seed: int = 0,
                 epoch_steps: int | None = None):
        if ctx_len < 1:
            raise FinetuneError(f"ctx_len must be positive (got {ctx_len})")
        if schedule not in ("random", "magic_prime"):
            raise FinetuneError(f"sampling: {schedule!r} is not one of random, magic_prime")
        if corpus.num_tokens < ctx_len + 1:
            raise FinetuneError(f"{corpus.path}: data shorter than one window ({corpus.num_tokens} tokens, "
                                f"ctx_len {ctx_len} needs {ctx_len + 1})")
        self.corpus = corpus
        self.ctx_len = ctx_len
        self.schedule = schedule
        self.seed = int(seed)
        self.epoch = 0
        self.magic_prime = None
        if schedule == "magic_prime":
            self.magic_prime = magic_prime(corpus.num_tokens, ctx_len)
            if self.magic_prime is None:
                # named after the setting the user wrote (`sampling`), not this argument's name
                raise FinetuneError(f"{corpus.path}: too short for sampling: magic_prime at ctx_len {ctx_len} "
                                    f"({corpus.num_tokens} tokens); use sampling: random or a smaller ctx_len")
            self.factor = int(self.magic_prime * (math.sqrt(5) - 1) / 2)
            self.windows_per_epoch = self.magic_prime
        else:
            self.windows_per_epoch = (corpus.num_tokens - 1) // ctx_len
        self.epoch_steps = epoch_steps

    def __len__(self) -> int:
        return int(self.epoch_steps) if self.epoch_steps is not None else self.windows_per_epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def start_of(self, i: int) -> int:
        if self.schedule == "magic_prime":
            ii = 1 + self.epoch * len(self) + i
            return ((self.factor * ii * ii * ii) % self.magic_prime) * self.ctx_len
        rng = np.random.default_rng([self.seed, self.epoch, i])
        return int(rng.integers(0, self.corpus.num_tokens - self.ctx_len))

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"window {i} out of range ({len(self)} per epoch)")
        tokens, mask = self.corpus.window(self.start_of(i), self.ctx_len + 1)
        loss_mask = mask[1:].astype(np.float32) if mask is not None else np.ones(self.ctx_len, dtype=np.float32)
        return {
            "input_ids": torch.from_numpy(tokens[:-1].copy()),
            "targets": torch.from_numpy(tokens[1:].copy()),
            "loss_mask": torch.from_numpy(loss_mask),
        }
