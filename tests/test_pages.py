"""finetune/pages.py: a tensor in a memory-mapped file is found as such, its pages leave the process's resident
memory when released and read back from the file unchanged; anonymous memory is never touched."""

from __future__ import annotations

import mmap
import struct

import torch

from finetune import pages


def resident(t: torch.Tensor) -> int:
    """Bytes of the pages under `t` that are mapped in this process now (bit 63 of each page's /proc/self/pagemap
    entry: present). Page by page, so the kernel's fault-around, which maps up to 64 KiB of a file's neighbouring
    pages on each fault, does not blur it as a mapping-wide count would."""
    page = mmap.PAGESIZE
    lo = t.data_ptr() // page
    hi = -(-(t.data_ptr() + t.numel() * t.element_size()) // page)
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(lo * 8)
        entries = struct.unpack(f"{hi - lo}Q", f.read((hi - lo) * 8))
    return sum(page for e in entries if e >> 63)


def test_released_pages_leave_memory_and_read_back_from_the_file(tmp_path):
    w = torch.randn(4096, 1024, generator=torch.Generator().manual_seed(0)).bfloat16()  # 8 MiB
    torch.save({"w": w}, tmp_path / "w.pth")
    t = torch.load(tmp_path / "w.pth", mmap=True, weights_only=True)["w"]
    ranges = pages.file_mapping(t)
    assert len(ranges) == 1 and ranges == pages.file_ranges(tmp_path / "w.pth")[:1]
    assert torch.equal(t, w)  # reads every page
    assert resident(t) >= w.numel() * 2
    pages.release(t[:2048], ranges)  # the first half
    assert resident(t[:2048]) == 0  # (the kernel may drop neighbouring pages with them: huge pages)
    pages.release(t, ranges)
    assert resident(t) == 0
    assert torch.equal(t, w)  # read back from the file


def test_anonymous_memory_is_never_released():
    a = torch.randn(1 << 20)
    kept = a.clone()
    assert pages.file_mapping(a) == []
    pages.release(a, pages.file_mapping(a))
    pages.release(a, pages.file_ranges("/no/such/file"))
    assert torch.equal(a, kept)
