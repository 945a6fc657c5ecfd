// RWKV-5.2 / RWKV-6 WKV operator on CUDA: forward and backward.
//
// Maths and interface: see finetune/ops/wkv6.py and kernels/README.md. Per head, S [N, N] (row i = key index,
// column j = value index), d_t = exp(w_t):
//     y_t[j] = sum_i r_t[i] (u[i] k_t[i] v_t[j] + S_{t-1}[i][j]),    S_t[i][j] = k_t[i] v_t[j] + d_t[i] S_{t-1}[i][j]
// Backward (G_t = dL/dS_t, G_T = gstate_out):
//     gr_t[i] = sum_j S_{t-1}[i][j] gy_t[j] + u[i] k_t[i] (gy_t . v_t)
//     gk_t[i] = sum_j G_t[i][j] v_t[j] + r_t[i] u[i] (gy_t . v_t)
//     gv_t[j] = sum_i G_t[i][j] k_t[i] + (r_t . u k_t) gy_t[j]
//     gw_t[i] = d_t[i] sum_j G_t[i][j] S_{t-1}[i][j]
//     gu[i] += r_t[i] k_t[i] (gy_t . v_t)
//     G_{t-1}[i][j] = d_t[i] G_t[i][j] + r_t[i] gy_t[j]
//
// Like wkv_cuda.cu this file includes no torch header: plain launchers on raw pointers, the binding
// (wkv6_cuda_bind.cpp) does the checks, the device guard, the allocations. Every thread is an independent "lane"
// that reads what the others share (r_t, k_t, ... of its head) straight from global memory (the lanes of a warp read
// the same address: one broadcast transaction), so there is no shared memory and no __syncthreads, and the lanes are
// __host__ __device__ functions that a CPU build (-DWKV_HOST_SELFTEST, tests/test_wkv6_cuda.py) runs one after the
// other to check the maths without a GPU.
//
// Kernels (all lanes over B*H*N except prep):
//   prep     lane (b, t, h): dec = exp(w) [B,T,H,N], ruk = r_t . (u k_t) [B,T,H], gyv = gy_t . v_t [B,T,H] (backward)
//   forward  lane (b, h, j): owns column j of S (N registers); writes y and state_out.
//   column   lane (b, h, j): owns column j of G, walks t backwards: gv.
//   row      lane (b, h, i): owns row i of S, walks t forwards: gr, and a checkpoint of its row every K steps; then
//            owns row i of G and walks backwards one block of K steps at a time, recomputing the block's rows of S
//            from the checkpoint into a block buffer: gk, gw, gu, gstate_in.
// Nothing is sized by T at compile time. Scratch (allocated by the binding): dec (as big as w), checkpoints
// [B,H,ceil(T/K),N,N] and the block buffer [B,H,K,N,N]; with K ~ sqrt(T) both are O(sqrt(T) * B*H*N*N), never T*N*N.
// N = 64 (every published model) keeps each lane's row/column in registers; any other N runs the same code with the
// row/column in a global work buffer [2,B,H,N,N].

#include <cstdint>
#include <cmath>
#include <cuda_runtime.h>
#include <cuda_bf16.h>

namespace rwkv_wkv6 {

#define WKV_HD __host__ __device__ __forceinline__

WKV_HD float load(const float* p, int64_t i) { return p[i]; }
WKV_HD float load(const __nv_bfloat16* p, int64_t i) { return __bfloat162float(p[i]); }

struct Dims {
    int64_t B, T, H, N;
    WKV_HD int64_t at(int64_t b, int64_t t, int64_t h) const { return ((b * T + t) * H + h) * N; }  // [B,T,H,N]
    WKV_HD int64_t bth(int64_t b, int64_t t, int64_t h) const { return (b * T + t) * H + h; }       // [B,T,H]
    WKV_HD int64_t state(int64_t b, int64_t h) const { return (b * H + h) * N * N; }                // [B,H,N,N]
};

// A lane's row or column of N floats: in registers when N is the compile-time NT (fully unrolled loops index it
// with constants), else in global memory at p with the given stride.
template <int NT>
struct Vec {
    float x[NT];
    WKV_HD Vec(float*, int64_t) {}
    WKV_HD float& operator[](int64_t i) { return x[i]; }
};
template <>
struct Vec<0> {
    float* p;
    int64_t stride;
    WKV_HD Vec(float* p_, int64_t s) : p(p_), stride(s) {}
    WKV_HD float& operator[](int64_t i) { return p[i * stride]; }
};

// the trip count of a loop over N: a constant when NT > 0, so that the loop unrolls and Vec stays in registers
template <int NT>
WKV_HD int64_t len(const Dims& D) { return NT > 0 ? NT : D.N; }

// ---------------------------------------------------------------------------------------------------------------------
// prep: one lane per (b, t, h)

template <typename F>
WKV_HD void prep_lane(const Dims& D, int64_t b, int64_t t, int64_t h, const F* r, const float* w, const F* k,
                      const F* v, const float* u, const float* gy, float* dec, float* ruk, float* gyv) {
    const int64_t o = D.at(b, t, h);
    float a = 0.f, g = 0.f;
    for (int64_t i = 0; i < D.N; ++i) {
        dec[o + i] = expf(w[o + i]);  // IEEE expf: exp(-inf) = 0, no fast-math anywhere in this file
        a += load(r, o + i) * u[h * D.N + i] * load(k, o + i);
        if (gy != nullptr) g += gy[o + i] * load(v, o + i);
    }
    ruk[D.bth(b, t, h)] = a;
    if (gy != nullptr) gyv[D.bth(b, t, h)] = g;
}

// ---------------------------------------------------------------------------------------------------------------------
// forward: lane (b, h, j) owns column j of S. work: where the column lives when NT == 0 (the lane's column of s_out).

template <int NT, typename F>
WKV_HD void forward_lane(const Dims& D, int64_t b, int64_t h, int64_t j, const F* r, const F* k, const F* v,
                         const float* dec, const float* ruk, const float* s_in, float* y, float* s_out) {
    const int64_t n = len<NT>(D), so = D.state(b, h) + j;
    Vec<NT> S(s_out + so, D.N);
#pragma unroll
    for (int64_t i = 0; i < n; ++i) S[i] = s_in[so + i * D.N];
    for (int64_t t = 0; t < D.T; ++t) {
        const int64_t o = D.at(b, t, h);
        const float vj = load(v, o + j);
        // four partial sums: one chain of N dependent FMAs would wait on the FMA latency at every key
        float a0 = ruk[D.bth(b, t, h)] * vj, a1 = 0.f, a2 = 0.f, a3 = 0.f;
#pragma unroll
        for (int64_t i = 0; i < n; ++i) {
            const float s = S[i];
            const float p = load(r, o + i) * s;
            if (i % 4 == 0) a0 += p; else if (i % 4 == 1) a1 += p; else if (i % 4 == 2) a2 += p; else a3 += p;
            S[i] = dec[o + i] * s + load(k, o + i) * vj;
        }
        y[o + j] = (a0 + a1) + (a2 + a3);
    }
#pragma unroll
    for (int64_t i = 0; i < n; ++i) s_out[so + i * D.N] = S[i];
}

// ---------------------------------------------------------------------------------------------------------------------
// column: lane (b, h, j) owns column j of G and walks backwards: gv. work: [B,H,N,N] (NT == 0 only).

template <int NT, typename F>
WKV_HD void column_lane(const Dims& D, int64_t b, int64_t h, int64_t j, const F* r, const F* k, const float* dec,
                        const float* ruk, const float* gy, const float* gs_out, float* work, float* gv) {
    const int64_t n = len<NT>(D), so = D.state(b, h) + j;
    Vec<NT> G(work + so, D.N);
#pragma unroll
    for (int64_t i = 0; i < n; ++i) G[i] = gs_out[so + i * D.N];
    for (int64_t t = D.T - 1; t >= 0; --t) {
        const int64_t o = D.at(b, t, h);
        const float gj = gy[o + j];
        float a0 = ruk[D.bth(b, t, h)] * gj, a1 = 0.f, a2 = 0.f, a3 = 0.f;
#pragma unroll
        for (int64_t i = 0; i < n; ++i) {
            const float g = G[i];
            const float p = g * load(k, o + i);
            if (i % 4 == 0) a0 += p; else if (i % 4 == 1) a1 += p; else if (i % 4 == 2) a2 += p; else a3 += p;
            G[i] = dec[o + i] * g + load(r, o + i) * gj;
        }
        gv[o + j] = (a0 + a1) + (a2 + a3);
    }
}

// ---------------------------------------------------------------------------------------------------------------------
// row: lane (b, h, i) owns row i of S, then of G. ckpt [B,H,nck,N,N] and blk [B,H,K,N,N] hold rows transposed
// ([.., j, i]: the lanes of a warp, consecutive i, touch consecutive addresses). work: [B,H,N,N] (NT == 0 only) for
// the S row; the G row then lives in gs_in itself.

template <int NT, typename F>
WKV_HD void row_lane(const Dims& D, int64_t K, int64_t b, int64_t h, int64_t i, const F* r, const F* k, const F* v,
                     const float* dec, const float* gyv, const float* u, const float* s_in, const float* gy,
                     const float* gs_out, float* ckpt, float* blk, float* work, float* gr, float* gk, float* gw,
                     float* gu_part, float* gs_in) {
    const int64_t n = len<NT>(D), N = D.N, T = D.T, bh = b * D.H + h, row = D.state(b, h) + i * N;
    const int64_t nck = (T + K - 1) / K;
    const float ui = u[h * N + i];
    float* ck = ckpt + bh * nck * N * N + i;  // + (c * N + j) * N
    float* bk = blk + bh * K * N * N + i;     // + (m * N + j) * N
    Vec<NT> S(work + row, 1);
#pragma unroll
    for (int64_t j = 0; j < n; ++j) S[j] = s_in[row + j];
    // forwards: gr, and the row at the start of every block
    for (int64_t t = 0; t < T; ++t) {
        const int64_t o = D.at(b, t, h);
        if (t % K == 0) {
#pragma unroll
            for (int64_t j = 0; j < n; ++j) ck[((t / K) * N + j) * N] = S[j];
        }
        const float ki = load(k, o + i), di = dec[o + i];
        float a0 = ui * ki * gyv[D.bth(b, t, h)], a1 = 0.f;
#pragma unroll
        for (int64_t j = 0; j < n; ++j) {
            const float s = S[j];
            if (j % 2 == 0) a0 += s * gy[o + j]; else a1 += s * gy[o + j];
            S[j] = di * s + ki * load(v, o + j);
        }
        gr[o + i] = a0 + a1;
    }
    // backwards, one block of K steps at a time
    Vec<NT> G(gs_in + row, 1);
#pragma unroll
    for (int64_t j = 0; j < n; ++j) G[j] = gs_out[row + j];
    float gu = 0.f;
    for (int64_t c = nck - 1; c >= 0; --c) {
        const int64_t t0 = c * K, t1 = t0 + K < T ? t0 + K : T;
#pragma unroll
        for (int64_t j = 0; j < n; ++j) S[j] = ck[(c * N + j) * N];
        for (int64_t t = t0; t < t1; ++t) {  // blk[m] = the row of S_{t0+m-1}
            const int64_t o = D.at(b, t, h), m = t - t0;
            const float ki = load(k, o + i), di = dec[o + i];
#pragma unroll
            for (int64_t j = 0; j < n; ++j) {
                bk[(m * N + j) * N] = S[j];
                S[j] = di * S[j] + ki * load(v, o + j);
            }
        }
        for (int64_t t = t1 - 1; t >= t0; --t) {
            const int64_t o = D.at(b, t, h), m = t - t0;
            const float ri = load(r, o + i), ki = load(k, o + i), di = dec[o + i], gv = gyv[D.bth(b, t, h)];
            float ak0 = ri * ui * gv, ak1 = 0.f, aw0 = 0.f, aw1 = 0.f;
#pragma unroll
            for (int64_t j = 0; j < n; ++j) {
                const float g = G[j], s = bk[(m * N + j) * N];
                if (j % 2 == 0) {
                    ak0 += g * load(v, o + j);
                    aw0 += g * s;
                } else {
                    ak1 += g * load(v, o + j);
                    aw1 += g * s;
                }
                G[j] = di * g + ri * gy[o + j];
            }
            gk[o + i] = ak0 + ak1;
            gw[o + i] = di * (aw0 + aw1);
            gu += ri * ki * gv;
        }
    }
    if (NT > 0) {
#pragma unroll
        for (int64_t j = 0; j < n; ++j) gs_in[row + j] = G[j];
    }
    gu_part[bh * N + i] = gu;
}

// ---------------------------------------------------------------------------------------------------------------------
// Kernels: one thread per lane, a bounds check, any B, T, H, N.

constexpr int kThreads = 64;  // small blocks: B*H*N is often only a few thousand lanes, spread them over the SMs

template <typename F>
__global__ void prep_kernel(Dims D, const F* r, const float* w, const F* k, const F* v, const float* u,
                            const float* gy, float* dec, float* ruk, float* gyv) {
    const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (idx >= D.B * D.T * D.H) return;
    prep_lane<F>(D, idx / (D.T * D.H), (idx / D.H) % D.T, idx % D.H, r, w, k, v, u, gy, dec, ruk, gyv);
}

template <int NT, typename F>
__global__ void forward_kernel(Dims D, const F* r, const F* k, const F* v, const float* dec, const float* ruk,
                               const float* s_in, float* y, float* s_out) {
    const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (idx >= D.B * D.H * D.N) return;
    const int64_t bh = idx / D.N;
    forward_lane<NT, F>(D, bh / D.H, bh % D.H, idx % D.N, r, k, v, dec, ruk, s_in, y, s_out);
}

template <int NT, typename F>
__global__ void column_kernel(Dims D, const F* r, const F* k, const float* dec, const float* ruk, const float* gy,
                              const float* gs_out, float* work, float* gv) {
    const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (idx >= D.B * D.H * D.N) return;
    const int64_t bh = idx / D.N;
    column_lane<NT, F>(D, bh / D.H, bh % D.H, idx % D.N, r, k, dec, ruk, gy, gs_out, work, gv);
}

template <int NT, typename F>
__global__ void row_kernel(Dims D, int64_t K, const F* r, const F* k, const F* v, const float* dec, const float* gyv,
                           const float* u, const float* s_in, const float* gy, const float* gs_out, float* ckpt,
                           float* blk, float* work, float* gr, float* gk, float* gw, float* gu_part, float* gs_in) {
    const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (idx >= D.B * D.H * D.N) return;
    const int64_t bh = idx / D.N;
    row_lane<NT, F>(D, K, bh / D.H, bh % D.H, idx % D.N, r, k, v, dec, gyv, u, s_in, gy, gs_out, ckpt, blk, work, gr,
                    gk, gw, gu_part, gs_in);
}

inline unsigned blocks_for(int64_t n) { return static_cast<unsigned>((n + kThreads - 1) / kThreads); }

inline const char* last_error() {
    const cudaError_t err = cudaGetLastError();
    return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

template <typename F>
void forward_all(const Dims& D, cudaStream_t s, const F* r, const float* w, const F* k, const F* v, const float* u,
                 const float* s_in, float* y, float* s_out, float* dec, float* ruk) {
    if (D.B * D.T * D.H > 0)
        prep_kernel<F><<<blocks_for(D.B * D.T * D.H), kThreads, 0, s>>>(D, r, w, k, v, u, nullptr, dec, ruk, nullptr);
    const unsigned g = blocks_for(D.B * D.H * D.N);
    if (D.N == 64)
        forward_kernel<64, F><<<g, kThreads, 0, s>>>(D, r, k, v, dec, ruk, s_in, y, s_out);
    else
        forward_kernel<0, F><<<g, kThreads, 0, s>>>(D, r, k, v, dec, ruk, s_in, y, s_out);
}

template <typename F>
void backward_all(const Dims& D, int64_t K, cudaStream_t s, const F* r, const float* w, const F* k, const F* v,
                  const float* u, const float* s_in, const float* gy, const float* gs_out, float* dec, float* ruk,
                  float* gyv, float* ckpt, float* blk, float* work, float* gr, float* gk, float* gw, float* gv,
                  float* gu_part, float* gs_in) {
    if (D.B * D.T * D.H > 0)
        prep_kernel<F><<<blocks_for(D.B * D.T * D.H), kThreads, 0, s>>>(D, r, w, k, v, u, gy, dec, ruk, gyv);
    const unsigned g = blocks_for(D.B * D.H * D.N);
    float* work_row = work;
    float* work_col = work == nullptr ? nullptr : work + D.B * D.H * D.N * D.N;
    if (D.N == 64) {
        column_kernel<64, F><<<g, kThreads, 0, s>>>(D, r, k, dec, ruk, gy, gs_out, work_col, gv);
        row_kernel<64, F><<<g, kThreads, 0, s>>>(D, K, r, k, v, dec, gyv, u, s_in, gy, gs_out, ckpt, blk, work_row,
                                                 gr, gk, gw, gu_part, gs_in);
    } else {
        column_kernel<0, F><<<g, kThreads, 0, s>>>(D, r, k, dec, ruk, gy, gs_out, work_col, gv);
        row_kernel<0, F><<<g, kThreads, 0, s>>>(D, K, r, k, v, dec, gyv, u, s_in, gy, gs_out, ckpt, blk, work_row, gr,
                                                gk, gw, gu_part, gs_in);
    }
}

}  // namespace rwkv_wkv6

// Launchers: nullptr on success, else the CUDA error string. r, k, v share one dtype: fp32, or bf16 when `bf16`.
// Scratch sizes (fp32, allocated by the caller): dec [B,T,H,N]; ruk, gyv [B,T,H]; ckpt [B,H,ceil(T/K),N,N];
// blk [B,H,K,N,N]; work [2,B,H,N,N] when N != 64 (else unused, may be null). Nothing is launched when B*H*N == 0.

const char* rwkv_wkv6_cuda_forward(int64_t B, int64_t T, int64_t H, int64_t N, const void* r, const float* w,
                                   const void* k, const void* v, bool bf16, const float* u, const float* s_in, float* y,
                                   float* s_out, float* dec, float* ruk, void* stream) {
    using namespace rwkv_wkv6;
    if (B * H * N == 0) return nullptr;
    const Dims D{B, T, H, N};
    const cudaStream_t s = static_cast<cudaStream_t>(stream);
    if (bf16) {
        using F = __nv_bfloat16;
        forward_all<F>(D, s, static_cast<const F*>(r), w, static_cast<const F*>(k), static_cast<const F*>(v), u, s_in,
                       y, s_out, dec, ruk);
    } else {
        forward_all<float>(D, s, static_cast<const float*>(r), w, static_cast<const float*>(k),
                           static_cast<const float*>(v), u, s_in, y, s_out, dec, ruk);
    }
    return last_error();
}

const char* rwkv_wkv6_cuda_backward(int64_t B, int64_t T, int64_t H, int64_t N, int64_t K, const void* r,
                                    const float* w, const void* k, const void* v, bool bf16, const float* u,
                                    const float* s_in, const float* gy, const float* gs_out, float* dec, float* ruk,
                                    float* gyv, float* ckpt, float* blk, float* work, float* gr, float* gk, float* gw,
                                    float* gv, float* gu_part, float* gs_in, void* stream) {
    using namespace rwkv_wkv6;
    if (B * H * N == 0) return nullptr;
    const Dims D{B, T, H, N};
    const cudaStream_t s = static_cast<cudaStream_t>(stream);
    if (bf16) {
        using F = __nv_bfloat16;
        backward_all<F>(D, K, s, static_cast<const F*>(r), w, static_cast<const F*>(k), static_cast<const F*>(v), u,
                        s_in, gy, gs_out, dec, ruk, gyv, ckpt, blk, work, gr, gk, gw, gv, gu_part, gs_in);
    } else {
        backward_all<float>(D, K, s, static_cast<const float*>(r), w, static_cast<const float*>(k),
                            static_cast<const float*>(v), u, s_in, gy, gs_out, dec, ruk, gyv, ckpt, blk, work, gr, gk,
                            gw, gv, gu_part, gs_in);
    }
    return last_error();
}

#ifdef WKV_HOST_SELFTEST
// The same lanes run on the CPU, one after the other, for checking the maths without a GPU. bf16 inputs are passed
// as raw uint16 bits. `generic` forces the N-as-a-runtime-value path (global work rows) even when N == 64.
namespace rwkv_wkv6 {
template <int NT, typename F>
void host_forward(const Dims& D, const F* r, const float* w, const F* k, const F* v, const float* u, const float* s_in,
                  float* y, float* s_out, float* dec, float* ruk) {
    for (int64_t idx = 0; idx < D.B * D.T * D.H; ++idx)
        prep_lane<F>(D, idx / (D.T * D.H), (idx / D.H) % D.T, idx % D.H, r, w, k, v, u, nullptr, dec, ruk, nullptr);
    for (int64_t idx = 0; idx < D.B * D.H * D.N; ++idx) {
        const int64_t bh = idx / D.N;
        forward_lane<NT, F>(D, bh / D.H, bh % D.H, idx % D.N, r, k, v, dec, ruk, s_in, y, s_out);
    }
}

template <int NT, typename F>
void host_backward(const Dims& D, int64_t K, const F* r, const float* w, const F* k, const F* v, const float* u,
                   const float* s_in, const float* gy, const float* gs_out, float* dec, float* ruk, float* gyv,
                   float* ckpt, float* blk, float* work, float* gr, float* gk, float* gw, float* gv, float* gu_part,
                   float* gs_in) {
    for (int64_t idx = 0; idx < D.B * D.T * D.H; ++idx)
        prep_lane<F>(D, idx / (D.T * D.H), (idx / D.H) % D.T, idx % D.H, r, w, k, v, u, gy, dec, ruk, gyv);
    for (int64_t idx = 0; idx < D.B * D.H * D.N; ++idx) {
        const int64_t bh = idx / D.N;
        column_lane<NT, F>(D, bh / D.H, bh % D.H, idx % D.N, r, k, dec, ruk, gy, gs_out, work + D.B * D.H * D.N * D.N,
                           gv);
    }
    for (int64_t idx = 0; idx < D.B * D.H * D.N; ++idx) {
        const int64_t bh = idx / D.N;
        row_lane<NT, F>(D, K, bh / D.H, bh % D.H, idx % D.N, r, k, v, dec, gyv, u, s_in, gy, gs_out, ckpt, blk, work,
                        gr, gk, gw, gu_part, gs_in);
    }
}
}  // namespace rwkv_wkv6

extern "C" void rwkv_wkv6_host_forward(int64_t B, int64_t T, int64_t H, int64_t N, const void* r, const float* w,
                                       const void* k, const void* v, int bf16, int generic, const float* u,
                                       const float* s_in, float* y, float* s_out, float* dec, float* ruk) {
    using namespace rwkv_wkv6;
    const Dims D{B, T, H, N};
    using H16 = __nv_bfloat16;
    const bool reg = N == 64 && !generic;
    if (bf16) {
        auto* rr = static_cast<const H16*>(r);
        auto* kk = static_cast<const H16*>(k);
        auto* vv = static_cast<const H16*>(v);
        reg ? host_forward<64, H16>(D, rr, w, kk, vv, u, s_in, y, s_out, dec, ruk)
            : host_forward<0, H16>(D, rr, w, kk, vv, u, s_in, y, s_out, dec, ruk);
    } else {
        auto* rr = static_cast<const float*>(r);
        auto* kk = static_cast<const float*>(k);
        auto* vv = static_cast<const float*>(v);
        reg ? host_forward<64, float>(D, rr, w, kk, vv, u, s_in, y, s_out, dec, ruk)
            : host_forward<0, float>(D, rr, w, kk, vv, u, s_in, y, s_out, dec, ruk);
    }
}

extern "C" void rwkv_wkv6_host_backward(int64_t B, int64_t T, int64_t H, int64_t N, int64_t K, const void* r,
                                        const float* w, const void* k, const void* v, int bf16, int generic,
                                        const float* u, const float* s_in, const float* gy, const float* gs_out,
                                        float* dec, float* ruk, float* gyv, float* ckpt, float* blk, float* work,
                                        float* gr, float* gk, float* gw, float* gv, float* gu_part, float* gs_in) {
    using namespace rwkv_wkv6;
    const Dims D{B, T, H, N};
    using H16 = __nv_bfloat16;
    const bool reg = N == 64 && !generic;
    if (bf16) {
        auto* rr = static_cast<const H16*>(r);
        auto* kk = static_cast<const H16*>(k);
        auto* vv = static_cast<const H16*>(v);
        reg ? host_backward<64, H16>(D, K, rr, w, kk, vv, u, s_in, gy, gs_out, dec, ruk, gyv, ckpt, blk, work, gr, gk,
                                     gw, gv, gu_part, gs_in)
            : host_backward<0, H16>(D, K, rr, w, kk, vv, u, s_in, gy, gs_out, dec, ruk, gyv, ckpt, blk, work, gr, gk,
                                    gw, gv, gu_part, gs_in);
    } else {
        auto* rr = static_cast<const float*>(r);
        auto* kk = static_cast<const float*>(k);
        auto* vv = static_cast<const float*>(v);
        reg ? host_backward<64, float>(D, K, rr, w, kk, vv, u, s_in, gy, gs_out, dec, ruk, gyv, ckpt, blk, work, gr,
                                       gk, gw, gv, gu_part, gs_in)
            : host_backward<0, float>(D, K, rr, w, kk, vv, u, s_in, gy, gs_out, dec, ruk, gyv, ckpt, blk, work, gr,
                                      gk, gw, gv, gu_part, gs_in);
    }
}
#endif
