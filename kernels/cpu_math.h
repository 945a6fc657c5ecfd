// Small float helpers shared by the CPU kernels (wkv_cpu.cpp, wkv7_cpu.cpp, rwkv7_step_cpu.cpp).
#pragma once

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>

// e^x, inline and branch-free so that loops over channels vectorise (a libm call per element costs about as much as
// the rest of a step): 2^n * e^f with n = round(x / ln 2), |f| <= ln 2 / 2, e^f by the degree-6 polynomial of
// Cephes' expf (about 1 ulp). Below -87 it returns 0 (the true value is below fp32's normal range), above 88 it
// saturates at e^88.
inline float exp_f32(float x0) {
  const float x = std::min(std::max(x0, -87.0f), 88.0f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float f = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  float e = 1.9875691500e-4f;
  e = e * f + 1.3981999507e-3f;
  e = e * f + 8.3334519073e-3f;
  e = e * f + 4.1665795894e-2f;
  e = e * f + 1.6666665459e-1f;
  e = e * f + 5.0000001201e-1f;
  e = e * f * f + f + 1.0f;
  const float scale = std::bit_cast<float>((static_cast<int32_t>(n) + 127) << 23);
  return x0 < -87.0f ? 0.0f : e * scale;
}
