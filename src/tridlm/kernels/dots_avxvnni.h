// The integer dot products of a tile's codes (see cpu.cpp) by 256-bit dpbusd: AVX-VNNI without AVX-512.
// Part of cpu.cpp, included inside its namespace after its vector types (vf, vi, vu): the AVX-VNNI build.
#pragma once

#include "avx2_parts.h"

// AVX-VNNI (the VEX-encoded 256-bit dpbusd of CPUs that have it without AVX-512, such as Intel's client cores since
// Alder Lake): the same integer sums as AVX-512 VNNI on two halves of 8 lanes; int8 weights as their bytes w + 128.
struct Parts {
  Halves part;
  template <int R>
  void dots(const int8_t* xq, int64_t stride, vi* dot) const {
    for (int r = 0; r < R; ++r) {
      __m256i acc[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
      for (int c = 0; c < 8; ++c) {
        const __m256i x = broadcast_word(xq + r * stride + 4 * c);
        for (int h = 0; h < 2; ++h) acc[h] = _mm256_dpbusd_avx_epi32(acc[h], part[c][h], x);
      }
      std::memcpy(&dot[r], acc, sizeof acc);
    }
  }
};
struct Q4 : Parts {
  static constexpr int64_t bytes = 256;
  explicit Q4(const uint8_t* p) { unpack_q4(p, part); }
};
struct Q8 : Parts {
  static constexpr int64_t bytes = 512;
  explicit Q8(const uint8_t* p) {
    for (int c = 0; c < 8; ++c)
      for (int h = 0; h < 2; ++h) part[c][h] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 64 * c + 32 * h));
  }
};
