"""The WKV-5/6 section of bench/gpu_check.py on the CPU: it passes with the CPU kernel, and it fails when the kernel
disagrees with the float64 reference."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "gpu_check.py"
spec = importlib.util.spec_from_file_location("gpu_check_wkv6", SCRIPT)
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)


def test_wkv6_section_passes_on_cpu():
    parts, ok = gpu_check.wkv6_section(torch.device("cpu"), big=False)
    text = "\n".join(parts)
    assert ok, text
    assert "## WKV-5/6 correctness" in text and "## WKV-5/6 kernel time" in text
    assert "FAIL" not in text and "FAILED" not in text


def test_wkv6_section_catches_a_wrong_kernel(monkeypatch):
    real = gpu_check.wkv6

    def off_by_a_little(*args, **kwargs):
        y, s = real(*args, **kwargs)
        return y * (1 + 1e-4), s

    monkeypatch.setattr(gpu_check, "wkv6", off_by_a_little)
    parts, ok = gpu_check.wkv6_section(torch.device("cpu"), big=False)
    assert not ok
    assert "FAIL" in "\n".join(parts)
