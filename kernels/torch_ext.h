// What the extensions here take from torch: tensors (at::Tensor with its methods: new_empty, new_zeros, sum, ...),
// at::parallel_for, and pybind11 with torch's tensor type casters (PYBIND11_MODULE, py::arg). Not
// <torch/extension.h>, which also parses the whole C++ frontend (torch::nn, autograd, optimizers, serialization),
// nor <ATen/ATen.h>, which declares every operator as a function (at::empty, at::sum, ...): the kernels allocate
// through the methods of a tensor they hold instead, which <ATen/core/Tensor.h> already declares. Parsing is most of
// a build. The five CPU kernels built two at a time (g++ 12, 2-core AVX2 machine): 142 s wall (237 s of CPU) with
// <torch/extension.h>, 74-78 s (130-134 s) with <ATen/ATen.h>, 51-55 s (93-100 s) with this; the three CUDA
// bindings' syntax checks 94 s, 50 s and 26 s.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <torch/csrc/utils/pybind.h>
