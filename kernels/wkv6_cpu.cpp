// RWKV-5.2 / RWKV-6 WKV operator, CPU kernel (forward and backward), for finetune/ops/wkv6.py.
//
// Per head, with the state S [N, N] (row i = key index, column j = value index) and d_t = exp(w_t):
//     y_t[j] = sum_i r_t[i] (u[i] k_t[i] v_t[j] + S_{t-1}[i][j])
//     S_t[i][j] = k_t[i] v_t[j] + d_t[i] S_{t-1}[i][j]
//
// Interface (all tensors contiguous, on the CPU; r, k, v share one dtype, fp32 or bf16; everything else fp32):
//   forward(r, w, k, v [B,T,H,N], u [H,N], state_in [B,H,N,N], col_blocks) -> (y [B,T,H,N], state_out [B,H,N,N])
//   backward(r, w, k, v, u, state_in, gy [B,T,H,N], gstate_out [B,H,N,N], col_blocks, ckpt_every)
//       -> (gr, gw, gk, gv [B,T,H,N], gu [H,N], gstate_in [B,H,N,N]), all fp32 (gw is dL/dw, w the log decay)
//   col_blocks, ckpt_every: 0 = automatic; the tests force other values to cover every path.
//
// Work split: a tile is one (batch row, head, block of value columns). The columns of S evolve independently
// (column j only ever meets v_t[j]), so a head can be cut into column blocks when B*H alone would leave threads
// idle; the sums over j (gr, gk, gw, gu) are then per-block partials, added up at the end.
// Inside a tile the forward vectorises over the block's value columns and the backward over the keys (it keeps the
// state transposed), 16 at a time when the sizes allow it, else in plain loops (any N).
//
// Backward. Differentiating the two lines above, with G_t = dL/dS_t (G_T = gstate_out):
//     gr_t[i] = sum_j S_{t-1}[i][j] gy_t[j] + u[i] k_t[i] (gy_t . v_t)
//     gk_t[i] = sum_j G_t[i][j] v_t[j]     + r_t[i] u[i] (gy_t . v_t)
//     gv_t[j] = sum_i G_t[i][j] k_t[i]     + (sum_i r_t[i] u[i] k_t[i]) gy_t[j]
//     gw_t[i] = d_t[i] sum_j G_t[i][j] S_{t-1}[i][j]
//     gu[i]  += r_t[i] k_t[i] (gy_t . v_t)
//     G_{t-1}[i][j] = d_t[i] G_t[i][j] + r_t[i] gy_t[j]          (and gstate_in = G_0)
// Walking backwards needs S_{t-1} at every step. Undoing the update (S_{t-1} = (S_t - k v^T) / d_t) is hopeless for
// d_t ~ 0, and keeping every state costs T*N*N floats per head. So the backward first reruns the forward keeping the
// state only every K steps, then, walking backwards one block of K steps at a time, recomputes that block's states
// into a small buffer and differentiates it. The scratch per thread is (ceil(T/K) + K) states of N x cols floats
// (rows padded, see row_stride), whatever B and H; with K = 16 and N = 64 that is about as much as one head's own
// inputs.

#ifndef WKV6_CORE_ONLY  // -DWKV6_CORE_ONLY: the maths alone, for a quick standalone build (no torch headers)
#include "torch_ext.h"  // ATen and pybind11, not the whole C++ frontend
#endif

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <vector>

namespace {

#ifndef WKV6_K
#define WKV6_K 16
#endif
constexpr int64_t K_DEFAULT = WKV6_K;  // backward: steps between two checkpoints of the state
constexpr int64_t PREFETCH = 2;       // steps ahead that a tile asks for its input rows
constexpr int64_t MIN_COLS = 16;       // narrowest column block worth a tile of its own (2 AVX2 / 1 AVX-512 vectors)

// bf16 as raw bits (the core needs no torch header; the binding reinterprets at::BFloat16 storage)
struct bf16 {
  uint16_t bits;
};
inline float to_f(float x) { return x; }
inline float to_f(bf16 x) {
  const uint32_t bits = static_cast<uint32_t>(x.bits) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// 8 floats, GCC/Clang vector extension: the fast paths spell their loops in these so that accumulators stay in
// registers (the compiler does not keep a runtime-length accumulator array there). memcpy = unaligned load/store.
typedef float vf __attribute__((vector_size(32)));
inline vf vload(const float* p) {
  vf x;
  std::memcpy(&x, p, sizeof(x));
  return x;
}
inline void vstore(float* p, vf x) { std::memcpy(p, &x, sizeof(x)); }
inline float hsum(vf x) { return ((x[0] + x[4]) + (x[1] + x[5])) + ((x[2] + x[6]) + (x[3] + x[7])); }

// exp(w) for the log decay w <= 0, inline and branch-free so that the loops over keys vectorise (a call to expf per
// key cost more than the whole state update). e^w = 2^n e^f with n = round(w / ln 2) and |f| <= ln(2) / 2, f taken
// from w in two parts (ln 2 = hi + lo, hi with a short mantissa so n * hi is exact); e^f by its Taylor series to
// f^7 (the next term is below 6e-9 relative, under 1 ulp); 2^n built in the exponent bits. Below -87 the true value
// is under 1.7e-38: flushed to 0 so that the state never holds denormals (slow on many CPUs); the relative change
// to any output is below 1e-37. w = -inf gives 0.
inline float decay_of(float w) {
  const float x = std::max(w, -87.0f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  // explicit fmas: -ffast-math would otherwise fold the two parts back into one rounded ln 2
  const float f = std::fma(n, -1.428606820309417e-6f, std::fma(n, -0.693145751953125f, x));
  float p = 1.0f / 5040.0f;
  p = p * f + 1.0f / 720.0f;
  p = p * f + 1.0f / 120.0f;
  p = p * f + 1.0f / 24.0f;
  p = p * f + 1.0f / 6.0f;
  p = p * f + 0.5f;
  p = p * f + 1.0f;
  p = p * f + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return w < -87.0f ? 0.0f : p * scale;
}

struct Shape {
  int64_t B, T, H, N;
  // offset of (b, t, h, 0) in a [B, T, H, N] tensor
  int64_t at(int64_t b, int64_t t, int64_t h) const { return ((b * T + t) * H + h) * N; }
  // offset of (b, h, 0, 0) in a [B, H, N, N] state
  int64_t state(int64_t b, int64_t h) const { return (b * H + h) * N * N; }
};

// Row length (in floats) of a state buffer whose rows hold n numbers. A row of 64 floats is 4 cache lines: walking
// down a column of such rows touches only every 4th set of the L1 cache, where the state and its gradient (16 KiB
// each) can evict each other; one line of padding (an odd number of lines per row) spreads them over every set.
// (Insurance: no difference above the noise was measured on the 2-core development machine.)
inline int64_t row_stride(int64_t n) { return n % 16 == 0 && (n / 16) % 2 == 0 ? n + 16 : n; }

// A float buffer aligned to the 64-byte cache line (rows then start on a line, and a 16-float chunk is one line).
class Buf {
 public:
  explicit Buf(int64_t n) {
    const int64_t bytes = std::max<int64_t>(64, (4 * n + 63) / 64 * 64);  // aligned_alloc wants a multiple of 64
    p_ = static_cast<float*>(std::aligned_alloc(64, static_cast<size_t>(bytes)));
    if (p_ == nullptr) throw std::bad_alloc();
  }
  ~Buf() { std::free(p_); }
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
  float* data() const { return p_; }
  float& operator[](int64_t i) const { return p_[i]; }

 private:
  float* p_;
};

// Per-thread buffers, sized once per call (never by B or H). M: floats of one tile's state (rows x padded stride).
struct Work {
  Buf S, G, ckpt, buf, dec, rr, kk, vv, gg, acc, gu, ar, ak, aw, P;
  Work(int64_t N, int64_t J, int64_t M, int64_t nck, int64_t K)
      : S(M), G(M), ckpt(nck * M), buf(K * M), dec(std::max<int64_t>(K, 1) * N), rr(N), kk(N), vv(J), gg(J), acc(J),
        gu(N), ar(N), ak(N), aw(N), P(8 * J) {}
};

// r_t and k_t of the whole head into fp32 buffers; returns sum_i r_t[i] u[i] k_t[i] (the bonus coefficient).
template <typename scalar_t>
inline float load_rk(const scalar_t* __restrict r, const scalar_t* __restrict k, const float* __restrict u,
                     float* __restrict rr, float* __restrict kk, int64_t N) {
  float ruk = 0.f;
  for (int64_t i = 0; i < N; ++i) {
    rr[i] = to_f(r[i]);
    kk[i] = to_f(k[i]);
    ruk += rr[i] * u[i] * kk[i];
  }
  return ruk;
}

// Asks for the n elements at p ahead of their use. A tile walks [B, T, H, N] inputs with a stride of H*N elements
// per step, which the hardware prefetchers (stopped at every 4 KiB page) do not follow: without this a step spends
// more time waiting for its rows than computing.
template <typename scalar_t>
inline void prefetch(const scalar_t* p, int64_t n) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t i = 0; i < n * static_cast<int64_t>(sizeof(scalar_t)); i += 64) __builtin_prefetch(c + i);
}

template <typename scalar_t>
inline void load_vec(const scalar_t* __restrict x, float* __restrict out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = to_f(x[i]);
}

// ---------------------------------------------------------------------------------------------------------------------
// Forward. The tile's state is kept as S[i][j] (key-major, the tile's J columns contiguous): y_t is then a sum of
// rows, vectorised over j with no horizontal sums.

// One step, any J: acc = y_t (starting from the bonus ruk * v), S <- d * S + k v^T.
inline void forward_step_generic(float* __restrict S, int64_t N, int64_t J, int64_t L, const float* __restrict rr,
                                 const float* __restrict kk, const float* __restrict d, const float* __restrict vv,
                                 float ruk, float* __restrict acc) {
  for (int64_t j = 0; j < J; ++j) acc[j] = ruk * vv[j];
  for (int64_t i = 0; i < N; ++i) {
    const float ri = rr[i], di = d[i], ki = kk[i];
    float* __restrict Si = S + i * L;
#pragma omp simd
    for (int64_t j = 0; j < J; ++j) {
      acc[j] += ri * Si[j];
      Si[j] = di * Si[j] + ki * vv[j];
    }
  }
}

// The same for J % 16 == 0: 16 columns at a time, two rows per iteration into separate accumulators (four
// independent FMA chains: one chain would wait on the FMA latency at every row).
inline void forward_step_vec(float* __restrict S, int64_t N, int64_t J, int64_t L, const float* __restrict rr,
                             const float* __restrict kk, const float* __restrict d, const float* __restrict vv,
                             float ruk, float* __restrict y) {
  for (int64_t c = 0; c < J; c += 16) {
    const vf v0 = vload(vv + c), v1 = vload(vv + c + 8);
    vf a0 = v0 * ruk, a1 = v1 * ruk, b0 = {}, b1 = {};
    int64_t i = 0;
    for (; i + 2 <= N; i += 2) {
      float* p = S + i * L + c;
      float* q = p + L;
      const vf s0 = vload(p), s1 = vload(p + 8), t0 = vload(q), t1 = vload(q + 8);
      a0 += rr[i] * s0;
      a1 += rr[i] * s1;
      b0 += rr[i + 1] * t0;
      b1 += rr[i + 1] * t1;
      vstore(p, d[i] * s0 + kk[i] * v0);
      vstore(p + 8, d[i] * s1 + kk[i] * v1);
      vstore(q, d[i + 1] * t0 + kk[i + 1] * v0);
      vstore(q + 8, d[i + 1] * t1 + kk[i + 1] * v1);
    }
    if (i < N) {
      float* p = S + i * L + c;
      const vf s0 = vload(p), s1 = vload(p + 8);
      a0 += rr[i] * s0;
      a1 += rr[i] * s1;
      vstore(p, d[i] * s0 + kk[i] * v0);
      vstore(p + 8, d[i] * s1 + kk[i] * v1);
    }
    vstore(y + c, a0 + b0);
    vstore(y + c + 8, a1 + b1);
  }
}

template <typename scalar_t>
void forward_tile(const Shape& s, int64_t b, int64_t h, int64_t j0, int64_t J, const scalar_t* r, const float* w,
                  const scalar_t* k, const scalar_t* v, const float* u, const float* s_in, float* y, float* s_out,
                  Work& ws) {
  const int64_t N = s.N;
  float* S = ws.S.data();
  float* d = ws.dec.data();
  float* rr = ws.rr.data();
  float* kk = ws.kk.data();
  float* vv = ws.vv.data();
  const float* uh = u + h * N;
  const bool vec = J % 16 == 0;
  const int64_t L = row_stride(J);
  const float* sp = s_in + s.state(b, h);
  for (int64_t i = 0; i < N; ++i) std::memcpy(S + i * L, sp + i * N + j0, J * sizeof(float));
  for (int64_t t = 0; t < s.T; ++t) {
    const int64_t o = s.at(b, t, h);
    if (t + PREFETCH < s.T) {
      const int64_t p = s.at(b, t + PREFETCH, h);
      prefetch(r + p, N);
      prefetch(w + p, N);
      prefetch(k + p, N);
      prefetch(v + p + j0, J);
    }
    const float ruk = load_rk(r + o, k + o, uh, rr, kk, N);
    for (int64_t i = 0; i < N; ++i) d[i] = decay_of(w[o + i]);
    load_vec(v + o + j0, vv, J);
    if (vec) {
      forward_step_vec(S, N, J, L, rr, kk, d, vv, ruk, y + o + j0);
    } else {
      forward_step_generic(S, N, J, L, rr, kk, d, vv, ruk, ws.acc.data());
      std::memcpy(y + o + j0, ws.acc.data(), J * sizeof(float));
    }
  }
  float* so = s_out + s.state(b, h);
  for (int64_t i = 0; i < N; ++i) std::memcpy(so + i * N + j0, S + i * L, J * sizeof(float));
}

// ---------------------------------------------------------------------------------------------------------------------
// Backward. Here the tile's state and its gradient are kept transposed, ST[j][i] (value-major, the N keys
// contiguous): of the four sums a step needs (gr, gk, gw over j; gv over i) three then accumulate as vectors over
// i and only gv needs a horizontal sum, once per column.

// dst <- d * src + k v^T in the transposed layout (dst may be src).
inline void update_state_t(float* dst, const float* src, const float* __restrict d, const float* __restrict kk,
                           const float* __restrict vv, int64_t N, int64_t J, int64_t L) {
  for (int64_t j = 0; j < J; ++j) {
    const float vj = vv[j];
    float* Dj = dst + j * L;
    const float* Sj = src + j * L;
#pragma omp simd
    for (int64_t i = 0; i < N; ++i) Dj[i] = d[i] * Sj[i] + kk[i] * vj;
  }
}

// Everything one backward step needs besides the states.
struct StepIn {
  const float *rr, *kk, *d, *uh, *vv, *gg;
  float gyv, ruk;
};
// Where it writes: gr, gk, gw (N keys, this column block's partials), gv (J columns), gu_acc (N, accumulated).
struct StepOut {
  float *gr, *gk, *gw, *gv, *gu_acc;
};

// One step backwards, any N: Sp = S_{t-1}^T, G = G_t^T on entry and G_{t-1}^T on return (both [J][N]).
inline void backward_step_generic(const float* __restrict Sp, float* __restrict G, int64_t N, int64_t J, int64_t L,
                                  const StepIn& in, const StepOut& out, Work& ws) {
  float* __restrict ar = ws.ar.data();
  float* __restrict ak = ws.ak.data();
  float* __restrict aw = ws.aw.data();
  std::fill(ar, ar + N, 0.f);
  std::fill(ak, ak + N, 0.f);
  std::fill(aw, aw + N, 0.f);
  for (int64_t j = 0; j < J; ++j) {
    const float* __restrict s = Sp + j * L;
    float* __restrict g = G + j * L;
    const float gj = in.gg[j], vj = in.vv[j];
    float pv = 0.f;
#pragma omp simd reduction(+ : pv)
    for (int64_t i = 0; i < N; ++i) {
      const float gi = g[i];
      ar[i] += s[i] * gj;
      ak[i] += gi * vj;
      aw[i] += gi * s[i];
      pv += gi * in.kk[i];
      g[i] = in.d[i] * gi + in.rr[i] * gj;
    }
    out.gv[j] = pv + in.ruk * gj;
  }
  for (int64_t i = 0; i < N; ++i) {
    out.gr[i] = ar[i] + in.uh[i] * in.kk[i] * in.gyv;
    out.gk[i] = ak[i] + in.rr[i] * in.uh[i] * in.gyv;
    out.gw[i] = in.d[i] * aw[i];
    out.gu_acc[i] += in.rr[i] * in.kk[i] * in.gyv;
  }
}

// The same for N % 16 == 0: 16 keys at a time, every accumulator in registers; gv's per-column partial vectors go
// to P [J][8] and are summed once at the end.
inline void backward_step_vec(const float* __restrict Sp, float* __restrict G, int64_t N, int64_t J, int64_t L,
                              const StepIn& in, const StepOut& out, Work& ws) {
  float* __restrict P = ws.P.data();
  std::fill(P, P + 8 * J, 0.f);
  for (int64_t i0 = 0; i0 < N; i0 += 16) {
    const vf d0 = vload(in.d + i0), d1 = vload(in.d + i0 + 8);
    const vf r0 = vload(in.rr + i0), r1 = vload(in.rr + i0 + 8);
    const vf k0 = vload(in.kk + i0), k1 = vload(in.kk + i0 + 8);
    vf ar0 = {}, ar1 = {}, ak0 = {}, ak1 = {}, aw0 = {}, aw1 = {};
    for (int64_t j = 0; j < J; ++j) {
      const float* s = Sp + j * L + i0;
      float* g = G + j * L + i0;
      const vf s0 = vload(s), s1 = vload(s + 8), g0 = vload(g), g1 = vload(g + 8);
      const float gj = in.gg[j], vj = in.vv[j];
      ar0 += s0 * gj;
      ar1 += s1 * gj;
      ak0 += g0 * vj;
      ak1 += g1 * vj;
      aw0 += g0 * s0;
      aw1 += g1 * s1;
      vstore(P + 8 * j, vload(P + 8 * j) + (g0 * k0 + g1 * k1));
      vstore(g, d0 * g0 + r0 * gj);
      vstore(g + 8, d1 * g1 + r1 * gj);
    }
    const vf u0 = vload(in.uh + i0), u1 = vload(in.uh + i0 + 8);
    vstore(out.gr + i0, ar0 + u0 * k0 * in.gyv);
    vstore(out.gr + i0 + 8, ar1 + u1 * k1 * in.gyv);
    vstore(out.gk + i0, ak0 + r0 * u0 * in.gyv);
    vstore(out.gk + i0 + 8, ak1 + r1 * u1 * in.gyv);
    vstore(out.gw + i0, d0 * aw0);
    vstore(out.gw + i0 + 8, d1 * aw1);
    vstore(out.gu_acc + i0, vload(out.gu_acc + i0) + r0 * k0 * in.gyv);
    vstore(out.gu_acc + i0 + 8, vload(out.gu_acc + i0 + 8) + r1 * k1 * in.gyv);
  }
  for (int64_t j = 0; j < J; ++j) out.gv[j] = hsum(vload(P + 8 * j)) + in.ruk * in.gg[j];
}

// One tile of the backward, recomputation included. gr, gk, gw: this column block's partial sums [B,T,H,N];
// gu: this (column block, batch row)'s partial [H,N]; gv and gs_in: the tile's own columns of the full outputs.
template <typename scalar_t>
void backward_tile(const Shape& s, int64_t b, int64_t h, int64_t j0, int64_t J, int64_t K, const scalar_t* r,
                   const float* w, const scalar_t* k, const scalar_t* v, const float* u, const float* s_in,
                   const float* gy, const float* gs_out, float* gr, float* gw, float* gk, float* gv, float* gu,
                   float* gs_in, Work& ws) {
  const int64_t N = s.N, T = s.T, L = row_stride(N), NJ = J * L;
  const int64_t nck = (T + K - 1) / K;
  const bool vec = N % 16 == 0;
  float* S = ws.S.data();
  float* G = ws.G.data();
  float* rr = ws.rr.data();
  float* kk = ws.kk.data();
  float* vv = ws.vv.data();
  float* gg = ws.gg.data();
  float* gu_acc = ws.gu.data();
  const float* uh = u + h * N;

  // pass 1: the state at the start of every block of K steps
  const float* sp = s_in + s.state(b, h);
  for (int64_t i = 0; i < N; ++i)
    for (int64_t j = 0; j < J; ++j) S[j * L + i] = sp[i * N + j0 + j];
  for (int64_t c = 0; c < nck; ++c) {
    std::memcpy(ws.ckpt.data() + c * NJ, S, NJ * sizeof(float));
    if (c + 1 == nck) break;  // the last block's own states are recomputed in pass 2
    for (int64_t t = c * K; t < (c + 1) * K; ++t) {
      const int64_t o = s.at(b, t, h);
      if (t + PREFETCH < T) {
        const int64_t p = s.at(b, t + PREFETCH, h);
        prefetch(w + p, N);
        prefetch(k + p, N);
        prefetch(v + p + j0, J);
      }
      load_vec(k + o, kk, N);
      for (int64_t i = 0; i < N; ++i) ws.dec[i] = decay_of(w[o + i]);
      load_vec(v + o + j0, vv, J);
      update_state_t(S, S, ws.dec.data(), kk, vv, N, J, L);
    }
  }

  // pass 2: backwards, block by block
  const float* gp = gs_out + s.state(b, h);
  for (int64_t i = 0; i < N; ++i)
    for (int64_t j = 0; j < J; ++j) G[j * L + i] = gp[i * N + j0 + j];
  std::fill(gu_acc, gu_acc + N, 0.f);
  for (int64_t c = nck - 1; c >= 0; --c) {
    const int64_t t0 = c * K, t1 = std::min(T, t0 + K);
    // buf[m] = S_{t0+m-1}^T, the state before step t0+m; dec[m] = that step's decays
    float* buf = ws.buf.data();
    std::memcpy(buf, ws.ckpt.data() + c * NJ, NJ * sizeof(float));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t o = s.at(b, t, h), m = t - t0;
      if (t + PREFETCH < t1) {
        const int64_t p = s.at(b, t + PREFETCH, h);
        prefetch(w + p, N);
        prefetch(k + p, N);
        prefetch(v + p + j0, J);
      }
      float* d = ws.dec.data() + m * N;
      for (int64_t i = 0; i < N; ++i) d[i] = decay_of(w[o + i]);
      if (t + 1 == t1) break;
      load_vec(k + o, kk, N);
      load_vec(v + o + j0, vv, J);
      update_state_t(buf + (m + 1) * NJ, buf + m * NJ, d, kk, vv, N, J, L);
    }
    for (int64_t t = t1 - 1; t >= t0; --t) {
      const int64_t o = s.at(b, t, h), m = t - t0;
      if (t - PREFETCH >= t0) {  // (the block's recomputation, just done, brought w, k, v of the block in)
        const int64_t p = s.at(b, t - PREFETCH, h);
        prefetch(r + p, N);
        prefetch(gy + p + j0, J);
      }
      StepIn in{rr, kk, ws.dec.data() + m * N, uh, vv, gg, 0.f, load_rk(r + o, k + o, uh, rr, kk, N)};
      load_vec(v + o + j0, vv, J);
      for (int64_t j = 0; j < J; ++j) {
        gg[j] = gy[o + j0 + j];
        in.gyv += gg[j] * vv[j];
      }
      const StepOut out{gr + o, gk + o, gw + o, gv + o + j0, gu_acc};
      if (vec)
        backward_step_vec(buf + m * NJ, G, N, J, L, in, out, ws);
      else
        backward_step_generic(buf + m * NJ, G, N, J, L, in, out, ws);
    }
  }
  float* gi = gs_in + s.state(b, h);
  for (int64_t i = 0; i < N; ++i)
    for (int64_t j = 0; j < J; ++j) gi[i * N + j0 + j] = G[j * L + i];
  std::memcpy(gu + h * N, gu_acc, N * sizeof(float));
}

// Number of column blocks per head: 1 unless B*H tiles would leave threads idle; then the split that minimises the
// longest thread's work (in head-units: ceil(tiles / threads) / blocks), only if it gains at least 10%.
int64_t auto_col_blocks(int64_t BH, int64_t N, int64_t threads) {
  int64_t best = 1;
  double best_cost = static_cast<double>((BH + threads - 1) / threads);
  for (int64_t nb = 2; N % nb == 0 && N / nb >= MIN_COLS; nb *= 2) {
    const double cost = static_cast<double>((BH * nb + threads - 1) / threads) / static_cast<double>(nb);
    if (cost < 0.9 * best_cost) {
      best = nb;
      best_cost = cost;
    }
  }
  return best;
}

#ifndef WKV6_CORE_ONLY

const bf16* as_bf16(const at::Tensor& t) { return reinterpret_cast<const bf16*>(t.data_ptr<at::BFloat16>()); }

Shape check_inputs(const at::Tensor& r, const at::Tensor& w, const at::Tensor& k, const at::Tensor& v,
                   const at::Tensor& u, const at::Tensor& s) {
  TORCH_CHECK(r.dim() == 4, "wkv6_cpu: r must be [B, T, H, N], got ", r.sizes());
  const Shape sh{r.size(0), r.size(1), r.size(2), r.size(3)};
  for (const auto* x : {&r, &w, &k, &v, &u, &s}) {
    TORCH_CHECK(x->device().is_cpu(), "wkv6_cpu: all tensors must be on the CPU");
    TORCH_CHECK(x->is_contiguous(), "wkv6_cpu: all tensors must be contiguous");
  }
  TORCH_CHECK(r.scalar_type() == at::kFloat || r.scalar_type() == at::kBFloat16,
              "wkv6_cpu: r, k, v must be float32 or bfloat16, got ", r.scalar_type());
  TORCH_CHECK(k.scalar_type() == r.scalar_type() && v.scalar_type() == r.scalar_type(),
              "wkv6_cpu: r, k and v must share one dtype");
  TORCH_CHECK(w.scalar_type() == at::kFloat && u.scalar_type() == at::kFloat && s.scalar_type() == at::kFloat,
              "wkv6_cpu: w, u and the state must be float32");
  TORCH_CHECK(w.sizes() == r.sizes() && k.sizes() == r.sizes() && v.sizes() == r.sizes(),
              "wkv6_cpu: r, w, k, v must have one shape [B, T, H, N]");
  TORCH_CHECK(u.dim() == 2 && u.size(0) == sh.H && u.size(1) == sh.N, "wkv6_cpu: u must be [H, N], got ", u.sizes());
  TORCH_CHECK(s.dim() == 4 && s.size(0) == sh.B && s.size(1) == sh.H && s.size(2) == sh.N && s.size(3) == sh.N,
              "wkv6_cpu: state must be [B, H, N, N], got ", s.sizes());
  return sh;
}

int64_t pick_col_blocks(const Shape& sh, int64_t col_blocks) {
  if (col_blocks <= 0) return auto_col_blocks(sh.B * sh.H, sh.N, omp_get_max_threads());
  TORCH_CHECK(sh.N % col_blocks == 0, "wkv6_cpu: col_blocks (", col_blocks, ") must divide N (", sh.N, ")");
  return col_blocks;
}

std::vector<at::Tensor> wkv6_forward(at::Tensor r, at::Tensor w, at::Tensor k, at::Tensor v,
                                        at::Tensor u, at::Tensor state_in, int64_t col_blocks) {
  const Shape sh = check_inputs(r, w, k, v, u, state_in);
  const int64_t nb = pick_col_blocks(sh, col_blocks), J = sh.N / std::max<int64_t>(nb, 1);
  auto f32 = r.options().dtype(at::kFloat);
  auto y = r.new_empty({sh.B, sh.T, sh.H, sh.N}, f32);
  auto s_out = r.new_empty({sh.B, sh.H, sh.N, sh.N}, f32);
  const int64_t tiles = sh.B * sh.H * nb;
  const float *wp = w.data_ptr<float>(), *up = u.data_ptr<float>(), *sp = state_in.data_ptr<float>();
  float *yp = y.data_ptr<float>(), *sop = s_out.data_ptr<float>();
  auto run = [&](const auto* rp, const auto* kp, const auto* vp) {
#pragma omp parallel
    {
      Work ws(sh.N, J, sh.N * row_stride(J), 0, 0);
#pragma omp for schedule(static)
      for (int64_t tile = 0; tile < tiles; ++tile) {
        const int64_t jb = tile % nb, bh = tile / nb;
        forward_tile(sh, bh / sh.H, bh % sh.H, jb * J, J, rp, wp, kp, vp, up, sp, yp, sop, ws);
      }
    }
  };
  if (r.scalar_type() == at::kFloat)
    run(r.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>());
  else
    run(as_bf16(r), as_bf16(k), as_bf16(v));
  return {y, s_out};
}

std::vector<at::Tensor> wkv6_backward(at::Tensor r, at::Tensor w, at::Tensor k, at::Tensor v,
                                         at::Tensor u, at::Tensor state_in, at::Tensor gy,
                                         at::Tensor gstate_out, int64_t col_blocks, int64_t ckpt_every) {
  const Shape sh = check_inputs(r, w, k, v, u, state_in);
  TORCH_CHECK(gy.scalar_type() == at::kFloat && gy.is_contiguous() && gy.sizes() == r.sizes(),
              "wkv6_cpu: gy must be a contiguous float32 [B, T, H, N]");
  TORCH_CHECK(gstate_out.scalar_type() == at::kFloat && gstate_out.is_contiguous() &&
                  gstate_out.sizes() == state_in.sizes(),
              "wkv6_cpu: gstate_out must be a contiguous float32 [B, H, N, N]");
  TORCH_CHECK(ckpt_every >= 0, "wkv6_cpu: ckpt_every must be >= 0");
  const int64_t nb = pick_col_blocks(sh, col_blocks), J = sh.N / std::max<int64_t>(nb, 1);
  const int64_t K = std::max<int64_t>(1, std::min<int64_t>(ckpt_every > 0 ? ckpt_every : K_DEFAULT, sh.T));
  const int64_t nck = (sh.T + K - 1) / K;
  auto f32 = r.options().dtype(at::kFloat);
  // the sums over value columns (gr, gk, gw, gu) are per column block, added up below; with one block the partial
  // is the result itself
  auto gr = r.new_empty({nb, sh.B, sh.T, sh.H, sh.N}, f32);
  auto gk = r.new_empty({nb, sh.B, sh.T, sh.H, sh.N}, f32);
  auto gw = r.new_empty({nb, sh.B, sh.T, sh.H, sh.N}, f32);
  auto gu = r.new_empty({nb, sh.B, sh.H, sh.N}, f32);
  auto gv = r.new_empty({sh.B, sh.T, sh.H, sh.N}, f32);
  auto gs_in = r.new_empty({sh.B, sh.H, sh.N, sh.N}, f32);
  const int64_t tiles = sh.B * sh.H * nb, part = sh.B * sh.T * sh.H * sh.N;
  const float *wp = w.data_ptr<float>(), *up = u.data_ptr<float>(), *sp = state_in.data_ptr<float>();
  const float *gyp = gy.data_ptr<float>(), *gsop = gstate_out.data_ptr<float>();
  float *grp = gr.data_ptr<float>(), *gwp = gw.data_ptr<float>(), *gkp = gk.data_ptr<float>();
  float *gvp = gv.data_ptr<float>(), *gup = gu.data_ptr<float>(), *gsp = gs_in.data_ptr<float>();
  auto run = [&](const auto* rp, const auto* kp, const auto* vp) {
#pragma omp parallel
    {
      Work ws(sh.N, J, J * row_stride(sh.N), nck, K);
#pragma omp for schedule(static)
      for (int64_t tile = 0; tile < tiles; ++tile) {
        const int64_t jb = tile % nb, bh = tile / nb, b = bh / sh.H;
        backward_tile(sh, b, bh % sh.H, jb * J, J, K, rp, wp, kp, vp, up, sp, gyp, gsop, grp + jb * part,
                      gwp + jb * part, gkp + jb * part, gvp, gup + (jb * sh.B + b) * sh.H * sh.N, gsp, ws);
      }
    }
  };
  if (sh.B * sh.H > 0 && sh.N > 0) {
    if (r.scalar_type() == at::kFloat)
      run(r.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>());
    else
      run(as_bf16(r), as_bf16(k), as_bf16(v));
  }
  auto reduce = [&](const at::Tensor& p) { return nb == 1 ? p[0] : p.sum(0); };
  return {reduce(gr), reduce(gw), reduce(gk), gv, gu.sum({0, 1}), gs_in};
}

#endif  // WKV6_CORE_ONLY

}  // namespace

#ifndef WKV6_CORE_ONLY
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &wkv6_forward, "WKV-5/6 forward (CPU)", py::arg("r"), py::arg("w"), py::arg("k"), py::arg("v"),
        py::arg("u"), py::arg("state_in"), py::arg("col_blocks") = 0);
  m.def("backward", &wkv6_backward, "WKV-5/6 backward (CPU)", py::arg("r"), py::arg("w"), py::arg("k"), py::arg("v"),
        py::arg("u"), py::arg("state_in"), py::arg("gy"), py::arg("gstate_out"), py::arg("col_blocks") = 0,
        py::arg("ckpt_every") = 0);
}
#endif  // WKV6_CORE_ONLY
