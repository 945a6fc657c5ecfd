// Python binding of the CUDA WKV-5/6 kernel (kernels/wkv6_cuda.cu): argument checks, device guard, stream, dtype
// dispatch, scratch and output allocations. Same interface as the CPU extension (see finetune/ops/wkv6.py):
//   forward(r, w, k, v [B,T,H,N], u [H,N], state_in [B,H,N,N]) -> (y [B,T,H,N], state_out [B,H,N,N])
//   backward(r, w, k, v, u, state_in, gy [B,T,H,N], gstate_out [B,H,N,N]) -> (gr, gw, gk, gv, gu [H,N], gstate_in)
// r, k, v: one dtype, fp32 or bf16; w, u, state, gy, gstate_out fp32; every output fp32. The CPU extension's extra
// arguments are accepted and ignored (col_blocks), or used (ckpt_every: 0 = ceil(sqrt(T))).
// Set RWKV_LORA_WKV_POISON=1 to pre-fill every output and scratch buffer with NaN (a check that the kernel writes
// everything it returns and reads only what it wrote).

#include "torch_ext.h"  // ATen and pybind11, not the whole C++ frontend
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cmath>
#include <cstdlib>
#include <limits>
#include <tuple>

const char* rwkv_wkv6_cuda_forward(int64_t B, int64_t T, int64_t H, int64_t N, const void* r, const float* w,
                                   const void* k, const void* v, bool bf16, const float* u, const float* s_in, float* y,
                                   float* s_out, float* dec, float* ruk, void* stream);
const char* rwkv_wkv6_cuda_backward(int64_t B, int64_t T, int64_t H, int64_t N, int64_t K, const void* r,
                                    const float* w, const void* k, const void* v, bool bf16, const float* u,
                                    const float* s_in, const float* gy, const float* gs_out, float* dec, float* ruk,
                                    float* gyv, float* ckpt, float* blk, float* work, float* gr, float* gk, float* gw,
                                    float* gv, float* gu_part, float* gs_in, void* stream);

namespace {

bool poison() {
    const char* env = std::getenv("RWKV_LORA_WKV_POISON");
    return env != nullptr && env[0] != '\0' && env[0] != '0';
}

at::Tensor f32_empty(at::IntArrayRef shape, const at::Tensor& like) {
    at::Tensor t = like.new_empty(shape, at::kFloat);
    if (poison()) t.fill_(std::numeric_limits<float>::quiet_NaN());
    return t;
}

void check_f32(const at::Tensor& t, const char* name, at::IntArrayRef shape, const at::Tensor& r) {
    TORCH_CHECK(t.device() == r.device(), "wkv6_cuda: ", name, " is on ", t.device(), ", r on ", r.device());
    TORCH_CHECK(t.scalar_type() == at::kFloat, "wkv6_cuda: ", name, " must be float32, got ", t.scalar_type());
    TORCH_CHECK(t.is_contiguous(), "wkv6_cuda: ", name, " must be contiguous");
    TORCH_CHECK(t.sizes() == shape, "wkv6_cuda: ", name, " has shape ", t.sizes(), ", expected ", shape);
}

// checks r, w, k, v, u, state_in; returns whether r, k, v are bf16
bool check_inputs(const at::Tensor& r, const at::Tensor& w, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& u, const at::Tensor& s_in) {
    TORCH_CHECK(r.is_cuda(), "wkv6_cuda: r must be a CUDA tensor");
    TORCH_CHECK(r.dim() == 4, "wkv6_cuda: r must be [B, T, H, N], got ", r.sizes());
    TORCH_CHECK(r.scalar_type() == at::kFloat || r.scalar_type() == at::kBFloat16,
                "wkv6_cuda: r must be float32 or bfloat16, got ", r.scalar_type());
    for (const auto* x : {&k, &v}) {
        TORCH_CHECK(x->scalar_type() == r.scalar_type(), "wkv6_cuda: r, k and v must share a dtype");
        TORCH_CHECK(x->device() == r.device(), "wkv6_cuda: k and v must be on r's device");
        TORCH_CHECK(x->sizes() == r.sizes(), "wkv6_cuda: k and v must have r's shape ", r.sizes());
    }
    TORCH_CHECK(r.is_contiguous() && k.is_contiguous() && v.is_contiguous(), "wkv6_cuda: r, k, v must be contiguous");
    const int64_t B = r.size(0), H = r.size(2), N = r.size(3);
    check_f32(w, "w", r.sizes(), r);
    check_f32(u, "u", {H, N}, r);
    check_f32(s_in, "state_in", {B, H, N, N}, r);
    return r.scalar_type() == at::kBFloat16;
}

void raise_if(const char* err, const char* what) {
    TORCH_CHECK(err == nullptr, "wkv6_cuda: ", what, " launch failed: ", err);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> wkv6_forward(const at::Tensor& r, const at::Tensor& w, const at::Tensor& k,
                                                const at::Tensor& v, const at::Tensor& u, const at::Tensor& state_in,
                                                int64_t col_blocks) {
    (void)col_blocks;  // a CPU tiling knob: every CUDA lane already owns one column
    const bool bf16 = check_inputs(r, w, k, v, u, state_in);
    const c10::cuda::CUDAGuard guard(r.device());
    const int64_t B = r.size(0), T = r.size(1), H = r.size(2), N = r.size(3);
    at::Tensor y = f32_empty({B, T, H, N}, r);
    at::Tensor s_out = f32_empty({B, H, N, N}, r);
    at::Tensor dec = f32_empty({B, T, H, N}, r);  // exp(w)
    at::Tensor ruk = f32_empty({B, T, H}, r);     // r_t . (u k_t)
    raise_if(rwkv_wkv6_cuda_forward(B, T, H, N, r.data_ptr(), w.data_ptr<float>(), k.data_ptr(), v.data_ptr(), bf16,
                                    u.data_ptr<float>(), state_in.data_ptr<float>(), y.data_ptr<float>(),
                                    s_out.data_ptr<float>(), dec.data_ptr<float>(), ruk.data_ptr<float>(),
                                    c10::cuda::getCurrentCUDAStream().stream()),
             "forward");
    return {y, s_out};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> wkv6_backward(
    const at::Tensor& r, const at::Tensor& w, const at::Tensor& k, const at::Tensor& v, const at::Tensor& u,
    const at::Tensor& state_in, const at::Tensor& gy, const at::Tensor& gstate_out, int64_t col_blocks,
    int64_t ckpt_every) {
    (void)col_blocks;
    const bool bf16 = check_inputs(r, w, k, v, u, state_in);
    const int64_t B = r.size(0), T = r.size(1), H = r.size(2), N = r.size(3);
    check_f32(gy, "gy", {B, T, H, N}, r);
    check_f32(gstate_out, "gstate_out", {B, H, N, N}, r);
    TORCH_CHECK(ckpt_every >= 0, "wkv6_cuda: ckpt_every must be >= 0");
    const c10::cuda::CUDAGuard guard(r.device());
    // checkpoints every K steps and one block of K recomputed rows: K ~ sqrt(T) keeps both at O(sqrt(T)) states
    const int64_t K = std::max<int64_t>(
        1, std::min<int64_t>(T, ckpt_every > 0 ? ckpt_every : static_cast<int64_t>(std::ceil(std::sqrt(double(T))))));
    const int64_t nck = (T + K - 1) / K;
    at::Tensor dec = f32_empty({B, T, H, N}, r);
    at::Tensor ruk = f32_empty({B, T, H}, r);
    at::Tensor gyv = f32_empty({B, T, H}, r);
    at::Tensor ckpt = f32_empty({B, H, nck, N, N}, r);
    at::Tensor blk = f32_empty({B, H, K, N, N}, r);
    at::Tensor work = f32_empty({N == 64 ? 0 : 2 * B * H * N * N}, r);  // rows/columns of N != 64 (not in registers)
    at::Tensor gr = f32_empty({B, T, H, N}, r);
    at::Tensor gk = f32_empty({B, T, H, N}, r);
    at::Tensor gw = f32_empty({B, T, H, N}, r);
    at::Tensor gv = f32_empty({B, T, H, N}, r);
    at::Tensor gu_part = f32_empty({B, H, N}, r);
    at::Tensor gs_in = f32_empty({B, H, N, N}, r);
    raise_if(rwkv_wkv6_cuda_backward(B, T, H, N, K, r.data_ptr(), w.data_ptr<float>(), k.data_ptr(), v.data_ptr(),
                                     bf16, u.data_ptr<float>(), state_in.data_ptr<float>(), gy.data_ptr<float>(),
                                     gstate_out.data_ptr<float>(), dec.data_ptr<float>(), ruk.data_ptr<float>(),
                                     gyv.data_ptr<float>(), ckpt.data_ptr<float>(), blk.data_ptr<float>(),
                                     N == 64 ? nullptr : work.data_ptr<float>(), gr.data_ptr<float>(),
                                     gk.data_ptr<float>(), gw.data_ptr<float>(), gv.data_ptr<float>(),
                                     gu_part.data_ptr<float>(), gs_in.data_ptr<float>(),
                                     c10::cuda::getCurrentCUDAStream().stream()),
             "backward");
    // B == 0: the part is empty and the sum is zeros, as it should be
    return {gr, gw, gk, gv, gu_part.sum(0), gs_in};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "RWKV-5/6 WKV operator, CUDA kernel (rwkv-lora)";
    m.def("forward", &wkv6_forward, "WKV-5/6 forward: (r, w, k, v, u, state_in) -> (y, state_out)", py::arg("r"),
          py::arg("w"), py::arg("k"), py::arg("v"), py::arg("u"), py::arg("state_in"), py::arg("col_blocks") = 0);
    m.def("backward", &wkv6_backward,
          "WKV-5/6 backward: (r, w, k, v, u, state_in, gy, gstate_out) -> (gr, gw, gk, gv, gu, gstate_in)",
          py::arg("r"), py::arg("w"), py::arg("k"), py::arg("v"), py::arg("u"), py::arg("state_in"), py::arg("gy"),
          py::arg("gstate_out"), py::arg("col_blocks") = 0, py::arg("ckpt_every") = 0);
}
