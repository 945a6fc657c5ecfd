// RWKV-7 WKV operator on CUDA: forward and backward, one thread block per (batch, head), one thread per row of the
// state. For finetune/ops/wkv7.py; the maths and the interface are those of the CPU kernel (kernels/wkv7_cpu.cpp):
//     sa = S a;   S' = S * d[None, :] + sa b^T + v k^T   (d = e^w);   y = S' r        S: [N, N], row = value index
//
// This file includes no torch header: it exposes launchers on raw pointers (and the stream as void*); the binding
// (wkv7_cuda_bind.cpp) does the checks, the device guard, the dtype flags and the allocations.
//
// Layouts (all contiguous): r, w, k, v, a, b, y, sa, gy and the gradients [B, T, H, N]; state_in, state_out,
// gstate_out, gstate_in [B, H, N, N]; ckpt [B, H, ceil(T/K), N, N] (the state before steps 0, K, 2K, ..., in the
// state's own layout); scratch [B * H, K, N, N] fp32 (the backward's recomputed states of one block of K steps).
// r, k, v, a, b share one dtype (fp32 or bf16), w has that dtype or fp32; everything else is fp32.
//
// Forward: thread i keeps row i of S in registers. The inputs of K steps at a time are staged in shared memory
// (thread i loads element i of each), then each thread runs the K steps on its own: sa_i = S[i] . a, the update of
// its row, y_i = S[i] . r. With gradients wanted it also writes the state every K steps (ckpt) and sa at every step.
//
// Backward, memory-bounded (nothing per step is kept but the [N] vector sa): the blocks of K steps are walked from
// the last. For each, thread i reloads column i of the checkpoint and recomputes the K states of the block, column
// by column (the column update needs sa from the forward, every other term is thread i's own), into the global
// scratch buffer; then it steps back through the block. Row i and column i of G = dL/dS both live in thread i's
// registers (each element of G is thus updated twice, by its row's and its column's thread, with the same
// arithmetic), so that both kinds of reduction of the backward are thread-local:
//     over j of row i:    dv_i = G[i] . k,   dsa_i = G[i] . b
//     over j of column i: dr_i = S'[:, i] . gy,  dk_i = G[:, i] . v,  db_i = G[:, i] . sa,  dd_i = G[:, i] . S[:, i],
//                         da_i = S[:, i] . dsa
// and only dsa is exchanged through shared memory (one barrier per step).
//
// No compile-time T: any T (no multiple of 16 asked), the grid is B * H blocks, and the per-step loops run to T.
// The per-thread code is written as __host__ __device__ phases separated by the barriers, so that the very same
// code runs on the CPU, threads in turn between the barriers (build with -DWKV7_HOST_SELFTEST; see
// tests/test_wkv7_cuda.py), where there is no GPU.

#include <cmath>
#include <cstdint>
#include <memory>
#include <type_traits>
#include <cuda_runtime.h>
#include <cuda_bf16.h>

namespace rwkv_wkv7 {

constexpr int K = 16;   // steps between two saved states; also the steps staged in shared memory at a time
constexpr int NH = 64;  // head size this file is built for (every published RWKV-7 model)

#define WKV7_HD __host__ __device__ __forceinline__

WKV7_HD float load(const float* p, int64_t i) { return p[i]; }
WKV7_HD float load(const __nv_bfloat16* p, int64_t i) { return __bfloat162float(p[i]); }
WKV7_HD void store(float* p, int64_t i, float x) { p[i] = x; }
WKV7_HD void store(__nv_bfloat16* p, int64_t i, float x) { p[i] = __float2bfloat16(x); }  // round to nearest even

// offset of (b, t, h, 0) in a [B, T, H, N] tensor, bh = b * H + h
template <int N>
WKV7_HD int64_t seq_offset(int64_t bh, int64_t t, int64_t T, int64_t H) {
    return ((bh / H * T + t) * H + bh % H) * N;
}

template <typename F, typename FW>
struct FwdArgs {
    int64_t B, T, H;
    const F *r, *k, *v, *a, *b;
    const FW* w;
    const float* s_in;
    float *y, *s_out;
    float *ckpt, *sa;  // null when no gradient is wanted
};

template <typename F, typename FW>
struct BwdArgs {
    int64_t B, T, H;
    const F *r, *k, *v, *a, *b;
    const FW* w;
    const float *ckpt, *sa, *gy, *gs_out;
    float* scratch;
    F *gr, *gk, *gv, *ga, *gb;
    FW* gw;
    float* gs_in;
};

template <int N>
struct FwdShared {
    alignas(16) float r[K][N];
    alignas(16) float d[K][N];
    alignas(16) float k[K][N];
    alignas(16) float a[K][N];
    alignas(16) float b[K][N];
};

template <int N>
struct BwdShared {
    alignas(16) float r[K][N];
    alignas(16) float d[K][N];
    alignas(16) float k[K][N];
    alignas(16) float a[K][N];
    alignas(16) float b[K][N];
    alignas(16) float v[K][N];
    alignas(16) float sa[K][N];
    alignas(16) float gy[K][N];
    alignas(16) float dsa[2][N];  // double-buffered by step parity: one barrier per step is enough
};

template <int N>
struct BwdRegs {
    float grow[N];  // G[i][:]
    float gcol[N];  // G[:][i]
    float dr, dv, dk, db, dd, dsa;
};

WKV7_HD float4 ld4(const float* p) { return *reinterpret_cast<const float4*>(p); }

// ---------------------------------------------------------------------------------------------------------------------
// Forward phases (thread i of block bh)

template <int N, typename F, typename FW>
WKV7_HD void fwd_init(const FwdArgs<F, FW>& p, int64_t bh, int i, float* s) {
    const float* src = p.s_in + (bh * N + i) * N;
#pragma unroll
    for (int j = 0; j < N; ++j) s[j] = src[j];
}

template <int N, typename F, typename FW>
WKV7_HD void fwd_stage(const FwdArgs<F, FW>& p, int64_t bh, int64_t t0, int n, int i, FwdShared<N>& sh) {
    for (int tt = 0; tt < n; ++tt) {
        const int64_t o = seq_offset<N>(bh, t0 + tt, p.T, p.H) + i;
        sh.r[tt][i] = load(p.r, o);
        sh.d[tt][i] = expf(load(p.w, o));
        sh.k[tt][i] = load(p.k, o);
        sh.a[tt][i] = load(p.a, o);
        sh.b[tt][i] = load(p.b, o);
    }
}

template <int N, typename F, typename FW>
WKV7_HD void fwd_steps(const FwdArgs<F, FW>& p, int64_t bh, int64_t c, int64_t t0, int n, int i,
                       const FwdShared<N>& sh, float* s) {
    if (p.ckpt != nullptr) {
        const int64_t nck = (p.T + K - 1) / K;
        float* dst = p.ckpt + ((bh * nck + c) * N + i) * N;
#pragma unroll
        for (int j = 0; j < N; ++j) dst[j] = s[j];
    }
    for (int tt = 0; tt < n; ++tt) {
        const int64_t o = seq_offset<N>(bh, t0 + tt, p.T, p.H) + i;
        const float vi = load(p.v, o);
        // four partial sums per dot product: independent chains for the pipeline
        float sa0 = 0.f, sa1 = 0.f, sa2 = 0.f, sa3 = 0.f;
#pragma unroll
        for (int j = 0; j < N; j += 4) {
            const float4 a4 = ld4(&sh.a[tt][j]);
            sa0 += s[j] * a4.x;
            sa1 += s[j + 1] * a4.y;
            sa2 += s[j + 2] * a4.z;
            sa3 += s[j + 3] * a4.w;
        }
        const float sa = (sa0 + sa1) + (sa2 + sa3);
        float y0 = 0.f, y1 = 0.f, y2 = 0.f, y3 = 0.f;
#pragma unroll
        for (int j = 0; j < N; j += 4) {
            const float4 d4 = ld4(&sh.d[tt][j]), b4 = ld4(&sh.b[tt][j]), k4 = ld4(&sh.k[tt][j]);
            const float4 r4 = ld4(&sh.r[tt][j]);
            s[j] = s[j] * d4.x + sa * b4.x + vi * k4.x;
            s[j + 1] = s[j + 1] * d4.y + sa * b4.y + vi * k4.y;
            s[j + 2] = s[j + 2] * d4.z + sa * b4.z + vi * k4.z;
            s[j + 3] = s[j + 3] * d4.w + sa * b4.w + vi * k4.w;
            y0 += s[j] * r4.x;
            y1 += s[j + 1] * r4.y;
            y2 += s[j + 2] * r4.z;
            y3 += s[j + 3] * r4.w;
        }
        p.y[o] = (y0 + y1) + (y2 + y3);
        if (p.sa != nullptr) p.sa[o] = sa;
    }
}

template <int N, typename F, typename FW>
WKV7_HD void fwd_end(const FwdArgs<F, FW>& p, int64_t bh, int i, const float* s) {
    float* dst = p.s_out + (bh * N + i) * N;
#pragma unroll
    for (int j = 0; j < N; ++j) dst[j] = s[j];
}

// ---------------------------------------------------------------------------------------------------------------------
// Backward phases (thread i of block bh)

template <int N, typename F, typename FW>
WKV7_HD void bwd_init(const BwdArgs<F, FW>& p, int64_t bh, int i, BwdRegs<N>& rg) {
    const float* g = p.gs_out + bh * N * N;
#pragma unroll
    for (int j = 0; j < N; ++j) {
        rg.grow[j] = g[i * N + j];
        rg.gcol[j] = g[j * N + i];
    }
}

template <int N, typename F, typename FW>
WKV7_HD void bwd_stage(const BwdArgs<F, FW>& p, int64_t bh, int64_t t0, int n, int i, BwdShared<N>& sh) {
    for (int tt = 0; tt < n; ++tt) {
        const int64_t o = seq_offset<N>(bh, t0 + tt, p.T, p.H) + i;
        sh.r[tt][i] = load(p.r, o);
        sh.d[tt][i] = expf(load(p.w, o));
        sh.k[tt][i] = load(p.k, o);
        sh.a[tt][i] = load(p.a, o);
        sh.b[tt][i] = load(p.b, o);
        sh.v[tt][i] = load(p.v, o);
        sh.sa[tt][i] = p.sa[o];
        sh.gy[tt][i] = p.gy[o];
    }
}

// column i of the states before steps t0 .. t0+n-1 into scratch, from the checkpoint (element [j][i] of
// S' = S * d[None, :] + sa b^T + v k^T is S[j][i] * d_i + sa_j * b_i + v_j * k_i: the forward's expression)
template <int N, typename F, typename FW>
WKV7_HD void bwd_recompute(const BwdArgs<F, FW>& p, int64_t bh, int64_t c, int n, int i, const BwdShared<N>& sh) {
    const int64_t nck = (p.T + K - 1) / K;
    const float* ck = p.ckpt + (bh * nck + c) * N * N;
    // one element of the column at a time through the block's steps (j outer): a register copy of the whole
    // column beside the two of G would spill
    for (int j = 0; j < N; ++j) {
        float x = ck[j * N + i];
        for (int tt = 0; tt < n; ++tt) {
            p.scratch[(bh * K + tt) * N * N + j * N + i] = x;  // thread i reads back only its own column
            x = x * sh.d[tt][i] + sh.sa[tt][j] * sh.b[tt][i] + sh.v[tt][j] * sh.k[tt][i];
        }
    }
}

// step t0 + tt, up to dsa (written to shared memory for the other threads)
template <int N, typename F, typename FW>
WKV7_HD void bwd_phase1(const BwdArgs<F, FW>& p, int64_t bh, int tt, int i, BwdShared<N>& sh, BwdRegs<N>& rg) {
    // column i of the state before the step is streamed from scratch (for the same reason)
    const float* scr = p.scratch + (bh * K + tt) * N * N;
    const float gyi = sh.gy[tt][i], ri = sh.r[tt][i], di = sh.d[tt][i], bi = sh.b[tt][i], ki = sh.k[tt][i];
    // two partial sums per dot product (the six products are already independent chains; more partials, or fewer,
    // make ptxas spill at 255 registers on sm_90 with nvcc 13)
    float dr[2] = {}, dv[2] = {}, dsa[2] = {}, dk[2] = {}, db[2] = {}, dd[2] = {};
#pragma unroll
    for (int j = 0; j < N; ++j) {
        const int q = j % 2;
        // G += gy r^T (y = S' r), on row i and on column i
        rg.grow[j] += gyi * sh.r[tt][j];
        rg.gcol[j] += sh.gy[tt][j] * ri;
        const float sj = scr[j * N + i];                                   // S[j][i]
        const float sp = sj * di + sh.sa[tt][j] * bi + sh.v[tt][j] * ki;  // S'[j][i]
        dr[q] += sp * sh.gy[tt][j];
        dv[q] += rg.grow[j] * sh.k[tt][j];
        dsa[q] += rg.grow[j] * sh.b[tt][j];
        dk[q] += rg.gcol[j] * sh.v[tt][j];
        db[q] += rg.gcol[j] * sh.sa[tt][j];
        dd[q] += rg.gcol[j] * sj;
    }
    rg.dr = dr[0] + dr[1];
    rg.dv = dv[0] + dv[1];
    rg.dsa = dsa[0] + dsa[1];
    rg.dk = dk[0] + dk[1];
    rg.db = db[0] + db[1];
    rg.dd = dd[0] + dd[1];
    sh.dsa[tt & 1][i] = rg.dsa;
}

// step t0 + tt, after the barrier: through sa = S a, G back to before the step, and the gradients out
template <int N, typename F, typename FW>
WKV7_HD void bwd_phase2(const BwdArgs<F, FW>& p, int64_t bh, int64_t t0, int tt, int i, const BwdShared<N>& sh,
                        BwdRegs<N>& rg) {
    const float* dsa = sh.dsa[tt & 1];
    const float* scr = p.scratch + (bh * K + tt) * N * N;
    const float di = sh.d[tt][i], ai = sh.a[tt][i];
    float da[4] = {};
#pragma unroll
    for (int j = 0; j < N; ++j) {
        da[j % 4] += scr[j * N + i] * dsa[j];
        rg.gcol[j] = rg.gcol[j] * di + dsa[j] * ai;
        rg.grow[j] = rg.grow[j] * sh.d[tt][j] + rg.dsa * sh.a[tt][j];
    }
    const int64_t o = seq_offset<N>(bh, t0 + tt, p.T, p.H) + i;
    store(p.gr, o, rg.dr);
    store(p.gw, o, rg.dd * di);  // dL/dw = dL/dd * d
    store(p.gk, o, rg.dk);
    store(p.gv, o, rg.dv);
    store(p.ga, o, (da[0] + da[1]) + (da[2] + da[3]));
    store(p.gb, o, rg.db);
}

template <int N, typename F, typename FW>
WKV7_HD void bwd_end(const BwdArgs<F, FW>& p, int64_t bh, int i, const BwdRegs<N>& rg) {
    float* g = p.gs_in + bh * N * N;
#pragma unroll
    for (int j = 0; j < N; ++j) g[j * N + i] = rg.gcol[j];
}

// ---------------------------------------------------------------------------------------------------------------------
// Kernels: the phases with the barriers between them

template <int N, typename F, typename FW>
__global__ void __launch_bounds__(N) forward_kernel(const FwdArgs<F, FW> p) {
    __shared__ FwdShared<N> sh;
    const int i = threadIdx.x;
    const int64_t bh = blockIdx.x;
    float s[N];
    fwd_init<N>(p, bh, i, s);
    const int64_t nck = (p.T + K - 1) / K;
    for (int64_t c = 0; c < nck; ++c) {
        const int64_t t0 = c * K;
        const int n = static_cast<int>(p.T - t0 < K ? p.T - t0 : K);
        fwd_stage<N>(p, bh, t0, n, i, sh);
        __syncthreads();
        fwd_steps<N>(p, bh, c, t0, n, i, sh, s);
        __syncthreads();
    }
    fwd_end<N>(p, bh, i, s);
}

template <int N, typename F, typename FW>
__global__ void __launch_bounds__(N) backward_kernel(const BwdArgs<F, FW> p) {
    __shared__ BwdShared<N> sh;
    const int i = threadIdx.x;
    const int64_t bh = blockIdx.x;
    BwdRegs<N> rg;
    bwd_init<N>(p, bh, i, rg);
    const int64_t nck = (p.T + K - 1) / K;
    for (int64_t c = nck - 1; c >= 0; --c) {
        const int64_t t0 = c * K;
        const int n = static_cast<int>(p.T - t0 < K ? p.T - t0 : K);
        bwd_stage<N>(p, bh, t0, n, i, sh);
        __syncthreads();
        bwd_recompute<N>(p, bh, c, n, i, sh);
        for (int tt = n - 1; tt >= 0; --tt) {
            bwd_phase1<N>(p, bh, tt, i, sh, rg);
            __syncthreads();
            bwd_phase2<N>(p, bh, t0, tt, i, sh, rg);
        }
        __syncthreads();  // before the next block's staging overwrites shared memory
    }
    bwd_end<N>(p, bh, i, rg);
}

inline const char* last_error() {
    const cudaError_t err = cudaGetLastError();
    return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

// calls fn(F*, FW*) with null pointers of the input types: bf16 says r, k, v, a, b are bf16, w_bf16 that w is
template <typename Fn>
inline void dispatch(bool bf16, bool w_bf16, Fn&& fn) {
    if (!bf16)
        fn(static_cast<float*>(nullptr), static_cast<float*>(nullptr));
    else if (w_bf16)
        fn(static_cast<__nv_bfloat16*>(nullptr), static_cast<__nv_bfloat16*>(nullptr));
    else
        fn(static_cast<__nv_bfloat16*>(nullptr), static_cast<float*>(nullptr));
}

}  // namespace rwkv_wkv7

// ---------------------------------------------------------------------------------------------------------------------
// Launchers: nullptr on success, else the error string. Inputs as void*: r, k, v, a, b of one dtype (bf16 when `bf16`),
// w bf16 when `w_bf16` (only with bf16). ckpt and sa may be null in the forward (no gradient wanted). The scratch
// buffer of the backward holds B * H * K * N * N floats.

int rwkv_wkv7_cuda_checkpoint_interval() { return rwkv_wkv7::K; }
int rwkv_wkv7_cuda_head_size() { return rwkv_wkv7::NH; }

const char* rwkv_wkv7_cuda_forward(int64_t B, int64_t T, int64_t H, int64_t N, const void* r, const void* w,
                                   const void* k, const void* v, const void* a, const void* b, bool bf16,
                                   bool w_bf16, const float* s_in, float* y, float* s_out, float* ckpt, float* sa,
                                   void* stream) {
    using namespace rwkv_wkv7;
    if (N != NH) return "wkv7_cuda: this build supports head size 64 only";
    if (B * H == 0) return nullptr;
    const cudaStream_t st = static_cast<cudaStream_t>(stream);
    dispatch(bf16, w_bf16, [&](auto* F_, auto* FW_) {
        using F = std::remove_pointer_t<decltype(F_)>;
        using FW = std::remove_pointer_t<decltype(FW_)>;
        const FwdArgs<F, FW> p{B, T, H, static_cast<const F*>(r), static_cast<const F*>(k),
                               static_cast<const F*>(v), static_cast<const F*>(a), static_cast<const F*>(b),
                               static_cast<const FW*>(w), s_in, y, s_out, ckpt, sa};
        forward_kernel<NH, F, FW><<<static_cast<unsigned>(B * H), NH, 0, st>>>(p);
    });
    return last_error();
}

const char* rwkv_wkv7_cuda_backward(int64_t B, int64_t T, int64_t H, int64_t N, const void* r, const void* w,
                                    const void* k, const void* v, const void* a, const void* b, bool bf16,
                                    bool w_bf16, const float* ckpt, const float* sa, const float* gy,
                                    const float* gs_out, float* scratch, void* gr, void* gw, void* gk, void* gv,
                                    void* ga, void* gb, float* gs_in, void* stream) {
    using namespace rwkv_wkv7;
    if (N != NH) return "wkv7_cuda: this build supports head size 64 only";
    if (B * H == 0) return nullptr;
    const cudaStream_t st = static_cast<cudaStream_t>(stream);
    dispatch(bf16, w_bf16, [&](auto* F_, auto* FW_) {
        using F = std::remove_pointer_t<decltype(F_)>;
        using FW = std::remove_pointer_t<decltype(FW_)>;
        const BwdArgs<F, FW> p{B, T, H, static_cast<const F*>(r), static_cast<const F*>(k),
                               static_cast<const F*>(v), static_cast<const F*>(a), static_cast<const F*>(b),
                               static_cast<const FW*>(w), ckpt, sa, gy, gs_out, scratch,
                               static_cast<F*>(gr), static_cast<F*>(gk), static_cast<F*>(gv), static_cast<F*>(ga),
                               static_cast<F*>(gb), static_cast<FW*>(gw), gs_in};
        backward_kernel<NH, F, FW><<<static_cast<unsigned>(B * H), NH, 0, st>>>(p);
    });
    return last_error();
}

#ifdef WKV7_HOST_SELFTEST
// The same phases on the CPU, threads of a block in turn between the barriers, for checking the maths without a
// GPU. Same arguments as the launchers (bf16 values passed as their raw 16-bit patterns), no stream.
#include <vector>

extern "C" void rwkv_wkv7_host_forward(int64_t B, int64_t T, int64_t H, const void* r, const void* w, const void* k,
                                       const void* v, const void* a, const void* b, int bf16, int w_bf16,
                                       const float* s_in, float* y, float* s_out, float* ckpt, float* sa) {
    using namespace rwkv_wkv7;
    constexpr int N = NH;
    dispatch(bf16, w_bf16, [&](auto* F_, auto* FW_) {
        using F = std::remove_pointer_t<decltype(F_)>;
        using FW = std::remove_pointer_t<decltype(FW_)>;
        const FwdArgs<F, FW> p{B, T, H, static_cast<const F*>(r), static_cast<const F*>(k),
                               static_cast<const F*>(v), static_cast<const F*>(a), static_cast<const F*>(b),
                               static_cast<const FW*>(w), s_in, y, s_out, ckpt, sa};
        auto sh = std::make_unique<FwdShared<N>>();
        std::vector<float> s(N * N);  // thread i's registers: s[i*N ..]
        const int64_t nck = (T + K - 1) / K;
        for (int64_t bh = 0; bh < B * H; ++bh) {
            for (int i = 0; i < N; ++i) fwd_init<N>(p, bh, i, &s[i * N]);
            for (int64_t c = 0; c < nck; ++c) {
                const int64_t t0 = c * K;
                const int n = static_cast<int>(T - t0 < K ? T - t0 : K);
                for (int i = 0; i < N; ++i) fwd_stage<N>(p, bh, t0, n, i, *sh);
                for (int i = 0; i < N; ++i) fwd_steps<N>(p, bh, c, t0, n, i, *sh, &s[i * N]);
            }
            for (int i = 0; i < N; ++i) fwd_end<N>(p, bh, i, &s[i * N]);
        }
    });
}

extern "C" void rwkv_wkv7_host_backward(int64_t B, int64_t T, int64_t H, const void* r, const void* w,
                                        const void* k, const void* v, const void* a, const void* b, int bf16,
                                        int w_bf16, const float* ckpt, const float* sa, const float* gy,
                                        const float* gs_out, float* scratch, void* gr, void* gw, void* gk, void* gv,
                                        void* ga, void* gb, float* gs_in) {
    using namespace rwkv_wkv7;
    constexpr int N = NH;
    dispatch(bf16, w_bf16, [&](auto* F_, auto* FW_) {
        using F = std::remove_pointer_t<decltype(F_)>;
        using FW = std::remove_pointer_t<decltype(FW_)>;
        const BwdArgs<F, FW> p{B, T, H, static_cast<const F*>(r), static_cast<const F*>(k),
                               static_cast<const F*>(v), static_cast<const F*>(a), static_cast<const F*>(b),
                               static_cast<const FW*>(w), ckpt, sa, gy, gs_out, scratch,
                               static_cast<F*>(gr), static_cast<F*>(gk), static_cast<F*>(gv), static_cast<F*>(ga),
                               static_cast<F*>(gb), static_cast<FW*>(gw), gs_in};
        auto sh = std::make_unique<BwdShared<N>>();
        std::vector<BwdRegs<N>> rg(N);
        const int64_t nck = (T + K - 1) / K;
        for (int64_t bh = 0; bh < B * H; ++bh) {
            for (int i = 0; i < N; ++i) bwd_init<N>(p, bh, i, rg[i]);
            for (int64_t c = nck - 1; c >= 0; --c) {
                const int64_t t0 = c * K;
                const int n = static_cast<int>(T - t0 < K ? T - t0 : K);
                for (int i = 0; i < N; ++i) bwd_stage<N>(p, bh, t0, n, i, *sh);
                for (int i = 0; i < N; ++i) bwd_recompute<N>(p, bh, c, n, i, *sh);
                for (int tt = n - 1; tt >= 0; --tt) {
                    for (int i = 0; i < N; ++i) bwd_phase1<N>(p, bh, tt, i, *sh, rg[i]);
                    for (int i = 0; i < N; ++i) bwd_phase2<N>(p, bh, t0, tt, i, *sh, rg[i]);
                }
            }
            for (int i = 0; i < N; ++i) bwd_end<N>(p, bh, i, rg[i]);
        }
    });
}
#endif
