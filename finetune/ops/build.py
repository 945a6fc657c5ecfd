"""Building the compiled WKV kernels: one loader shared by every RWKV generation's operator.

Each operator names its sources under `kernels/`; `load_extension` compiles them on first use with
`torch.utils.cpp_extension.load` (torch caches the build under ~/.cache/torch_extensions and rebuilds when sources or
flags change) and returns the module, or None with one warning when the build fails, so that the caller falls back
to its PyTorch reference. Written by hand only because torch ships no WKV operator: the build itself is torch's.

The CPU build uses -march=native, so the extension's name carries the CPU's identity (model name and vector
extensions): a home directory shared between machines of different CPUs never loads code built for another one.
Every name also carries a short hash of the kernel folder's path: two checkouts (or a checkout and an installed
copy) each keep their own build instead of rebuilding over each other's on every import.
"""

from __future__ import annotations

import functools
import hashlib
import platform
import re
import shutil
import subprocess
import warnings
from pathlib import Path
from typing import Callable, TypeVar

import torch

from finetune.errors import first_line

KERNEL_DIR = Path(__file__).resolve().parent.parent.parent / "kernels"

# GPU generations the CUDA kernels are compiled for, when the installed nvcc still supports them (CUDA 13 dropped
# sm_70): Volta, Ampere (A100; sm_86/89 run the sm_80 code), Hopper (H100/H200). The newest one also ships as PTX
# so that later GPUs (Blackwell, ...) can JIT it.
CUDA_ARCHS = (70, 80, 90)

# -ffast-math lets the channel loops vectorise; -fno-finite-math-only keeps the -1e38 / inf handling exact
CPU_CFLAGS = ["-O3", "-fopenmp", "-march=native", "-ffast-math", "-fno-finite-math-only"]

_extensions: dict[str, object] = {}

F = TypeVar("F", bound=Callable)


def cpu_id() -> str:
    """A short id of this CPU (model name and flags from /proc/cpuinfo, else platform.processor())."""
    text = platform.machine() + platform.processor()
    try:
        info = Path("/proc/cpuinfo").read_text()
        for key in ("model name", "flags", "Features"):
            m = re.search(rf"^{key}\s*:\s*(.*)$", info, re.MULTILINE)
            if m:
                text += m.group(1)
    except OSError:
        pass
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def _checkout_id() -> str:
    """A short id of where the kernel sources live (torch's cache keys builds by name only)."""
    return hashlib.sha256(str(KERNEL_DIR.resolve()).encode()).hexdigest()[:8]


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
    """All nvcc flags for a CUDA kernel. No fast-math: expf / division stay IEEE so fp32 matches the reference to
    ~1e-6. The .cu files include no torch headers, so C++17 works with any torch and nvcc."""
    return ["-O3", "-std=c++17", *cuda_gencode_flags(nvcc)]


def load_extension(name: str, cpu_sources: list[str] | None = None, cuda_sources: list[str] | None = None,
                   device_type: str = "cpu"):
    """Compile (or load from torch's cache) the extension `name` for 'cpu' or 'cuda'; None when that fails.

    Sources are file names under kernels/. The result (module or None) is remembered for the process.
    """
    key = f"{name}:{device_type}"
    if key in _extensions:
        return _extensions[key]
    from torch.utils import cpp_extension

    ext = None
    nvcc, cuda_flags = None, []
    try:
        if device_type == "cpu" and cpu_sources:
            ext = cpp_extension.load(
                name=f"rwkv_lora_{name}_cpu_{cpu_id()}_{_checkout_id()}",
                sources=[str(KERNEL_DIR / s) for s in cpu_sources],
                extra_cflags=CPU_CFLAGS,
                extra_ldflags=["-fopenmp"],
                verbose=False,
            )
        elif device_type == "cuda" and cuda_sources:
            nvcc = find_nvcc()
            cuda_flags = cuda_compile_flags(nvcc)
            ext = cpp_extension.load(
                name=f"rwkv_lora_{name}_cuda_{_checkout_id()}",
                sources=[str(KERNEL_DIR / s) for s in cuda_sources],
                extra_cuda_cflags=cuda_flags,
                verbose=False,
            )
    except Exception as e:  # no compiler, no nvcc, a bad flag: say which and fall back
        last = [ln for ln in str(e).strip().splitlines() if ln.strip()]
        reason = last[-1][:200] if last else first_line(e)
        if device_type == "cuda":
            hint = (f"nvcc: {nvcc or 'not found (set CUDA_HOME or put nvcc on PATH)'}; "
                    f"nvcc flags: {' '.join(cuda_flags)}; torch CUDA_HOME: {cpp_extension.CUDA_HOME}")
        else:
            hint = "check that a C++ compiler is installed"
        warnings.warn(f"rwkv-lora: could not build the {device_type} {name} kernel ({reason}); using the slow "
                      f"reference. {hint}.", stacklevel=3)
    _extensions[key] = ext
    return ext


def eager_under_compile(op: F) -> F:
    """`op` (an operator that calls a compiled extension) run eagerly when called from code under torch.compile
    (the trainer's `compile: true` compiles each block): torch.compile cannot trace into a pybind11 function, so the
    block's graph is split cleanly around the operator (the code on either side is still compiled) instead of a
    warning at every compilation. Eager callers pay a wrapper call and an `is_compiling()` check (~0.35 us)."""
    eager = torch.compiler.disable(op)

    @functools.wraps(op)
    def call(*args, **kwargs):
        if torch.compiler.is_compiling():
            return eager(*args, **kwargs)
        return op(*args, **kwargs)

    return call  # type: ignore[return-value]
