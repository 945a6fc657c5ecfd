"""Handing freed memory back to the operating system during training (`trim_memory`).

glibc's allocator keeps what a program frees for reuse, and the mid-sized tensors of training (a block's
activations, a few MB each at ctx 1024) leave its heap fragmented: freed space is not always reused, so the resident
size climbs block after block although what is alive stays flat (measured on a 0.1B RWKV-7 with an NF4 base at ctx
1024: +100 MB per block, 2.5 GB peak against ~1.5 GB alive). Two calls put it near what is alive:
- `mallopt(M_MMAP_THRESHOLD, 1 MB)`: every allocation of 1 MB or more (each [T, C] activation) gets its own memory
  mapping, unmapped when it is freed. glibc starts with such a threshold (128 KB) but raises it to the size of each
  big block freed (up to 32 MB), after which activations come from the heap; fixing it stops that. Measured on a
  2 x 2048 RWKV-7, NF4 base, ctx 1024: 1.98 -> 1.41 GB peak during training.
- `malloc_trim(0)` before each block (its forward, and its recomputation in the backward pass): returns the free
  pages of the heap (the smaller tensors) to the kernel.
The price is the page faults of touching fresh memory again: malloc_trim alone costs little (0.93-1.04x the step
time measured), the fixed mmap threshold much more for small models (RWKV-7 0.1B NF4, ctx 1024: 59-73 tok/s against
111-113 without either call, for 1.15 instead of 2.25 GB peak), so the trainer fixes it only for a quantized or
bf16-held base (`base_quant`), the setting chosen to fit a big model in memory.
No Python library wraps these (two libc calls), hence ctypes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Any

import torch
import torch.nn as nn

from finetune.infctx import rwkv_core

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)
MMAP_THRESHOLD = 1 << 20
"""Allocations of this many bytes or more are mapped on their own and unmapped when freed."""


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    return None if name is None else ctypes.CDLL(name)


_LIBC = _libc()
_MALLOC_TRIM = getattr(_LIBC, "malloc_trim", None)
_MALLOPT = getattr(_LIBC, "mallopt", None)


def _trim_before_block(module: nn.Module, args: Any) -> None:
    # a block whose input is on a GPU keeps its activations there: nothing of the host heap to hand back
    if not args or not isinstance(args[0], torch.Tensor) or args[0].device.type == "cpu":
        _MALLOC_TRIM(0)


def trim_between_blocks(model: nn.Module, map_big_allocations: bool = False) -> bool:
    """Call malloc_trim(0) before every block of the RWKV inside `model` runs, and with `map_big_allocations` map
    allocations of MMAP_THRESHOLD bytes or more on their own from now on (for the whole process). False (nothing
    done) where the C library lacks these calls (not glibc)."""
    if _MALLOC_TRIM is None or _MALLOPT is None:
        return False
    if map_big_allocations:
        _MALLOPT(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    for block in rwkv_core(model).blocks:
        block.register_forward_pre_hook(_trim_before_block)
    return True
