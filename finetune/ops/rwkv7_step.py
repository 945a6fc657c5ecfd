"""The compiled one-token step of RWKV-7 (CPU, float32): the small per-layer arithmetic between the projections.

Generating one token at a time, a layer's six large matrix-vector products are memory-bound and already at full
speed; what costs is the ~55 small PyTorch operations between them, each a dispatch and a few cache misses for
under a microsecond of arithmetic. `kernels/rwkv7_step_cpu.cpp` does them in three calls per layer (its header
lists the functions and shapes); `finetune.models.rwkv7` decides when that is exact for the layer it runs
(`RWKV7.forward`: one token, no autograd, float32 everywhere) and otherwise runs its PyTorch path.
"""

from __future__ import annotations

from types import ModuleType

from finetune.ops.build import load_extension


def step_kernel() -> ModuleType | None:
    """The compiled one-token extension for the CPU, or None when it cannot be built (then the PyTorch path runs;
    one warning says why)."""
    return load_extension("rwkv7_step", cpu_sources=["rwkv7_step_cpu.cpp"], device_type="cpu")
