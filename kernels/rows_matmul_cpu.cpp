// y = x W^T for a few rows of x (2..32: the decode step of several streams), CPU, fp32, with W packed once into
// column panels. Used by the serving engine (finetune/ops/rows_matmul.py, finetune/serve/engine.py).
//
// Why by hand: at a few rows a product is neither memory-bound (one row: it streams W at memory speed) nor a large
// GEMM, and the libraries torch ships do it poorly on the AVX2 CPU measured (one thread, bench/gemm_floor.py):
// 8 rows x the 65536 x 768 head take 41 ms in MKL on the row-major weight and 22.6 ms in oneDNN on a weight it
// prepacked (36 GFLOPS), against 12.4 ms (65 GFLOPS) here; the block's 768 x 768 and 3072 x 768 products likewise.
// What it takes is reading W exactly once at the speed memory gives while the FMA units keep up with it: a
// register tile of 4 rows x 24 columns (12 accumulators of 8 floats), W laid out so that each k reads 24 contiguous
// floats, and a software prefetch of the next block of W into L2 spread evenly over the current one (the hardware
// prefetcher alone leaves the FMA units waiting on memory: 47 instead of 60 GFLOPS at 8 rows; into L1 it would
// evict the block the other row groups still read).
//
// Layout: W [N, K] row-major becomes panels [P = ceil(N / 24), K, 24]: panel p holds output columns 24p..24p+23,
// k-major, zero-padded past N. A k-block of one panel (256 x 24 floats, 24 KiB) stays in L1 while the 4-row groups
// of a 16-row chunk take their turns on it.
//
// Arithmetic: every output is one sequential sum over k (c += x[k] * w[k], fused or not as the compiler contracts,
// the same for every row count), computed by one thread: a row's result does not depend on how many rows come with
// it or on the number of threads. The tile is written with GCC/Clang vector types (8 floats: an AVX2 register here,
// two NEON ones on ARM) rather than x86 intrinsics, so it builds anywhere; with AVX an empty asm pins the three W
// vectors in registers: left to itself GCC folds each W load into every FMA that uses it (16 loads per 12 FMAs
// instead of 7: ~70 instead of ~80 GFLOPS with W in cache).
//
//   pack(w [N, K] fp32) -> panels [P, K, 24] fp32
//   matmul(x [M, K] fp32, panels, N) -> y [M, N] fp32
//   lora_add_(y [M, N], x [M, K], pack(A [R, K]), R, pack(B [N, R]), mask [G, R] or None): y += ((x A^T) * mask) B^T

#include "torch_ext.h"  // ATen and pybind11, not the whole C++ frontend

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>

namespace {

constexpr int64_t NR = 24;        // output columns per panel: three 8-float vectors
constexpr int64_t MR = 4;         // rows per register tile: 4 x 24 = 12 accumulators, 16 vector registers in all
constexpr int64_t MC = 16;        // rows per chunk sharing one pass over a k-block
constexpr int64_t KB = 256;       // k-block: 256 x 24 floats = 24 KiB of W, held in L1 for the chunk's row groups
constexpr int64_t LINE = 64 / sizeof(float);  // floats per cache line

typedef float v8 __attribute__((vector_size(32)));  // 8 floats: one AVX2 register (two NEON ones)

inline v8 load8(const float* p) {
  v8 v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}

// acc[r][0..24) (+)= sum_k x[r][k] w[k][0..24) for r < 4, and a prefetch of this group's share of the next k-block
// of W (`pf_lines` cache lines from `pf`) spread evenly over its k steps. A prefetch past the end of W (after the
// last panel) is harmless: prefetches never fault.
void tile(const float* __restrict x, int64_t ldx, const float* __restrict w, int64_t kn, float* __restrict acc,
          bool first, const float* pf, int64_t pf_lines) {
  v8 c[MR][3];
  for (int64_t r = 0; r < MR; ++r)
    for (int64_t j = 0; j < 3; ++j) c[r][j] = first ? v8{} : load8(acc + r * NR + 8 * j);
  int64_t done = 0, due = 0;  // lines prefetched; each step adds pf_lines to due, each kn of it is one more line
  for (int64_t k = 0; k < kn; ++k) {
    for (due += pf_lines; due >= kn; due -= kn) __builtin_prefetch(pf + LINE * done++, 0, 2);
    v8 w0 = load8(w + k * NR), w1 = load8(w + k * NR + 8), w2 = load8(w + k * NR + 16);
#if defined(__x86_64__) && defined(__AVX__)
    asm("" : "+x"(w0), "+x"(w1), "+x"(w2));  // keep W in registers: 7 loads per 12 FMAs instead of 16
#endif
#pragma GCC unroll 4
    for (int64_t r = 0; r < MR; ++r) {
      const float b = x[r * ldx + k];
      c[r][0] += b * w0;
      c[r][1] += b * w1;
      c[r][2] += b * w2;
    }
  }
  for (int64_t r = 0; r < MR; ++r)
    for (int64_t j = 0; j < 3; ++j) __builtin_memcpy(acc + r * NR + 8 * j, &c[r][j], sizeof(v8));
}

at::Tensor pack(at::Tensor w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kFloat && w.device().is_cpu(),
              "rows_matmul.pack: a 2-D float32 CPU weight expected");
  w = w.contiguous();
  const int64_t N = w.size(0), K = w.size(1), P = (N + NR - 1) / NR;
  auto out = w.new_zeros({P, K, NR});
  const float* src = w.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p)
      for (int64_t j = 0; j < NR && p * NR + j < N; ++j) {
        const float* row = src + (p * NR + j) * K;
        for (int64_t k = 0; k < K; ++k) dst[(p * K + k) * NR + j] = row[k];
      }
  });
  return out;
}

// y [M, N] = x W^T, or y += x W^T when `accumulate`, with W's panels [P, K, 24]; x [Mp, K] holds M rows and zero
// rows up to whole tiles (Mp a multiple of 4), y [M, N] is contiguous.
void gemm(const float* xp, int64_t M, int64_t Mp, int64_t K, const float* wp, int64_t P, int64_t N, float* yp,
          bool accumulate) {
  at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
    float acc[MC * NR];
    for (int64_t p = p0; p < p1; ++p) {
      const float* panel = wp + p * K * NR;
      const int64_t cols = std::min(NR, N - p * NR);
      for (int64_t m0 = 0; m0 < M; m0 += MC) {
        const int64_t mc = std::min(MC, Mp - m0), groups = mc / MR, rows = std::min(MC, M - m0);
        if (accumulate) {  // the sums start from y's values (pad columns and rows from zero)
          std::fill(acc, acc + mc * NR, 0.0f);
          for (int64_t r = 0; r < rows; ++r) std::memcpy(acc + r * NR, yp + (m0 + r) * N + p * NR, cols * sizeof(float));
        }
        for (int64_t k0 = 0; k0 < K; k0 += KB) {
          const int64_t kn = std::min(KB, K - k0);
          // the next k-block (the next panel's first after the last one: panels are contiguous), its lines shared
          // out among the groups so that the stream from memory runs while every group computes
          const float* next = panel + (k0 + kn) * NR;
          const int64_t per_group = (KB * NR / LINE + groups - 1) / groups;
          for (int64_t g = 0; g < groups; ++g) {
            const int64_t r0 = g * MR;
            tile(xp + (m0 + r0) * K + k0, K, panel + k0 * NR, kn, acc + r0 * NR, k0 == 0 && !accumulate,
                 next + g * per_group * LINE, per_group);
          }
        }
        for (int64_t r = 0; r < rows; ++r) std::memcpy(yp + (m0 + r) * N + p * NR, acc + r * NR, cols * sizeof(float));
      }
    }
  });
}

void check_x(const at::Tensor& x, const char* what) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.device().is_cpu(), "rows_matmul.", what,
              ": x must be a 2-D float32 CPU tensor");
}

void check_panels(const at::Tensor& panels, int64_t K, int64_t N, const char* what) {
  TORCH_CHECK(panels.dim() == 3 && panels.size(2) == NR && panels.scalar_type() == at::kFloat &&
                  panels.is_contiguous() && panels.size(1) == K && panels.size(0) * NR >= N &&
                  (panels.size(0) - 1) * NR < N,
              "rows_matmul.", what, ": panels do not match x or N");
}

// x with zero rows added up to whole 4-row tiles, contiguous. One tile shape means one order of operations for every
// row, so a row's bits cannot depend on the rows around it (a 1-row tile compiled differently gave different bits
// under -ffast-math); a lone row costs no more, being memory-bound.
at::Tensor whole_tiles(at::Tensor x) {
  const int64_t M = x.size(0), Mp = (M + MR - 1) / MR * MR;
  if (Mp == M) return x.contiguous();
  auto padded = x.new_zeros({Mp, x.size(1)});
  padded.narrow(0, 0, M).copy_(x);
  return padded;
}

at::Tensor matmul(at::Tensor x, at::Tensor panels, int64_t N) {
  check_x(x, "matmul");
  check_panels(panels, x.size(1), N, "matmul");
  const int64_t M = x.size(0);
  x = whole_tiles(x);
  auto y = x.new_empty({M, N});
  gemm(x.data_ptr<float>(), M, x.size(0), x.size(1), panels.data_ptr<float>(), panels.size(0), N, y.data_ptr<float>(),
       false);
  return y;
}

// y [M, N] += ((x A^T) * mask) B^T in place, A [R, K] and B [N, R] as panels; mask [G, R] (G dividing M: row m
// uses mask row m / (M / G), the T positions of a sequence one row) or None. The LoRA delta of a batch of rows in
// one call: the two products, the mask and the add that would be four torch operations, each with its dispatch and
// a fresh [M, *] tensor.
void lora_add_(at::Tensor y, at::Tensor x, at::Tensor a_panels, int64_t R, at::Tensor b_panels,
               std::optional<at::Tensor> mask) {
  check_x(x, "lora_add_");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(y.dim() == 2 && y.size(0) == M && y.is_contiguous() && y.scalar_type() == at::kFloat,
              "rows_matmul.lora_add_: y must be a contiguous float32 [M, N]");
  const int64_t N = y.size(1);
  check_panels(a_panels, K, R, "lora_add_ (A)");
  check_panels(b_panels, R, N, "lora_add_ (B)");
  x = whole_tiles(x);
  const int64_t Mp = x.size(0);
  auto h = x.new_zeros({Mp, R});
  float* hp = h.data_ptr<float>();
  gemm(x.data_ptr<float>(), M, Mp, K, a_panels.data_ptr<float>(), a_panels.size(0), R, hp, false);
  if (mask) {
    const at::Tensor m = mask->contiguous();
    TORCH_CHECK(m.dim() == 2 && m.size(1) == R && m.size(0) > 0 && M % m.size(0) == 0 &&
                    m.scalar_type() == at::kFloat,
                "rows_matmul.lora_add_: mask must be float32 [G, R] with G dividing the rows");
    const float* mp = m.data_ptr<float>();
    const int64_t per = M / m.size(0);
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < R; ++j) hp[i * R + j] *= mp[(i / per) * R + j];
  }
  gemm(hp, M, Mp, R, b_panels.data_ptr<float>(), b_panels.size(0), N, y.data_ptr<float>(), true);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pack", &pack, "W [N, K] -> panels [ceil(N / 24), K, 24]");
  m.def("matmul", &matmul, "x [M, K] @ W^T from W's panels -> [M, N]");
  m.def("lora_add_", &lora_add_, "y [M, N] += ((x A^T) * mask) B^T, A and B as panels, mask [G, R] or None");
}
