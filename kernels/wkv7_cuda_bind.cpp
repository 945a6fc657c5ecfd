// Python binding of the CUDA WKV-7 kernel (kernels/wkv7_cuda.cu): argument checks, device guard, stream, dtype flags
// and allocations. Same interface as the CPU extension (see finetune/ops/wkv7.py):
//   forward(r, w, k, v, a, b [B,T,H,N], state_in [B,H,N,N] fp32, save)
//       -> (y [B,T,H,N] fp32, state_out [B,H,N,N] fp32, ckpt [B,H,ceil(T/K),N,N] fp32, sa [B,T,H,N] fp32)
//   backward(r, w, k, v, a, b, ckpt, sa, gy [B,T,H,N] fp32, gstate_out [B,H,N,N] fp32)
//       -> (gr, gw, gk, gv, ga, gb [B,T,H,N] in the dtype of their input, gstate_in [B,H,N,N] fp32)
//   checkpoint_interval() -> K
// r, k, v, a, b share one dtype (fp32 or bf16); w has that dtype or fp32. N must be 64 (the build's head size).
// Set RWKV_LORA_WKV_POISON=1 to pre-fill every output (and the backward's scratch) with NaN: a debug check that the
// kernel writes everything it returns and reads nothing it did not write.

#include "torch_ext.h"  // ATen and pybind11, not the whole C++ frontend
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdlib>
#include <limits>
#include <vector>

int rwkv_wkv7_cuda_checkpoint_interval();
int rwkv_wkv7_cuda_head_size();
const char* rwkv_wkv7_cuda_forward(int64_t B, int64_t T, int64_t H, int64_t N, const void* r, const void* w,
                                   const void* k, const void* v, const void* a, const void* b, bool bf16,
                                   bool w_bf16, const float* s_in, float* y, float* s_out, float* ckpt, float* sa,
                                   void* stream);
const char* rwkv_wkv7_cuda_backward(int64_t B, int64_t T, int64_t H, int64_t N, const void* r, const void* w,
                                    const void* k, const void* v, const void* a, const void* b, bool bf16,
                                    bool w_bf16, const float* ckpt, const float* sa, const float* gy,
                                    const float* gs_out, float* scratch, void* gr, void* gw, void* gk, void* gv,
                                    void* ga, void* gb, float* gs_in, void* stream);

namespace {

bool poison() {
    const char* env = std::getenv("RWKV_LORA_WKV_POISON");
    return env != nullptr && env[0] != '\0' && env[0] != '0';
}

at::Tensor out_empty(const at::Tensor& like, at::IntArrayRef shape, const at::TensorOptions& options) {
    at::Tensor t = like.new_empty(shape, options);
    if (poison()) t.fill_(std::numeric_limits<float>::quiet_NaN());
    return t;
}

void check_f32(const at::Tensor& t, const char* name, at::IntArrayRef shape, const at::Tensor& r) {
    TORCH_CHECK(t.device() == r.device(), "wkv7_cuda: ", name, " is on ", t.device(), ", r on ", r.device());
    TORCH_CHECK(t.scalar_type() == at::kFloat, "wkv7_cuda: ", name, " must be float32, got ", t.scalar_type());
    TORCH_CHECK(t.is_contiguous(), "wkv7_cuda: ", name, " must be contiguous");
    TORCH_CHECK(t.sizes() == shape, "wkv7_cuda: ", name, " has shape ", t.sizes(), ", expected ", shape);
}

struct Dims {
    int64_t B, T, H, N;
    bool bf16, w_bf16;
};

// checks r, w, k, v, a, b; returns the sizes and the dtype flags
Dims check_inputs(const std::vector<at::Tensor>& x) {
    const at::Tensor& r = x[0];
    TORCH_CHECK(r.is_cuda(), "wkv7_cuda: r must be a CUDA tensor");
    TORCH_CHECK(r.dim() == 4, "wkv7_cuda: r must be [B, T, H, N], got ", r.sizes());
    const char* names[] = {"r", "w", "k", "v", "a", "b"};
    for (size_t n = 0; n < x.size(); ++n) {
        TORCH_CHECK(x[n].device() == r.device(), "wkv7_cuda: ", names[n], " is on ", x[n].device(), ", r on ",
                    r.device());
        TORCH_CHECK(x[n].is_contiguous(), "wkv7_cuda: ", names[n], " must be contiguous");
        TORCH_CHECK(x[n].sizes() == r.sizes(), "wkv7_cuda: ", names[n], " has shape ", x[n].sizes(), ", r ",
                    r.sizes());
        if (n != 1)
            TORCH_CHECK(x[n].scalar_type() == r.scalar_type(), "wkv7_cuda: r, k, v, a, b must share one dtype; ",
                        names[n], " is ", x[n].scalar_type(), ", r ", r.scalar_type());
    }
    TORCH_CHECK(r.scalar_type() == at::kFloat || r.scalar_type() == at::kBFloat16,
                "wkv7_cuda: r, k, v, a, b must be float32 or bfloat16, got ", r.scalar_type());
    TORCH_CHECK(x[1].scalar_type() == r.scalar_type() || x[1].scalar_type() == at::kFloat,
                "wkv7_cuda: w must be float32 or the dtype of r, got ", x[1].scalar_type());
    const int64_t N = r.size(3);
    TORCH_CHECK(N == rwkv_wkv7_cuda_head_size(), "wkv7_cuda: head size ", N, " is not supported (this build: ",
                rwkv_wkv7_cuda_head_size(), ")");
    return {r.size(0), r.size(1), r.size(2), N, r.scalar_type() == at::kBFloat16,
            x[1].scalar_type() == at::kBFloat16};
}

void raise_if(const char* err, const char* what) {
    TORCH_CHECK(err == nullptr, "wkv7_cuda: ", what, " failed: ", err);
}

}  // namespace

std::vector<at::Tensor> wkv7_forward(const at::Tensor& r, const at::Tensor& w, const at::Tensor& k,
                                     const at::Tensor& v, const at::Tensor& a, const at::Tensor& b,
                                     const at::Tensor& state_in, bool save) {
    const Dims d = check_inputs({r, w, k, v, a, b});
    check_f32(state_in, "state_in", {d.B, d.H, d.N, d.N}, r);
    const c10::cuda::CUDAGuard guard(r.device());
    const int64_t K = rwkv_wkv7_cuda_checkpoint_interval(), nck = (d.T + K - 1) / K;
    const auto f32 = r.options().dtype(at::kFloat);
    at::Tensor y = out_empty(r, {d.B, d.T, d.H, d.N}, f32);
    at::Tensor s_out = out_empty(r, {d.B, d.H, d.N, d.N}, f32);
    at::Tensor ckpt = save ? out_empty(r, {d.B, d.H, nck, d.N, d.N}, f32) : r.new_empty({0}, f32);
    at::Tensor sa = save ? out_empty(r, {d.B, d.T, d.H, d.N}, f32) : r.new_empty({0}, f32);
    raise_if(rwkv_wkv7_cuda_forward(d.B, d.T, d.H, d.N, r.data_ptr(), w.data_ptr(), k.data_ptr(), v.data_ptr(),
                                    a.data_ptr(), b.data_ptr(), d.bf16, d.w_bf16, state_in.data_ptr<float>(),
                                    y.data_ptr<float>(), s_out.data_ptr<float>(),
                                    save ? ckpt.data_ptr<float>() : nullptr, save ? sa.data_ptr<float>() : nullptr,
                                    c10::cuda::getCurrentCUDAStream().stream()),
             "forward launch");
    return {y, s_out, ckpt, sa};
}

std::vector<at::Tensor> wkv7_backward(const at::Tensor& r, const at::Tensor& w, const at::Tensor& k,
                                      const at::Tensor& v, const at::Tensor& a, const at::Tensor& b,
                                      const at::Tensor& ckpt, const at::Tensor& sa, const at::Tensor& gy,
                                      const at::Tensor& gstate_out) {
    const Dims d = check_inputs({r, w, k, v, a, b});
    const int64_t K = rwkv_wkv7_cuda_checkpoint_interval(), nck = (d.T + K - 1) / K;
    check_f32(ckpt, "ckpt", {d.B, d.H, nck, d.N, d.N}, r);
    check_f32(sa, "sa", {d.B, d.T, d.H, d.N}, r);
    check_f32(gy, "gy", {d.B, d.T, d.H, d.N}, r);
    check_f32(gstate_out, "gstate_out", {d.B, d.H, d.N, d.N}, r);
    const c10::cuda::CUDAGuard guard(r.device());
    // the states of one block of K steps per (batch, head), recomputed by the kernel; freed on return
    at::Tensor scratch = out_empty(r, {d.B * d.H, K, d.N, d.N}, r.options().dtype(at::kFloat));
    at::Tensor gr = out_empty(r, r.sizes(), r.options()), gw = out_empty(w, w.sizes(), w.options()),
               gk = out_empty(k, k.sizes(), k.options()), gv = out_empty(v, v.sizes(), v.options()),
               ga = out_empty(a, a.sizes(), a.options()), gb = out_empty(b, b.sizes(), b.options());
    at::Tensor gs_in = out_empty(r, {d.B, d.H, d.N, d.N}, r.options().dtype(at::kFloat));
    raise_if(rwkv_wkv7_cuda_backward(d.B, d.T, d.H, d.N, r.data_ptr(), w.data_ptr(), k.data_ptr(), v.data_ptr(),
                                     a.data_ptr(), b.data_ptr(), d.bf16, d.w_bf16, ckpt.data_ptr<float>(),
                                     sa.data_ptr<float>(), gy.data_ptr<float>(), gstate_out.data_ptr<float>(),
                                     scratch.data_ptr<float>(), gr.data_ptr(), gw.data_ptr(), gk.data_ptr(),
                                     gv.data_ptr(), ga.data_ptr(), gb.data_ptr(), gs_in.data_ptr<float>(),
                                     c10::cuda::getCurrentCUDAStream().stream()),
             "backward launch");
    return {gr, gw, gk, gv, ga, gb, gs_in};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "RWKV-7 WKV operator, CUDA kernel (rwkv-lora)";
    m.def("forward", &wkv7_forward, "WKV-7 forward: (r, w, k, v, a, b, state_in, save) -> (y, state_out, ckpt, sa)",
          py::arg("r"), py::arg("w"), py::arg("k"), py::arg("v"), py::arg("a"), py::arg("b"), py::arg("state_in"),
          py::arg("save"));
    m.def("backward", &wkv7_backward,
          "WKV-7 backward: (r, w, k, v, a, b, ckpt, sa, gy, gstate_out) -> (gr, gw, gk, gv, ga, gb, gstate_in)",
          py::arg("r"), py::arg("w"), py::arg("k"), py::arg("v"), py::arg("a"), py::arg("b"), py::arg("ckpt"),
          py::arg("sa"), py::arg("gy"), py::arg("gstate_out"));
    m.def("checkpoint_interval", &rwkv_wkv7_cuda_checkpoint_interval, "steps between two saved states (K)");
}
