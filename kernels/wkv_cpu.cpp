// RWKV-4 WKV operator, CPU kernel (forward and backward), for finetune/wkv.py.
//
// Interface (all tensors contiguous, on the CPU; w = -exp(time_decay) in fp32; k and v fp32 or bf16, same dtype):
//   forward(w[C], u[C], k[B,T,C], v[B,T,C], state_in[B,3,C]) -> (y[B,T,C] fp32, state_out[B,3,C] fp32)
//   backward(w, u, k, v, state_in, gy[B,T,C], gstate_out[B,3,C]) -> (gw[C], gu[C], gk[B,T,C], gv[B,T,C], gstate_in[B,3,C])
//
// The state (a, b, p) holds the numerator and denominator as a*e^p and b*e^p, p being a running max, so that no
// exponential of a large positive number is ever taken. Work is split into tiles of one batch row and a block of
// up to CB consecutive channels; each OpenMP thread walks the time axis for its tile with an inner loop over the
// channels of the block, which the compiler vectorises (the channels are contiguous in the [B,T,C] layout).
//
// Backward: a first pass recomputes the state before every step into a scratch tensor [B,T,3,C]; the second pass
// walks time backwards with the gradients of the numerator and denominator kept in scaled form
// (ga = dL/dA * e^p, gb = dL/dB * e^p, both bounded). The gradient reaching p_out beyond what the scaled form
// accounts for (r = g_p - g_a*a - g_b*b) follows the path of the running max back, as the autograd of the
// reference does (ties split in halves, like torch.maximum).

#include <torch/extension.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t CB = 64;  // channels per tile

inline float to_f(float x) { return x; }
inline float to_f(at::BFloat16 x) {
  uint16_t raw;
  std::memcpy(&raw, &x, sizeof(raw));
  uint32_t bits = static_cast<uint32_t>(raw) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// e^x for x <= 0 (all the kernel needs: every exponent is "something minus the max"), inline so that the loops over
// channels vectorise: 2^n * e^r with n = round(x / ln 2), |r| <= ln2 / 2, e^r by a degree-6 polynomial (Cephes
// expf coefficients, about 1 ulp). Below -87 (e.g. the empty state's p = -1e38) it returns
// 0 exactly, never NaN.
inline float exp_nonpos(float x0) {
  const float x = std::max(x0, -87.0f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  float e = 1.9875691500e-4f;
  e = e * r + 1.3981999507e-3f;
  e = e * r + 8.3334519073e-3f;
  e = e * r + 4.1665795894e-2f;
  e = e * r + 1.6666665459e-1f;
  e = e * r + 5.0000001201e-1f;
  e = e * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  return x0 < -87.0f ? 0.0f : e * std::bit_cast<float>(bits);
}

// One tile of the forward recurrence. Pointers are already offset to the batch row b (k, v, y: [T,C] rows;
// s_in, s_out: [3,C]; scratch: [T,3,C] or null). y may be null (the backward's recomputation pass).
template <typename scalar_t>
void forward_tile(const float* __restrict w, const float* __restrict u, const scalar_t* __restrict k,
                  const scalar_t* __restrict v, const float* __restrict s_in, float* __restrict y,
                  float* __restrict s_out, float* __restrict scratch, int64_t T, int64_t C, int64_t c0, int64_t n) {
  float a[CB], b[CB], p[CB], ww_[CB], uu[CB];
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
    if (scratch) {
      float* st = scratch + t * 3 * C + c0;
      for (int64_t i = 0; i < n; ++i) {
        st[i] = a[i];
        st[C + i] = b[i];
        st[2 * C + i] = p[i];
      }
    }
    if (y) {
      float* yt = y + t * C + c0;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        const float kk = to_f(kt[i]), vv = to_f(vt[i]);
        const float wo = uu[i] + kk;
        const float e = exp_nonpos(-std::abs(p[i] - wo));  // one of e^(p-q), e^(wo-q) is 1, q being the max
        const float e1 = p[i] >= wo ? 1.f : e, e2 = p[i] >= wo ? e : 1.f;
        yt[i] = (e1 * a[i] + e2 * vv) / (e1 * b[i] + e2);
      }
    }
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const float kk = to_f(kt[i]), vv = to_f(vt[i]);
      const float ww = p[i] + ww_[i];
      const float q = std::max(ww, kk);
      const float e = exp_nonpos(-std::abs(ww - kk));
      const float e1 = ww >= kk ? 1.f : e, e2 = ww >= kk ? e : 1.f;
      a[i] = e1 * a[i] + e2 * vv;
      b[i] = e1 * b[i] + e2;
      p[i] = q;
    }
  }
  for (int64_t i = 0; i < n; ++i) {
    s_out[c0 + i] = a[i];
    s_out[C + c0 + i] = b[i];
    s_out[2 * C + c0 + i] = p[i];
  }
}

// One tile of the backward pass; scratch holds the state before each step (from forward_tile), s_last the state
// after the last step. gw_part, gu_part: this batch row's partial sums [C].
template <typename scalar_t>
void backward_tile(const float* __restrict w, const float* __restrict u, const scalar_t* __restrict k,
                   const scalar_t* __restrict v, const float* __restrict s_in, const float* __restrict s_last,
                   const float* __restrict scratch, const float* __restrict gy, const float* __restrict gs_out,
                   float* __restrict gw_part, float* __restrict gu_part, float* __restrict gk, float* __restrict gv,
                   float* __restrict gs_in, int64_t T, int64_t C, int64_t c0, int64_t n) {
  float ga[CB], gb[CB], r[CB], gw[CB], gu[CB], ww_[CB], uu[CB];
  for (int64_t i = 0; i < n; ++i) {
    const int64_t c = c0 + i;
    ga[i] = gs_out[c];
    gb[i] = gs_out[C + c];
    // the part of p_out's gradient that the scaled (A, B) form does not carry
    r[i] = gs_out[2 * C + c] - ga[i] * s_last[c] - gb[i] * s_last[C + c];
    gw[i] = 0.f;
    gu[i] = 0.f;
    ww_[i] = w[c];
    uu[i] = u[c];
  }
  for (int64_t t = T - 1; t >= 0; --t) {
    const scalar_t* kt = k + t * C + c0;
    const scalar_t* vt = v + t * C + c0;
    const float* st = scratch + t * 3 * C + c0;
    const float* gyt = gy + t * C + c0;
    float* gkt = gk + t * C + c0;
    float* gvt = gv + t * C + c0;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const float a = st[i], b = st[C + i], p = st[2 * C + i];
      const float kk = to_f(kt[i]), vv = to_f(vt[i]);
      // the state update a, b, p -> a', b', p_t
      const float ww = p + ww_[i];
      const float eu = exp_nonpos(-std::abs(ww - kk));
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
      const float e = exp_nonpos(-std::abs(p - wo));
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
      gkt[i] = gki;
      gvt[i] = gvi;
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

void check_inputs(const torch::Tensor& w, const torch::Tensor& u, const torch::Tensor& k, const torch::Tensor& v,
                  const torch::Tensor& s) {
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

std::vector<torch::Tensor> wkv_forward(torch::Tensor w, torch::Tensor u, torch::Tensor k, torch::Tensor v,
                                       torch::Tensor state_in) {
  check_inputs(w, u, k, v, state_in);
  const int64_t B = k.size(0), T = k.size(1), C = k.size(2);
  auto f32 = k.options().dtype(at::kFloat);
  auto y = torch::empty({B, T, C}, f32);
  auto state_out = torch::empty({B, 3, C}, f32);
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
      forward_tile(wp, up, kp + bi * T * C, vp + bi * T * C, sp + bi * 3 * C, yp + bi * T * C, sop + bi * 3 * C,
                   static_cast<float*>(nullptr), T, C, c0, n);
    }
  };
  if (k.scalar_type() == at::kFloat)
    run(k.data_ptr<float>(), v.data_ptr<float>());
  else
    run(k.data_ptr<at::BFloat16>(), v.data_ptr<at::BFloat16>());
  return {y, state_out};
}

std::vector<torch::Tensor> wkv_backward(torch::Tensor w, torch::Tensor u, torch::Tensor k, torch::Tensor v,
                                        torch::Tensor state_in, torch::Tensor gy, torch::Tensor gstate_out) {
  check_inputs(w, u, k, v, state_in);
  const int64_t B = k.size(0), T = k.size(1), C = k.size(2);
  TORCH_CHECK(gy.scalar_type() == at::kFloat && gy.is_contiguous() && gy.sizes() == k.sizes(),
              "wkv_cpu: gy must be a contiguous float32 [B, T, C]");
  TORCH_CHECK(gstate_out.scalar_type() == at::kFloat && gstate_out.is_contiguous() &&
                  gstate_out.sizes() == state_in.sizes(),
              "wkv_cpu: gstate_out must be a contiguous float32 [B, 3, C]");
  auto f32 = k.options().dtype(at::kFloat);
  auto scratch = torch::empty({B, T, 3, C}, f32);
  auto s_last = torch::empty({B, 3, C}, f32);
  auto gw_part = torch::empty({B, C}, f32);
  auto gu_part = torch::empty({B, C}, f32);
  auto gk = torch::empty({B, T, C}, f32);
  auto gv = torch::empty({B, T, C}, f32);
  auto gs_in = torch::empty({B, 3, C}, f32);
  const int64_t nblk = (C + CB - 1) / CB;
  const float* wp = w.data_ptr<float>();
  const float* up = u.data_ptr<float>();
  const float* sp = state_in.data_ptr<float>();
  const float* gyp = gy.data_ptr<float>();
  const float* gsop = gstate_out.data_ptr<float>();
  float* scp = scratch.data_ptr<float>();
  float* slp = s_last.data_ptr<float>();
  float* gwp = gw_part.data_ptr<float>();
  float* gup = gu_part.data_ptr<float>();
  float* gkp = gk.data_ptr<float>();
  float* gvp = gv.data_ptr<float>();
  float* gsp = gs_in.data_ptr<float>();
  auto run = [&](auto* kp, auto* vp) {
#pragma omp parallel for schedule(static)
    for (int64_t tile = 0; tile < B * nblk; ++tile) {
      const int64_t bi = tile / nblk, c0 = (tile % nblk) * CB, n = std::min(CB, C - c0);
      forward_tile(wp, up, kp + bi * T * C, vp + bi * T * C, sp + bi * 3 * C, static_cast<float*>(nullptr),
                   slp + bi * 3 * C, scp + bi * T * 3 * C, T, C, c0, n);
      backward_tile(wp, up, kp + bi * T * C, vp + bi * T * C, sp + bi * 3 * C, slp + bi * 3 * C,
                    scp + bi * T * 3 * C, gyp + bi * T * C, gsop + bi * 3 * C, gwp + bi * C, gup + bi * C,
                    gkp + bi * T * C, gvp + bi * T * C, gsp + bi * 3 * C, T, C, c0, n);
    }
  };
  if (k.scalar_type() == at::kFloat)
    run(k.data_ptr<float>(), v.data_ptr<float>());
  else
    run(k.data_ptr<at::BFloat16>(), v.data_ptr<at::BFloat16>());
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
