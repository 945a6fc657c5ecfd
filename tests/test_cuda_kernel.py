"""The CUDA WKV kernel without a GPU: it compiles with nvcc for the archs the loader targets, its per-lane maths (the
same __host__ __device__ code the kernels run) matches the float64 reference when run on the CPU, and the binding
passes a host-compiler syntax check.

Skipped, with the reason, only when nvcc (or for the binding check, a C++ compiler / the CUDA headers) is absent.
Running the kernel itself on a GPU is bench/gpu_check.py's job.
"""

from __future__ import annotations

import ctypes

import pytest
import torch

from cuda_helpers import check_binding_syntax, includes, run
from finetune.ops.build import KERNEL_DIR, cuda_gencode_flags, nvcc_archs
from finetune.ops.wkv4 import empty_wkv_state, fold_state_grad, wkv_reference

CU = KERNEL_DIR / "wkv_cuda.cu"
BIND = KERNEL_DIR / "wkv_cuda_bind.cpp"








@pytest.mark.parametrize("arch", [80, 90])
def test_nvcc_compiles_kernel(nvcc, tmp_path, arch):
    obj = tmp_path / f"wkv_cuda_sm{arch}.o"
    run([nvcc, "-c", "-O3", "-std=c++17", *includes(), f"-gencode=arch=compute_{arch},code=sm_{arch}",
          str(CU), "-o", str(obj)])
    assert obj.stat().st_size > 0


def test_loader_gencodes_fit_nvcc(nvcc):
    flags = cuda_gencode_flags(nvcc)
    supported = nvcc_archs(nvcc)
    archs = {int(f.split("code=sm_")[1]) for f in flags if "code=sm_" in f}
    assert {80, 90} <= archs
    if supported is not None:
        assert archs <= supported, f"loader asks for {archs}, nvcc supports {sorted(supported)}"
    assert any("code=compute_" in f for f in flags)  # PTX for newer GPUs


# ---------------------------------------------------------------------------------------------------------------------
# The lanes on the CPU


@pytest.fixture(scope="module")
def selftest_lib(nvcc, tmp_path_factory):
    so = tmp_path_factory.mktemp("wkv_cuda") / "wkv_cuda_selftest.so"
    run([nvcc, "-shared", "-Xcompiler", "-fPIC", "-O3", "-std=c++17", "-DWKV_HOST_SELFTEST",
          "-gencode=arch=compute_80,code=sm_80", str(CU), "-o", str(so)])
    return ctypes.CDLL(str(so))


def _host_kernel(lib, time_decay, time_first, k, v, state, gy, gstate_out):
    """forward + backward through the kernel's lanes on the CPU; every output pre-filled with NaN."""
    B, T, C = k.shape
    bf16 = k.dtype == torch.bfloat16
    kk, vv = (k.view(torch.int16), v.view(torch.int16)) if bf16 else (k, v)
    w = -torch.exp(time_decay.float())
    u = time_first.float()

    def nan(*shape):
        return torch.full(shape, float("nan"))

    ptr = lambda t: ctypes.c_void_p(t.data_ptr())  # noqa: E731
    dims = [ctypes.c_int64(B), ctypes.c_int64(T), ctypes.c_int64(C)]
    y, s_out = nan(B, T, C), nan(B, 3, C)
    lib.rwkv_wkv_host_forward(*dims, ptr(w), ptr(u), ptr(kk), ptr(vv), ctypes.c_int(bf16), ptr(state), ptr(y),
                              ptr(s_out))
    scratch, gk, gv, gs_in, gw, gu = nan(B, T, 3, C), nan(B, T, C), nan(B, T, C), nan(B, 3, C), nan(B, C), nan(B, C)
    lib.rwkv_wkv_host_backward(*dims, ptr(w), ptr(u), ptr(kk), ptr(vv), ctypes.c_int(bf16), ptr(state), ptr(gy),
                               ptr(gstate_out), ptr(scratch), ptr(gk), ptr(gv), ptr(gs_in), ptr(gw), ptr(gu))
    # the chain rule to time_decay, as WKVKernel.backward does
    return y, s_out, gw.sum(0) * w, gu.sum(0), gk, gv, gs_in


@pytest.mark.parametrize("B,T,C,dtype,with_state", [
    (3, 1, 77, torch.float32, False),
    (3, 37, 77, torch.float32, True),
    (2, 300, 5, torch.float32, True),
    (1, 64, 33, torch.float32, False),
    (3, 40, 77, torch.bfloat16, True),
])
def test_lanes_match_reference(selftest_lib, B, T, C, dtype, with_state):
    g = torch.Generator().manual_seed(B * 1000 + T)
    time_decay = torch.randn(C, generator=g) * 2
    time_first = torch.randn(C, generator=g)
    k = (torch.randn(B, T, C, generator=g) * 3).to(dtype)
    v = torch.randn(B, T, C, generator=g).to(dtype)
    if with_state:  # a realistic incoming state: the state after some other tokens
        _, state = wkv_reference(time_decay, time_first, torch.randn(B, 9, C, generator=g) * 3,
                                 torch.randn(B, 9, C, generator=g))
        state = state.float().contiguous()
    else:
        state = empty_wkv_state(B, C)
    gy = torch.randn(B, T, C, generator=g)
    gstate_out = torch.randn(B, 3, C, generator=g)
    # what the autograd wrapper hands every kernel: the state gradient in folded form (finetune/ops/wkv4.py,
    # fold_state_grad), which is what any loss on the state's meaning (A, B) = (a e^p, b e^p) gives p
    _, s_out = wkv_reference(time_decay, time_first, k.float(), v.float(), state)
    gstate_out = fold_state_grad(gstate_out, s_out.float())
    out = _host_kernel(selftest_lib, time_decay, time_first, k, v, state, gy, gstate_out)

    leaves = [x.double().requires_grad_() for x in (time_decay, time_first, k.float(), v.float(), state)]
    y, s = wkv_reference(*leaves)
    ((y * gy.double()).sum() + (s * gstate_out.double()).sum()).backward()
    ref = [y.detach(), s.detach()] + [x.grad for x in leaves]
    for name, got, want in zip(["y", "state_out", "g_time_decay", "g_time_first", "gk", "gv", "gstate_in"], out, ref):
        assert not got.isnan().any(), f"{name}: NaN (an output the kernel did not write?)"
        err = ((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()
        assert err < 2e-5, f"{name}: relative error {err:.2e}"


# ---------------------------------------------------------------------------------------------------------------------
# The binding


def test_binding_syntax(nvcc, tmp_path):
    """g++ -fsyntax-only of the binding against this torch's headers (see tests/cuda_helpers.py for the stub)."""
    check_binding_syntax(nvcc, tmp_path, BIND, "rwkv_lora_wkv_cuda")
