// The integer dot products of a tile's codes (see cpu.cpp) by 256-bit dpbusd: AVX-VNNI without AVX-512.
// Part of cpu.cpp, included inside its namespace after its vector types (lanes.h): the AVX-VNNI build.
#pragma once

#include "avx2_parts.h"

// AVX-VNNI (the VEX-encoded 256-bit dpbusd of CPUs that have it without AVX-512, such as Intel's client cores since
// Alder Lake): the same integer sums as AVX-512 VNNI, half by half (channels 0-7, then 8-15) with the rows'
// accumulators in registers, as the AVX2 build does; int8 weights as their bytes w + 128.
struct Q4 {
  static constexpr int64_t bytes = 256;
  const uint8_t* p;
  explicit Q4(const uint8_t* codes) : p(codes) {}
  template <int R>
  void dots(const int8_t* xq, int64_t stride, vi* dot) const {
    for (int h = 0; h < 2; ++h) {
      __m256i acc[R];
      for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_si256();
      q4_parts<R>(p, h, xq, stride, [&](int r, __m256i part, __m256i x) {
        acc[r] = _mm256_dpbusd_avx_epi32(acc[r], part, x);
      });
      for (int r = 0; r < R; ++r) dot[r].h[h] = reinterpret_cast<vi::Half>(acc[r]);
    }
  }
};
struct Q8 {  // the bytes w + 128: dot products sum (w + 128) x
  static constexpr int64_t bytes = 512;
  static constexpr int32_t offset = 128;
  const uint8_t* p;
  explicit Q8(const uint8_t* codes) : p(codes) {}
  template <int R>
  void dots(const int8_t* xq, int64_t stride, vi* dot) const {
    for (int h = 0; h < 2; ++h) {
      __m256i acc[R];
      for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_si256();
      for (int c = 0; c < 8; ++c) {
        const __m256i part = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 64 * c + 32 * h));
        for (int r = 0; r < R; ++r)
          acc[r] = _mm256_dpbusd_avx_epi32(acc[r], part, broadcast_word(xq + r * stride + 4 * c));
      }
      for (int r = 0; r < R; ++r) dot[r].h[h] = reinterpret_cast<vi::Half>(acc[r]);
    }
  }
};
