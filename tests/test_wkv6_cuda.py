"""The CUDA WKV-5/6 kernel without a GPU: it compiles with nvcc for sm_80 and sm_90, its lanes (the same
__host__ __device__ code the kernels run) match the float64 reference when run on the CPU, and the binding passes a
host-compiler syntax check.

Skipped, with the reason, only when nvcc (or for the binding check, a C++ compiler / the CUDA headers) is absent.
Running the kernel itself on a GPU is bench/gpu_check.py's job.
"""

from __future__ import annotations

import ctypes
import math

import pytest
import torch

from cuda_helpers import check_binding_syntax, includes, run
from finetune.ops.build import KERNEL_DIR
from finetune.ops.wkv6 import wkv6_reference
from tests.test_wkv6 import make_inputs, rel_err

CU = KERNEL_DIR / "wkv6_cuda.cu"
BIND = KERNEL_DIR / "wkv6_cuda_bind.cpp"




@pytest.mark.slow
def test_nvcc_compiles_kernel_for_sm80_and_sm90(nvcc, tmp_path):
    """Both archs in one nvcc run (one front-end pass: half the time of two runs); a failure names the arch."""
    obj = tmp_path / "wkv6_cuda.o"
    run([nvcc, "-c", "-O3", "-std=c++17", *includes(), "-gencode=arch=compute_80,code=sm_80",
          "-gencode=arch=compute_90,code=sm_90", str(CU), "-o", str(obj)], timeout=900)
    assert obj.stat().st_size > 0


# ---------------------------------------------------------------------------------------------------------------------
# The lanes on the CPU


@pytest.fixture(scope="module")
def selftest_lib(nvcc, tmp_path_factory):
    so = tmp_path_factory.mktemp("wkv6_cuda") / "wkv6_cuda_selftest.so"
    run([nvcc, "-shared", "-Xcompiler", "-fPIC", "-O2", "-std=c++17", "-DWKV_HOST_SELFTEST",
          "-gencode=arch=compute_80,code=sm_80", str(CU), "-o", str(so)], timeout=900)
    return ctypes.CDLL(str(so))


def host_kernel(lib, r, w, k, v, u, state, gy, gstate, generic=False, ckpt_every=0):
    """forward + backward through the kernel's lanes on the CPU, with the binding's scratch sizes; every output and
    scratch buffer pre-filled with NaN. Returns y, state_out, gr, gw, gk, gv, gu, gstate_in."""
    B, T, H, N = r.shape
    bf16 = r.dtype == torch.bfloat16
    rr, kk, vv = ((x.view(torch.int16) if bf16 else x).contiguous() for x in (r, k, v))
    K = max(1, min(T, ckpt_every or math.ceil(math.sqrt(T))))
    nck = (T + K - 1) // K

    def nan(*shape):
        return torch.full(shape, float("nan"))

    ptr = lambda t: ctypes.c_void_p(t.data_ptr())  # noqa: E731
    i64 = ctypes.c_int64
    dims = [i64(B), i64(T), i64(H), i64(N)]
    y, s_out, dec, ruk = nan(B, T, H, N), nan(B, H, N, N), nan(B, T, H, N), nan(B, T, H)
    lib.rwkv_wkv6_host_forward(*dims, ptr(rr), ptr(w), ptr(kk), ptr(vv), ctypes.c_int(bf16), ctypes.c_int(generic),
                               ptr(u), ptr(state), ptr(y), ptr(s_out), ptr(dec), ptr(ruk))
    gyv, ckpt, blk, work = nan(B, T, H), nan(B, H, nck, N, N), nan(B, H, K, N, N), nan(2, B, H, N, N)
    gr, gk, gw, gv, gu, gs_in = nan(B, T, H, N), nan(B, T, H, N), nan(B, T, H, N), nan(B, T, H, N), nan(B, H, N), \
        nan(B, H, N, N)
    dec, ruk = nan(B, T, H, N), nan(B, T, H)
    lib.rwkv_wkv6_host_backward(*dims, i64(K), ptr(rr), ptr(w), ptr(kk), ptr(vv), ctypes.c_int(bf16),
                                ctypes.c_int(generic), ptr(u), ptr(state), ptr(gy), ptr(gstate), ptr(dec), ptr(ruk),
                                ptr(gyv), ptr(ckpt), ptr(blk), ptr(work), ptr(gr), ptr(gk), ptr(gw), ptr(gv), ptr(gu),
                                ptr(gs_in))
    return y, s_out, gr, gw, gk, gv, gu.sum(0), gs_in


@pytest.mark.parametrize("B,T,H,N,dtype,generic,ckpt_every", [
    (2, 1, 2, 64, torch.float32, False, 0),
    (1, 37, 3, 64, torch.float32, False, 0),    # K = 7: T not a multiple of K
    (2, 40, 2, 64, torch.float32, False, 1),    # a checkpoint at every step
    (1, 300, 1, 64, torch.float32, False, 0),
    (2, 23, 2, 64, torch.float32, True, 5),     # N as a runtime value, rows in the global work buffer
    (2, 19, 3, 5, torch.float32, False, 0),     # N != 64 takes that path by itself
    (1, 30, 2, 64, torch.bfloat16, False, 0),
    (1, 30, 2, 48, torch.bfloat16, False, 0),
])
def test_lanes_match_reference(selftest_lib, B, T, H, N, dtype, generic, ckpt_every):
    leaves, gy, gstate = make_inputs(B, T, H, N, seed=21)
    if dtype == torch.bfloat16:  # the reference sees the same rounded r, k, v as the kernel
        for i in (0, 2, 3):
            leaves[i] = leaves[i].to(torch.bfloat16).double()
    xs = [x.clone().requires_grad_() for x in leaves]
    y, s = wkv6_reference(*xs)
    grads = torch.autograd.grad((y * gy).sum() + (s * gstate).sum(), xs)
    want = [y.detach(), s.detach(), *grads]

    r, w, k, v, u, state = (x.float().contiguous() for x in leaves)
    r, k, v = (x.to(dtype) for x in (r, k, v))
    got = host_kernel(selftest_lib, r, w, k, v, u, state, gy.float().contiguous(), gstate.float().contiguous(),
                      generic=generic, ckpt_every=ckpt_every)
    for name, g, ref in zip(["y", "state_out", "gr", "gw", "gk", "gv", "gu", "gstate_in"], got, want):
        assert g.shape == ref.shape, name
        assert not g.isnan().any(), f"{name}: NaN (an output the lanes did not write?)"
        assert rel_err(g, ref) < 1e-5, f"{name}: relative error {rel_err(g, ref):.2e}"


def test_lanes_extreme_decays_stay_finite(selftest_lib):
    """w = 0 (no decay), -inf (forget at once) and -exp(5) (e^-148: underflows fp32) with large inputs."""
    B, T, H, N = 1, 50, 2, 64
    leaves, gy, gstate = make_inputs(B, T, H, N, seed=22)
    leaves[1][..., 0] = 0.0
    leaves[1][..., 1] = -float("inf")
    leaves[1][:, ::3, :, 2:9] = -math.exp(5)
    for i in (0, 2, 3):
        leaves[i] = leaves[i] * 30
    xs = [x.clone().requires_grad_() for x in leaves]
    y, s = wkv6_reference(*xs)
    want = [y.detach(), s.detach(), *torch.autograd.grad((y * gy).sum() + (s * gstate).sum(), xs)]
    got = host_kernel(selftest_lib, *(x.float().contiguous() for x in leaves), gy.float(), gstate.float())
    for name, g, ref in zip(["y", "state_out", "gr", "gw", "gk", "gv", "gu", "gstate_in"], got, want):
        assert torch.isfinite(g).all(), name
        assert rel_err(g, ref) < 1e-5, f"{name}: relative error {rel_err(g, ref):.2e}"


# ---------------------------------------------------------------------------------------------------------------------
# The binding


@pytest.mark.slow
def test_binding_syntax(nvcc, tmp_path):
    """g++ -fsyntax-only of the binding against this torch's headers (see tests/cuda_helpers.py for the stub)."""
    check_binding_syntax(nvcc, tmp_path, BIND, "rwkv_lora_wkv6_cuda")
