// The integer dot products of a tile's codes (see cpu.cpp) in portable vector code: the compiler's baseline.
// Part of cpu.cpp, included inside its namespace after its vector types (lanes.h): the portable build.
#pragma once

struct Parts {  // portable form of the same integer sums: codes as 16 lanes of 4 bytes each
  vu part[8];
  template <int R>
  void dots(const int8_t* xq, int64_t stride, vi* dot) const {
    for (int r = 0; r < R; ++r) {
      vi acc{};
      for (int c = 0; c < 8; ++c)
        for (int j = 0; j < 4; ++j)
          acc += bits<vi>((part[c] >> (8 * j)) & 0xFF) * static_cast<int32_t>(xq[r * stride + 4 * c + j]);
      dot[r] = acc;
    }
  }
};
struct Q4 : Parts {
  static constexpr int64_t bytes = 256;
  explicit Q4(const uint8_t* p) {
    vu raw[4];
    std::memcpy(raw, p, sizeof raw);
    for (int c = 0; c < 4; ++c) {
      part[2 * c] = raw[c] & 0x0F0F0F0F;
      part[2 * c + 1] = (raw[c] >> 4) & 0x0F0F0F0F;
    }
  }
};
struct Q8 : Parts {  // the bytes w + 128: dot products sum (w + 128) x
  static constexpr int64_t bytes = 512;
  static constexpr int32_t offset = 128;
  explicit Q8(const uint8_t* p) { std::memcpy(part, p, sizeof part); }
};
