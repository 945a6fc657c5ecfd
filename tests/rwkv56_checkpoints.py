"""Random RWKV-5.2 and RWKV-6 checkpoints in BlinkDL's exact key layout, built at test time (no tiny official ones
exist). Random values everywhere, at scales where every path matters: decays from fast to slow, non-zero low-rank
mixes and decay offsets, GroupNorm weights away from 1 (RWKV-LM's init zeroes several of these, which hides bugs)."""

from __future__ import annotations

import torch


def _maker(seed: int):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    def uniform(*shape: int, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(*shape, generator=g)

    return randn, uniform


def _common(sd: dict, randn, n_layer: int, C: int, V: int) -> None:
    sd["emb.weight"] = randn(V, C, scale=0.5)
    sd["blocks.0.ln0.weight"] = 1 + randn(C, scale=0.1)
    sd["blocks.0.ln0.bias"] = randn(C, scale=0.1)
    for i in range(n_layer):
        for ln in ("ln1", "ln2"):
            sd[f"blocks.{i}.{ln}.weight"] = 1 + randn(C, scale=0.1)
            sd[f"blocks.{i}.{ln}.bias"] = randn(C, scale=0.1)


def _tail(sd: dict, randn, C: int, V: int) -> None:
    sd["ln_out.weight"] = 1 + randn(C, scale=0.1)
    sd["ln_out.bias"] = randn(C, scale=0.1)
    sd["head.weight"] = randn(V, C, scale=C ** -0.5)


def _projections(sd: dict, randn, b: str, C: int, F: int) -> None:
    for m in ("receptance", "key", "value", "gate", "output"):
        sd[f"{b}att.{m}.weight"] = randn(C, C, scale=C ** -0.5)
    sd[f"{b}att.ln_x.weight"] = 1 + randn(C, scale=0.2)
    sd[f"{b}att.ln_x.bias"] = randn(C, scale=0.1)
    sd[f"{b}ffn.key.weight"] = randn(F, C, scale=C ** -0.5)
    sd[f"{b}ffn.receptance.weight"] = randn(C, C, scale=C ** -0.5)
    sd[f"{b}ffn.value.weight"] = randn(C, F, scale=F ** -0.5)


def random_rwkv5_state_dict(n_layer: int, n_embd: int, vocab: int, head_size: int, seed: int = 0,
                            dim_ffn: int | None = None, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """RWKV-5.2 (x052): time_mix_k/v/r/g [1, 1, C], time_decay and time_faaaa [H, N], gate, ln_x."""
    randn, uniform = _maker(seed)
    C, V, H, N = n_embd, vocab, n_embd // head_size, head_size
    F = dim_ffn or int(3.5 * C)
    sd: dict[str, torch.Tensor] = {}
    _common(sd, randn, n_layer, C, V)
    for i in range(n_layer):
        b = f"blocks.{i}."
        for m in ("k", "v", "r", "g"):
            sd[f"{b}att.time_mix_{m}"] = uniform(1, 1, C)
        sd[f"{b}att.time_decay"] = uniform(H, N, lo=-5.0, hi=1.5)  # decays exp(-exp(.)) from 0.99 to 0.01
        sd[f"{b}att.time_faaaa"] = randn(H, N, scale=0.5)
        _projections(sd, randn, b, C, F)
        sd[f"{b}ffn.time_mix_k"] = uniform(1, 1, C)
        sd[f"{b}ffn.time_mix_r"] = uniform(1, 1, C)
    _tail(sd, randn, C, V)
    return {k: v.to(dtype) for k, v in sd.items()}


def random_rwkv6_state_dict(n_layer: int, n_embd: int, vocab: int, head_size: int, seed: int = 0,
                            d_mix: int = 8, d_decay: int = 16, dim_ffn: int | None = None,
                            dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """RWKV-6 (x060): time_maa_x/w/k/v/r/g [1, 1, C], time_maa_w1 [C, 5 D], time_maa_w2 [5, D, C], time_decay
    [1, 1, C] with time_decay_w1/w2, time_faaaa [H, N], gate, ln_x; ffn time_maa_k/r."""
    randn, uniform = _maker(seed)
    C, V, H, N = n_embd, vocab, n_embd // head_size, head_size
    F = dim_ffn or int(3.5 * C)
    sd: dict[str, torch.Tensor] = {}
    _common(sd, randn, n_layer, C, V)
    for i in range(n_layer):
        b = f"blocks.{i}."
        for m in ("x", "w", "k", "v", "r", "g"):
            sd[f"{b}att.time_maa_{m}"] = uniform(1, 1, C)
        sd[f"{b}att.time_maa_w1"] = randn(C, 5 * d_mix, scale=C ** -0.5)
        sd[f"{b}att.time_maa_w2"] = randn(5, d_mix, C, scale=0.2)
        sd[f"{b}att.time_decay"] = uniform(1, 1, C, lo=-5.0, hi=1.0)
        sd[f"{b}att.time_decay_w1"] = randn(C, d_decay, scale=C ** -0.5)
        sd[f"{b}att.time_decay_w2"] = randn(d_decay, C, scale=0.3)
        sd[f"{b}att.time_faaaa"] = randn(H, N, scale=0.5)
        _projections(sd, randn, b, C, F)
        sd[f"{b}ffn.time_maa_k"] = uniform(1, 1, C)
        sd[f"{b}ffn.time_maa_r"] = uniform(1, 1, C)
    _tail(sd, randn, C, V)
    return {k: v.to(dtype) for k, v in sd.items()}
