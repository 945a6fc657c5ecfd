// Python binding of the CUDA WKV kernel (kernels/wkv_cuda.cu): argument checks, device guard, stream, dtype
// dispatch and allocations. Same interface as the CPU extension (see finetune/wkv.py):
//   forward(w[C], u[C], k[B,T,C], v[B,T,C], state_in[B,3,C]) -> (y[B,T,C] fp32, state_out[B,3,C] fp32)
//   backward(w, u, k, v, state_in, gy[B,T,C] fp32, gstate_out[B,3,C] fp32)
//       -> (gw[C], gu[C], gk[B,T,C] fp32, gv[B,T,C] fp32, gstate_in[B,3,C] fp32)
// Set RWKV_LORA_WKV_POISON=1 to pre-fill every output with NaN (a debug check that the kernel writes everything).

#include "torch_ext.h"  // ATen and pybind11, not the whole C++ frontend
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdlib>
#include <limits>
#include <tuple>

const char* rwkv_wkv_cuda_forward(int64_t B, int64_t T, int64_t C, const float* w, const float* u, const void* k,
                                  const void* v, bool bf16, const float* s_in, float* y, float* s_out, void* stream);
const char* rwkv_wkv_cuda_backward(int64_t B, int64_t T, int64_t C, const float* w, const float* u, const void* k,
                                   const void* v, bool bf16, const float* s_in, const float* gy, const float* gs_out,
                                   float* scratch, float* gk, float* gv, float* gs_in, float* gw_part,
                                   float* gu_part, void* stream);

namespace {

bool poison() {
    const char* env = std::getenv("RWKV_LORA_WKV_POISON");
    return env != nullptr && env[0] != '\0' && env[0] != '0';
}

at::Tensor out_empty(at::IntArrayRef shape, const at::Tensor& like) {
    at::Tensor t = like.new_empty(shape, at::kFloat);
    if (poison()) t.fill_(std::numeric_limits<float>::quiet_NaN());
    return t;
}

void check_f32(const at::Tensor& t, const char* name, at::IntArrayRef shape, const at::Tensor& k) {
    TORCH_CHECK(t.device() == k.device(), "wkv_cuda: ", name, " is on ", t.device(), ", k on ", k.device());
    TORCH_CHECK(t.scalar_type() == at::kFloat, "wkv_cuda: ", name, " must be float32, got ", t.scalar_type());
    TORCH_CHECK(t.is_contiguous(), "wkv_cuda: ", name, " must be contiguous");
    TORCH_CHECK(t.sizes() == shape, "wkv_cuda: ", name, " has shape ", t.sizes(), ", expected ", shape);
}

// checks k, v, w, u, state_in; returns whether k and v are bf16
bool check_inputs(const at::Tensor& w, const at::Tensor& u, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& s_in) {
    TORCH_CHECK(k.is_cuda(), "wkv_cuda: k must be a CUDA tensor");
    TORCH_CHECK(k.dim() == 3, "wkv_cuda: k must be [B, T, C], got ", k.sizes());
    TORCH_CHECK(k.scalar_type() == at::kFloat || k.scalar_type() == at::kBFloat16,
                "wkv_cuda: k must be float32 or bfloat16, got ", k.scalar_type());
    TORCH_CHECK(v.scalar_type() == k.scalar_type(), "wkv_cuda: v (", v.scalar_type(), ") and k (", k.scalar_type(),
                ") must share a dtype");
    TORCH_CHECK(v.device() == k.device(), "wkv_cuda: v is on ", v.device(), ", k on ", k.device());
    TORCH_CHECK(k.is_contiguous() && v.is_contiguous(), "wkv_cuda: k and v must be contiguous");
    TORCH_CHECK(v.sizes() == k.sizes(), "wkv_cuda: v has shape ", v.sizes(), ", k ", k.sizes());
    const int64_t B = k.size(0), C = k.size(2);
    check_f32(w, "w", {C}, k);
    check_f32(u, "u", {C}, k);
    check_f32(s_in, "state_in", {B, 3, C}, k);
    return k.scalar_type() == at::kBFloat16;
}

void raise_if(const char* err, const char* what) {
    TORCH_CHECK(err == nullptr, "wkv_cuda: ", what, " launch failed: ", err);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> wkv_forward(const at::Tensor& w, const at::Tensor& u, const at::Tensor& k,
                                               const at::Tensor& v, const at::Tensor& state_in) {
    const bool bf16 = check_inputs(w, u, k, v, state_in);
    const c10::cuda::CUDAGuard guard(k.device());
    const int64_t B = k.size(0), T = k.size(1), C = k.size(2);
    at::Tensor y = out_empty({B, T, C}, k);
    at::Tensor s_out = out_empty({B, 3, C}, k);
    raise_if(rwkv_wkv_cuda_forward(B, T, C, w.data_ptr<float>(), u.data_ptr<float>(), k.data_ptr(), v.data_ptr(),
                                   bf16, state_in.data_ptr<float>(), y.data_ptr<float>(), s_out.data_ptr<float>(),
                                   c10::cuda::getCurrentCUDAStream().stream()),
             "forward");
    return {y, s_out};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> wkv_backward(
    const at::Tensor& w, const at::Tensor& u, const at::Tensor& k, const at::Tensor& v, const at::Tensor& state_in,
    const at::Tensor& gy, const at::Tensor& gstate_out) {
    const bool bf16 = check_inputs(w, u, k, v, state_in);
    const int64_t B = k.size(0), T = k.size(1), C = k.size(2);
    check_f32(gy, "gy", {B, T, C}, k);
    check_f32(gstate_out, "gstate_out", {B, 3, C}, k);
    const c10::cuda::CUDAGuard guard(k.device());
    // the state before every step, recomputed by the kernel: [B, T, 3, C] fp32, freed on return
    at::Tensor scratch = k.new_empty({B, T, 3, C}, at::kFloat);
    at::Tensor gk = out_empty({B, T, C}, k);
    at::Tensor gv = out_empty({B, T, C}, k);
    at::Tensor gs_in = out_empty({B, 3, C}, k);
    at::Tensor gw_part = out_empty({B, C}, k);
    at::Tensor gu_part = out_empty({B, C}, k);
    raise_if(rwkv_wkv_cuda_backward(B, T, C, w.data_ptr<float>(), u.data_ptr<float>(), k.data_ptr(), v.data_ptr(),
                                    bf16, state_in.data_ptr<float>(), gy.data_ptr<float>(),
                                    gstate_out.data_ptr<float>(), scratch.data_ptr<float>(), gk.data_ptr<float>(),
                                    gv.data_ptr<float>(), gs_in.data_ptr<float>(), gw_part.data_ptr<float>(),
                                    gu_part.data_ptr<float>(), c10::cuda::getCurrentCUDAStream().stream()),
             "backward");
    // B == 0: the parts are empty and the sums are zeros, as they should be
    return {gw_part.sum(0), gu_part.sum(0), gk, gv, gs_in};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "RWKV-4 WKV operator, CUDA kernel (rwkv-lora)";
    m.def("forward", &wkv_forward, "WKV forward: (w, u, k, v, state_in) -> (y, state_out)");
    m.def("backward", &wkv_backward,
          "WKV backward: (w, u, k, v, state_in, gy, gstate_out) -> (gw, gu, gk, gv, gstate_in)");
}
