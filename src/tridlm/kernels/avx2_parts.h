// What the AVX2 and AVX-VNNI dot products share.
// Part of cpu.cpp, included inside its namespace: the AVX2 and AVX-VNNI builds.
#pragma once

// The 4 activation bytes at p in every 32-bit lane.
inline __m256i broadcast_word(const int8_t* p) {
  int32_t word;
  std::memcpy(&word, p, sizeof word);
  return _mm256_set1_epi32(word);
}
