// What the AVX2 and AVX-VNNI dot products share.
// Part of cpu.cpp, included inside its namespace: the AVX2 and AVX-VNNI builds.
#pragma once

// The 4 activation bytes at p in every 32-bit lane.
inline __m256i broadcast_word(const int8_t* p) {
  int32_t word;
  std::memcpy(&word, p, sizeof word);
  return _mm256_set1_epi32(word);
}

// add(r, part, x) for each part of half h (channels 0-7 or 8-15) of a Q4 block (tridlm.quant.Int4Weight) and each of
// R rows: part the codes of 4 inputs of each channel, unpacked as it is used; x row r's 4 matching activation bytes.
template <int R, typename Add>
inline void q4_parts(const uint8_t* p, int h, const int8_t* xq, int64_t stride, Add add) {
  const __m256i low = _mm256_set1_epi8(0x0F);
  for (int c = 0; c < 4; ++c) {
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 64 * c + 32 * h));
    const __m256i part[2] = {_mm256_and_si256(raw, low), _mm256_and_si256(_mm256_srli_epi16(raw, 4), low)};
    for (int k = 0; k < 2; ++k)
      for (int r = 0; r < R; ++r) add(r, part[k], broadcast_word(xq + r * stride + 8 * c + 4 * k));
  }
}
