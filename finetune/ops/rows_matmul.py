"""x W^T for a few rows (a decode step of several streams) on the CPU, from W packed once into column panels.

    panels = pack(weight)             # [ceil(out / 24), in, 24] fp32, or None where the kernel does not apply
    y = matmul(x, panels, out)        # x [..., in] fp32 -> [..., out]
    lora_add_(y, x, pack(A), r, pack(B), mask)   # y += ((x A^T) * mask) B^T in place: a batch's LoRA deltas

At one row a product streams W at memory speed, and at hundreds of rows it is a large GEMM; in between, at the 2-32
rows of a batched decode step, MKL and oneDNN reach well under this CPU's large-GEMM rate while W is read from
memory at most half as fast as one row reads it. `kernels/rows_matmul_cpu.cpp` (its header says how and what was
measured) reads each weight once for up to 16 rows at a time and keeps the FMA units busy while it does.
Each output is one sequential sum over `in`, computed the same way whatever the number of rows or threads: a row's
result does not depend on the rows batched with it. No autograd: these are inference products (serving).
"""

from __future__ import annotations

from types import ModuleType

import torch

from finetune.ops.build import load_extension

PANEL = 24
"""Output columns per panel (`NR` in the kernel): the packed copy holds ceil(out / 24) * 24 columns."""
MAX_ROWS = 32
"""The most rows `matmul` is used for by the serving engine: from ~32 rows on, torch's own GEMM on the row-major
weight is as fast (one thread on the AVX2 CPU measured: 64 vs 62 GFLOPS at 32 rows, 65 vs 85 at 128)."""


def kernel() -> ModuleType | None:
    """The compiled extension, or None when it cannot be built (one warning says why)."""
    return load_extension("rows_matmul", cpu_sources=["rows_matmul_cpu.cpp"], device_type="cpu")


def pack(weight: torch.Tensor) -> torch.Tensor | None:
    """W [out, in] as panels [ceil(out / 24), in, 24] (zero-padded), or None where `matmul` does not apply: not a
    plain fp32 CPU tensor (a quantized or 16-bit weight keeps its own path), or no compiled kernel."""
    if (weight.dim() != 2 or weight.device.type != "cpu" or weight.dtype != torch.float32
            or type(weight.data) is not torch.Tensor):
        return None
    ext = kernel()
    return None if ext is None else ext.pack(weight.detach())


def matmul(x: torch.Tensor, panels: torch.Tensor, out_features: int) -> torch.Tensor:
    """x [..., in] @ W^T -> [..., out_features], with `panels = pack(W)`; x float32 on the CPU."""
    y = kernel().matmul(x.reshape(-1, x.shape[-1]), panels, out_features)
    return y.view(*x.shape[:-1], out_features)


def lora_add_(y: torch.Tensor, x: torch.Tensor, a_panels: torch.Tensor, rank: int, b_panels: torch.Tensor,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """y [..., out] += ((x A^T) * mask) B^T in place and returned, with `a_panels = pack(A [rank, in])`,
    `b_panels = pack(B [out, rank])`; mask [G, rank] (G dividing the rows of x: the rows of x.view(G, -1, in) share
    a mask row, the positions of one sequence) or None. y must be contiguous."""
    x2, y2 = x.reshape(-1, x.shape[-1]), y.view(-1, y.shape[-1])
    kernel().lora_add_(y2, x2, a_panels, rank, b_panels, mask)
    return y
