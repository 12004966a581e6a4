// 256-bit forms shared by the AVX2 and AVX-VNNI dot products.
// Part of cpu.cpp, included inside its namespace after its vector types (vf, vi, vu): the AVX2 and AVX-VNNI builds.
#pragma once

// 256-bit forms: part c of the codes as two registers, lanes 0-7 and 8-15.
typedef __m256i Halves[8][2];
inline void unpack_q4(const uint8_t* p, Halves& part) {
  const __m256i low = _mm256_set1_epi8(0x0F);
  for (int c = 0; c < 4; ++c)
    for (int h = 0; h < 2; ++h) {
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 64 * c + 32 * h));
      part[2 * c][h] = _mm256_and_si256(raw, low);
      part[2 * c + 1][h] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low);
    }
}
inline __m256i broadcast_word(const int8_t* p) {
  int32_t word;
  std::memcpy(&word, p, sizeof word);
  return _mm256_set1_epi32(word);
}
