"""Shared test fixtures: small random RWKV-4 checkpoints in BlinkDL's exact layout, built at test time."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

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
