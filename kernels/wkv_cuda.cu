// RWKV-4 WKV operator on CUDA: forward and backward, one thread per (batch, channel).
//
// Interface and maths: see finetune/wkv.py and kernels/README.md. This file includes no torch / c10 headers on
// purpose: it exposes plain launchers on raw pointers (and a stream as void*); the binding (wkv_cuda_bind.cpp)
// does the checks, the device guard, the dtype dispatch and the allocations.
//
// Layouts (all contiguous): w, u [C] fp32; k, v, y, gy, gk, gv [B, T, C]; state [B, 3, C] rows a, b, p;
// scratch [B, T, 3, C] fp32 (the state before each step, written by the backward's forward pass);
// gw_part, gu_part [B, C] (summed over B by the binding).
//
// No compile-time T: each thread loops over any T, and the backward keeps the per-step states in the global scratch
// buffer, not in a per-thread array.
//
// The per-thread work is in __host__ __device__ functions so that the exact same code can be run on the CPU
// (build with -DWKV_HOST_SELFTEST, see tests/test_cuda_kernel.py) where there is no GPU.

#include <cstdint>
#include <cmath>
#include <cuda_runtime.h>
#include <cuda_bf16.h>

namespace rwkv_wkv {

#define WKV_HD __host__ __device__ __forceinline__

WKV_HD float load(const float* p, int64_t i) { return p[i]; }
WKV_HD float load(const __nv_bfloat16* p, int64_t i) { return __bfloat162float(p[i]); }

// One (b, c) lane of the forward recurrence, starting from state_in. Writes y (if not null), state_out (if not null)
// and the state *before* each step into scratch (if not null).
template <typename F>
WKV_HD void forward_lane(int64_t T, int64_t C, int64_t b, int64_t c, float w, float u, const F* k, const F* v,
                         const float* s_in, float* y, float* s_out, float* scratch) {
    const int64_t sb = b * 3 * C + c;
    float a = s_in[sb], bb = s_in[sb + C], p = s_in[sb + 2 * C];
    const int64_t base = b * T * C + c;
    for (int64_t t = 0; t < T; ++t) {
        const int64_t i = base + t * C;
        const float kt = load(k, i), vt = load(v, i);
        if (scratch != nullptr) {
            const int64_t j = (b * T + t) * 3 * C + c;
            scratch[j] = a;
            scratch[j + C] = bb;
            scratch[j + 2 * C] = p;
        }
        if (y != nullptr) {
            const float ww = u + kt;
            const float q = fmaxf(p, ww);
            const float e1 = expf(p - q), e2 = expf(ww - q);
            y[i] = (e1 * a + e2 * vt) / (e1 * bb + e2);
        }
        const float ww = p + w;
        const float q = fmaxf(ww, kt);
        const float e1 = expf(ww - q), e2 = expf(kt - q);
        a = e1 * a + e2 * vt;
        bb = e1 * bb + e2;
        p = q;
    }
    if (s_out != nullptr) {
        s_out[sb] = a;
        s_out[sb + C] = bb;
        s_out[sb + 2 * C] = p;
    }
}

// One (b, c) lane of the backward, given the states before each step in scratch (from forward_lane).
// Gradients of the numerator / denominator are kept scaled by e^p (ga = dL/dA * e^p with A = a * e^p), which is
// exactly dL/da; the p row of gstate_out is redundant with a and b and is not read (the autograd wrapper folds it:
// finetune/ops/wkv4.py, fold_state_grad).
template <typename F>
WKV_HD void backward_lane(int64_t T, int64_t C, int64_t b, int64_t c, float w, float u, const F* k, const F* v,
                          const float* s_in, const float* gy, const float* gs_out, const float* scratch, float* gk,
                          float* gv, float* gs_in, float* gw_part, float* gu_part) {
    const int64_t sb = b * 3 * C + c;
    float ga = gs_out[sb], gb = gs_out[sb + C];
    float gw = 0.f, gu = 0.f;
    const int64_t base = b * T * C + c;
    for (int64_t t = T - 1; t >= 0; --t) {
        const int64_t i = base + t * C;
        const int64_t j = (b * T + t) * 3 * C + c;
        const float kt = load(k, i), vt = load(v, i), g = gy[i];
        const float a = scratch[j], bb = scratch[j + C], p = scratch[j + 2 * C];
        // state update a' = e1u a + e2u v, b' = e1u b + e2u (scaled to the new max pt)
        const float wp = p + w;
        const float pt = fmaxf(wp, kt);
        const float e1u = expf(wp - pt), e2u = expf(kt - pt);
        gw += e1u * (a * ga + bb * gb);
        float gvt = e2u * ga;
        float gkt = e2u * (vt * ga + gb);
        ga *= e1u;
        gb *= e1u;
        // output y_t = (e1 a + e2 v) / (e1 b + e2)
        const float uk = u + kt;
        const float q = fmaxf(p, uk);
        const float e1 = expf(p - q), e2 = expf(uk - q);
        const float inv = 1.f / (e1 * bb + e2);
        const float yt = (e1 * a + e2 * vt) * inv;
        const float g1 = g * e1 * inv;
        ga += g1;
        gb -= g1 * yt;
        const float g2 = g * e2 * inv;
        gvt += g2;
        const float guk = g2 * (vt - yt);
        gu += guk;
        gkt += guk;
        gk[i] = gkt;
        gv[i] = gvt;
    }
    const float a0 = s_in[sb], b0 = s_in[sb + C];
    gs_in[sb] = ga;
    gs_in[sb + C] = gb;
    gs_in[sb + 2 * C] = ga * a0 + gb * b0;
    gw_part[b * C + c] = gw;
    gu_part[b * C + c] = gu;
}

template <typename F>
__global__ void forward_kernel(int64_t B, int64_t T, int64_t C, const float* __restrict__ w,
                               const float* __restrict__ u, const F* __restrict__ k, const F* __restrict__ v,
                               const float* __restrict__ s_in, float* __restrict__ y, float* __restrict__ s_out) {
    const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (idx >= B * C) return;
    const int64_t b = idx / C, c = idx % C;
    forward_lane<F>(T, C, b, c, w[c], u[c], k, v, s_in, y, s_out, nullptr);
}

template <typename F>
__global__ void backward_kernel(int64_t B, int64_t T, int64_t C, const float* __restrict__ w,
                                const float* __restrict__ u, const F* __restrict__ k, const F* __restrict__ v,
                                const float* __restrict__ s_in, const float* __restrict__ gy,
                                const float* __restrict__ gs_out, float* scratch, float* __restrict__ gk,
                                float* __restrict__ gv, float* __restrict__ gs_in, float* __restrict__ gw_part,
                                float* __restrict__ gu_part) {
    const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (idx >= B * C) return;
    const int64_t b = idx / C, c = idx % C;
    const float wc = w[c], uc = u[c];
    // each thread only reads back the scratch entries it wrote itself: no synchronisation needed
    forward_lane<F>(T, C, b, c, wc, uc, k, v, s_in, nullptr, nullptr, scratch);
    backward_lane<F>(T, C, b, c, wc, uc, k, v, s_in, gy, gs_out, scratch, gk, gv, gs_in, gw_part, gu_part);
}

constexpr int kThreads = 64;  // small blocks: B*C is often only a few thousand lanes, spread them over the SMs

inline unsigned blocks_for(int64_t n) { return static_cast<unsigned>((n + kThreads - 1) / kThreads); }

inline const char* last_error() {
    const cudaError_t err = cudaGetLastError();
    return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace rwkv_wkv

// Launchers: return nullptr on success, else the CUDA error string. k and v share one dtype: fp32, or bf16 when
// `bf16` is true. Nothing is launched when B*C == 0; T == 0 still writes state_out = state_in (and gstate_in).

const char* rwkv_wkv_cuda_forward(int64_t B, int64_t T, int64_t C, const float* w, const float* u, const void* k,
                                  const void* v, bool bf16, const float* s_in, float* y, float* s_out,
                                  void* stream) {
    using namespace rwkv_wkv;
    if (B * C == 0) return nullptr;
    const cudaStream_t s = static_cast<cudaStream_t>(stream);
    if (bf16) {
        forward_kernel<__nv_bfloat16><<<blocks_for(B * C), kThreads, 0, s>>>(
            B, T, C, w, u, static_cast<const __nv_bfloat16*>(k), static_cast<const __nv_bfloat16*>(v), s_in, y, s_out);
    } else {
        forward_kernel<float><<<blocks_for(B * C), kThreads, 0, s>>>(
            B, T, C, w, u, static_cast<const float*>(k), static_cast<const float*>(v), s_in, y, s_out);
    }
    return last_error();
}

const char* rwkv_wkv_cuda_backward(int64_t B, int64_t T, int64_t C, const float* w, const float* u, const void* k,
                                   const void* v, bool bf16, const float* s_in, const float* gy, const float* gs_out,
                                   float* scratch, float* gk, float* gv, float* gs_in, float* gw_part,
                                   float* gu_part, void* stream) {
    using namespace rwkv_wkv;
    if (B * C == 0) return nullptr;
    const cudaStream_t s = static_cast<cudaStream_t>(stream);
    if (bf16) {
        backward_kernel<__nv_bfloat16><<<blocks_for(B * C), kThreads, 0, s>>>(
            B, T, C, w, u, static_cast<const __nv_bfloat16*>(k), static_cast<const __nv_bfloat16*>(v), s_in, gy,
            gs_out, scratch, gk, gv, gs_in, gw_part, gu_part);
    } else {
        backward_kernel<float><<<blocks_for(B * C), kThreads, 0, s>>>(
            B, T, C, w, u, static_cast<const float*>(k), static_cast<const float*>(v), s_in, gy, gs_out, scratch, gk,
            gv, gs_in, gw_part, gu_part);
    }
    return last_error();
}

#ifdef WKV_HOST_SELFTEST
// The same lanes run on the CPU, for checking the maths without a GPU. bf16 inputs are passed as raw uint16 bits.
extern "C" void rwkv_wkv_host_forward(int64_t B, int64_t T, int64_t C, const float* w, const float* u,
                                      const void* k, const void* v, int bf16, const float* s_in, float* y,
                                      float* s_out) {
    using namespace rwkv_wkv;
    for (int64_t idx = 0; idx < B * C; ++idx) {
        const int64_t b = idx / C, c = idx % C;
        if (bf16) {
            forward_lane<__nv_bfloat16>(T, C, b, c, w[c], u[c], static_cast<const __nv_bfloat16*>(k),
                                        static_cast<const __nv_bfloat16*>(v), s_in, y, s_out, nullptr);
        } else {
            forward_lane<float>(T, C, b, c, w[c], u[c], static_cast<const float*>(k), static_cast<const float*>(v),
                                s_in, y, s_out, nullptr);
        }
    }
}

extern "C" void rwkv_wkv_host_backward(int64_t B, int64_t T, int64_t C, const float* w, const float* u,
                                       const void* k, const void* v, int bf16, const float* s_in, const float* gy,
                                       const float* gs_out, float* scratch, float* gk, float* gv, float* gs_in,
                                       float* gw_part, float* gu_part) {
    using namespace rwkv_wkv;
    for (int64_t idx = 0; idx < B * C; ++idx) {
        const int64_t b = idx / C, c = idx % C;
        if (bf16) {
            const auto* kk = static_cast<const __nv_bfloat16*>(k);
            const auto* vv = static_cast<const __nv_bfloat16*>(v);
            forward_lane<__nv_bfloat16>(T, C, b, c, w[c], u[c], kk, vv, s_in, nullptr, nullptr, scratch);
            backward_lane<__nv_bfloat16>(T, C, b, c, w[c], u[c], kk, vv, s_in, gy, gs_out, scratch, gk, gv, gs_in,
                                         gw_part, gu_part);
        } else {
            const auto* kk = static_cast<const float*>(k);
            const auto* vv = static_cast<const float*>(v);
            forward_lane<float>(T, C, b, c, w[c], u[c], kk, vv, s_in, nullptr, nullptr, scratch);
            backward_lane<float>(T, C, b, c, w[c], u[c], kk, vv, s_in, gy, gs_out, scratch, gk, gv, gs_in, gw_part,
                                 gu_part);
        }
    }
}
#endif
