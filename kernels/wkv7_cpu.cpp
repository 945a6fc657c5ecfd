// RWKV-7 WKV operator, CPU kernel (forward and backward), for finetune/ops/wkv7.py.
//
// Per head, with the state S [N, N] (row i = value index, column j = key index), d = exp(w):
//     sa = S @ a;   S' = S * d[None, :] + sa[:, None] * b[None, :] + v[:, None] * k[None, :];   y = S' @ r
//
// Interface (all tensors contiguous, on the CPU; r, k, v, a, b share one dtype, fp32 or bf16; w has that dtype or
// fp32; everything else fp32):
//   forward(r, w, k, v, a, b [B,T,H,N], state_in [B,H,N,N], save)
//       -> (y [B,T,H,N], state_out [B,H,N,N], ckpt [B,H,ceil(T/K),N,N], sa [B,T,H,N])
//   backward(r, w, k, v, a, b, ckpt, sa, gy [B,T,H,N], gstate_out [B,H,N,N])
//       -> (gr, gw, gk, gv, ga, gb [B,T,H,N] in the dtype of their input, gstate_in [B,H,N,N])
//   checkpoint_interval() -> K
// With save = false, ckpt and sa are empty (inference needs neither). ckpt[:, :, c] is the state before step c*K in
// this kernel's own layout (transposed, see below) and sa the vector S @ a of every step: what the backward
// recomputes from. Only the backward of the same extension reads them.
//
// Work is split over (batch, head) pairs, one OpenMP task each. Inside a task the state is kept transposed (ST[j][i]
// = S[i][j], one key index per row), so that every update of the state is an axpy over the contiguous value index.
// The forward makes one pass over the state per step: while it updates the rows it also accumulates y and the next
// step's sa.
//
// Backward, memory-bounded: the forward keeps the state only every K steps (and sa, one [N] vector per step). The
// backward walks the blocks of K steps from the last one; it recomputes the K + 1 states of a block from its
// checkpoint into a per-thread buffer ((K + 1) N^2 floats, 272 KiB for K = 16, N = 64: it stays in L2), then steps
// back through the block carrying G = dL/dS (also transposed), one pass over G per step. Nothing here is sized by T
// at compile time.
//
// The maths is plain C++ with no torch header (the binding at the end is the only part that needs torch), so that a
// bench harness can include this file with -DWKV7_NO_TORCH. Head sizes 32, 64 and 128 get code compiled for that N
// (constant trip counts, 16-wide register tiles in the forward); any other N runs the same code with N known at run
// time only.

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu_math.h"  // exp_f32

namespace wkv7cpu {

#ifndef WKV7_K
#define WKV7_K 16
#endif
constexpr int64_t K = WKV7_K;  // steps between two state checkpoints

struct bf16 {  // the bits of a bfloat16 (at::BFloat16 has this layout)
  uint16_t bits;
};

inline float to_f(float x) { return x; }
inline float to_f(bf16 x) { return std::bit_cast<float>(static_cast<uint32_t>(x.bits) << 16); }

// float -> bf16, round to nearest even as c10::BFloat16 does, NaN kept a (quiet) NaN
inline void store(float* p, float x) { *p = x; }
inline void store(bf16* p, float x) {
  const uint32_t bits = std::bit_cast<uint32_t>(x);
  p->bits = x != x ? uint16_t(0x7FC0) : static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

// exp_f32 (kernels/cpu_math.h): the decays of RWKV-7 are e^w with w in [-0.61, 0].

template <typename F>
inline void load_vec(float* __restrict dst, const F* __restrict src, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = to_f(src[i]);
}
// The [N] vector of one step as fp32: the input itself when it is fp32 (no copy), else converted into tmp.
template <typename F>
inline const float* as_f32(const F* src, float* __restrict tmp, int64_t n) {
  if constexpr (std::is_same_v<F, float>) {
    return src;
  } else {
    load_vec(tmp, src, n);
    return tmp;
  }
}

template <typename FW>
inline void load_decay(float* __restrict dst, const FW* __restrict w, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = exp_f32(to_f(w[i]));
}

// Steps are H * N floats apart in the [B, T, H, N] inputs, more than a 4 KiB page for H * N >= 1024: the
// hardware prefetchers do not follow such a walk, and a plain load of each step's vectors waits on L3 or DRAM
// (a third of the forward's time when measured without this). So the kernels ask for a later step's data themselves.
template <typename X>
inline void prefetch_row(const X* p, int64_t n) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t off = 0; off < n * static_cast<int64_t>(sizeof(X)); off += 64) __builtin_prefetch(c + off);
}
constexpr int64_t PREFETCH_STEPS = 4;  // how far ahead the forward prefetches

// S (row-major [N][N]) -> its transpose
inline void transpose_into(float* __restrict dst, const float* __restrict src, int64_t N) {
  for (int64_t i = 0; i < N; ++i)
    for (int64_t j = 0; j < N; ++j) dst[j * N + i] = src[i * N + j];
}

// One (batch, head) task. Its [T, H, N] rows start at `seq` in every [B, T, H, N] tensor, consecutive steps are
// `step` = H * N apart; `head` = b * H + h indexes the [B, H, ...] tensors.
struct Task {
  int64_t T, N, step, seq, head;
};

// Work space per thread, its size independent of T: one block of K + 1 states and G for the backward, one state
// for the forward, and vectors. 64-byte aligned.
struct Workspace {
  std::vector<float> mem;
  float *buf, *gt, *vec;
  Workspace(int64_t N, bool backward) {
    const int64_t NN = N * N, states = backward ? K + 2 : 1, round = (N + 15) / 16 * 16;
    mem.resize(states * NN + 40 * round + 16);
    float* base = mem.data() + (16 - (reinterpret_cast<uintptr_t>(mem.data()) / 4) % 16) % 16;
    buf = base;
    gt = base + (states - 1) * NN;
    vec = base + states * NN;
  }
};

// Eight floats, for the loops the compiler is not trusted to keep in registers (GCC's generic vectors: one AVX
// register, or two SSE / NEON ones elsewhere). Loaded and stored with memcpy: no alignment assumed.
typedef float v8 __attribute__((vector_size(32)));
inline v8 ld8(const float* p) {
  v8 x;
  std::memcpy(&x, p, sizeof(x));
  return x;
}
inline void st8(float* p, v8 x) { std::memcpy(p, &x, sizeof(x)); }

// One step of the state, ST[j][i] = ST[j][i] * d_j + b_j * sa_i + k_j * v_i, written the same way in the forward
// and in the backward's recomputation so that both give the same states.
inline v8 update8(v8 s, float d, float b, v8 sa, float k, v8 v) { return s * d + sa * b + v * k; }
inline float update1(float s, float d, float b, float sa, float k, float v) { return s * d + sa * b + v * k; }

// Tiles of 16 value indices (two v8) are used when N is a compile-time multiple of 16.
template <int NC>
constexpr bool tiled = NC > 0 && NC % 16 == 0;

template <int NC, typename F, typename FW>
void forward_task(const Task& tk, const F* r, const FW* w, const F* k, const F* v, const F* a, const F* b,
                  const float* s_in, float* y, float* s_out, float* ckpt, float* sa_out, Workspace& ws) {
  const int64_t N = NC > 0 ? NC : tk.N, NN = N * N, P = (N + 15) / 16 * 16;
  float* __restrict st = ws.buf;
  float* __restrict dd = ws.vec;
  float* __restrict sa = dd + P;
  float* __restrict sn = sa + P;  // sa of the next step
  float* __restrict zero = sn + P;
  float* __restrict tmp = zero + P;  // 5 P: bf16 inputs converted
  std::fill(zero, zero + N, 0.f);
  transpose_into(st, s_in + tk.head * NN, N);
  const int64_t nck = (tk.T + K - 1) / K;
  // sa of step 0; every later one is accumulated during the previous step's update (one pass over the state)
  {
    const float* a0 = tk.T > 0 ? as_f32(a + tk.seq, tmp, N) : zero;
    for (int64_t i = 0; i < N; ++i) sa[i] = 0.f;
    for (int64_t j = 0; j < N; ++j) {
#pragma omp simd
      for (int64_t i = 0; i < N; ++i) sa[i] += a0[j] * st[j * N + i];
    }
  }
  for (int64_t t = 0; t < tk.T; ++t) {
    const int64_t o = tk.seq + t * tk.step;
    if (ckpt != nullptr && t % K == 0) std::memcpy(ckpt + (tk.head * nck + t / K) * NN, st, NN * sizeof(float));
    if (t + PREFETCH_STEPS < tk.T) {
      const int64_t p = o + PREFETCH_STEPS * tk.step;
      for (const F* x : {r, k, v, a, b}) prefetch_row(x + p, N);
      prefetch_row(w + p, N);
    }
    const float* __restrict rr = as_f32(r + o, tmp, N);
    const float* __restrict kk = as_f32(k + o, tmp + P, N);
    const float* __restrict vv = as_f32(v + o, tmp + 2 * P, N);
    const float* __restrict bb = as_f32(b + o, tmp + 3 * P, N);
    const float* __restrict an = t + 1 < tk.T ? as_f32(a + o + tk.step, tmp + 4 * P, N) : zero;  // next step's a
    load_decay(dd, w + o, N);
    float* __restrict yo = y + o;
    if constexpr (tiled<NC>) {
      // per tile of 16 value indices, y and the next sa stay in registers while the N rows stream through
      for (int64_t i0 = 0; i0 < N; i0 += 16) {
        const v8 sa0 = ld8(sa + i0), sa1 = ld8(sa + i0 + 8), v0 = ld8(vv + i0), v1 = ld8(vv + i0 + 8);
        v8 y0 = {}, y1 = {}, n0 = {}, n1 = {};
        for (int64_t j = 0; j < N; ++j) {
          float* sj = st + j * N + i0;
          const v8 s0 = update8(ld8(sj), dd[j], bb[j], sa0, kk[j], v0);
          const v8 s1 = update8(ld8(sj + 8), dd[j], bb[j], sa1, kk[j], v1);
          st8(sj, s0);
          st8(sj + 8, s1);
          y0 += s0 * rr[j];
          y1 += s1 * rr[j];
          n0 += s0 * an[j];
          n1 += s1 * an[j];
        }
        st8(yo + i0, y0);
        st8(yo + i0 + 8, y1);
        st8(sn + i0, n0);
        st8(sn + i0 + 8, n1);
      }
    } else {
      for (int64_t i = 0; i < N; ++i) yo[i] = sn[i] = 0.f;
      for (int64_t j = 0; j < N; ++j) {
        float* __restrict sj = st + j * N;
        const float dj = dd[j], bj = bb[j], kj = kk[j], rj = rr[j], aj = an[j];
#pragma omp simd
        for (int64_t i = 0; i < N; ++i) {
          const float s = update1(sj[i], dj, bj, sa[i], kj, vv[i]);
          sj[i] = s;
          yo[i] += rj * s;
          sn[i] += aj * s;
        }
      }
    }
    if (sa_out != nullptr) {
#pragma omp simd
      for (int64_t i = 0; i < N; ++i) sa_out[o + i] = sa[i];
    }
    std::swap(sa, sn);
  }
  transpose_into(s_out + tk.head * NN, st, N);  // ST -> S: the same swap
}

// The backward keeps two steps in flight: the data of one step as fp32 views, its decays, and its gradients in fp32
// until they are complete.
struct Step {
  const float *r, *k, *v, *a, *b, *sa, *gy;
  float *d, *dsa, *g_r, *g_w, *g_k, *g_v, *g_a, *g_b, *tmp;
  int64_t o;  // offset of the step in the [B, T, H, N] tensors
};

template <typename F, typename FW>
inline void load_step(Step& st, int64_t o, int64_t N, int64_t P, const F* r, const FW* w, const F* k, const F* v,
                      const F* a, const F* b, const float* sa, const float* gy) {
  st.o = o;
  st.r = as_f32(r + o, st.tmp, N);
  st.k = as_f32(k + o, st.tmp + P, N);
  st.v = as_f32(v + o, st.tmp + 2 * P, N);
  st.a = as_f32(a + o, st.tmp + 3 * P, N);
  st.b = as_f32(b + o, st.tmp + 4 * P, N);
  st.sa = sa + o;
  st.gy = gy + o;
  load_decay(st.d, w + o, N);
}

template <typename F>
inline void store_vec(F* __restrict dst, const float* __restrict src, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) store(dst + i, src[i]);
}

// One sweep over the rows of G (transposed: row j holds dL/dS[:, j]) that finishes step `hi` and starts step `lo`
// = hi - 1, so that G is read and written once per step:
//   hi (when DO_HI): through sa = S a: ga = S^T dsa, G <- G * d[None, :] + dsa a^T   (G is then dL/dS before hi)
//   lo (when DO_LO): G += gy r^T (y = S' r), then gr = S'^T gy, gv = G k, dsa = G b, gk = G^T v, gb = G^T sa,
//                    gw = d * sum_i(G * S)
// S_hi is the state before step hi (= the state after step lo), S_lo the state before step lo.
template <int NC, bool DO_HI, bool DO_LO>
void sweep(int64_t N_, float* __restrict gt, const float* __restrict S_hi, const float* __restrict S_lo,
           const Step& hi, const Step& lo) {
  const int64_t N = NC > 0 ? NC : N_;
  // local restrict copies: the compiler may then keep them in registers and assume no overlap
  const float* __restrict hdsa = hi.dsa;
  const float* __restrict lgy = lo.gy;
  const float* __restrict lv = lo.v;
  const float* __restrict lsa = lo.sa;
  float* __restrict ldsa = lo.dsa;
  float* __restrict lgv = lo.g_v;
  if constexpr (DO_LO) {
    for (int64_t i = 0; i < N; ++i) ldsa[i] = lgv[i] = 0.f;
  }
  for (int64_t j = 0; j < N; ++j) {
    float* __restrict g = gt + j * N;
    const float* __restrict sh = S_hi + j * N;
    const float* __restrict sl = S_lo + j * N;
    const float dh = DO_HI ? hi.d[j] : 0.f, ah = DO_HI ? hi.a[j] : 0.f;
    const float rl = DO_LO ? lo.r[j] : 0.f, kl = DO_LO ? lo.k[j] : 0.f, bl = DO_LO ? lo.b[j] : 0.f;
    float da = 0.f, dr = 0.f, dk = 0.f, db = 0.f, dd = 0.f;
#pragma omp simd reduction(+ : da, dr, dk, db, dd)
    for (int64_t i = 0; i < N; ++i) {
      float gi = g[i];
      if constexpr (DO_HI) {
        da += sh[i] * hdsa[i];
        gi = gi * dh + ah * hdsa[i];
      }
      if constexpr (DO_LO) {
        gi += rl * lgy[i];
        dr += sh[i] * lgy[i];
        lgv[i] += kl * gi;
        ldsa[i] += bl * gi;
        dk += gi * lv[i];
        db += gi * lsa[i];
        dd += gi * sl[i];
      }
      g[i] = gi;
    }
    if constexpr (DO_HI) hi.g_a[j] = da;
    if constexpr (DO_LO) {
      lo.g_r[j] = dr;
      lo.g_w[j] = dd * lo.d[j];  // dL/dw = dL/dd * d
      lo.g_k[j] = dk;
      lo.g_b[j] = db;
    }
  }
}

template <int NC, typename F, typename FW>
void backward_task(const Task& tk, const F* r, const FW* w, const F* k, const F* v, const F* a, const F* b,
                   const float* ckpt, const float* sa_in, const float* gy, const float* gs_out, F* gr, FW* gw, F* gk,
                   F* gv, F* ga, F* gb, float* gs_in, Workspace& ws) {
  const int64_t N = NC > 0 ? NC : tk.N, NN = N * N, P = (N + 15) / 16 * 16;
  float* __restrict buf = ws.buf;  // K + 1 states: before each step of the block, and after its last one
  float* __restrict gt = ws.gt;
  Step steps[2];
  for (int m = 0; m < 2; ++m) {
    float* base = ws.vec + m * 15 * P;
    Step& st = steps[m];
    st.d = base;
    st.dsa = base + P;
    st.g_r = base + 2 * P;
    st.g_w = base + 3 * P;
    st.g_k = base + 4 * P;
    st.g_v = base + 5 * P;
    st.g_a = base + 6 * P;
    st.g_b = base + 7 * P;
    st.tmp = base + 8 * P;  // 5 P
  }
  float* __restrict kk = ws.vec + 30 * P;  // the recomputation's own fp32 copies (bf16 inputs)
  float* __restrict vv = kk + P;
  float* __restrict bb = vv + P;
  float* __restrict dd = bb + P;
  auto flush = [&](const Step& st) {  // a step whose six gradients are complete
    store_vec(gr + st.o, st.g_r, N);
    store_vec(gw + st.o, st.g_w, N);
    store_vec(gk + st.o, st.g_k, N);
    store_vec(gv + st.o, st.g_v, N);
    store_vec(ga + st.o, st.g_a, N);
    store_vec(gb + st.o, st.g_b, N);
  };
  // the states of block c into buf, from its checkpoint and the saved sa, by the forward's own update
  const int64_t nck = (tk.T + K - 1) / K;
  auto recompute = [&](int64_t c) {
    const int64_t t0 = c * K, n = std::min(K, tk.T - t0);
    std::memcpy(buf, ckpt + (tk.head * nck + c) * NN, NN * sizeof(float));
    for (int64_t s = 0; s < n; ++s) {
      const int64_t o = tk.seq + (t0 + s) * tk.step;
      const float* __restrict kv = as_f32(k + o, kk, N);
      const float* __restrict vvv = as_f32(v + o, vv, N);
      const float* __restrict bv = as_f32(b + o, bb, N);
      const float* __restrict sao = sa_in + o;
      load_decay(dd, w + o, N);
      const float* __restrict src = buf + s * NN;
      float* __restrict dst = buf + (s + 1) * NN;
      if constexpr (tiled<NC>) {
        for (int64_t j = 0; j < N; ++j)
          for (int64_t i = 0; i < N; i += 8)
            st8(dst + j * N + i, update8(ld8(src + j * N + i), dd[j], bv[j], ld8(sao + i), kv[j], ld8(vvv + i)));
      } else {
        for (int64_t j = 0; j < N; ++j) {
#pragma omp simd
          for (int64_t i = 0; i < N; ++i)
            dst[j * N + i] = update1(src[j * N + i], dd[j], bv[j], sao[i], kv[j], vvv[i]);
        }
      }
    }
    if (c > 0) {  // the inputs of block c - 1, next in line, while this one is worked on
      for (int64_t t = t0 - K; t < t0; ++t) {
        const int64_t p = tk.seq + t * tk.step;
        for (const F* x : {r, k, v, a, b}) prefetch_row(x + p, N);
        prefetch_row(w + p, N);
        prefetch_row(sa_in + p, N);
        prefetch_row(gy + p, N);
      }
    }
  };
  transpose_into(gt, gs_out + tk.head * NN, N);
  if (tk.T > 0) {
    // steps T-1 down to 0; `cur` holds step t (started), the other slot receives t - 1
    int64_t c = nck - 1;
    recompute(c);
    int cur = 0;
    int64_t t = tk.T - 1;
    load_step(steps[cur], tk.seq + t * tk.step, N, P, r, w, k, v, a, b, sa_in, gy);
    sweep<NC, false, true>(N, gt, buf + (t - c * K + 1) * NN, buf + (t - c * K) * NN, steps[cur], steps[cur]);
    for (; t > 0; --t) {
      if (t == c * K) recompute(--c);  // step t - 1 is in the block before; buf[K] is again the state before t
      const int64_t s = t - c * K;        // index of step t's "before" state in buf (K at a block boundary)
      Step& hi = steps[cur];
      Step& lo = steps[1 - cur];
      load_step(lo, tk.seq + (t - 1) * tk.step, N, P, r, w, k, v, a, b, sa_in, gy);
      sweep<NC, true, true>(N, gt, buf + s * NN, buf + (s - 1) * NN, hi, lo);
      flush(hi);
      cur = 1 - cur;
    }
    sweep<NC, true, false>(N, gt, buf, buf, steps[cur], steps[cur]);
    flush(steps[cur]);
  }
  transpose_into(gs_in + tk.head * NN, gt, N);
}

// The whole operator for one dtype pair, OpenMP over the B * H tasks (pointers as described at the top; ckpt and
// sa_out may be null in the forward).
template <typename F, typename FW>
void forward(int64_t B, int64_t T, int64_t H, int64_t N, const F* r, const FW* w, const F* k, const F* v,
             const F* a, const F* b, const float* s_in, float* y, float* s_out, float* ckpt, float* sa_out) {
#pragma omp parallel
  {
    Workspace ws(N, false);
#pragma omp for schedule(static)
    for (int64_t task = 0; task < B * H; ++task) {
      const Task tk{T, N, H * N, (task / H) * T * H * N + (task % H) * N, task};
      if (N == 64)
        forward_task<64>(tk, r, w, k, v, a, b, s_in, y, s_out, ckpt, sa_out, ws);
      else if (N == 32)
        forward_task<32>(tk, r, w, k, v, a, b, s_in, y, s_out, ckpt, sa_out, ws);
      else if (N == 128)
        forward_task<128>(tk, r, w, k, v, a, b, s_in, y, s_out, ckpt, sa_out, ws);
      else
        forward_task<0>(tk, r, w, k, v, a, b, s_in, y, s_out, ckpt, sa_out, ws);
    }
  }
}

template <typename F, typename FW>
void backward(int64_t B, int64_t T, int64_t H, int64_t N, const F* r, const FW* w, const F* k, const F* v,
              const F* a, const F* b, const float* ckpt, const float* sa, const float* gy, const float* gs_out, F* gr,
              FW* gw, F* gk, F* gv, F* ga, F* gb, float* gs_in) {
#pragma omp parallel
  {
    Workspace ws(N, true);
#pragma omp for schedule(static)
    for (int64_t task = 0; task < B * H; ++task) {
      const Task tk{T, N, H * N, (task / H) * T * H * N + (task % H) * N, task};
      if (N == 64)
        backward_task<64>(tk, r, w, k, v, a, b, ckpt, sa, gy, gs_out, gr, gw, gk, gv, ga, gb, gs_in, ws);
      else if (N == 32)
        backward_task<32>(tk, r, w, k, v, a, b, ckpt, sa, gy, gs_out, gr, gw, gk, gv, ga, gb, gs_in, ws);
      else if (N == 128)
        backward_task<128>(tk, r, w, k, v, a, b, ckpt, sa, gy, gs_out, gr, gw, gk, gv, ga, gb, gs_in, ws);
      else
        backward_task<0>(tk, r, w, k, v, a, b, ckpt, sa, gy, gs_out, gr, gw, gk, gv, ga, gb, gs_in, ws);
    }
  }
}

}  // namespace wkv7cpu

// ---------------------------------------------------------------------------------------------------------------------
// The torch binding: checks, allocations, dtype dispatch

#ifndef WKV7_NO_TORCH
#include "torch_ext.h"  // ATen and pybind11, not the whole C++ frontend

namespace {

static_assert(sizeof(at::BFloat16) == sizeof(wkv7cpu::bf16), "at::BFloat16 is expected to be 16 bits");

// returns (B, T, H, N); checks r, w, k, v, a, b and the state-shaped tensor
std::array<int64_t, 4> check_inputs(const std::vector<at::Tensor>& x, const at::Tensor& state,
                                    const char* state_name) {
  const auto& r = x[0];
  TORCH_CHECK(r.dim() == 4, "wkv7_cpu: r must be [B, T, H, N], got ", r.sizes());
  const char* names[] = {"r", "w", "k", "v", "a", "b"};
  for (size_t n = 0; n < x.size(); ++n) {
    TORCH_CHECK(x[n].device().is_cpu(), "wkv7_cpu: ", names[n], " must be on the CPU");
    TORCH_CHECK(x[n].is_contiguous(), "wkv7_cpu: ", names[n], " must be contiguous");
    TORCH_CHECK(x[n].sizes() == r.sizes(), "wkv7_cpu: ", names[n], " has shape ", x[n].sizes(), ", r ", r.sizes());
    if (n != 1)
      TORCH_CHECK(x[n].scalar_type() == r.scalar_type(), "wkv7_cpu: r, k, v, a, b must share one dtype; ", names[n],
                  " is ", x[n].scalar_type(), ", r ", r.scalar_type());
  }
  TORCH_CHECK(r.scalar_type() == at::kFloat || r.scalar_type() == at::kBFloat16,
              "wkv7_cpu: r, k, v, a, b must be float32 or bfloat16, got ", r.scalar_type());
  TORCH_CHECK(x[1].scalar_type() == r.scalar_type() || x[1].scalar_type() == at::kFloat,
              "wkv7_cpu: w must be float32 or the dtype of r, got ", x[1].scalar_type());
  const int64_t B = r.size(0), T = r.size(1), H = r.size(2), N = r.size(3);
  TORCH_CHECK(state.device().is_cpu() && state.scalar_type() == at::kFloat && state.is_contiguous() &&
                  state.sizes() == at::IntArrayRef({B, H, N, N}),
              "wkv7_cpu: ", state_name, " must be a contiguous float32 [B, H, N, N] = [", B, ", ", H, ", ", N, ", ",
              N, "] CPU tensor, got ", state.scalar_type(), " ", state.sizes());
  return {B, T, H, N};
}

void check_f32(const at::Tensor& t, const char* name, at::IntArrayRef shape) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.sizes() == shape,
              "wkv7_cpu: ", name, " must be a contiguous float32 CPU tensor of shape ", shape, ", got ",
              t.scalar_type(), " ", t.sizes());
}

// fn(F*, FW*) called with null pointers of the kernel's types for (r, k, v, a, b) and w
template <typename Fn>
void dispatch(const at::Tensor& r, const at::Tensor& w, Fn&& fn) {
  using wkv7cpu::bf16;
  if (r.scalar_type() == at::kFloat)
    fn(static_cast<float*>(nullptr), static_cast<float*>(nullptr));
  else if (w.scalar_type() == at::kBFloat16)
    fn(static_cast<bf16*>(nullptr), static_cast<bf16*>(nullptr));
  else
    fn(static_cast<bf16*>(nullptr), static_cast<float*>(nullptr));
}

template <typename T>
T* ptr(const at::Tensor& t) {
  return static_cast<T*>(t.data_ptr());
}

std::vector<at::Tensor> wkv7_forward(at::Tensor r, at::Tensor w, at::Tensor k, at::Tensor v,
                                        at::Tensor a, at::Tensor b, at::Tensor state_in, bool save) {
  const auto [B, T, H, N] = check_inputs({r, w, k, v, a, b}, state_in, "state_in");
  const auto f32 = r.options().dtype(at::kFloat);
  const int64_t nck = (T + wkv7cpu::K - 1) / wkv7cpu::K;
  auto y = r.new_empty({B, T, H, N}, f32);
  auto s_out = r.new_empty({B, H, N, N}, f32);
  auto ckpt = save ? r.new_empty({B, H, nck, N, N}, f32) : r.new_empty({0}, f32);
  auto sa = save ? r.new_empty({B, T, H, N}, f32) : r.new_empty({0}, f32);
  dispatch(r, w, [&](auto* F_, auto* FW_) {
    using F = std::remove_pointer_t<decltype(F_)>;
    using FW = std::remove_pointer_t<decltype(FW_)>;
    wkv7cpu::forward<F, FW>(B, T, H, N, ptr<F>(r), ptr<FW>(w), ptr<F>(k), ptr<F>(v), ptr<F>(a), ptr<F>(b),
                            ptr<float>(state_in), ptr<float>(y), ptr<float>(s_out),
                            save ? ptr<float>(ckpt) : nullptr, save ? ptr<float>(sa) : nullptr);
  });
  return {y, s_out, ckpt, sa};
}

std::vector<at::Tensor> wkv7_backward(at::Tensor r, at::Tensor w, at::Tensor k, at::Tensor v,
                                         at::Tensor a, at::Tensor b, at::Tensor ckpt, at::Tensor sa,
                                         at::Tensor gy, at::Tensor gstate_out) {
  const auto [B, T, H, N] = check_inputs({r, w, k, v, a, b}, gstate_out, "gstate_out");
  const int64_t nck = (T + wkv7cpu::K - 1) / wkv7cpu::K;
  check_f32(ckpt, "ckpt", {B, H, nck, N, N});
  check_f32(sa, "sa", {B, T, H, N});
  check_f32(gy, "gy", {B, T, H, N});
  auto gr = r.new_empty(r.sizes()), gw = w.new_empty(w.sizes()), gk = k.new_empty(k.sizes()), gv = v.new_empty(v.sizes()),
       ga = a.new_empty(a.sizes()), gb = b.new_empty(b.sizes());
  auto gs_in = r.new_empty({B, H, N, N}, at::kFloat);
  dispatch(r, w, [&](auto* F_, auto* FW_) {
    using F = std::remove_pointer_t<decltype(F_)>;
    using FW = std::remove_pointer_t<decltype(FW_)>;
    wkv7cpu::backward<F, FW>(B, T, H, N, ptr<F>(r), ptr<FW>(w), ptr<F>(k), ptr<F>(v), ptr<F>(a), ptr<F>(b),
                             ptr<float>(ckpt), ptr<float>(sa), ptr<float>(gy), ptr<float>(gstate_out), ptr<F>(gr),
                             ptr<FW>(gw), ptr<F>(gk), ptr<F>(gv), ptr<F>(ga), ptr<F>(gb), ptr<float>(gs_in));
  });
  return {gr, gw, gk, gv, ga, gb, gs_in};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &wkv7_forward, "WKV-7 forward (CPU)", py::arg("r"), py::arg("w"), py::arg("k"), py::arg("v"),
        py::arg("a"), py::arg("b"), py::arg("state_in"), py::arg("save"));
  m.def("backward", &wkv7_backward, "WKV-7 backward (CPU)", py::arg("r"), py::arg("w"), py::arg("k"), py::arg("v"),
        py::arg("a"), py::arg("b"), py::arg("ckpt"), py::arg("sa"), py::arg("gy"), py::arg("gstate_out"));
  m.def("checkpoint_interval", [] { return wkv7cpu::K; }, "steps between two saved states (K)");
}
#endif  // WKV7_NO_TORCH
