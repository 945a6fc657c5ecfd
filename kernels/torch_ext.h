// What the extensions here take from torch: tensors with ATen's operators (at::empty, at::parallel_for, ...) and
// pybind11 with torch's tensor type casters (PYBIND11_MODULE, py::arg). Not <torch/extension.h>: that also parses
// the whole C++ frontend (torch::nn, autograd, optimizers, serialization), which no kernel uses, and it was the
// larger part of every build: the five CPU kernels built two at a time took 142 s (237 s of CPU) with it and 78 s
// (134 s) with this; the three CUDA bindings' syntax checks 94 s and 50 s (g++ 12, 2-core AVX2 machine).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/utils/pybind.h>
