// The integer dot products of a tile's codes (see cpu.cpp) by maddubs: AVX2 without VNNI.
// Part of cpu.cpp, included inside its namespace after its vector types (vf, vi, vu): the AVX2 build.
#pragma once

#include "avx2_parts.h"

// AVX2: unsigned codes times signed activation bytes summed in pairs to 16 bits (maddubs: at most 2 x 15 x 128, no
// saturation for 4-bit codes), added up over the 8 parts in 16 bits (at most 8 x 3840 < 32768), then in pairs to 32
// bits (madd with ones) once per block: the same integer sums as dpbusd.
struct Q4 {
  static constexpr int64_t bytes = 256;
  Halves part;
  explicit Q4(const uint8_t* p) { unpack_q4(p, part); }
  template <int R>
  void dots(const int8_t* xq, int64_t stride, vi* dot) const {
    const __m256i ones = _mm256_set1_epi16(1);
    for (int r = 0; r < R; ++r) {
      __m256i acc[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
      for (int c = 0; c < 8; ++c) {
        const __m256i x = broadcast_word(xq + r * stride + 4 * c);
        for (int h = 0; h < 2; ++h) acc[h] = _mm256_add_epi16(acc[h], _mm256_maddubs_epi16(part[c][h], x));
      }
      for (int h = 0; h < 2; ++h) acc[h] = _mm256_madd_epi16(acc[h], ones);
      std::memcpy(&dot[r], acc, sizeof acc);
    }
  }
};
// The bytes w + 128 of int8 weights would overflow maddubs' 16-bit pair sums; the signed weights w do not
// (|w| <= 128 taken as unsigned, the activation's sign moved onto it): sum (w + 128) x = sum w x + 128 sum x.
struct Q8 {
  static constexpr int64_t bytes = 512;
  Halves part;  // the signed weights w
  explicit Q8(const uint8_t* p) {
    const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
    for (int c = 0; c < 8; ++c)
      for (int h = 0; h < 2; ++h)
        part[c][h] = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 64 * c + 32 * h)), flip);
  }
  template <int R>
  void dots(const int8_t* xq, int64_t stride, vi* dot) const {
    const __m256i ones = _mm256_set1_epi16(1);
    for (int r = 0; r < R; ++r) {
      __m256i acc[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
      int32_t sum = 0;
      for (int c = 0; c < 8; ++c) {
        const __m256i x = broadcast_word(xq + r * stride + 4 * c);
        for (int h = 0; h < 2; ++h) {
          const __m256i w = part[c][h];
          const __m256i pairs = _mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(x, w));
          acc[h] = _mm256_add_epi32(acc[h], _mm256_madd_epi16(pairs, ones));
        }
        for (int j = 0; j < 4; ++j) sum += xq[r * stride + 4 * c + j];
      }
      for (int h = 0; h < 2; ++h) acc[h] = _mm256_add_epi32(acc[h], _mm256_set1_epi32(128 * sum));
      std::memcpy(&dot[r], acc, sizeof acc);
    }
  }
};
