// RWKV-4 WKV operator, CPU kernel (forward and backward), for finetune/wkv.py.
//
// Interface (all tensors contiguous, on the CPU; w = -exp(time_decay) in fp32; k and v fp32 or bf16, same dtype):
//   forward(w[C], u[C], k[B,T,C], v[B,T,C], state_in[B,3,C]) -> (y[B,T,C] fp32, state_out[B,3,C] fp32)
//   backward(w, u, k, v, state_in, gy[B,T,C], gstate_out[B,3,C]) -> (gw[C], gu[C], gk[B,T,C], gv[B,T,C], gstate_in[B,3,C])
//   (gk and gv in the dtype of k and v, rounded to nearest even for bf16; everything else fp32)
//
// The state (a, b, p) holds the numerator and denominator as a*e^p and b*e^p, p being a running max, so that no
// exponential of a large positive number is ever taken. Work is split into tiles of one batch row and a block of
// up to CB consecutive channels; each OpenMP thread walks the time axis for its tile with an inner loop over the
// channels of the block, which the compiler vectorises (the channels are contiguous in the [B,T,C] layout).
//
// Backward: a first pass reruns the state update, keeping the state only every K steps; walking backwards, each block
// of K steps is recomputed into a small per-thread buffer (no scratch sized by T or C), then differentiated
// backwards with the gradients of the numerator and denominator kept in scaled form
// (ga = dL/dA * e^p, gb = dL/dB * e^p, both bounded). The gradient reaching p_out beyond what the scaled form
// accounts for (r = g_p - g_a*a - g_b*b) follows the path of the running max back, as the autograd of the
// reference does (ties split in halves, like torch.maximum).

#include "torch_ext.h"  // ATen and pybind11, not the whole C++ frontend

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_math.h"  // exp_f32

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace {

#ifndef WKV_CB
#define WKV_CB 128
#endif
#ifndef WKV_K
#define WKV_K 32
#endif
constexpr int64_t CB = WKV_CB;  // channels per tile
constexpr int64_t K = WKV_K;   // backward: time steps between two checkpoints of the state

inline float to_f(float x) { return x; }
inline float to_f(at::BFloat16 x) {
  uint16_t raw;
  std::memcpy(&raw, &x, sizeof(raw));
  uint32_t bits = static_cast<uint32_t>(raw) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// e^x: exp_f32 (kernels/cpu_math.h). Every exponent here is <= 0 ("something minus the max"); below -87 (e.g. the
// empty state's p = -1e38) it returns 0 exactly, never NaN.

// float -> bf16 bits, round to nearest even (as c10::BFloat16), NaN -> quiet NaN; branch-free so loops vectorise.
inline uint16_t to_bf16_bits(float f) {
  const uint32_t bits = std::bit_cast<uint32_t>(f);
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  return f != f ? uint16_t(0x7FC0) : static_cast<uint16_t>(rounded);
}
inline void store(float* p, float x) { *p = x; }
inline void store(at::BFloat16* p, float x) { *reinterpret_cast<uint16_t*>(p) = to_bf16_bits(x); }

// One tile of the forward recurrence. Pointers are already offset to the batch row b (k, v, y: [T,C] rows;
// s_in, s_out: [3,C]); the tile covers channels c0 .. c0+n-1 (n <= CB).
template <typename scalar_t>
void forward_tile(const float* __restrict w, const float* __restrict u, const scalar_t* __restrict k,
                  const scalar_t* __restrict v, const float* __restrict s_in, float* __restrict y,
                  float* __restrict s_out, int64_t T, int64_t C, int64_t c0, int64_t n) {
  alignas(64) float a[CB], b[CB], p[CB], ww_[CB], uu[CB];
  for (int64_t i = 0; i < n; ++i) {
    a[i] = s_in[c0 + i];
    b[i] = s_in[C + c0 + i];
    p[i] = s_in[2 * C + c0 + i];
    ww_[i] = w[c0 + i];
    uu[i] = u[c0 + i];
  }
  for (int64_t t = 0; t < T; ++t) {
    const scalar_t* kt = k + t * C + c0;
    const scalar_t* vt = v + t * C + c0;
    float* yt = y + t * C + c0;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const float kk = to_f(kt[i]), vv = to_f(vt[i]);
      const float wo = uu[i] + kk;
      const float e = exp_f32(-std::abs(p[i] - wo));  // one of e^(p-q), e^(wo-q) is 1, q being the max
      const float e1 = p[i] >= wo ? 1.f : e, e2 = p[i] >= wo ? e : 1.f;
      yt[i] = (e1 * a[i] + e2 * vv) / (e1 * b[i] + e2);
      const float ww = p[i] + ww_[i];
      const float q = std::max(ww, kk);
      const float f = exp_f32(-std::abs(ww - kk));
      const float f1 = ww >= kk ? 1.f : f, f2 = ww >= kk ? f : 1.f;
      a[i] = f1 * a[i] + f2 * vv;
      b[i] = f1 * b[i] + f2;
      p[i] = q;
    }
  }
  for (int64_t i = 0; i < n; ++i) {
    s_out[c0 + i] = a[i];
    s_out[C + c0 + i] = b[i];
    s_out[2 * C + c0 + i] = p[i];
  }
}

// The state update for steps t0 .. t1-1 of a tile, starting from (a, b, p) (updated in place). When buf is given it
// records, per step, the state before the step and the exponential of the update: buf[(t-t0)*4*CB + {0,1,2,3}*CB + i]
// = a, b, p, e^-|p+w-k|.
template <typename scalar_t>
inline void advance(const float* __restrict ww_, const scalar_t* __restrict k, const scalar_t* __restrict v,
                    float* __restrict a, float* __restrict b, float* __restrict p, float* __restrict buf, int64_t t0,
                    int64_t t1, int64_t C, int64_t c0, int64_t n) {
  for (int64_t t = t0; t < t1; ++t) {
    const scalar_t* kt = k + t * C + c0;
    const scalar_t* vt = v + t * C + c0;
    float* bt = buf ? buf + (t - t0) * 4 * CB : nullptr;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const float kk = to_f(kt[i]), vv = to_f(vt[i]);
      const float ww = p[i] + ww_[i];
      const float q = std::max(ww, kk);
      const float e = exp_f32(-std::abs(ww - kk));
      const float e1 = ww >= kk ? 1.f : e, e2 = ww >= kk ? e : 1.f;
      if (bt) {
        bt[i] = a[i];
        bt[CB + i] = b[i];
        bt[2 * CB + i] = p[i];
        bt[3 * CB + i] = e;
      }
      a[i] = e1 * a[i] + e2 * vv;
      b[i] = e1 * b[i] + e2;
      p[i] = q;
    }
  }
}

// One tile of the backward pass (recomputation included). The forward is rerun keeping the state only every K steps
// (ckpt: [ceil(T/K), 3, CB]); walking backwards, each block of K steps is recomputed into buf ([K, 4, CB], small
// enough to stay in L1/L2) and then differentiated. gw_part, gu_part: this batch row's partial sums [C].
template <typename scalar_t>
void backward_tile(const float* __restrict w, const float* __restrict u, const scalar_t* __restrict k,
                   const scalar_t* __restrict v, const float* __restrict s_in, const float* __restrict gy,
                   const float* __restrict gs_out, float* __restrict gw_part, float* __restrict gu_part,
                   scalar_t* __restrict gk, scalar_t* __restrict gv, float* __restrict gs_in, float* __restrict ckpt,
                   float* __restrict buf, int64_t T, int64_t C, int64_t c0, int64_t n) {
  alignas(64) float a[CB], b[CB], p[CB], ga[CB], gb[CB], r[CB], gw[CB], gu[CB], ww_[CB], uu[CB];
  for (int64_t i = 0; i < n; ++i) {
    a[i] = s_in[c0 + i];
    b[i] = s_in[C + c0 + i];
    p[i] = s_in[2 * C + c0 + i];
    ww_[i] = w[c0 + i];
    uu[i] = u[c0 + i];
  }
  const int64_t nck = (T + K - 1) / K;
  for (int64_t j = 0; j < nck; ++j) {
    float* ck = ckpt + j * 3 * CB;
    for (int64_t i = 0; i < n; ++i) {
      ck[i] = a[i];
      ck[CB + i] = b[i];
      ck[2 * CB + i] = p[i];
    }
    advance(ww_, k, v, a, b, p, static_cast<float*>(nullptr), j * K, std::min(T, (j + 1) * K), C, c0, n);
  }
  for (int64_t i = 0; i < n; ++i) {
    const int64_t c = c0 + i;
    ga[i] = gs_out[c];
    gb[i] = gs_out[C + c];
    // the part of p_out's gradient that the scaled (A, B) form does not carry (a, b: the state after the last step)
    r[i] = gs_out[2 * C + c] - ga[i] * a[i] - gb[i] * b[i];
    gw[i] = 0.f;
    gu[i] = 0.f;
  }
  for (int64_t j = nck - 1; j >= 0; --j) {
    const int64_t t0 = j * K, t1 = std::min(T, t0 + K);
    const float* ck = ckpt + j * 3 * CB;
    for (int64_t i = 0; i < n; ++i) {
      a[i] = ck[i];
      b[i] = ck[CB + i];
      p[i] = ck[2 * CB + i];
    }
    advance(ww_, k, v, a, b, p, buf, t0, t1, C, c0, n);
    for (int64_t t = t1 - 1; t >= t0; --t) {
      const scalar_t* kt = k + t * C + c0;
      const scalar_t* vt = v + t * C + c0;
      const float* st = buf + (t - t0) * 4 * CB;
      const float* gyt = gy + t * C + c0;
      scalar_t* gkt = gk + t * C + c0;
      scalar_t* gvt = gv + t * C + c0;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        const float a = st[i], b = st[CB + i], p = st[2 * CB + i], eu = st[3 * CB + i];
        const float kk = to_f(kt[i]), vv = to_f(vt[i]);
        // the state update a, b, p -> a', b', p_t
        const float ww = p + ww_[i];
        const float e1u = ww >= kk ? 1.f : eu, e2u = ww >= kk ? eu : 1.f;
        float gwi = e1u * (a * ga[i] + b * gb[i]);
        float gvi = e2u * ga[i];
        float gki = e2u * (vv * ga[i] + gb[i]);
        const float fw = ww > kk ? 1.f : (ww < kk ? 0.f : 0.5f);  // share of p_t's gradient going to p + w
        gwi += fw * r[i];
        gki += (1.f - fw) * r[i];
        r[i] *= fw;
        float gai = e1u * ga[i], gbi = e1u * gb[i];
        // the output y_t
        const float wo = uu[i] + kk;
        const float e = exp_f32(-std::abs(p - wo));
        const float e1 = p >= wo ? 1.f : e, e2 = p >= wo ? e : 1.f;
        const float inv = 1.f / (e1 * b + e2);
        const float yt = (e1 * a + e2 * vv) * inv;
        const float g = gyt[i] * inv;
        gai += g * e1;
        gbi -= g * yt * e1;
        gvi += g * e2;
        const float guk = g * (vv - yt) * e2;
        gu[i] += guk;
        gki += guk;
        gw[i] += gwi;
        ga[i] = gai;
        gb[i] = gbi;
        store(gkt + i, gki);
        store(gvt + i, gvi);
      }
    }
  }
  for (int64_t i = 0; i < n; ++i) {
    const int64_t c = c0 + i;
    gs_in[c] = ga[i];
    gs_in[C + c] = gb[i];
    gs_in[2 * C + c] = ga[i] * s_in[c] + gb[i] * s_in[C + c] + r[i];
    gw_part[c] = gw[i];
    gu_part[c] = gu[i];
  }
}

// A fresh output tensor, asked to be backed by transparent huge pages where the kernel offers them on request
// (Linux, THP "madvise" mode): a big output is written once, and 4 KiB pages cost one page fault each (about half
// the time of the write) and a TLB miss every row of the [B, T, C] layout.
at::Tensor empty_output(const at::Tensor& like, at::IntArrayRef sizes, const at::TensorOptions& options) {
  auto t = like.new_empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t huge = 2u << 20;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr()), end = begin + t.nbytes();
  const uintptr_t b = (begin + huge - 1) & ~(huge - 1), e = end & ~(huge - 1);
  if (e > b) madvise(reinterpret_cast<void*>(b), e - b, MADV_HUGEPAGE);  // only a hint: errors are ignored
#endif
  return t;
}

void check_inputs(const at::Tensor& w, const at::Tensor& u, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& s) {
  TORCH_CHECK(k.dim() == 3, "wkv: k must be [B, T, C]");
  const int64_t B = k.size(0), T = k.size(1), C = k.size(2);
  for (const auto* x : {&w, &u, &k, &v, &s}) {
    TORCH_CHECK(x->device().is_cpu(), "wkv_cpu: all tensors must be on the CPU");
    TORCH_CHECK(x->is_contiguous(), "wkv_cpu: all tensors must be contiguous");
  }
  TORCH_CHECK(w.scalar_type() == at::kFloat && u.scalar_type() == at::kFloat && s.scalar_type() == at::kFloat,
              "wkv_cpu: w, u and the state must be float32");
  TORCH_CHECK(k.scalar_type() == v.scalar_type(), "wkv_cpu: k and v must have the same dtype");
  TORCH_CHECK(k.scalar_type() == at::kFloat || k.scalar_type() == at::kBFloat16,
              "wkv_cpu: k and v must be float32 or bfloat16");
  TORCH_CHECK(w.dim() == 1 && w.size(0) == C && u.dim() == 1 && u.size(0) == C, "wkv_cpu: w and u must be [C]");
  TORCH_CHECK(v.sizes() == k.sizes(), "wkv_cpu: v must have the shape of k");
  TORCH_CHECK(s.dim() == 3 && s.size(0) == B && s.size(1) == 3 && s.size(2) == C, "wkv_cpu: state must be [B, 3, C]");
  (void)T;
}

std::vector<at::Tensor> wkv_forward(at::Tensor w, at::Tensor u, at::Tensor k, at::Tensor v,
                                       at::Tensor state_in) {
  check_inputs(w, u, k, v, state_in);
  const int64_t B = k.size(0), T = k.size(1), C = k.size(2);
  auto f32 = k.options().dtype(at::kFloat);
  auto y = empty_output(k, {B, T, C}, f32);
  auto state_out = k.new_empty({B, 3, C}, f32);
  const int64_t nblk = (C + CB - 1) / CB;
  const float* wp = w.data_ptr<float>();
  const float* up = u.data_ptr<float>();
  const float* sp = state_in.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  float* sop = state_out.data_ptr<float>();
  auto run = [&](auto* kp, auto* vp) {
#pragma omp parallel for schedule(static)
    for (int64_t tile = 0; tile < B * nblk; ++tile) {
      const int64_t bi = tile / nblk, c0 = (tile % nblk) * CB, n = std::min(CB, C - c0);
      forward_tile(wp, up, kp + bi * T * C, vp + bi * T * C, sp + bi * 3 * C, yp + bi * T * C, sop + bi * 3 * C, T, C, c0, n);
    }
  };
  if (k.scalar_type() == at::kFloat)
    run(k.data_ptr<float>(), v.data_ptr<float>());
  else
    run(k.data_ptr<at::BFloat16>(), v.data_ptr<at::BFloat16>());
  return {y, state_out};
}

std::vector<at::Tensor> wkv_backward(at::Tensor w, at::Tensor u, at::Tensor k, at::Tensor v,
                                        at::Tensor state_in, at::Tensor gy, at::Tensor gstate_out) {
  check_inputs(w, u, k, v, state_in);
  const int64_t B = k.size(0), T = k.size(1), C = k.size(2);
  TORCH_CHECK(gy.scalar_type() == at::kFloat && gy.is_contiguous() && gy.sizes() == k.sizes(),
              "wkv_cpu: gy must be a contiguous float32 [B, T, C]");
  TORCH_CHECK(gstate_out.scalar_type() == at::kFloat && gstate_out.is_contiguous() &&
                  gstate_out.sizes() == state_in.sizes(),
              "wkv_cpu: gstate_out must be a contiguous float32 [B, 3, C]");
  auto f32 = k.options().dtype(at::kFloat);
  auto gw_part = k.new_empty({B, C}, f32);
  auto gu_part = k.new_empty({B, C}, f32);
  auto gk = empty_output(k, {B, T, C}, k.options());  // in the dtype of k and v
  auto gv = empty_output(k, {B, T, C}, k.options());
  auto gs_in = k.new_empty({B, 3, C}, f32);
  const int64_t nblk = (C + CB - 1) / CB, nck = (T + K - 1) / K;
  const float* wp = w.data_ptr<float>();
  const float* up = u.data_ptr<float>();
  const float* sp = state_in.data_ptr<float>();
  const float* gyp = gy.data_ptr<float>();
  const float* gsop = gstate_out.data_ptr<float>();
  float* gwp = gw_part.data_ptr<float>();
  float* gup = gu_part.data_ptr<float>();
  float* gsp = gs_in.data_ptr<float>();
  auto run = [&](auto* kp, auto* vp, auto* gkp, auto* gvp) {
#pragma omp parallel
    {
      // per-thread work space, its size independent of B and C: checkpoints and one recomputed block
      std::vector<float> ckpt(nck * 3 * CB), buf(K * 4 * CB);
#pragma omp for schedule(static)
      for (int64_t tile = 0; tile < B * nblk; ++tile) {
        const int64_t bi = tile / nblk, c0 = (tile % nblk) * CB, n = std::min(CB, C - c0);
        backward_tile(wp, up, kp + bi * T * C, vp + bi * T * C, sp + bi * 3 * C, gyp + bi * T * C, gsop + bi * 3 * C,
                      gwp + bi * C, gup + bi * C, gkp + bi * T * C, gvp + bi * T * C, gsp + bi * 3 * C, ckpt.data(),
                      buf.data(), T, C, c0, n);
      }
    }
  };
  if (k.scalar_type() == at::kFloat)
    run(k.data_ptr<float>(), v.data_ptr<float>(), gk.data_ptr<float>(), gv.data_ptr<float>());
  else
    run(k.data_ptr<at::BFloat16>(), v.data_ptr<at::BFloat16>(), gk.data_ptr<at::BFloat16>(),
        gv.data_ptr<at::BFloat16>());
  // the per-row partials of gw and gu, summed over the batch (each tile wrote its own slots: no races)
  return {gw_part.sum(0), gu_part.sum(0), gk, gv, gs_in};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &wkv_forward, "WKV forward (CPU)", py::arg("w"), py::arg("u"), py::arg("k"), py::arg("v"),
        py::arg("state_in"));
  m.def("backward", &wkv_backward, "WKV backward (CPU)", py::arg("w"), py::arg("u"), py::arg("k"), py::arg("v"),
        py::arg("state_in"), py::arg("gy"), py::arg("gstate_out"));
}
