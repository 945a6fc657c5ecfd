"""The CPU-safe parts of bench/gpu_check.py: its float64 references agree, and the whole script runs on tiny sizes."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "gpu_check.py"
spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)


def test_recurrence_matches_autograd_reference():
    x = gpu_check.make_inputs(2, 21, 13, torch.float32, True, torch.device("cpu"), seed=3)
    x[6] = gpu_check.consistent_gstate(x[6], gpu_check.wkv_reference(*x[:5])[1])
    for a, b in zip(gpu_check.recurrence64(*x), gpu_check.reference64(*x)):
        assert gpu_check.rel_err(a, b) < 1e-10


def test_dry_run_on_cpu(capsys):
    rc = gpu_check.main(["--device", "cpu", "--skip-train", "--skip-trainer"])  # the trainer: its own test
    out = capsys.readouterr().out
    assert "## Correctness" in out and "## Kernel time" in out
    assert "## WKV-7: correctness" in out and "FAIL" not in out
    assert rc == 0, out


def test_wkv7_segmented_reference_matches_plain_autograd():
    """The WKV-7 float64 reference of the GPU check (autograd segment by segment, the state carried between them)
    gives what autograd through the whole sequence gives."""
    *xs, state, gy, gstate = gpu_check.make_inputs7(2, 23, 2, torch.float32, torch.float32, torch.device("cpu"),
                                                     seed=4, N=8)
    got = gpu_check.reference64_7(xs, state, gy, gstate, segment=5)
    leaves = [x.double().requires_grad_() for x in (*xs, state)]
    y, s = gpu_check.wkv7_mod.wkv7_reference(*leaves)
    grads = torch.autograd.grad((y * gy.double()).sum() + (s * gstate.double()).sum(), leaves)
    for a, b in zip(got, [y, s, *grads]):
        assert gpu_check.rel_err(a, b) < 1e-12


def test_wkv7_only_dry_run_on_cpu(capsys):
    rc = gpu_check.main(["--device", "cpu", "--wkv7-only"])
    out = capsys.readouterr().out
    assert "## WKV-7: correctness" in out and "## WKV-7: kernel time" in out
    assert "## Correctness" not in out  # the RWKV-4 sections were skipped
    assert rc == 0, out


def test_trainer_only_dry_run_on_cpu(capsys):
    """The trainer section runs `rwkv-lora train` itself in fp32 and bf16-mixed and reports both (tiny on the CPU)."""
    rc = gpu_check.main(["--device", "cpu", "--trainer-only"])
    out = capsys.readouterr().out
    assert "## The trainer in fp32 and bf16-mixed" in out and "FAILED" not in out
    assert "## Correctness" not in out and "## WKV-7" not in out
    assert rc == 0, out
