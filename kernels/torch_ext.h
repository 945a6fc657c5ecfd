// What the extensions here take from torch: tensors (at::Tensor with its methods: new_empty, new_zeros, sum, ...),
// at::parallel_for, and pybind11 with torch's tensor type casters (PYBIND11_MODULE, py::arg). Not
// <torch/extension.h>, which also parses the whole C++ frontend (torch::nn, autograd, optimizers, serialization),
// nor <ATen/ATen.h>, which declares every operator as a function (at::empty, at::sum, ...): the kernels allocate
// through the methods of a tensor they hold instead, which <ATen/core/Tensor.h> already declares. Parsing is most of
// a build: one file's headers take ~11 s of CPU with <ATen/ATen.h> and ~5 s with this (g++ 12); with
// <torch/extension.h> the five CPU kernels built two at a time took 142 s (237 s of CPU), with <ATen/ATen.h> 78 s
// (134 s).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <torch/csrc/utils/pybind.h>
