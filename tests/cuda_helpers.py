"""What the CUDA kernel tests share without a GPU: running nvcc / the host compiler, torch's include flags, and the
binding's host-compiler syntax check (the `nvcc` fixture itself is in conftest.py)."""

from __future__ import annotations

import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
from torch.utils import cpp_extension


def run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)}\nfailed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


def includes() -> list[str]:
    return [f"-I{p}" for p in cpp_extension.include_paths()]


def check_binding_syntax(nvcc: str, tmp_path: Path, bind: Path, extension_name: str, timeout: float = 900) -> None:
    """g++ -fsyntax-only of a binding against this torch's headers. A CPU build of torch ships the c10/cuda headers
    but not the generated c10/cuda/impl/cuda_cmake_macros.h; an empty stand-in is enough for a syntax check."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no host C++ compiler (g++ / c++) for the binding syntax check")
    cuda_include = next((d for d in (Path(nvcc).resolve().parent.parent / "include", Path("/usr/local/cuda/include"))
                         if (d / "cuda_runtime.h").exists()), None)
    if cuda_include is None:
        pytest.skip("cuda_runtime.h not found next to nvcc")
    stub = tmp_path / "stub"
    macros = "c10/cuda/impl/cuda_cmake_macros.h"
    if not any((Path(p) / macros).exists() for p in cpp_extension.include_paths()):
        (stub / macros).parent.mkdir(parents=True)
        (stub / macros).write_text("#pragma once\n")
    run([cxx, "-std=c++20", "-fsyntax-only", "-Wall", "-Werror=return-type",
         f"-DTORCH_EXTENSION_NAME={extension_name}", *includes(), f"-I{stub}",
         f"-I{sysconfig.get_paths()['include']}", f"-I{cuda_include}", str(bind)], timeout=timeout)
