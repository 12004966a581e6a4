// The kernels' vectors of 16 lanes: vf (float), vi (int32), vu (uint32), and what they do besides arithmetic:
// select (a lane-wise ?:), convert (value by value), bits (the same bytes as another type), halves, sum_lanes and
// sum_lanes16. Part of cpu.cpp, included inside its namespace.
//
// With AVX-512 (or no AVX2) a vector is one GCC/Clang vector of 64 bytes. Without AVX-512 GCC keeps such a vector
// in memory and works on it piece by piece, through the stack (an AVX2 attention ran 5-7x slower than AVX-512's,
// most of it stores and loads): there a vector is two native 32-byte halves with the same operators, lanes 0-7 and
// 8-15, so that every value stays in registers. Both forms compute the same lanes in the same order.
#pragma once

#if defined(__AVX2__) && !defined(__AVX512F__)
#define TRIDLM_LANES_IN_HALVES 1  // the form of two native halves (below)
#else
#define TRIDLM_LANES_IN_HALVES 0
#endif

#if !TRIDLM_LANES_IN_HALVES

typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
typedef uint32_t vu __attribute__((vector_size(64)));

template <typename M, typename V>
inline V select(M mask, V a, V b) {
  return mask ? a : b;
}
template <typename To, typename From>
inline To convert(From x) {
  return __builtin_convertvector(x, To);
}
template <typename To, typename From>
inline To bits(From x) {
  return reinterpret_cast<To>(x);
}

typedef float v8 __attribute__((vector_size(32)));
inline v8 low_half(vf x) { return __builtin_shufflevector(x, x, 0, 1, 2, 3, 4, 5, 6, 7); }
inline v8 high_half(vf x) { return __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15); }

// u[p]: lanes l + (l + 8) of v[2p] in lanes 0-7 and of v[2p + 1] in lanes 8-15; then the same in quarters and
// eighths (see sum_lanes16).
inline vf fold_halves(vf a, vf b) {
  return __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
         __builtin_shufflevector(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
}
inline vf fold_quarters(vf a, vf b) {
  return __builtin_shufflevector(a, b, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
         __builtin_shufflevector(a, b, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
}
inline vf fold_pairs(vf a, vf b) {
  return __builtin_shufflevector(a, b, 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
         __builtin_shufflevector(a, b, 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
}
inline vf fold_singles(vf a, vf b) {
  return __builtin_shufflevector(a, b, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
         __builtin_shufflevector(a, b, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

#else

// Two native halves. The operators are hidden friends taking the element type, so that a scalar of another type
// (an int literal, a double) converts to it as it would for a GCC vector.
template <typename E>
struct Lanes {
  typedef E Half __attribute__((vector_size(32)));
  typedef decltype(Half{} < Half{}) HalfMask;
  Half h[2];

  E operator[](int l) const { return h[l / 8][l % 8]; }
  Lanes operator-() const { return {-h[0], -h[1]}; }
#define TRIDLM_LANES_OP(op)                                                                                     \
  friend Lanes operator op(Lanes a, Lanes b) { return {a.h[0] op b.h[0], a.h[1] op b.h[1]}; }                 \
  friend Lanes operator op(Lanes a, E s) { return {a.h[0] op s, a.h[1] op s}; }                               \
  friend Lanes operator op(E s, Lanes b) { return {s op b.h[0], s op b.h[1]}; }                               \
  Lanes& operator op##=(Lanes b) { return *this = *this op b; }
  TRIDLM_LANES_OP(+)
  TRIDLM_LANES_OP(-)
  TRIDLM_LANES_OP(*)
  TRIDLM_LANES_OP(/)
#undef TRIDLM_LANES_OP
#define TRIDLM_LANES_INT_OP(op)                                                                                 \
  template <typename F = E, typename = std::enable_if_t<std::is_integral_v<F>>>                                \
  friend Lanes operator op(Lanes a, E s) { return {a.h[0] op s, a.h[1] op s}; }                               \
  template <typename F = E, typename = std::enable_if_t<std::is_integral_v<F>>>                                \
  friend Lanes operator op(Lanes a, Lanes b) { return {a.h[0] op b.h[0], a.h[1] op b.h[1]}; }
  TRIDLM_LANES_INT_OP(&)
  TRIDLM_LANES_INT_OP(>>)
  TRIDLM_LANES_INT_OP(<<)
#undef TRIDLM_LANES_INT_OP
#define TRIDLM_LANES_CMP(op)                                                                                    \
  friend Lanes<int32_t> operator op(Lanes a, Lanes b) { return mask(a.h[0] op b.h[0], a.h[1] op b.h[1]); }    \
  friend Lanes<int32_t> operator op(Lanes a, E s) { return mask(a.h[0] op s, a.h[1] op s); }
  TRIDLM_LANES_CMP(<)
  TRIDLM_LANES_CMP(>)
#undef TRIDLM_LANES_CMP

 private:
  static Lanes<int32_t> mask(HalfMask a, HalfMask b);
};

typedef Lanes<float> vf;
typedef Lanes<int32_t> vi;
typedef Lanes<uint32_t> vu;

template <typename E>
Lanes<int32_t> Lanes<E>::mask(HalfMask a, HalfMask b) {
  return {reinterpret_cast<vi::Half>(a), reinterpret_cast<vi::Half>(b)};
}

template <typename V>
inline V select(vi mask, V a, V b) {
  return {mask.h[0] ? a.h[0] : b.h[0], mask.h[1] ? a.h[1] : b.h[1]};
}
template <typename To, typename From>
inline To convert(From x) {
  return {__builtin_convertvector(x.h[0], typename To::Half), __builtin_convertvector(x.h[1], typename To::Half)};
}
template <typename To, typename From>
inline To bits(From x) {
  return {reinterpret_cast<typename To::Half>(x.h[0]), reinterpret_cast<typename To::Half>(x.h[1])};
}

typedef vf::Half v8;
inline v8 low_half(vf x) { return x.h[0]; }
inline v8 high_half(vf x) { return x.h[1]; }

// The same lanes as the shuffles of the 64-byte form above, half by half.
inline vf fold_halves(vf a, vf b) { return {a.h[0] + a.h[1], b.h[0] + b.h[1]}; }
inline vf fold_quarters(vf a, vf b) {
  return {__builtin_shufflevector(a.h[0], a.h[1], 0, 1, 2, 3, 8, 9, 10, 11) +
              __builtin_shufflevector(a.h[0], a.h[1], 4, 5, 6, 7, 12, 13, 14, 15),
          __builtin_shufflevector(b.h[0], b.h[1], 0, 1, 2, 3, 8, 9, 10, 11) +
              __builtin_shufflevector(b.h[0], b.h[1], 4, 5, 6, 7, 12, 13, 14, 15)};
}
inline vf fold_pairs(vf a, vf b) {
  return {__builtin_shufflevector(a.h[0], a.h[1], 0, 1, 4, 5, 8, 9, 12, 13) +
              __builtin_shufflevector(a.h[0], a.h[1], 2, 3, 6, 7, 10, 11, 14, 15),
          __builtin_shufflevector(b.h[0], b.h[1], 0, 1, 4, 5, 8, 9, 12, 13) +
              __builtin_shufflevector(b.h[0], b.h[1], 2, 3, 6, 7, 10, 11, 14, 15)};
}
inline vf fold_singles(vf a, vf b) {
  return {__builtin_shufflevector(a.h[0], a.h[1], 0, 2, 4, 6, 8, 10, 12, 14) +
              __builtin_shufflevector(a.h[0], a.h[1], 1, 3, 5, 7, 9, 11, 13, 15),
          __builtin_shufflevector(b.h[0], b.h[1], 0, 2, 4, 6, 8, 10, 12, 14) +
              __builtin_shufflevector(b.h[0], b.h[1], 1, 3, 5, 7, 9, 11, 13, 15)};
}

#endif

inline float sum_lanes(vf x) {  // a fixed pairwise order: lanes l and l + 8, then l and l + 4, then (0 + 2) + (1 + 3)
  typedef float v4 __attribute__((vector_size(16)));
  const v8 a = low_half(x) + high_half(x);
  const v4 c = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (c[0] + c[2]) + (c[1] + c[3]);
}

// sum_lanes of 16 vectors at once, lane k of the result = sum_lanes(v[k]) bit for bit: the same pairwise order,
// by shuffles across vectors instead of within one.
inline vf sum_lanes16(const vf* v) {
  vf u[8], w[4], e[2];
  for (int p = 0; p < 8; ++p) u[p] = fold_halves(v[2 * p], v[2 * p + 1]);
  for (int q = 0; q < 4; ++q) w[q] = fold_quarters(u[2 * q], u[2 * q + 1]);
  for (int s = 0; s < 2; ++s) e[s] = fold_pairs(w[2 * s], w[2 * s + 1]);
  return fold_singles(e[0], e[1]);
}
