// The integer dot products of a tile's codes (see cpu.cpp) by maddubs: AVX2 without VNNI.
// Part of cpu.cpp, included inside its namespace after its vector types (lanes.h): the AVX2 build.
#pragma once

#include "avx2_parts.h"

// AVX2: unsigned codes times signed activation bytes summed in pairs to 16 bits (maddubs: at most 2 x 15 x 128, no
// saturation for 4-bit codes), added up over the 8 parts in 16 bits (at most 8 x 3840 < 32768), then in pairs to 32
// bits (madd with ones) once per block: the same integer sums as dpbusd.
// Half by half (channels 0-7, then 8-15), each block part unpacked as it is used, with the rows' accumulators in
// registers: each part serves all R rows (a register tile over tokens).
struct Q4 {
  static constexpr int64_t bytes = 256;
  const uint8_t* p;
  explicit Q4(const uint8_t* codes) : p(codes) {}
  template <int R>
  void dots(const int8_t* xq, int64_t stride, vi* dot) const {
    const __m256i ones = _mm256_set1_epi16(1);
    for (int h = 0; h < 2; ++h) {
      __m256i acc[R];
      for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_si256();
      q4_parts<R>(p, h, xq, stride, [&](int r, __m256i part, __m256i x) {
        acc[r] = _mm256_add_epi16(acc[r], _mm256_maddubs_epi16(part, x));
      });
      for (int r = 0; r < R; ++r) dot[r].h[h] = reinterpret_cast<vi::Half>(_mm256_madd_epi16(acc[r], ones));
    }
  }
};
// The bytes w + 128 of int8 weights would overflow maddubs' 16-bit pair sums; the signed weights w do not (|w| <= 128
// taken as unsigned, the activation's sign moved onto it), so the dot products here are sum w x (offset 0).
struct Q8 {
  static constexpr int64_t bytes = 512;
  static constexpr int32_t offset = 0;
  const uint8_t* p;
  explicit Q8(const uint8_t* codes) : p(codes) {}
  template <int R>
  void dots(const int8_t* xq, int64_t stride, vi* dot) const {
    const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80)), ones = _mm256_set1_epi16(1);
    for (int h = 0; h < 2; ++h) {
      __m256i acc[R];
      for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_si256();
      for (int c = 0; c < 8; ++c) {
        const __m256i w = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 64 * c + 32 * h)), flip);
        const __m256i magnitude = _mm256_abs_epi8(w);
        for (int r = 0; r < R; ++r) {
          const __m256i pairs = _mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(broadcast_word(xq + r * stride + 4 * c), w));
          acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(pairs, ones));
        }
      }
      for (int r = 0; r < R; ++r) dot[r].h[h] = reinterpret_cast<vi::Half>(acc[r]);
    }
  }
};
