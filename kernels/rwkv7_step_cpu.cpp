// RWKV-7 one-token step, CPU: the small per-layer arithmetic between the projections, fused, for
// finetune/models/rwkv7.py (TimeMix.one_token, ChannelMix.one_token).
//
// Why by hand: generating one token at a time, a layer's large matrix-vector products (r, k, v, output, ffn key and
// value) are memory-bound and already as fast as they go, but between them sit ~55 small PyTorch operations per
// layer (layer norms, six token-shift mixes, four low-rank paths with tanh/sigmoid, the key normalisation, the
// WKV-7 update, GroupNorm, the bonus, the gate) on vectors of C floats, each paying 5-20 us of dispatch and cache
// misses for well under a microsecond of arithmetic: ~8 ms of a ~42 ms token at 12 x 768. No library ships a fused
// RWKV-7 one-token step for the CPU (BlinkDL's `rwkv` package runs the same small operations through TorchScript).
// Here each layer's small work is three calls; the six big products stay torch's F.linear through the layer's own
// nn.Linear modules (so LoRA / quantized projections behave exactly as in the PyTorch path).
//
// Shapes, all float32 and contiguous, B rows (one token per sequence):
//   time_mix_in(x [B,C], shift_in [B,L,C], shift_out [B,L,C], layer, ln_w, ln_b [C], eps, x_r..x_g [C] x 6)
//       -> [xr, xw, xk, xv, xa, xg] ([B,C] each). Writes ln1(x) into shift_out[:, layer].
//   time_mix_out(r, k, v, xw, xv, xa, xg [B,C], v_first [B,C] or None (layer 0), w0 [C], w1 [C,Dw], w2 [Dw,C],
//                a0, a1, a2, v0, v1, v2 (None in layer 0), g1 [C,Dg], g2 [Dg,C], k_k, k_a [C], r_k [H,N],
//                lnx_w, lnx_b [C], lnx_eps, wkv_in [B,L,H,N,N], wkv_out [B,L,H,N,N], layer)
//       -> (input of the output projection [B,C], v_first [B,C]). Writes the new WKV state into wkv_out[:, layer].
//   channel_mix_in(x, dx [B,C], shift_in [B,L,C], shift_out [B,L,C], layer, ln_w, ln_b, eps, x_k [C])
//       -> (x + dx, input of ffn.key [B,C]). Writes ln2(x + dx) into shift_out[:, layer].
//   relu_square_(h) -> h, relu(h)^2 in place.
// The maths is the PyTorch path's, line for line (see TimeMix.forward); the WKV state keeps the `rwkv` package's
// layout S[i][j], i = value index, j = key index, and is updated in that layout (one token: no transpose needed).

#include "torch_ext.h"  // ATen and pybind11, not the whole C++ frontend

#include "cpu_math.h"  // exp_f32

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

namespace {

inline float sigmoid_f32(float x) { return 1.0f / (1.0f + exp_f32(-x)); }
// tanh(x) = 1 - 2 / (e^{2x} + 1): saturates to +-1 without overflow (exp_f32 clamps its argument)
inline float tanh_f32(float x) { return 1.0f - 2.0f / (exp_f32(2.0f * x) + 1.0f); }

// torch.lerp's formula (start + w (end - start) below w = 0.5, end - (end - start)(1 - w) above), so the fused path
// rounds as the PyTorch one does
inline float lerp_f32(float start, float end, float w) {
  const float d = end - start;
  return std::abs(w) < 0.5f ? start + w * d : end - d * (1.0f - w);
}

// y[D] = x[C] @ W[C, D], W row-major: one axpy per row of W (contiguous, vectorised), four rows at a time so that y
// is loaded and stored once per four rows. Streams W once: memory-bound like torch's own matrix-vector product.
void vec_mat(const float* __restrict x, const float* __restrict W, int64_t C, int64_t D, float* __restrict y) {
  std::fill(y, y + D, 0.0f);
  int64_t i = 0;
  for (; i + 4 <= C; i += 4) {
    const float x0 = x[i], x1 = x[i + 1], x2 = x[i + 2], x3 = x[i + 3];
    const float *w0 = W + i * D, *w1 = w0 + D, *w2 = w1 + D, *w3 = w2 + D;
#pragma omp simd
    for (int64_t j = 0; j < D; ++j) y[j] += x0 * w0[j] + x1 * w1[j] + x2 * w2[j] + x3 * w3[j];
  }
  for (; i < C; ++i) {
    const float xi = x[i];
    const float* w = W + i * D;
#pragma omp simd
    for (int64_t j = 0; j < D; ++j) y[j] += xi * w[j];
  }
}

// LayerNorm of one row of C (biased variance, as torch's): out = (x - mean) / sqrt(var + eps) * w + b
void layer_norm(const float* __restrict x, const float* __restrict w, const float* __restrict b, double eps,
                int64_t C, float* __restrict out) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t c = 0; c < C; ++c) sum += x[c];
  const float mean = sum / C;
  float sq = 0.0f;
#pragma omp simd reduction(+ : sq)
  for (int64_t c = 0; c < C; ++c) sq += (x[c] - mean) * (x[c] - mean);
  const float rstd = 1.0f / std::sqrt(sq / C + static_cast<float>(eps));
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) out[c] = (x[c] - mean) * rstd * w[c] + b[c];
}

float* fp(const at::Tensor& t) { return t.data_ptr<float>(); }

void check(const at::Tensor& t, int64_t numel, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == numel,
              "rwkv7_step: ", name, " must be a contiguous float32 CPU tensor of ", numel, " elements, got ",
              t.scalar_type(), " ", t.sizes());
}

// The per-layer [B, C] slice of a [B, L, C] state
struct LayerRows {
  float* base;
  int64_t L, layer, row;  // row: the size of one layer's slice (C, or H N N)
  float* at(int64_t b) const { return base + (b * L + layer) * row; }
};

LayerRows layer_rows(const at::Tensor& t, int64_t B, int64_t layer, int64_t row, const char* name) {
  TORCH_CHECK(t.dim() >= 2 && t.size(0) == B && layer >= 0 && layer < t.size(1), "rwkv7_step: ", name,
              " must be [B, L, ...] with B = ", B, " and layer < L, got ", t.sizes(), " and layer ", layer);
  check(t, B * t.size(1) * row, name);
  return {fp(t), t.size(1), layer, row};
}

std::vector<at::Tensor> time_mix_in(const at::Tensor& x, const at::Tensor& shift_in,
                                       const at::Tensor& shift_out, int64_t layer, const at::Tensor& ln_w,
                                       const at::Tensor& ln_b, double eps, const at::Tensor& x_r,
                                       const at::Tensor& x_w, const at::Tensor& x_k, const at::Tensor& x_v,
                                       const at::Tensor& x_a, const at::Tensor& x_g) {
  TORCH_CHECK(x.dim() == 2, "rwkv7_step: x must be [B, C], got ", x.sizes());
  const int64_t B = x.size(0), C = x.size(1);
  check(x, B * C, "x");
  const LayerRows in = layer_rows(shift_in, B, layer, C, "shift_in"), out = layer_rows(shift_out, B, layer, C,
                                                                                     "shift_out");
  check(ln_w, C, "ln_w");
  check(ln_b, C, "ln_b");
  const at::Tensor* mixes[6] = {&x_r, &x_w, &x_k, &x_v, &x_a, &x_g};
  std::vector<at::Tensor> xs;
  for (const auto* m : mixes) {
    check(*m, C, "x_r..x_g");
    xs.push_back(x.new_empty({B, C}));
  }
  for (int64_t b = 0; b < B; ++b) {
    float* __restrict xa = out.at(b);  // ln1(x): this layer's new token-shift state
    const float* __restrict prev = in.at(b);
    layer_norm(fp(x) + b * C, fp(ln_w), fp(ln_b), eps, C, xa);
    for (int m = 0; m < 6; ++m) {
      const float* __restrict mix = fp(*mixes[m]);
      float* __restrict o = fp(xs[m]) + b * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) o[c] = lerp_f32(xa[c], prev[c], mix[c]);
    }
  }
  return xs;
}

std::tuple<at::Tensor, at::Tensor> time_mix_out(
    const at::Tensor& r, const at::Tensor& k, const at::Tensor& v, const at::Tensor& xw,
    const at::Tensor& xv, const at::Tensor& xa, const at::Tensor& xg,
    const std::optional<at::Tensor>& v_first, const at::Tensor& w0, const at::Tensor& w1,
    const at::Tensor& w2, const at::Tensor& a0, const at::Tensor& a1, const at::Tensor& a2,
    const std::optional<at::Tensor>& v0, const std::optional<at::Tensor>& v1,
    const std::optional<at::Tensor>& v2, const at::Tensor& g1, const at::Tensor& g2,
    const at::Tensor& k_k, const at::Tensor& k_a, const at::Tensor& r_k, const at::Tensor& lnx_w,
    const at::Tensor& lnx_b, double lnx_eps, const at::Tensor& wkv_in, const at::Tensor& wkv_out,
    int64_t layer) {
  TORCH_CHECK(r.dim() == 2 && r_k.dim() == 2, "rwkv7_step: r must be [B, C] and r_k [H, N], got ", r.sizes(), " ",
              r_k.sizes());
  const int64_t B = r.size(0), C = r.size(1), H = r_k.size(0), N = r_k.size(1);
  TORCH_CHECK(H * N == C, "rwkv7_step: r_k [H, N] = ", r_k.sizes(), " does not cover C = ", C);
  const int64_t Dw = w1.size(-1), Da = a1.size(-1), Dg = g1.size(-1);
  const int64_t Dv = v1 ? v1->size(-1) : 0;
  const bool residual = v_first.has_value();  // layer 0 makes v_first; every later layer mixes towards it
  TORCH_CHECK(!residual || (v0 && v1 && v2), "rwkv7_step: a layer given v_first needs v0, v1 and v2");
  for (const auto* t : {&r, &k, &v, &xw, &xv, &xa, &xg}) check(*t, B * C, "r, k, v, xw, xv, xa, xg");
  if (residual) {
    check(*v_first, B * C, "v_first");
    check(*v0, C, "v0");
    check(*v1, C * Dv, "v1");
    check(*v2, Dv * C, "v2");
  }
  for (const auto* t : {&w0, &a0, &k_k, &k_a, &r_k, &lnx_w, &lnx_b}) check(*t, C, "w0, a0, k_k, k_a, r_k, ln_x");
  check(w1, C * Dw, "w1");
  check(w2, Dw * C, "w2");
  check(a1, C * Da, "a1");
  check(a2, Da * C, "a2");
  check(g1, C * Dg, "g1");
  check(g2, Dg * C, "g2");
  const LayerRows s_in = layer_rows(wkv_in, B, layer, H * N * N, "wkv_in");
  const LayerRows s_out = layer_rows(wkv_out, B, layer, H * N * N, "wkv_out");

  auto out = r.new_empty({B, C});
  auto vf = residual ? *v_first : v;  // layer 0: v_first is this layer's value itself
  auto v_mixed = residual ? r.new_empty({B, C}) : v;
  // scratch: the low-rank hidden vector, then per channel: decay, a, g, kk, the updated k, the WKV output
  std::vector<float> scratch(std::max({Dw, Da, Dv, Dg}) + 7 * C);
  float* __restrict hid = scratch.data();
  float* __restrict lin = hid + std::max({Dw, Da, Dv, Dg});
  float* __restrict dec = lin + C;
  float* __restrict aa = dec + C;
  float* __restrict gg = aa + C;
  float* __restrict kk = gg + C;
  float* __restrict kn = kk + C;
  float* __restrict y = kn + C;
  const float decay_scale = std::exp(-0.5f);  // LOG_DECAY_SCALE in rwkv7.py

  for (int64_t b = 0; b < B; ++b) {
    const int64_t o = b * C;
    const float* __restrict rb = fp(r) + o;
    const float* __restrict kb = fp(k) + o;
    float* __restrict vb = fp(v_mixed) + o;
    // decay: exp(-e^-0.5 sigmoid(w0 + tanh(xw @ w1) @ w2)), per channel
    vec_mat(fp(xw) + o, fp(w1), C, Dw, hid);
    for (int64_t j = 0; j < Dw; ++j) hid[j] = tanh_f32(hid[j]);
    vec_mat(hid, fp(w2), Dw, C, lin);
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) dec[c] = exp_f32(-decay_scale * sigmoid_f32(fp(w0)[c] + lin[c]));
    // value residual: v + (v_first - v) * sigmoid(v0 + (xv @ v1) @ v2)
    if (residual) {
      vec_mat(fp(xv) + o, fp(*v1), C, Dv, hid);
      vec_mat(hid, fp(*v2), Dv, C, lin);
      const float* __restrict vs = fp(v) + o;
      const float* __restrict vfb = fp(vf) + o;
      const float* __restrict bias = fp(*v0);
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) vb[c] = lerp_f32(vs[c], vfb[c], sigmoid_f32(bias[c] + lin[c]));
    }
    // in-context learning rate a = sigmoid(a0 + (xa @ a1) @ a2); gate g = sigmoid(xg @ g1) @ g2
    vec_mat(fp(xa) + o, fp(a1), C, Da, hid);
    vec_mat(hid, fp(a2), Da, C, lin);
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) aa[c] = sigmoid_f32(fp(a0)[c] + lin[c]);
    vec_mat(fp(xg) + o, fp(g1), C, Dg, hid);
    for (int64_t j = 0; j < Dg; ++j) hid[j] = sigmoid_f32(hid[j]);
    vec_mat(hid, fp(g2), Dg, C, gg);
    // kk = L2-normalise(k * k_k) per head (F.normalize: / max(norm, 1e-12)); k = lerp(k, k * a, k_a)
    const float* __restrict kkw = fp(k_k);
    const float* __restrict kaw = fp(k_a);
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      kk[c] = kb[c] * kkw[c];
      kn[c] = lerp_f32(kb[c], kb[c] * aa[c], kaw[c]);
    }
    for (int64_t h = 0; h < H; ++h) {
      float* __restrict kh = kk + h * N;
      float sq = 0.0f;
#pragma omp simd reduction(+ : sq)
      for (int64_t n = 0; n < N; ++n) sq += kh[n] * kh[n];
      const float inv = 1.0f / std::max(std::sqrt(sq), 1e-12f);
#pragma omp simd
      for (int64_t n = 0; n < N; ++n) kh[n] *= inv;
    }
    // WKV-7, per head, on S[i][j] (i value, j key) with a = -kk, b = kk * a:
    //   sa_i = sum_j S[i][j] a_j;  S'[i][j] = S[i][j] d_j + sa_i b_j + v_i k_j;  y_i = sum_j S'[i][j] r_j
    // then GroupNorm over the head and the bonus sum_j(r_j k_j r_k_j) * v_i
    for (int64_t h = 0; h < H; ++h) {
      const int64_t p = h * N;
      const float* __restrict sin = s_in.at(b) + p * N;
      float* __restrict sout = s_out.at(b) + p * N;
      const float *__restrict dh = dec + p, *__restrict kh = kk + p, *__restrict ah = aa + p;
      const float *__restrict knh = kn + p, *__restrict rh = rb + p, *__restrict vh = vb + p;
      float* __restrict yh = y + p;
      for (int64_t i = 0; i < N; ++i) {
        const float* __restrict si = sin + i * N;
        float* __restrict so = sout + i * N;
        float sa = 0.0f;
#pragma omp simd reduction(+ : sa)
        for (int64_t j = 0; j < N; ++j) sa -= si[j] * kh[j];  // S @ (-kk)
        const float vi = vh[i];
        float yi = 0.0f;
#pragma omp simd reduction(+ : yi)
        for (int64_t j = 0; j < N; ++j) {
          const float s = si[j] * dh[j] + sa * (kh[j] * ah[j]) + vi * knh[j];
          so[j] = s;
          yi += s * rh[j];
        }
        yh[i] = yi;
      }
      float sum = 0.0f, bonus = 0.0f;
      const float* __restrict rkh = fp(r_k) + p;
#pragma omp simd reduction(+ : sum, bonus)
      for (int64_t n = 0; n < N; ++n) {
        sum += yh[n];
        bonus += rh[n] * knh[n] * rkh[n];
      }
      const float mean = sum / N;
      float sq = 0.0f;
#pragma omp simd reduction(+ : sq)
      for (int64_t n = 0; n < N; ++n) sq += (yh[n] - mean) * (yh[n] - mean);
      const float rstd = 1.0f / std::sqrt(sq / N + static_cast<float>(lnx_eps));
      const float *__restrict lw = fp(lnx_w) + p, *__restrict lb = fp(lnx_b) + p, *__restrict gh = gg + p;
      float* __restrict ob = fp(out) + o + p;
#pragma omp simd
      for (int64_t n = 0; n < N; ++n) ob[n] = ((yh[n] - mean) * rstd * lw[n] + lb[n] + bonus * vh[n]) * gh[n];
    }
  }
  return {out, residual ? vf : v};
}

std::tuple<at::Tensor, at::Tensor> channel_mix_in(const at::Tensor& x, const at::Tensor& dx,
                                                        const at::Tensor& shift_in, const at::Tensor& shift_out,
                                                        int64_t layer, const at::Tensor& ln_w,
                                                        const at::Tensor& ln_b, double eps,
                                                        const at::Tensor& x_k) {
  TORCH_CHECK(x.dim() == 2, "rwkv7_step: x must be [B, C], got ", x.sizes());
  const int64_t B = x.size(0), C = x.size(1);
  check(x, B * C, "x");
  check(dx, B * C, "dx");
  check(ln_w, C, "ln_w");
  check(ln_b, C, "ln_b");
  check(x_k, C, "x_k");
  const LayerRows in = layer_rows(shift_in, B, layer, C, "shift_in"), out = layer_rows(shift_out, B, layer, C,
                                                                                     "shift_out");
  auto xn = x.new_empty({B, C}), kin = x.new_empty({B, C});
  for (int64_t b = 0; b < B; ++b) {
    const float *__restrict xb = fp(x) + b * C, *__restrict db = fp(dx) + b * C, *__restrict prev = in.at(b);
    float *__restrict sum = fp(xn) + b * C, *__restrict xf = out.at(b), *__restrict ko = fp(kin) + b * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) sum[c] = xb[c] + db[c];
    layer_norm(sum, fp(ln_w), fp(ln_b), eps, C, xf);  // ln2(x): this layer's new channel-mix shift state
    const float* __restrict mix = fp(x_k);
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) ko[c] = lerp_f32(xf[c], prev[c], mix[c]);
  }
  return {xn, kin};
}

at::Tensor relu_square_(at::Tensor h) {
  check(h, h.numel(), "h");
  float* __restrict p = fp(h);
  const int64_t n = h.numel();
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float z = std::max(p[i], 0.0f);
    p[i] = z * z;
  }
  return h;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("time_mix_in", &time_mix_in, "ln1 and the six token-shift mixes of one token (CPU, fp32)");
  m.def("time_mix_out", &time_mix_out,
        "decay, value residual, rate, gate, key normalisation, WKV-7 step, GroupNorm, bonus and gate of one token");
  m.def("channel_mix_in", &channel_mix_in, "residual add, ln2 and the channel-mix token shift of one token");
  m.def("relu_square_", &relu_square_, "relu(h)^2 in place");
}
