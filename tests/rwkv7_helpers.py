"""RWKV-7 test helpers: random checkpoints in BlinkDL's exact x070 layout, and the `rwkv` package as the oracle."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ORACLE = Path(__file__).with_name("rwkv7_oracle.py")


def random_rwkv7_state_dict(n_layer: int, n_embd: int, vocab: int, head_size: int, seed: int = 0,
                            widths: tuple[int, int, int, int] = (16, 8, 12, 24), dim_ffn: int | None = None,
                            layer0_value_mix: bool = True,
                            dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random but sane values everywhere (RWKV-LM's init zeroes whole paths, which would hide bugs), in BlinkDL's key
    layout. widths = (Dw, Da, Dv, Dg), deliberately unlike RWKV-LM's defaults so that reading them from shapes is
    tested. Decay biases w0 spread over [-6, 2] (decays from ~0.9985 to ~0.56 per token)."""
    g = torch.Generator().manual_seed(seed)
    C, V, F = n_embd, vocab, dim_ffn or 4 * n_embd
    H, N = C // head_size, head_size
    Dw, Da, Dv, Dg = widths

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    def rand(*shape: int, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(*shape, generator=g)

    sd = {"emb.weight": randn(V, C, scale=0.5),
          "blocks.0.ln0.weight": 1 + randn(C, scale=0.1), "blocks.0.ln0.bias": randn(C, scale=0.1)}
    for i in range(n_layer):
        b = f"blocks.{i}."
        for ln in ("ln1", "ln2"):
            sd[f"{b}{ln}.weight"] = 1 + randn(C, scale=0.1)
            sd[f"{b}{ln}.bias"] = randn(C, scale=0.1)
        for m in ("r", "w", "k", "v", "a", "g"):
            sd[f"{b}att.x_{m}"] = rand(1, 1, C)
        sd[f"{b}att.w0"] = rand(1, 1, C, lo=-6.0, hi=2.0)
        sd[f"{b}att.w1"] = randn(C, Dw, scale=C ** -0.5)
        sd[f"{b}att.w2"] = randn(Dw, C, scale=0.5 * Dw ** -0.5)
        sd[f"{b}att.a0"] = randn(1, 1, C, scale=0.7)
        sd[f"{b}att.a1"] = randn(C, Da, scale=C ** -0.5)
        sd[f"{b}att.a2"] = randn(Da, C, scale=0.5 * Da ** -0.5)
        if i > 0 or layer0_value_mix:
            sd[f"{b}att.v0"] = randn(1, 1, C, scale=0.7)
            sd[f"{b}att.v1"] = randn(C, Dv, scale=C ** -0.5)
            sd[f"{b}att.v2"] = randn(Dv, C, scale=0.5 * Dv ** -0.5)
        sd[f"{b}att.g1"] = randn(C, Dg, scale=C ** -0.5)
        sd[f"{b}att.g2"] = randn(Dg, C, scale=Dg ** -0.5)
        sd[f"{b}att.k_k"] = 0.7 + randn(1, 1, C, scale=0.2)
        sd[f"{b}att.k_a"] = rand(1, 1, C, lo=0.5, hi=1.5)
        sd[f"{b}att.r_k"] = randn(H, N, scale=0.3)
        for m in ("receptance", "key", "value", "output"):
            sd[f"{b}att.{m}.weight"] = randn(C, C, scale=C ** -0.5)
        sd[f"{b}att.ln_x.weight"] = 1 + randn(C, scale=0.1)
        sd[f"{b}att.ln_x.bias"] = randn(C, scale=0.1)
        sd[f"{b}ffn.x_k"] = rand(1, 1, C)
        sd[f"{b}ffn.key.weight"] = randn(F, C, scale=C ** -0.5)
        sd[f"{b}ffn.value.weight"] = randn(C, F, scale=F ** -0.5)
    sd["ln_out.weight"] = 1 + randn(C, scale=0.1)
    sd["ln_out.bias"] = randn(C, scale=0.1)
    sd["head.weight"] = randn(V, C, scale=C ** -0.5)
    return {k: v.to(dtype) for k, v in sd.items()}


def rwkv_package_v7(jobs: list[tuple[dict[str, torch.Tensor], list[int]]], workdir: Path,
                    timeout: float = 600, states: list[list[torch.Tensor] | None] | None = None) -> list[dict]:
    """Run BlinkDL's `rwkv` package (RWKV_V7_ON=1, cpu fp32) on each (state dict, tokens) in one subprocess.
    Returns [{"logits": [T, V], "state": [3 * L tensors]}] in order. Each state dict is written as an fp32 copy.
    `states`: per job, the package's state list to start from (None: its zero state)."""
    workdir.mkdir(parents=True, exist_ok=True)
    spec = []
    for n, (sd, tokens) in enumerate(jobs):
        path = workdir / f"oracle-{n}.pth"
        torch.save({k: v.float() for k, v in sd.items()}, path)
        spec.append({"model": str(path)[: -len(".pth")], "tokens": list(tokens), "out": str(workdir / f"out-{n}.pt")})
        if states is not None and states[n] is not None:
            torch.save([t.float() for t in states[n]], workdir / f"state-{n}.pt")
            spec[-1]["state"] = str(workdir / f"state-{n}.pt")
    jobs_path = workdir / "jobs.json"
    jobs_path.write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny models: a second thread only waits at barriers
    r = subprocess.run([sys.executable, str(ORACLE), str(jobs_path)], capture_output=True, text=True, timeout=timeout,
                       env=env)
    if r.returncode != 0:
        raise RuntimeError(f"rwkv package worker failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    return [torch.load(s["out"], weights_only=True) for s in spec]
