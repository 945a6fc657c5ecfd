"""Shared test fixtures: small random RWKV-4 checkpoints in BlinkDL's exact layout, built at test time."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from finetune.ops.build import find_nvcc

os.environ.setdefault("RWKV_JIT_ON", "0")  # the rwkv oracle package reads this at import; plain eager is enough


def random_rwkv4_state_dict(n_layer: int, n_embd: int, vocab: int, seed: int = 0, dim_ffn: int | None = None,
                            dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random weights everywhere (unlike RWKV-LM's init, which zeroes several matrices), in BlinkDL's key layout:
    raw time_decay [C], time_mix_* [1, 1, C], blocks.0.ln0, head.weight [V, C]."""
    g = torch.Generator().manual_seed(seed)
    C, V, F = n_embd, vocab, dim_ffn or 4 * n_embd

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    def rand(*shape):
        return torch.rand(*shape, generator=g)

    sd = {"emb.weight": randn(V, C, scale=0.5),
          "blocks.0.ln0.weight": 1 + randn(C, scale=0.1), "blocks.0.ln0.bias": randn(C, scale=0.1)}
    for i in range(n_layer):
        b = f"blocks.{i}."
        for ln in ("ln1", "ln2"):
            sd[f"{b}{ln}.weight"] = 1 + randn(C, scale=0.1)
            sd[f"{b}{ln}.bias"] = randn(C, scale=0.1)
        sd[f"{b}att.time_decay"] = randn(C, scale=1.5)
        sd[f"{b}att.time_first"] = randn(C, scale=0.5)
        for m in ("k", "v", "r"):
            sd[f"{b}att.time_mix_{m}"] = rand(1, 1, C)
        for m in ("key", "value", "receptance", "output"):
            sd[f"{b}att.{m}.weight"] = randn(C, C, scale=C ** -0.5)
        sd[f"{b}ffn.time_mix_k"] = rand(1, 1, C)
        sd[f"{b}ffn.time_mix_r"] = rand(1, 1, C)
        sd[f"{b}ffn.key.weight"] = randn(F, C, scale=C ** -0.5)
        sd[f"{b}ffn.receptance.weight"] = randn(C, C, scale=C ** -0.5)
        sd[f"{b}ffn.value.weight"] = randn(C, F, scale=F ** -0.5)
    sd["ln_out.weight"] = 1 + randn(C, scale=0.1)
    sd["ln_out.bias"] = randn(C, scale=0.1)
    sd["head.weight"] = randn(V, C, scale=C ** -0.5)
    return {k: v.to(dtype) for k, v in sd.items()}


def write_checkpoint(path: Path, sd: dict[str, torch.Tensor]) -> Path:
    torch.save(sd, path)
    return path


@pytest.fixture
def tiny_checkpoint(tmp_path) -> Path:
    """2 layers x 48 wide, vocab 97, fp32."""
    return write_checkpoint(tmp_path / "tiny.pth", random_rwkv4_state_dict(2, 48, 97, seed=1))


# ---- data fixtures (tokenizers, an independent binidx reader)

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


@pytest.fixture(scope="module")
def nvcc() -> str:
    """The nvcc the kernel loader would use (the CUDA tests compile with it; skipped, with the reason, without it)."""
    path = find_nvcc()
    if path is None:
        pytest.skip("nvcc not found: no $CUDA_HOME/bin/nvcc, no nvcc on PATH, no /usr/local/cuda/bin/nvcc")
    return path


def pytest_sessionstart(session: pytest.Session) -> None:
    """Build (or load from torch's cache) the CPU kernels two at a time before the first test. Each is one C++ file
    that torch's builder compiles on one core; built one after another by the first test needing each, they took
    ~3 of the suite's 13 minutes on a fresh 2-core machine. Threads suffice: the compiler runs in a subprocess.
    A kernel that fails to build warns here, and the tests see what they would have seen (the module falls back)."""
    from concurrent.futures import ThreadPoolExecutor

    from finetune.ops import rows_matmul, rwkv7_step, wkv4, wkv6, wkv7

    cpu = torch.device("cpu")
    builds = [lambda: wkv4.kernel_for(cpu), lambda: wkv6.kernel_for(cpu), lambda: wkv7.kernel_for(cpu),
              rwkv7_step.step_kernel, rows_matmul.kernel]
    with ThreadPoolExecutor(max_workers=max(2, min(len(builds), os.cpu_count() or 2))) as pool:
        for future in [pool.submit(build) for build in builds]:
            future.result()

