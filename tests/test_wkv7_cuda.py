"""The CUDA WKV-7 kernel without a GPU: it compiles with nvcc for sm_80 and sm_90, its per-thread phases (the same
__host__ __device__ code the kernels run, threads in turn between the barriers and the warp-shuffle sums, those
summed in the shuffles' order) match the float64 reference when run on the CPU, and the binding passes a
host-compiler syntax check.

Skipped, with the reason, only when nvcc (or for the binding check, a C++ compiler / the CUDA headers) is absent.
Running the kernel itself on a GPU is bench/gpu_check.py's job.
"""

from __future__ import annotations

import ctypes
import math

import pytest
import torch

from cuda_helpers import check_binding_syntax, run
from finetune.ops.build import KERNEL_DIR
from test_wkv7 import NAMES, make_inputs, reference_run, rel_err

CU = KERNEL_DIR / "wkv7_cuda.cu"
BIND = KERNEL_DIR / "wkv7_cuda_bind.cpp"
K = 16  # rwkv_wkv7::K in the .cu file
N = 64






@pytest.mark.parametrize("arch", [80, 90])
def test_nvcc_compiles_kernel(nvcc, tmp_path, arch):
    obj = tmp_path / f"wkv7_cuda_sm{arch}.o"
    run([nvcc, "-c", "-O3", "-std=c++17", f"-gencode=arch=compute_{arch},code=sm_{arch}", str(CU), "-o", str(obj)])
    assert obj.stat().st_size > 0


# ---------------------------------------------------------------------------------------------------------------------
# The per-thread phases on the CPU


def _selftest_build(nvcc, tmp_path_factory, *defines: str) -> ctypes.CDLL:
    so = tmp_path_factory.mktemp("wkv7_cuda") / "wkv7_cuda_selftest.so"
    run([nvcc, "-shared", "-Xcompiler", "-fPIC", "-O2", "-std=c++17", "-DWKV7_HOST_SELFTEST", *defines,
         "-gencode=arch=compute_80,code=sm_80", str(CU), "-o", str(so)])
    return ctypes.CDLL(str(so))


@pytest.fixture(scope="module")
def selftest_lib(nvcc, tmp_path_factory):
    return _selftest_build(nvcc, tmp_path_factory)


def _raw(x: torch.Tensor) -> torch.Tensor:
    """bf16 tensors are handed over as their 16-bit patterns."""
    return x.view(torch.int16) if x.dtype == torch.bfloat16 else x


def _host_kernel(lib, xs, state, gy, gstate):
    """Forward (saving checkpoints) and backward through the kernel's phases on the CPU; every output and the
    scratch buffer pre-filled with NaN, so that anything left unwritten or read before being written shows."""
    r, w, k, v, a, b = (x.contiguous() for x in xs)
    B, T, H, _ = r.shape
    bf16, w_bf16 = r.dtype == torch.bfloat16, w.dtype == torch.bfloat16
    nck = math.ceil(T / K)

    def nan(*shape, dtype=torch.float32):
        return torch.full(shape, float("nan"), dtype=dtype)

    ptr = lambda t: ctypes.c_void_p(t.data_ptr())  # noqa: E731
    dims = [ctypes.c_int64(B), ctypes.c_int64(T), ctypes.c_int64(H)]
    ins = [ptr(_raw(x)) for x in (r, w, k, v, a, b)]
    flags = [ctypes.c_int(bf16), ctypes.c_int(w_bf16)]
    y, s_out, ckpt, sa = nan(B, T, H, N), nan(B, H, N, N), nan(B, H, nck, N, N), nan(B, T, H, N)
    lib.rwkv_wkv7_host_forward(*dims, *ins, *flags, ptr(state), ptr(y), ptr(s_out), ptr(ckpt), ptr(sa))
    grads = [nan(B, T, H, N, dtype=x.dtype) for x in (r, w, k, v, a, b)]
    scratch, gs_in = nan(B * H, K, N, N), nan(B, H, N, N)
    lib.rwkv_wkv7_host_backward(*dims, *ins, *flags, ptr(ckpt), ptr(sa), ptr(gy), ptr(gstate), ptr(scratch),
                                *(ptr(_raw(g)) for g in grads), ptr(gs_in))
    return y, s_out, ckpt, grads + [gs_in]


CASES = [  # B, T, H, dtype of r/k/v/a/b, dtype of w
    (1, 1, 1, torch.float32, torch.float32),
    (2, 37, 2, torch.float32, torch.float32),  # T not a multiple of 16: a partial last block
    (1, 48, 1, torch.float32, torch.float32),  # exactly three blocks
    (2, 21, 2, torch.bfloat16, torch.float32),
    (1, 40, 3, torch.bfloat16, torch.bfloat16),
]


@pytest.mark.parametrize("B,T,H,dtype,w_dtype", CASES, ids=[f"B{c[0]}-T{c[1]}-H{c[2]}-{str(c[3])[6:]}-w{str(c[4])[6:]}"
                                                            for c in CASES])
def test_phases_match_reference(selftest_lib, B, T, H, dtype, w_dtype):
    _check_against_reference(selftest_lib, B, T, H, dtype, w_dtype)


@pytest.mark.parametrize("lanes", [8])
def test_phases_match_reference_with_other_lane_counts(nvcc, tmp_path_factory, lanes):
    """The row split is a build-time constant (WKV7_LANES, 4 by default) that bench/gpu_check.py times at 2 and 8 too:
    the code is right with eight threads per row (three shuffle rounds, two columns a thread per float4 chunk)."""
    lib = _selftest_build(nvcc, tmp_path_factory, f"-DWKV7_LANES={lanes}")
    _check_against_reference(lib, 2, 37, 2, torch.float32, torch.float32)
    _check_against_reference(lib, 1, 21, 1, torch.bfloat16, torch.float32)


def _check_against_reference(lib, B, T, H, dtype, w_dtype):
    leaves, gy, gstate = make_inputs(B, T, H, N, seed=20)
    xs = [x.to(w_dtype if i == 1 else dtype) for i, x in enumerate(leaves[:6])]
    state = leaves[6].float().contiguous()
    y, s_out, ckpt, grads = _host_kernel(lib, xs, state, gy.float().contiguous(), gstate.float().contiguous())
    # the reference on the values the kernel saw (bf16 inputs rounded once)
    rounded = [x.double() for x in xs] + [leaves[6]]
    y_ref, s_ref, g_ref = reference_run(rounded, gy, gstate)
    for name, got, want in (("y", y, y_ref), ("state_out", s_out, s_ref)):
        assert not got.isnan().any(), f"{name}: NaN (an output the kernel did not write?)"
        assert rel_err(got, want) < 1e-5, f"{name}: relative error {rel_err(got, want):.2e}"
    for name, got, want in zip(NAMES, grads, g_ref):
        assert got.dtype == (torch.float32 if name == "state" else w_dtype if name == "w" else dtype), name
        assert not got.isnan().any(), f"d{name}: NaN (an output the kernel did not write?)"
        tol = 1e-5 if got.dtype == torch.float32 else 1e-2  # bf16 gradients are rounded to 2^-8
        assert rel_err(got, want) < tol, f"d{name}: relative error {rel_err(got, want):.2e}"
    # the checkpoints are the reference's states before steps 0, K, 2K, ... in the state's own layout
    for c in range(math.ceil(T / K)):
        _, s_c, _ = reference_run([x[:, :c * K] for x in rounded[:6]] + [rounded[6]], None, None, grads=False)
        assert rel_err(ckpt[:, :, c], s_c) < 1e-5, f"checkpoint {c}"


def test_phases_extreme_decays_and_zero_kk(selftest_lib):
    """w at both ends of the model's range (-0.6065 and -1e-9) and kk = 0 (a = b = 0) stay finite and exact."""
    B, T, H = 1, 40, 2
    leaves, gy, gstate = make_inputs(B, T, H, N, seed=21)
    e = math.exp(-0.5)
    w0 = torch.where(torch.arange(N) % 2 == 0, 20.0, -20.0).double().expand(B, T, H, N)
    leaves[1] = -e * torch.sigmoid(w0)
    leaves[4][:, :, 1] = 0.0
    leaves[5][:, :, 1] = 0.0
    xs = [x.float() for x in leaves[:6]]
    y, s_out, _, grads = _host_kernel(selftest_lib, xs, leaves[6].float().contiguous(), gy.float().contiguous(),
                                      gstate.float().contiguous())
    y_ref, s_ref, g_ref = reference_run(leaves, gy, gstate)
    for name, got, want in zip(["y", "state_out", *NAMES], [y, s_out, *grads], [y_ref, s_ref, *g_ref]):
        assert torch.isfinite(got).all(), name
        assert rel_err(got, want) < 1e-5, f"{name}: relative error {rel_err(got, want):.2e}"


# ---------------------------------------------------------------------------------------------------------------------
# The binding


def test_binding_syntax(nvcc, tmp_path):
    """g++ -fsyntax-only of the binding against this torch's headers (see tests/cuda_helpers.py for the stub)."""
    check_binding_syntax(nvcc, tmp_path, BIND, "rwkv_lora_wkv7_cuda")
