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
// Inside a tile the inner loops run over the block's columns, contiguous in every buffer, so they vectorise.
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
// into a small buffer and differentiates it. The scratch per thread is (ceil(T/K) + K) * N * cols floats, whatever
// B and H; with K = 16 and N = 64 that is about as much as one head's own inputs.

#include <torch/extension.h>

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

#ifndef WKV6_K
#define WKV6_K 16
#endif
constexpr int64_t K_DEFAULT = WKV6_K;  // backward: steps between two checkpoints of the state
constexpr int64_t MIN_COLS = 16;       // narrowest column block worth a tile of its own (2 AVX2 / 1 AVX-512 vectors)

inline float to_f(float x) { return x; }
inline float to_f(at::BFloat16 x) {
  uint16_t raw;
  std::memcpy(&raw, &x, sizeof(raw));
  const uint32_t bits = static_cast<uint32_t>(raw) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// exp(w) for the log decay w <= 0. Below -87 the true value is under 1.7e-38: flushed to 0 so that the state never
// holds denormals (slow on many CPUs); the relative change to any output is below 1e-37.
inline float decay_of(float w) { return w < -87.0f ? 0.0f : std::exp(w); }

struct Shape {
  int64_t B, T, H, N;
  // offset of (b, t, h, 0) in a [B, T, H, N] tensor
  int64_t at(int64_t b, int64_t t, int64_t h) const { return ((b * T + t) * H + h) * N; }
  // offset of (b, h, 0, 0) in a [B, H, N, N] state
  int64_t state(int64_t b, int64_t h) const { return (b * H + h) * N * N; }
};

// Per-thread buffers, sized once per call (never by B or H).
struct Work {
  std::vector<float> S, G, ckpt, buf, dec, rr, kk, vv, gg, acc, gu;
  Work(int64_t N, int64_t J, int64_t nck, int64_t K)
      : S(N * J), G(N * J), ckpt(nck * N * J), buf(K * N * J), dec(std::max<int64_t>(K, 1) * N), rr(N), kk(N),
        vv(J), gg(J), acc(J), gu(N) {}
};

// Loads r_t, k_t (full head) into work buffers and returns sum_i r_t[i] u[i] k_t[i] (the bonus coefficient).
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

// dst <- d * src + k v^T on a tile of J columns (states [N][J] row-major, vv: the tile's J values of v_t);
// dst may be src.
inline void update_state(float* dst, const float* src, const float* __restrict d, const float* __restrict kk,
                         const float* __restrict vv, int64_t N, int64_t J) {
  for (int64_t i = 0; i < N; ++i) {
    const float di = d[i], ki = kk[i];
    float* Di = dst + i * J;
    const float* Si = src + i * J;
#pragma omp simd
    for (int64_t j = 0; j < J; ++j) Di[j] = di * Si[j] + ki * vv[j];
  }
}

template <typename scalar_t>
void forward_tile(const Shape& s, int64_t b, int64_t h, int64_t j0, int64_t J, const scalar_t* r, const float* w,
                  const scalar_t* k, const scalar_t* v, const float* u, const float* s_in, float* y, float* s_out,
                  Work& ws) {
  const int64_t N = s.N;
  float* __restrict S = ws.S.data();
  float* __restrict d = ws.dec.data();
  float* __restrict rr = ws.rr.data();
  float* __restrict kk = ws.kk.data();
  float* __restrict vv = ws.vv.data();
  float* __restrict acc = ws.acc.data();
  const float* uh = u + h * N;
  const float* sp = s_in + s.state(b, h);
  for (int64_t i = 0; i < N; ++i) std::memcpy(S + i * J, sp + i * N + j0, J * sizeof(float));
  for (int64_t t = 0; t < s.T; ++t) {
    const int64_t o = s.at(b, t, h);
    const float ruk = load_rk(r + o, k + o, uh, rr, kk, N);
    for (int64_t i = 0; i < N; ++i) d[i] = decay_of(w[o + i]);
    for (int64_t j = 0; j < J; ++j) {
      vv[j] = to_f(v[o + j0 + j]);
      acc[j] = ruk * vv[j];
    }
    // y_t = r_t S_{t-1} + bonus, then S_t, in one sweep over the state
    for (int64_t i = 0; i < N; ++i) {
      const float ri = rr[i], di = d[i], ki = kk[i];
      float* __restrict Si = S + i * J;
#pragma omp simd
      for (int64_t j = 0; j < J; ++j) {
        acc[j] += ri * Si[j];
        Si[j] = di * Si[j] + ki * vv[j];
      }
    }
    std::memcpy(y + o + j0, acc, J * sizeof(float));
  }
  float* so = s_out + s.state(b, h);
  for (int64_t i = 0; i < N; ++i) std::memcpy(so + i * N + j0, S + i * J, J * sizeof(float));
}

// One tile of the backward, recomputation included. gr, gk, gw: this column block's partial sums [B,T,H,N];
// gu: this (column block, batch row)'s partial [H,N]; gv and gs_in: the tile's own columns of the full outputs.
template <typename scalar_t>
void backward_tile(const Shape& s, int64_t b, int64_t h, int64_t j0, int64_t J, int64_t K, const scalar_t* r,
                   const float* w, const scalar_t* k, const scalar_t* v, const float* u, const float* s_in,
                   const float* gy, const float* gs_out, float* gr, float* gw, float* gk, float* gv, float* gu,
                   float* gs_in, Work& ws) {
  const int64_t N = s.N, T = s.T, NJ = N * J;
  const int64_t nck = (T + K - 1) / K;
  float* __restrict S = ws.S.data();
  float* __restrict G = ws.G.data();
  float* __restrict rr = ws.rr.data();
  float* __restrict kk = ws.kk.data();
  float* __restrict vv = ws.vv.data();
  float* __restrict gg = ws.gg.data();
  float* __restrict acc = ws.acc.data();
  float* __restrict gu_acc = ws.gu.data();
  const float* uh = u + h * N;

  // pass 1: the state at the start of every block of K steps
  const float* sp = s_in + s.state(b, h);
  for (int64_t i = 0; i < N; ++i) std::memcpy(S + i * J, sp + i * N + j0, J * sizeof(float));
  for (int64_t c = 0; c < nck; ++c) {
    std::memcpy(ws.ckpt.data() + c * NJ, S, NJ * sizeof(float));
    if (c + 1 == nck) break;  // the last block's own states are recomputed in pass 2
    for (int64_t t = c * K; t < (c + 1) * K; ++t) {
      const int64_t o = s.at(b, t, h);
      for (int64_t i = 0; i < N; ++i) {
        kk[i] = to_f(k[o + i]);
        ws.dec[i] = decay_of(w[o + i]);
      }
      for (int64_t j = 0; j < J; ++j) vv[j] = to_f(v[o + j0 + j]);
      update_state(S, S, ws.dec.data(), kk, vv, N, J);
    }
  }

  // pass 2: backwards, block by block
  const float* gp = gs_out + s.state(b, h);
  for (int64_t i = 0; i < N; ++i) std::memcpy(G + i * J, gp + i * N + j0, J * sizeof(float));
  std::fill(gu_acc, gu_acc + N, 0.f);
  for (int64_t c = nck - 1; c >= 0; --c) {
    const int64_t t0 = c * K, t1 = std::min(T, t0 + K);
    // buf[m] = S_{t0+m-1}, the state before step t0+m; dec[m] = that step's decays
    float* buf = ws.buf.data();
    std::memcpy(buf, ws.ckpt.data() + c * NJ, NJ * sizeof(float));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t o = s.at(b, t, h), m = t - t0;
      float* d = ws.dec.data() + m * N;
      for (int64_t i = 0; i < N; ++i) d[i] = decay_of(w[o + i]);
      if (t + 1 == t1) break;
      for (int64_t i = 0; i < N; ++i) kk[i] = to_f(k[o + i]);
      for (int64_t j = 0; j < J; ++j) vv[j] = to_f(v[o + j0 + j]);
      update_state(buf + (m + 1) * NJ, buf + m * NJ, d, kk, vv, N, J);
    }
    for (int64_t t = t1 - 1; t >= t0; --t) {
      const int64_t o = s.at(b, t, h), m = t - t0;
      const float* __restrict Sp = buf + m * NJ;  // S_{t-1}
      const float* __restrict d = ws.dec.data() + m * N;
      const float ruk = load_rk(r + o, k + o, uh, rr, kk, N);
      float gyv = 0.f;
      for (int64_t j = 0; j < J; ++j) {
        vv[j] = to_f(v[o + j0 + j]);
        gg[j] = gy[o + j0 + j];
        gyv += gg[j] * vv[j];
        acc[j] = ruk * gg[j];  // gv_t, bonus part
      }
      for (int64_t i = 0; i < N; ++i) {
        const float ri = rr[i], ki = kk[i], di = d[i];
        const float* __restrict Si = Sp + i * J;
        float* __restrict Gi = G + i * J;
        float sr = 0.f, sk = 0.f, sw = 0.f;
#pragma omp simd reduction(+ : sr, sk, sw)
        for (int64_t j = 0; j < J; ++j) {
          const float gij = Gi[j];
          sr += Si[j] * gg[j];
          sk += gij * vv[j];
          sw += gij * Si[j];
          acc[j] += gij * ki;
          Gi[j] = di * gij + ri * gg[j];  // G_{t-1}
        }
        gr[o + i] = sr + uh[i] * ki * gyv;
        gk[o + i] = sk + ri * uh[i] * gyv;
        gw[o + i] = di * sw;
        gu_acc[i] += ri * ki * gyv;
      }
      std::memcpy(gv + o + j0, acc, J * sizeof(float));
    }
  }
  float* gi = gs_in + s.state(b, h);
  for (int64_t i = 0; i < N; ++i) std::memcpy(gi + i * N + j0, G + i * J, J * sizeof(float));
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

Shape check_inputs(const torch::Tensor& r, const torch::Tensor& w, const torch::Tensor& k, const torch::Tensor& v,
                   const torch::Tensor& u, const torch::Tensor& s) {
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

std::vector<torch::Tensor> wkv6_forward(torch::Tensor r, torch::Tensor w, torch::Tensor k, torch::Tensor v,
                                        torch::Tensor u, torch::Tensor state_in, int64_t col_blocks) {
  const Shape sh = check_inputs(r, w, k, v, u, state_in);
  const int64_t nb = pick_col_blocks(sh, col_blocks), J = sh.N / std::max<int64_t>(nb, 1);
  auto f32 = r.options().dtype(at::kFloat);
  auto y = torch::empty({sh.B, sh.T, sh.H, sh.N}, f32);
  auto s_out = torch::empty({sh.B, sh.H, sh.N, sh.N}, f32);
  const int64_t tiles = sh.B * sh.H * nb;
  const float *wp = w.data_ptr<float>(), *up = u.data_ptr<float>(), *sp = state_in.data_ptr<float>();
  float *yp = y.data_ptr<float>(), *sop = s_out.data_ptr<float>();
  auto run = [&](const auto* rp, const auto* kp, const auto* vp) {
#pragma omp parallel
    {
      Work ws(sh.N, J, 0, 0);
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
    run(r.data_ptr<at::BFloat16>(), k.data_ptr<at::BFloat16>(), v.data_ptr<at::BFloat16>());
  return {y, s_out};
}

std::vector<torch::Tensor> wkv6_backward(torch::Tensor r, torch::Tensor w, torch::Tensor k, torch::Tensor v,
                                         torch::Tensor u, torch::Tensor state_in, torch::Tensor gy,
                                         torch::Tensor gstate_out, int64_t col_blocks, int64_t ckpt_every) {
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
  auto gr = torch::empty({nb, sh.B, sh.T, sh.H, sh.N}, f32);
  auto gk = torch::empty({nb, sh.B, sh.T, sh.H, sh.N}, f32);
  auto gw = torch::empty({nb, sh.B, sh.T, sh.H, sh.N}, f32);
  auto gu = torch::empty({nb, sh.B, sh.H, sh.N}, f32);
  auto gv = torch::empty({sh.B, sh.T, sh.H, sh.N}, f32);
  auto gs_in = torch::empty({sh.B, sh.H, sh.N, sh.N}, f32);
  const int64_t tiles = sh.B * sh.H * nb, part = sh.B * sh.T * sh.H * sh.N;
  const float *wp = w.data_ptr<float>(), *up = u.data_ptr<float>(), *sp = state_in.data_ptr<float>();
  const float *gyp = gy.data_ptr<float>(), *gsop = gstate_out.data_ptr<float>();
  float *grp = gr.data_ptr<float>(), *gwp = gw.data_ptr<float>(), *gkp = gk.data_ptr<float>();
  float *gvp = gv.data_ptr<float>(), *gup = gu.data_ptr<float>(), *gsp = gs_in.data_ptr<float>();
  auto run = [&](const auto* rp, const auto* kp, const auto* vp) {
#pragma omp parallel
    {
      Work ws(sh.N, J, nck, K);
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
      run(r.data_ptr<at::BFloat16>(), k.data_ptr<at::BFloat16>(), v.data_ptr<at::BFloat16>());
  }
  auto reduce = [&](const torch::Tensor& p) { return nb == 1 ? p[0] : p.sum(0); };
  return {reduce(gr), reduce(gw), reduce(gk), gv, gu.sum({0, 1}), gs_in};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &wkv6_forward, "WKV-5/6 forward (CPU)", py::arg("r"), py::arg("w"), py::arg("k"), py::arg("v"),
        py::arg("u"), py::arg("state_in"), py::arg("col_blocks") = 0);
  m.def("backward", &wkv6_backward, "WKV-5/6 backward (CPU)", py::arg("r"), py::arg("w"), py::arg("k"), py::arg("v"),
        py::arg("u"), py::arg("state_in"), py::arg("gy"), py::arg("gstate_out"), py::arg("col_blocks") = 0,
        py::arg("ckpt_every") = 0);
}
