// RWKV-7 WKV operator on CUDA: forward and backward, one thread block per (batch, head), P threads per row of the
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
// Why P threads per row: the only parallelism of the recurrence is B * H * N rows (a 0.1B model at batch 8 has 96
// heads: 6,144 rows), too few threads to hide an H200's latencies with one thread per row (the first version of
// this file: two warps per SM, a layer's forward + backward ~6 ms at 8 x 1024). Here the P = 4 threads of a row
// (lanes 4i' .. 4i'+3 of one warp) each own J = N / P of its columns, four times the threads, a quarter of the
// serial work per step each, and every dot product over a row becomes J products and a butterfly of shuffles within
// the four lanes (group_sum). Thread (i, q) owns the columns col(q, m, e) = 4 (m P + q) + e, m < J / 4, e < 4: at
// each m the four lanes of a row read four consecutive float4 of shared memory, no bank conflict.
//
// Forward: thread (i, q) keeps its J elements of row i of S in registers. The inputs of K steps at a time are staged
// in shared memory by all the block's threads, then each step is sa_i = group_sum(S[i, own] . a[own]), the update of
// the thread's elements, y_i = group_sum(S'[i, own] . r[own]). With gradients wanted it also writes the state every
// K steps (ckpt) and sa at every step.
//
// Backward, memory-bounded (nothing per step is kept but the [N] vector sa): the blocks of K steps are walked from
// the last. For each, thread (i, q) reloads its J elements of column i of the checkpoint and recomputes them through
// the block's K states (each element's recurrence needs only sa from the forward and the staged inputs) into the
// global scratch buffer, which only it reads back; then it steps back through the block. The J elements of row i and
// of column i of G = dL/dS that the thread's columns index live in its registers (each element of G is thus updated
// twice, by a thread of its row's group and one of its column's, with the same arithmetic), so that both kinds of
// reduction of the backward are group sums:
//     over j of row i:    dv_i = G[i] . k,   dsa_i = G[i] . b
//     over j of column i: dr_i = S'[:, i] . gy,  dk_i = G[:, i] . v,  db_i = G[:, i] . sa,  dd_i = G[:, i] . S[:, i],
//                         da_i = S[:, i] . dsa
// and only dsa is exchanged through shared memory (one barrier per step).
//
// No compile-time T: any T (no multiple of 16 asked), the grid is B * H blocks of N * P threads, and the per-step
// loops run to T. The per-thread code is written as __host__ __device__ phases, split at the barriers and at the
// group sums, so that the very same code runs on the CPU, threads in turn between the barriers and the group sums
// computed in the shuffles' order (build with -DWKV7_HOST_SELFTEST; see tests/test_wkv7_cuda.py), where there is no
// GPU.

#include <cmath>
#include <cstdint>
#include <memory>
#include <type_traits>
#include <cuda_runtime.h>
#include <cuda_bf16.h>

namespace rwkv_wkv7 {

constexpr int K = 16;       // steps between two saved states; also the steps staged in shared memory at a time
constexpr int NH = 64;      // head size this file is built for (every published RWKV-7 model)
// threads per row of the state: a power of two dividing 32 and N / 4. A build-time constant; bench/gpu_check.py
// builds and times 2 and 8 beside the default, tests/test_wkv7_cuda.py checks 8 on the CPU too.
#ifndef WKV7_LANES
#define WKV7_LANES 4
#endif
constexpr int P = WKV7_LANES;
constexpr int J = NH / P;   // columns per thread
constexpr int M = J / 4;    // float4 chunks per thread
constexpr int THREADS = NH * P;
static_assert(P > 0 && (P & (P - 1)) == 0 && 32 % P == 0 && NH % (4 * P) == 0, "P must divide 32 and N / 4");

#define WKV7_HD __host__ __device__ __forceinline__

WKV7_HD float load(const float* p, int64_t i) { return p[i]; }
WKV7_HD float load(const __nv_bfloat16* p, int64_t i) { return __bfloat162float(p[i]); }
WKV7_HD void store(float* p, int64_t i, float x) { p[i] = x; }
WKV7_HD void store(__nv_bfloat16* p, int64_t i, float x) { p[i] = __float2bfloat16(x); }  // round to nearest even

// column of element (m, e) of thread q's share of a row
WKV7_HD int col(int q, int m, int e) { return 4 * (m * P + q) + e; }

// offset of (b, t, h, 0) in a [B, T, H, N] tensor, bh = b * H + h
WKV7_HD int64_t seq_offset(int64_t bh, int64_t t, int64_t T, int64_t H) { return ((bh / H * T + t) * H + bh % H) * NH; }

// the sum over the P lanes of a row, the same value in each (lane l adds lane l ^ o's value, o = 1, 2, .., P / 2)
__device__ __forceinline__ float group_sum(float x) {
#pragma unroll
    for (int o = 1; o < P; o *= 2) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

// the same butterfly on the CPU, for the self-test: parts[q] is lane q's value
inline float group_sum_host(const float* parts) {
    float x[P];
    for (int q = 0; q < P; ++q) x[q] = parts[q];
    for (int o = 1; o < P; o *= 2) {
        float nx[P];
        for (int q = 0; q < P; ++q) nx[q] = x[q] + x[q ^ o];
        for (int q = 0; q < P; ++q) x[q] = nx[q];
    }
    return x[0];
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

// the inputs of K steps, as both passes stage them (d = e^w)
struct FwdShared {
    alignas(16) float r[K][NH];
    alignas(16) float d[K][NH];
    alignas(16) float k[K][NH];
    alignas(16) float a[K][NH];
    alignas(16) float b[K][NH];
    alignas(16) float v[K][NH];
};

struct BwdShared : FwdShared {
    alignas(16) float sa[K][NH];
    alignas(16) float gy[K][NH];
    alignas(16) float dsa[2][NH];  // double-buffered by step parity: one barrier per step is enough
};

// what one thread keeps between the phases of the backward
struct BwdRegs {
    float grow[J];  // G[i][col(q, m, e)] at [4 m + e]
    float gcol[J];  // G[col(q, m, e)][i]
    float dr, dv, dk, db, dd, dsa;
};

WKV7_HD float4 ld4(const float* p) { return *reinterpret_cast<const float4*>(p); }
WKV7_HD float at(const float4& x, int e) { return e == 0 ? x.x : e == 1 ? x.y : e == 2 ? x.z : x.w; }

// thread t of the block is lane q = t % P of row i = t / P
WKV7_HD int row_of(int t) { return t / P; }
WKV7_HD int lane_of(int t) { return t % P; }

// ---------------------------------------------------------------------------------------------------------------------
// Forward phases (thread t = (i, q) of block bh)

template <typename F, typename FW>
WKV7_HD void fwd_init(const FwdArgs<F, FW>& p, int64_t bh, int t, float* s) {
    const int i = row_of(t), q = lane_of(t);
    const float* src = p.s_in + (bh * NH + i) * NH;
#pragma unroll
    for (int m = 0; m < M; ++m)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[4 * m + e] = src[col(q, m, e)];
}

// the n steps from t0 into shared memory, by all the block's threads (consecutive threads, consecutive elements);
// Args: FwdArgs or BwdArgs
template <typename Args>
WKV7_HD void stage_inputs(const Args& p, int64_t bh, int64_t t0, int n, int t, FwdShared& sh) {
    for (int x = t; x < n * NH; x += THREADS) {
        const int tt = x / NH, e = x % NH;
        const int64_t o = seq_offset(bh, t0 + tt, p.T, p.H) + e;
        sh.r[tt][e] = load(p.r, o);
        sh.d[tt][e] = expf(load(p.w, o));
        sh.k[tt][e] = load(p.k, o);
        sh.a[tt][e] = load(p.a, o);
        sh.b[tt][e] = load(p.b, o);
        sh.v[tt][e] = load(p.v, o);
    }
}

template <typename F, typename FW>
WKV7_HD void fwd_ckpt(const FwdArgs<F, FW>& p, int64_t bh, int64_t c, int t, const float* s) {
    if (p.ckpt == nullptr) return;
    const int i = row_of(t), q = lane_of(t);
    const int64_t nck = (p.T + K - 1) / K;
    float* dst = p.ckpt + ((bh * nck + c) * NH + i) * NH;
#pragma unroll
    for (int m = 0; m < M; ++m)
#pragma unroll
        for (int e = 0; e < 4; ++e) dst[col(q, m, e)] = s[4 * m + e];
}

// step tt of the staged block: this thread's part of sa_i = S[i] . a
WKV7_HD float fwd_sa_part(const FwdShared& sh, int tt, int t, const float* s) {
    const int q = lane_of(t);
    float acc[4] = {};  // one chain per e: independent for the pipeline
#pragma unroll
    for (int m = 0; m < M; ++m) {
        const float4 a4 = ld4(&sh.a[tt][col(q, m, 0)]);
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[e] += s[4 * m + e] * at(a4, e);
    }
    return (acc[0] + acc[1]) + (acc[2] + acc[3]);
}

// step tt, given the whole sa_i: the update of this thread's elements, and its part of y_i = S'[i] . r
WKV7_HD float fwd_update(const FwdShared& sh, int tt, int t, float sa, float* s) {
    const int i = row_of(t), q = lane_of(t);
    const float vi = sh.v[tt][i];
    float acc[4] = {};
#pragma unroll
    for (int m = 0; m < M; ++m) {
        const int j = col(q, m, 0);
        const float4 d4 = ld4(&sh.d[tt][j]), b4 = ld4(&sh.b[tt][j]), k4 = ld4(&sh.k[tt][j]), r4 = ld4(&sh.r[tt][j]);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            float& x = s[4 * m + e];
            x = x * at(d4, e) + sa * at(b4, e) + vi * at(k4, e);
            acc[e] += x * at(r4, e);
        }
    }
    return (acc[0] + acc[1]) + (acc[2] + acc[3]);
}

template <typename F, typename FW>
WKV7_HD void fwd_out(const FwdArgs<F, FW>& p, int64_t bh, int64_t t0, int tt, int t, float sa, float y) {
    const int i = row_of(t), q = lane_of(t);
    const int64_t o = seq_offset(bh, t0 + tt, p.T, p.H) + i;
    if (q == 0) p.y[o] = y;
    if (q == 1 % P && p.sa != nullptr) p.sa[o] = sa;
}

template <typename F, typename FW>
WKV7_HD void fwd_end(const FwdArgs<F, FW>& p, int64_t bh, int t, const float* s) {
    const int i = row_of(t), q = lane_of(t);
    float* dst = p.s_out + (bh * NH + i) * NH;
#pragma unroll
    for (int m = 0; m < M; ++m)
#pragma unroll
        for (int e = 0; e < 4; ++e) dst[col(q, m, e)] = s[4 * m + e];
}

// ---------------------------------------------------------------------------------------------------------------------
// Backward phases (thread t = (i, q) of block bh)

template <typename F, typename FW>
WKV7_HD void bwd_init(const BwdArgs<F, FW>& p, int64_t bh, int t, BwdRegs& rg) {
    const int i = row_of(t), q = lane_of(t);
    const float* g = p.gs_out + bh * NH * NH;
#pragma unroll
    for (int m = 0; m < M; ++m)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int j = col(q, m, e);
            rg.grow[4 * m + e] = g[i * NH + j];
            rg.gcol[4 * m + e] = g[j * NH + i];
        }
}

template <typename F, typename FW>
WKV7_HD void bwd_stage(const BwdArgs<F, FW>& p, int64_t bh, int64_t t0, int n, int t, BwdShared& sh) {
    stage_inputs(p, bh, t0, n, t, sh);
    for (int x = t; x < n * NH; x += THREADS) {
        const int tt = x / NH, e = x % NH;
        const int64_t o = seq_offset(bh, t0 + tt, p.T, p.H) + e;
        sh.sa[tt][e] = p.sa[o];
        sh.gy[tt][e] = p.gy[o];
    }
}

// this thread's elements of column i of the states before steps t0 .. t0+n-1 into scratch, from the checkpoint
// (element [j][i] of S' = S * d[None, :] + sa b^T + v k^T is S[j][i] * d_i + sa_j * b_i + v_j * k_i: the forward's
// expression)
template <typename F, typename FW>
WKV7_HD void bwd_recompute(const BwdArgs<F, FW>& p, int64_t bh, int64_t c, int n, int t, const BwdShared& sh) {
    const int i = row_of(t), q = lane_of(t);
    const int64_t nck = (p.T + K - 1) / K;
    const float* ck = p.ckpt + (bh * nck + c) * NH * NH;
    float* scr = p.scratch + bh * K * NH * NH;
    float x[J];
#pragma unroll
    for (int m = 0; m < M; ++m)
#pragma unroll
        for (int e = 0; e < 4; ++e) x[4 * m + e] = ck[col(q, m, e) * NH + i];
    for (int tt = 0; tt < n; ++tt) {
        const float di = sh.d[tt][i], bi = sh.b[tt][i], ki = sh.k[tt][i];
#pragma unroll
        for (int m = 0; m < M; ++m) {
            const int j0 = col(q, m, 0);
            const float4 sa4 = ld4(&sh.sa[tt][j0]), v4 = ld4(&sh.v[tt][j0]);
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                float& xe = x[4 * m + e];
                scr[tt * NH * NH + (j0 + e) * NH + i] = xe;  // only this thread reads it back
                xe = xe * di + at(sa4, e) * bi + at(v4, e) * ki;
            }
        }
    }
}

// step t0 + tt, up to the group sums: this thread's parts of dr, dv, dsa, dk, db, dd (in that order in part[])
template <typename F, typename FW>
WKV7_HD void bwd_phase1(const BwdArgs<F, FW>& p, int64_t bh, int tt, int t, const BwdShared& sh, BwdRegs& rg,
                        float* part) {
    const int i = row_of(t), q = lane_of(t);
    const float* scr = p.scratch + (bh * K + tt) * NH * NH;  // the state before the step
    const float gyi = sh.gy[tt][i], ri = sh.r[tt][i], di = sh.d[tt][i], bi = sh.b[tt][i], ki = sh.k[tt][i];
    float dr = 0.f, dv = 0.f, dsa = 0.f, dk = 0.f, db = 0.f, dd = 0.f;
#pragma unroll
    for (int m = 0; m < M; ++m) {
        const int j0 = col(q, m, 0);
        const float4 r4 = ld4(&sh.r[tt][j0]), gy4 = ld4(&sh.gy[tt][j0]), k4 = ld4(&sh.k[tt][j0]);
        const float4 b4 = ld4(&sh.b[tt][j0]), v4 = ld4(&sh.v[tt][j0]), sa4 = ld4(&sh.sa[tt][j0]);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            float& gr = rg.grow[4 * m + e];  // G[i][j]
            float& gc = rg.gcol[4 * m + e];  // G[j][i]
            // G += gy r^T (y = S' r), on row i and on column i
            gr += gyi * at(r4, e);
            gc += at(gy4, e) * ri;
            const float sj = scr[(j0 + e) * NH + i];                         // S[j][i]
            const float sp = sj * di + at(sa4, e) * bi + at(v4, e) * ki;  // S'[j][i]
            dr += sp * at(gy4, e);
            dv += gr * at(k4, e);
            dsa += gr * at(b4, e);
            dk += gc * at(v4, e);
            db += gc * at(sa4, e);
            dd += gc * sj;
        }
    }
    part[0] = dr;
    part[1] = dv;
    part[2] = dsa;
    part[3] = dk;
    part[4] = db;
    part[5] = dd;
}

// after the group sums: keep them, and publish dsa_i to the other rows
WKV7_HD void bwd_phase1_end(int tt, int t, const float* sum, BwdShared& sh, BwdRegs& rg) {
    rg.dr = sum[0];
    rg.dv = sum[1];
    rg.dsa = sum[2];
    rg.dk = sum[3];
    rg.db = sum[4];
    rg.dd = sum[5];
    if (lane_of(t) == 0) sh.dsa[tt & 1][row_of(t)] = rg.dsa;
}

// step t0 + tt, after the barrier: G back through sa = S a to before the step; returns this thread's part of
// da_i = S[:, i] . dsa
template <typename F, typename FW>
WKV7_HD float bwd_phase2(const BwdArgs<F, FW>& p, int64_t bh, int tt, int t, const BwdShared& sh, BwdRegs& rg) {
    const int i = row_of(t), q = lane_of(t);
    const float* scr = p.scratch + (bh * K + tt) * NH * NH;
    const float di = sh.d[tt][i], ai = sh.a[tt][i];
    float da = 0.f;
#pragma unroll
    for (int m = 0; m < M; ++m) {
        const int j0 = col(q, m, 0);
        const float4 dsa4 = ld4(&sh.dsa[tt & 1][j0]), d4 = ld4(&sh.d[tt][j0]), a4 = ld4(&sh.a[tt][j0]);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            da += scr[(j0 + e) * NH + i] * at(dsa4, e);
            rg.gcol[4 * m + e] = rg.gcol[4 * m + e] * di + at(dsa4, e) * ai;
            rg.grow[4 * m + e] = rg.grow[4 * m + e] * at(d4, e) + rg.dsa * at(a4, e);
        }
    }
    return da;
}

// the step's gradients out, one store of the six per lane in turn
template <typename F, typename FW>
WKV7_HD void bwd_out(const BwdArgs<F, FW>& p, int64_t bh, int64_t t0, int tt, int t, const BwdShared& sh,
                     const BwdRegs& rg, float da) {
    const int i = row_of(t), q = lane_of(t);
    const int64_t o = seq_offset(bh, t0 + tt, p.T, p.H) + i;
    if (q == 0 % P) store(p.gr, o, rg.dr);
    if (q == 1 % P) store(p.gw, o, rg.dd * sh.d[tt][i]);  // dL/dw = dL/dd * d
    if (q == 2 % P) store(p.gk, o, rg.dk);
    if (q == 3 % P) store(p.gv, o, rg.dv);
    if (q == 4 % P) store(p.ga, o, da);
    if (q == 5 % P) store(p.gb, o, rg.db);
}

template <typename F, typename FW>
WKV7_HD void bwd_end(const BwdArgs<F, FW>& p, int64_t bh, int t, const BwdRegs& rg) {
    const int i = row_of(t), q = lane_of(t);
    float* g = p.gs_in + bh * NH * NH;
#pragma unroll
    for (int m = 0; m < M; ++m)
#pragma unroll
        for (int e = 0; e < 4; ++e) g[col(q, m, e) * NH + i] = rg.gcol[4 * m + e];
}

// ---------------------------------------------------------------------------------------------------------------------
// Kernels: the phases with the barriers and the group sums between them

template <typename F, typename FW>
__global__ void __launch_bounds__(THREADS) forward_kernel(const FwdArgs<F, FW> p) {
    __shared__ FwdShared sh;
    const int t = threadIdx.x;
    const int64_t bh = blockIdx.x;
    float s[J];
    fwd_init(p, bh, t, s);
    const int64_t nck = (p.T + K - 1) / K;
    for (int64_t c = 0; c < nck; ++c) {
        const int64_t t0 = c * K;
        const int n = static_cast<int>(p.T - t0 < K ? p.T - t0 : K);
        stage_inputs(p, bh, t0, n, t, sh);
        fwd_ckpt(p, bh, c, t, s);
        __syncthreads();
        for (int tt = 0; tt < n; ++tt) {
            const float sa = group_sum(fwd_sa_part(sh, tt, t, s));
            const float y = group_sum(fwd_update(sh, tt, t, sa, s));
            fwd_out(p, bh, t0, tt, t, sa, y);
        }
        __syncthreads();  // before the next block's staging overwrites shared memory
    }
    fwd_end(p, bh, t, s);
}

template <typename F, typename FW>
__global__ void __launch_bounds__(THREADS) backward_kernel(const BwdArgs<F, FW> p) {
    __shared__ BwdShared sh;
    const int t = threadIdx.x;
    const int64_t bh = blockIdx.x;
    BwdRegs rg;
    bwd_init(p, bh, t, rg);
    const int64_t nck = (p.T + K - 1) / K;
    for (int64_t c = nck - 1; c >= 0; --c) {
        const int64_t t0 = c * K;
        const int n = static_cast<int>(p.T - t0 < K ? p.T - t0 : K);
        bwd_stage(p, bh, t0, n, t, sh);
        __syncthreads();
        bwd_recompute(p, bh, c, n, t, sh);
        for (int tt = n - 1; tt >= 0; --tt) {
            float part[6];
            bwd_phase1(p, bh, tt, t, sh, rg, part);
#pragma unroll
            for (int x = 0; x < 6; ++x) part[x] = group_sum(part[x]);
            bwd_phase1_end(tt, t, part, sh, rg);
            __syncthreads();
            const float da = group_sum(bwd_phase2(p, bh, tt, t, sh, rg));
            bwd_out(p, bh, t0, tt, t, sh, rg, da);
        }
        __syncthreads();  // before the next block's staging overwrites shared memory
    }
    bwd_end(p, bh, t, rg);
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
        forward_kernel<F, FW><<<static_cast<unsigned>(B * H), THREADS, 0, st>>>(p);
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
        backward_kernel<F, FW><<<static_cast<unsigned>(B * H), THREADS, 0, st>>>(p);
    });
    return last_error();
}

#ifdef WKV7_HOST_SELFTEST
// The same phases on the CPU, the block's threads in turn between the barriers and the group sums (computed by
// group_sum_host in the shuffles' order), for checking the maths without a GPU. Same arguments as the launchers (bf16
// values passed as their raw 16-bit patterns), no stream.
#include <vector>

extern "C" void rwkv_wkv7_host_forward(int64_t B, int64_t T, int64_t H, const void* r, const void* w, const void* k,
                                       const void* v, const void* a, const void* b, int bf16, int w_bf16,
                                       const float* s_in, float* y, float* s_out, float* ckpt, float* sa) {
    using namespace rwkv_wkv7;
    dispatch(bf16, w_bf16, [&](auto* F_, auto* FW_) {
        using F = std::remove_pointer_t<decltype(F_)>;
        using FW = std::remove_pointer_t<decltype(FW_)>;
        const FwdArgs<F, FW> p{B, T, H, static_cast<const F*>(r), static_cast<const F*>(k),
                               static_cast<const F*>(v), static_cast<const F*>(a), static_cast<const F*>(b),
                               static_cast<const FW*>(w), s_in, y, s_out, ckpt, sa};
        auto sh = std::make_unique<FwdShared>();
        std::vector<float> s(THREADS * J);  // thread t's registers: s[t * J ..]
        std::vector<float> part(THREADS), sa_t(THREADS), y_t(THREADS);
        const int64_t nck = (T + K - 1) / K;
        for (int64_t bh = 0; bh < B * H; ++bh) {
            for (int t = 0; t < THREADS; ++t) fwd_init(p, bh, t, &s[t * J]);
            for (int64_t c = 0; c < nck; ++c) {
                const int64_t t0 = c * K;
                const int n = static_cast<int>(T - t0 < K ? T - t0 : K);
                for (int t = 0; t < THREADS; ++t) {
                    stage_inputs(p, bh, t0, n, t, *sh);
                    fwd_ckpt(p, bh, c, t, &s[t * J]);
                }
                for (int tt = 0; tt < n; ++tt) {
                    for (int t = 0; t < THREADS; ++t) part[t] = fwd_sa_part(*sh, tt, t, &s[t * J]);
                    for (int t = 0; t < THREADS; ++t) sa_t[t] = group_sum_host(&part[t / P * P]);
                    for (int t = 0; t < THREADS; ++t) part[t] = fwd_update(*sh, tt, t, sa_t[t], &s[t * J]);
                    for (int t = 0; t < THREADS; ++t) y_t[t] = group_sum_host(&part[t / P * P]);
                    for (int t = 0; t < THREADS; ++t) fwd_out(p, bh, t0, tt, t, sa_t[t], y_t[t]);
                }
            }
            for (int t = 0; t < THREADS; ++t) fwd_end(p, bh, t, &s[t * J]);
        }
    });
}

extern "C" void rwkv_wkv7_host_backward(int64_t B, int64_t T, int64_t H, const void* r, const void* w,
                                        const void* k, const void* v, const void* a, const void* b, int bf16,
                                        int w_bf16, const float* ckpt, const float* sa, const float* gy,
                                        const float* gs_out, float* scratch, void* gr, void* gw, void* gk, void* gv,
                                        void* ga, void* gb, float* gs_in) {
    using namespace rwkv_wkv7;
    dispatch(bf16, w_bf16, [&](auto* F_, auto* FW_) {
        using F = std::remove_pointer_t<decltype(F_)>;
        using FW = std::remove_pointer_t<decltype(FW_)>;
        const BwdArgs<F, FW> p{B, T, H, static_cast<const F*>(r), static_cast<const F*>(k),
                               static_cast<const F*>(v), static_cast<const F*>(a), static_cast<const F*>(b),
                               static_cast<const FW*>(w), ckpt, sa, gy, gs_out, scratch,
                               static_cast<F*>(gr), static_cast<F*>(gk), static_cast<F*>(gv), static_cast<F*>(ga),
                               static_cast<F*>(gb), static_cast<FW*>(gw), gs_in};
        auto sh = std::make_unique<BwdShared>();
        std::vector<BwdRegs> rg(THREADS);
        std::vector<float> part(THREADS * 6), sum(THREADS * 6), da_part(THREADS);
        const int64_t nck = (T + K - 1) / K;
        for (int64_t bh = 0; bh < B * H; ++bh) {
            for (int t = 0; t < THREADS; ++t) bwd_init(p, bh, t, rg[t]);
            for (int64_t c = nck - 1; c >= 0; --c) {
                const int64_t t0 = c * K;
                const int n = static_cast<int>(T - t0 < K ? T - t0 : K);
                for (int t = 0; t < THREADS; ++t) bwd_stage(p, bh, t0, n, t, *sh);
                for (int t = 0; t < THREADS; ++t) bwd_recompute(p, bh, c, n, t, *sh);
                for (int tt = n - 1; tt >= 0; --tt) {
                    for (int t = 0; t < THREADS; ++t) bwd_phase1(p, bh, tt, t, *sh, rg[t], &part[t * 6]);
                    for (int t = 0; t < THREADS; ++t)
                        for (int x = 0; x < 6; ++x) {
                            float lanes[P];
                            for (int q = 0; q < P; ++q) lanes[q] = part[(t / P * P + q) * 6 + x];
                            sum[t * 6 + x] = group_sum_host(lanes);
                        }
                    for (int t = 0; t < THREADS; ++t) bwd_phase1_end(tt, t, &sum[t * 6], *sh, rg[t]);
                    for (int t = 0; t < THREADS; ++t) da_part[t] = bwd_phase2(p, bh, tt, t, *sh, rg[t]);
                    for (int t = 0; t < THREADS; ++t)
                        bwd_out(p, bh, t0, tt, t, *sh, rg[t], group_sum_host(&da_part[t / P * P]));
                }
            }
            for (int t = 0; t < THREADS; ++t) bwd_end(p, bh, t, rg[t]);
        }
    });
}
#endif
