"""The RWKV-4 WKV operator: reference, compiled kernels, and the dispatch between them.

Per channel c, with w = -exp(time_decay) and u = time_first:

    wkv_t = (sum_{i<t} e^{(t-1-i)w + k_i} v_i + e^{u + k_t} v_t) / (sum_{i<t} e^{(t-1-i)w + k_i} + e^{u + k_t})

computed with the numerically stable running-max recurrence over a state (a, b, p): the true numerator and
denominator are a*e^p and b*e^p, so nothing overflows whatever the decays and keys.

State layout (one tensor so it can be carried between chunks and trained): `[B, 3, C]` float32 holding a, b, p.
The empty state is a = b = 0, p = -1e38 (see `empty_wkv_state`).

Everything here runs in float32 (float64 for the reference when given float64 inputs), whatever the dtype of k and v:
the decays and the state never leave fp32. `wkv` returns y in float32; the model casts it back.

Backends:
- `wkv_reference`: plain PyTorch, a loop over time, autograd does the backward. The definition the tests trust.
- the C++ CPU kernel (`kernels/wkv_cpu.cpp`) and the CUDA kernel (`kernels/wkv_cuda.cu`): compiled on first use with
  `torch.utils.cpp_extension.load` and cached by torch; no compile-time sequence length, any T and any B*C.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import warnings
from pathlib import Path
from typing import Literal

import torch

KERNEL_DIR = Path(__file__).resolve().parent.parent / "kernels"
P_EMPTY = -1e38  # the running max of an empty state: exp(P_EMPTY - anything) == 0 in fp32

Backend = Literal["auto", "reference", "kernel"]


def empty_wkv_state(batch: int, channels: int, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The state before the first token: a = b = 0, p = -1e38. Shape [B, 3, C]."""
    state = torch.zeros(batch, 3, channels, device=device, dtype=dtype)
    state[:, 2] = P_EMPTY
    return state


# ----------------------------------------------------------------------------------------------------------------------
# Reference


def wkv_step(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor,
             b: torch.Tensor, p: torch.Tensor):
    """One step of the stable recurrence (w = -exp(time_decay), u = time_first; every tensor [..., C]):
    returns (wkv_t, a, b, p) after the token. Shared by the reference and the one-token generation path."""
    ww = u + k
    q = torch.maximum(p, ww)
    e1 = torch.exp(p - q)
    e2 = torch.exp(ww - q)
    y = (e1 * a + e2 * v) / (e1 * b + e2)
    ww = p + w
    q = torch.maximum(ww, k)
    e1 = torch.exp(ww - q)
    e2 = torch.exp(k - q)
    return y, e1 * a + e2 * v, e1 * b + e2, q


def wkv_reference(time_decay: torch.Tensor, time_first: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """WKV by the stable recurrence, one time step at a time; differentiable through everything, state included.

    time_decay, time_first: [C]; k, v: [B, T, C]; state: [B, 3, C] or None. Returns (y [B, T, C], state [B, 3, C]).
    Runs in float64 when k is float64, else in float32.
    """
    dtype = torch.float64 if k.dtype == torch.float64 else torch.float32
    B, T, C = k.shape
    w = -torch.exp(time_decay.to(dtype))
    u = time_first.to(dtype)
    k = k.to(dtype)
    v = v.to(dtype)
    if state is None:
        state = empty_wkv_state(B, C, k.device, dtype)
    a, b, p = state.to(dtype).unbind(1)
    ys = []
    # unbind, not k[:, t]: the backward of T slices would build T full-size [B, T, C] gradients (quadratic in T)
    for kt, vt in zip(k.unbind(1), v.unbind(1)):
        y, a, b, p = wkv_step(w, u, kt, vt, a, b, p)
        ys.append(y)
    y = torch.stack(ys, dim=1) if ys else k.new_zeros(B, 0, C)
    return y, torch.stack([a, b, p], dim=1)


# ----------------------------------------------------------------------------------------------------------------------
# Compiled kernels
#
# Both extensions expose the same two functions (all tensors contiguous; w is -exp(time_decay), fp32):
#   forward(w[C], u[C], k[B,T,C], v[B,T,C], state_in[B,3,C]) -> (y[B,T,C] fp32, state_out[B,3,C])
#   backward(w, u, k, v, state_in, gy[B,T,C] fp32, gstate_out[B,3,C]) -> (gw[C], gu[C], gk[B,T,C], gv[B,T,C],
#                                                                         gstate_in[B,3,C])
# gw is the gradient with respect to w; the chain rule to time_decay (times w) is applied here in Python.
# k and v may be fp32 or bf16; the CPU kernel returns gk and gv in their dtype, the CUDA kernel in fp32 (the .to() in
# WKVKernel.backward is then a no-op on the CPU).

_extensions: dict[str, object] = {}
_warned: set[str] = set()

# GPU generations the CUDA kernel is compiled for, when the installed nvcc still supports them (CUDA 13 dropped
# sm_70): Volta, Ampere (A100; sm_86/89 run the sm_80 code), Hopper (H100/H200). The newest one also ships as PTX
# so that later GPUs (Blackwell, ...) can JIT it.
CUDA_ARCHS = (70, 80, 90)


def find_nvcc() -> str | None:
    """The nvcc torch's extension builder will use: $CUDA_HOME/bin/nvcc as torch sees it, else nvcc on PATH."""
    from torch.utils import cpp_extension

    home = getattr(cpp_extension, "CUDA_HOME", None)
    if home and (Path(home) / "bin" / "nvcc").exists():
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc") or (
        "/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists() else None)


def nvcc_archs(nvcc: str | None) -> set[int] | None:
    """Compute capabilities this nvcc can compile for (`nvcc --list-gpu-arch`), or None when it cannot say."""
    if not nvcc:
        return None
    try:
        out = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    found = {int(m) for m in re.findall(r"compute_(\d+)", out.stdout)} if out.returncode == 0 else set()
    return found or None


def cuda_gencode_flags(nvcc: str | None = None) -> list[str]:
    """`-gencode` flags: the archs of CUDA_ARCHS that nvcc supports (all of them when it cannot tell), the GPU in
    this machine when nvcc supports it and it is not covered, and PTX of the newest arch."""
    supported = nvcc_archs(nvcc)
    archs = [a for a in CUDA_ARCHS if supported is None or a in supported] or list(CUDA_ARCHS[-2:])
    try:
        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            here = 10 * major + minor
            covered = any(a // 10 == major and a <= here for a in archs)  # same major: binary compatible
            if not covered and (supported is None or here in supported):
                archs.append(here)
    except Exception:  # no driver, no device: build for the list above
        pass
    archs = sorted(set(archs))
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    flags.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")
    return flags


def cuda_compile_flags(nvcc: str | None = None) -> list[str]:
    """All nvcc flags for the CUDA kernel. No fast-math: expf / division stay IEEE so fp32 matches the reference to
    ~1e-6. The .cu includes no torch headers, so C++17 works with any torch and nvcc."""
    return ["-O3", "-std=c++17", *cuda_gencode_flags(nvcc)]


def _build(kind: str):
    """Compile (or load from torch's cache) the extension for `kind` ('cpu' or 'cuda'); None when that fails."""
    if kind in _extensions:
        return _extensions[kind]
    from torch.utils import cpp_extension

    ext = None
    nvcc, cuda_flags = None, []
    try:
        if kind == "cpu":
            ext = cpp_extension.load(
                name="rwkv_lora_wkv_cpu",
                sources=[str(KERNEL_DIR / "wkv_cpu.cpp")],
                extra_cflags=["-O3", "-fopenmp", "-march=native", "-ffast-math", "-fno-finite-math-only"],
                extra_ldflags=["-fopenmp"],
                verbose=False,
            )
        else:
            nvcc = find_nvcc()
            cuda_flags = cuda_compile_flags(nvcc)
            ext = cpp_extension.load(
                name="rwkv_lora_wkv_cuda",
                sources=[str(KERNEL_DIR / "wkv_cuda_bind.cpp"), str(KERNEL_DIR / "wkv_cuda.cu")],
                extra_cuda_cflags=cuda_flags,
                verbose=False,
            )
    except Exception as e:  # no compiler, no nvcc, a bad flag: say which and fall back
        first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        if kind == "cuda":
            hint = (f"nvcc: {nvcc or 'not found (set CUDA_HOME or put nvcc on PATH)'}; "
                    f"nvcc flags: {' '.join(cuda_flags)}; torch CUDA_HOME: {cpp_extension.CUDA_HOME}")
        else:
            hint = "check that a C++ compiler is installed"
        warnings.warn(f"rwkv-lora: could not build the {kind} WKV kernel ({first}); using the slow reference WKV. "
                      f"{hint}.", stacklevel=3)
        _warned.add(kind)
    _extensions[kind] = ext
    return ext


def kernel_for(device: torch.device):
    """The compiled extension for this device, or None (then the reference is used)."""
    return _build("cuda" if device.type == "cuda" else "cpu") if device.type in ("cpu", "cuda") else None


class WKVKernel(torch.autograd.Function):
    """Autograd wrapper around a compiled extension; gradients for decay, bonus, k, v and the incoming state."""

    @staticmethod
    def forward(ctx, ext, time_decay, time_first, k, v, state):
        w = -torch.exp(time_decay.float()).contiguous()
        u = time_first.float().contiguous()
        k = k.contiguous()
        v = v.contiguous()
        state = state.float().contiguous()
        y, state_out = ext.forward(w, u, k, v, state)
        ctx.ext = ext
        ctx.k_dtype, ctx.v_dtype = k.dtype, v.dtype
        ctx.save_for_backward(w, u, k, v, state)
        return y, state_out

    @staticmethod
    def backward(ctx, gy, gstate_out):
        w, u, k, v, state = ctx.saved_tensors
        gy = torch.zeros_like(k, dtype=torch.float32) if gy is None else gy.float().contiguous()
        gstate_out = torch.zeros_like(state) if gstate_out is None else gstate_out.float().contiguous()
        gw, gu, gk, gv, gstate = ctx.ext.backward(w, u, k, v, state, gy, gstate_out)
        return None, gw * w, gu, gk.to(ctx.k_dtype), gv.to(ctx.v_dtype), gstate


def wkv(time_decay: torch.Tensor, time_first: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
        state: torch.Tensor | None = None, backend: Backend = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """WKV with gradients, on the best backend for k's device. See the module docstring for shapes.

    backend: "auto" (compiled kernel for fp32/bf16 on CPU or CUDA, the reference otherwise or when the build fails),
    "reference", or "kernel" (raise if the kernel cannot be built).
    """
    B, T, C = k.shape
    if state is None:
        state = empty_wkv_state(B, C, k.device)
    use_kernel = backend != "reference" and k.dtype in (torch.float32, torch.bfloat16) and T > 0
    ext = kernel_for(k.device) if use_kernel else None
    if ext is None:
        if backend == "kernel":
            raise RuntimeError(f"no compiled WKV kernel for {k.device} / {k.dtype}")
        return wkv_reference(time_decay, time_first, k, v, state)
    v = v.to(k.dtype)
    return WKVKernel.apply(ext, time_decay, time_first, k, v, state)
