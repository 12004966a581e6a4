// The integer dot products of a tile's codes (see cpu.cpp) by 512-bit dpbusd: AVX-512 with VNNI.
// Part of cpu.cpp, included inside its namespace after its vector types (lanes.h): the AVX-512 VNNI build.
#pragma once

struct Parts {
  __m512i part[8];
  // dot[r] for the blocks of R rows at xq + r * stride, interleaved; below 4 rows two chains per row (summed
  // exactly) keep the adds from waiting on each other.
  template <int R>
  void dots(const int8_t* xq, int64_t stride, vi* dot) const {
    constexpr int C = R >= 4 ? 1 : 2;
    __m512i acc[R * C];
    for (int i = 0; i < R * C; ++i) acc[i] = _mm512_setzero_si512();
    for (int c = 0; c < 8; ++c)
      for (int r = 0; r < R; ++r) {
        int32_t word;
        std::memcpy(&word, xq + r * stride + 4 * c, sizeof word);
        acc[r * C + c % C] = _mm512_dpbusd_epi32(acc[r * C + c % C], part[c], _mm512_set1_epi32(word));
      }
    for (int r = 0; r < R; ++r)
      dot[r] = bits<vi>(C == 1 ? acc[r] : _mm512_add_epi32(acc[r * C], acc[r * C + C - 1]));
  }
};
struct Q4 : Parts {  // unpacked to bytes once for all rows
  static constexpr int64_t bytes = 256;
  explicit Q4(const uint8_t* p) {
    const __m512i low = _mm512_set1_epi8(0x0F);
    for (int c = 0; c < 4; ++c) {
      const __m512i raw = _mm512_loadu_si512(p + 64 * c);
      part[2 * c] = _mm512_and_si512(raw, low);
      part[2 * c + 1] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low);
    }
  }
};
struct Q8 : Parts {  // the bytes w + 128: dot products sum (w + 128) x
  static constexpr int64_t bytes = 512;
  static constexpr int32_t offset = 128;
  explicit Q8(const uint8_t* p) {
    for (int c = 0; c < 8; ++c) part[c] = _mm512_loadu_si512(p + 64 * c);
  }
};
