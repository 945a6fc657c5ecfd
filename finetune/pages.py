"""Tensors that live in a file's memory map: dropping this process's copy of their pages.

A checkpoint opened with `torch.load(mmap=True)` (or safetensors) is mapped, not read: its pages come into memory as
they are touched and then count in the process's resident memory. madvise(MADV_DONTNEED) on such a private file
mapping only forgets our copy of the pages: the file is untouched, and the data reads back from it (the page cache,
or the disk if the kernel dropped it meanwhile) on the next access. It is the one way to keep a big frozen tensor on
disk rather than in memory between uses, and to stop a tensor read once from staying resident.

On anonymous memory the same call zeroes the data, and on a page written since the mapping was made it loses the
write; so every range released here lies in a mapping of a file on disk as /proc/self/maps lists it, and only
tensors never written to are released (frozen weights: the callers' duty). Linux only; elsewhere nothing is
released (memory stays resident, results are the same). Two libc calls that no Python library wraps: ctypes.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
from pathlib import Path

import torch

_MADV_DONTNEED = 4
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
if _libc is not None:
    _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]

Range = tuple[int, int]


def _maps() -> list[tuple[int, int, str]]:
    """(start, end, path) of every mapping of a file on disk in this process (Linux); [] elsewhere."""
    if _libc is None:
        return []
    out = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].startswith("/"):
                    start, end = (int(x, 16) for x in fields[0].split("-"))
                    out.append((start, end, fields[5].rstrip("\n")))
    except OSError:
        return []
    return out


def file_ranges(path: str | Path) -> list[Range]:
    """Address ranges [start, end) where this process maps the file `path`."""
    if not Path(path).is_file():
        return []
    real = os.path.realpath(path)
    return [(start, end) for start, end, p in _maps() if p == real]


def _span(t: torch.Tensor) -> Range:
    return t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()


def file_mapping(t: torch.Tensor) -> list[Range]:
    """[the range of the file mapping that holds all of `t`] when `t` (contiguous, on the CPU) lies in one, else []:
    what `release` may be given for `t` and its slices."""
    if t.device.type != "cpu" or t.numel() == 0 or not t.is_contiguous():
        return []
    lo, hi = _span(t)
    return [(start, end) for start, end, _ in _maps() if start <= lo and hi <= end][:1]


def release(t: torch.Tensor, ranges: list[Range]) -> None:
    """Drop this process's copy of the pages under `t` (contiguous) that lie in one of `ranges` (from `file_ranges`
    or `file_mapping`, never anything else); nothing when `ranges` is empty."""
    if not ranges or t.numel() == 0:
        return
    lo, hi = _span(t)
    page = mmap.PAGESIZE
    for start, end in ranges:
        if start <= lo and hi <= end:
            a, b = max(start, lo // page * page), min(end, -(-hi // page) * page)
            _libc.madvise(a, b - a, _MADV_DONTNEED)
            return
