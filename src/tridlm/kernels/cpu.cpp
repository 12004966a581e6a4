// CPU kernels for a decode step's operations, each one call where torch needs several ops: attention for short
// query blocks, RMSNorm, RoPE, SiLU, low-rank adapters, and int4/int8 matmuls by integer dot products. Every row
// is computed on its own in a fixed order of operations, so its result never depends on how many rows, keys or
// batch rows come with it: a spec verify row equals the AR step that would produce it bit for bit.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <optional>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

#include "lanes.h"

constexpr int64_t W = 16;  // lanes: elements of a row, or softmax weights of 16 keys

#if TRIDLM_LANES_IN_HALVES  // half by half: a copy of the whole pair went through the stack (float32 rows 1.6x slower)
inline v8 load_half(const float* p) {
  v8 h;
  std::memcpy(&h, p, sizeof h);
  return h;
}
inline vf load(const float* p) { return {load_half(p), load_half(p + 8)}; }
inline void store(float* p, vf x) {
  std::memcpy(p, &x.h[0], sizeof x.h[0]);
  std::memcpy(p + 8, &x.h[1], sizeof x.h[1]);
}
#else
inline vf load(const float* p) {
  vf x;
  std::memcpy(&x, p, sizeof x);
  return x;
}
inline void store(float* p, vf x) { std::memcpy(p, &x, sizeof x); }
#endif
inline vf load(const c10::BFloat16* p) {  // bfloat16 is the top half of a float
#if !TRIDLM_LANES_IN_HALVES
  typedef uint16_t vh __attribute__((vector_size(32)));
  vh h;
  std::memcpy(&h, p, sizeof h);
  return bits<vf>(__builtin_convertvector(h, vu) << 16);
#else
  typedef uint16_t h8 __attribute__((vector_size(16)));
  h8 h[2];
  std::memcpy(h, p, sizeof h);
  return bits<vf>(vu{__builtin_convertvector(h[0], vu::Half), __builtin_convertvector(h[1], vu::Half)} << 16);
#endif
}
inline vf load(const c10::Half* p) {
#if defined(__AVX512F__)
  return bits<vf>(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
#elif defined(__F16C__)  // the AVX2 builds: two native halves
  return {reinterpret_cast<v8>(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))),
          reinterpret_cast<v8>(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8))))};
#else
  float f[W];
  for (int64_t l = 0; l < W; ++l) f[l] = static_cast<float>(p[l]);
  return load(f);
#endif
}
inline void store(c10::BFloat16* p, vf x) {  // round to nearest even
  const vu wide = bits<vu>(x);
  const vu top = (wide + 0x7FFF + ((wide >> 16) & 1)) >> 16;
#if !TRIDLM_LANES_IN_HALVES
  typedef uint16_t vh __attribute__((vector_size(32)));
  const vh h = __builtin_convertvector(top, vh);
  std::memcpy(p, &h, sizeof h);
#else  // packed as lanes 0-3, 8-11, 4-7, 12-15; the permute puts them in order
  const __m256i packed = _mm256_packus_epi32(reinterpret_cast<__m256i>(top.h[0]), reinterpret_cast<__m256i>(top.h[1]));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm256_permute4x64_epi64(packed, 0xD8));
#endif
}
inline void store(c10::Half* p, vf x) {  // round to nearest even, as c10::Half's conversion does
#if defined(__AVX512F__)
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(bits<__m512>(x), _MM_FROUND_TO_NEAREST_INT));
#elif defined(__F16C__)
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm256_cvtps_ph(reinterpret_cast<__m256>(x.h[0]), _MM_FROUND_TO_NEAREST_INT));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p + 8),
                   _mm256_cvtps_ph(reinterpret_cast<__m256>(x.h[1]), _MM_FROUND_TO_NEAREST_INT));
#else
  float f[W];
  store(f, x);
  for (int64_t l = 0; l < W; ++l) p[l] = static_cast<c10::Half>(f[l]);
#endif
}

// Calls fn(T{}) with T the element type: float32, bfloat16 or float16.
template <typename Fn>
void dispatch(at::ScalarType type, const char* name, Fn fn) {
  switch (type) {
    case torch::kFloat: fn(float{}); break;
    case torch::kBFloat16: fn(c10::BFloat16{}); break;
    case torch::kHalf: fn(c10::Half{}); break;
    default: TORCH_CHECK(false, name, ": float32, bfloat16 or float16 only, not ", type);
  }
}
template <typename Fn>
void dispatch(const torch::Tensor& t, const char* name, Fn fn) {
  dispatch(t.scalar_type(), name, fn);
}

// exp(x) for x <= 0, lane by lane (Cephes' single-precision polynomial, about 1 ulp).
inline vf exp_nonpositive(vf x) {
  x = select(x < -87.0f, vf{} - 87.0f, x);
  const vi n = convert<vi>(x * 1.44269504088896341f - 0.5f);  // round to nearest (x <= 0)
  const vf fn = convert<vf>(n);
  const vf r = x - fn * 0.693359375f + fn * 2.12194440e-4f;
  vf y = vf{} + 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  return y * bits<vf>((n + 127) << 23);
}

struct Strides {
  int64_t b, h, j;  // batch row, head, and query or key index
};

// Every score is a sum over the head dimension and every output a sum over the allowed keys, each in a fixed
// order of its own: the same operations for a query row whatever else is in the call. C: the head size in
// lanes, a template parameter so that a query head and its output stay in registers.
// tokens: where the queries are a chosen few of the B * n (ascending indices b * n + i), q holds those rows only
// (query r at q + r * qs.j) and so does the output; nullptr: all of them.
template <typename T, typename O, int64_t C>
void attend_rows(const T* q, const T* k, const T* v, const bool* mask, O* out, int64_t B, int64_t n, int64_t H,
                 int64_t KV, int64_t P, Strides qs, Strides ks, Strides vs, Strides ms, float scale,
                 const int64_t* tokens, int64_t queries) {
  constexpr int64_t GROUP = 4;  // query heads that share each key and value load
  const int64_t G = H / KV, chunks_max = (P + W - 1) / W;
  // One task: the G query heads of one row that share a key/value head, up to GROUP of them per pass over the
  // keys: each key and value row is loaded once for them all. Every score and output is computed exactly as
  // for one head alone.
  at::parallel_for(0, queries * KV, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> weights(GROUP * chunks_max * W);
    std::vector<int64_t> keys(P);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = task / KV, kv = task % KV, token = tokens ? tokens[r] : r, b = token / n, i = token % n;
      const T* qrow = tokens ? q + r * qs.j : q + b * qs.b + i * qs.j;
      const bool* allowed = mask + b * ms.b + i * ms.j;
      int64_t count = 0;
      for (int64_t j = 0; j < P; ++j)
        if (allowed[j]) keys[count++] = j;
      if (count == 0) continue;  // no key to attend to: the output stays zero
      const int64_t chunks = (count + W - 1) / W;
      const T* kbase = k + b * ks.b + kv * ks.h;
      const T* vbase = v + b * vs.b + kv * vs.h;
      for (int64_t g0 = 0; g0 < G; g0 += GROUP) {
        const int64_t heads = std::min(GROUP, G - g0);
        vf qh[GROUP][C];
        for (int64_t g = 0; g < heads; ++g)
          for (int64_t c = 0; c < C; ++c)
            qh[g][c] = load(qrow + (kv * G + g0 + g) * qs.h + c * W) * scale;
        float* w[GROUP];
        for (int64_t g = 0; g < heads; ++g) w[g] = weights.data() + g * chunks_max * W;
        for (int64_t j0 = 0; j0 < count; j0 += W) {  // a score: lane l sums elements l, l + W, ...; then the lanes
          vf lanes[GROUP][W];
          for (int64_t t = 0; t < W; ++t) {
            if (j0 + t >= count) {
              for (int64_t g = 0; g < heads; ++g) lanes[g][t] = vf{};
              continue;
            }
            const T* krow = kbase + keys[j0 + t] * ks.j;
            vf key[C];
            for (int64_t c = 0; c < C; ++c) key[c] = load(krow + c * W);
            for (int64_t g = 0; g < heads; ++g) {
              lanes[g][t] = qh[g][0] * key[0];
              for (int64_t c = 1; c < C; ++c) lanes[g][t] += qh[g][c] * key[c];
            }
          }
          for (int64_t g = 0; g < heads; ++g) store(w[g] + j0, sum_lanes16(lanes[g]));  // 16 keys' scores at once
        }
        float total[GROUP];
        for (int64_t g = 0; g < heads; ++g) {
          std::fill(w[g] + count, w[g] + chunks * W, -std::numeric_limits<float>::infinity());
          vf top = load(w[g]);
          for (int64_t c = 1; c < chunks; ++c) top = select(top > load(w[g] + c * W), top, load(w[g] + c * W));
          float mx = top[0];
          for (int64_t l = 1; l < W; ++l) mx = std::max(mx, top[l]);
          for (int64_t c = 0; c < chunks; ++c) store(w[g] + c * W, exp_nonpositive(load(w[g] + c * W) - mx));
          std::fill(w[g] + count, w[g] + chunks * W, 0.f);
          vf sum{};
          for (int64_t c = 0; c < chunks; ++c) sum += load(w[g] + c * W);
          total[g] = sum_lanes(sum);
        }
        vf acc[GROUP][C] = {};
        for (int64_t j = 0; j < count; ++j) {  // unnormalized weights times values, in key order
          const T* vrow = vbase + keys[j] * vs.j;
          vf value[C];
          for (int64_t c = 0; c < C; ++c) value[c] = load(vrow + c * W);
          for (int64_t g = 0; g < heads; ++g)
            for (int64_t c = 0; c < C; ++c) acc[g][c] += w[g][j] * value[c];
        }
        for (int64_t g = 0; g < heads; ++g) {
          O* orow = out + (r * H + kv * G + g0 + g) * C * W;
          for (int64_t c = 0; c < C; ++c) store(orow + c * W, acc[g][c] / total[g]);
        }
      }
    }
  });
}

// ---- int4 weights (GGUF Q4_1) times activations quantized to int8, by integer dot products.
//
// Each activation row is quantized per block of 32 inputs to int8 (scale dx = max|x| / 127, round to nearest),
// as llama.cpp does for its Q4_1 x Q8_1 dot products, so a block's dot product with the 4-bit codes is an exact
// integer sum: AVX-512 VNNI adds 64 byte products per instruction, and a matmul of several rows reads the weights
// once and costs little more than one row. Per output channel and block, y += (d * dx) * sum(q * xq) + m * sx
// with sx = dx * sum(xq), blocks in order: a row's result depends on that row alone.
//
// Weight layout (tridlm.quant.Int4Weight): codes (N / 16, K / 32, 256) bytes, tiles of 16 output channels; in a
// tile's block of 32 inputs, 64-byte chunk c holds in the 4 bytes of lane (channel) l the codes of inputs
// 8c .. 8c + 3 in the low nibbles and 8c + 4 .. 8c + 7 in the high ones. scales (N / 16, K / 32, 2, 16) float16:
// the 16 channels' d, then their m.

constexpr int64_t BLOCK = 32;

struct QuantizedRows {
  std::vector<int8_t> q;     // (M, K)
  std::vector<float> d, s;   // (M, K / 32): the scale dx, and dx * the sum of the block's codes
  std::vector<int32_t> sum;  // (M, K / 32): the sum of the block's codes
};

template <typename T>
QuantizedRows quantize_rows(const T* x, int64_t M, int64_t K) {
  const int64_t blocks = M * K / BLOCK;
  QuantizedRows out{std::vector<int8_t>(M * K), std::vector<float>(blocks), std::vector<float>(blocks),
                    std::vector<int32_t>(blocks)};
  at::parallel_for(0, blocks, 512, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const vf half[2] = {load(x + i * BLOCK), load(x + i * BLOCK + W)};
      const vf mag[2] = {select(half[0] < 0, -half[0], half[0]), select(half[1] < 0, -half[1], half[1])};
      const vf top = select(mag[0] > mag[1], mag[0], mag[1]);
      float amax = top[0];
      for (int64_t l = 1; l < W; ++l) amax = std::max(amax, top[l]);
      const float d = amax / 127.f, inv = d > 0 ? 1.f / d : 0.f;
      int32_t sum = 0;
      for (int64_t h = 0; h < 2; ++h) {
        const vf scaled = half[h] * inv;
        for (int64_t l = 0; l < W; ++l) {
          const int32_t c = static_cast<int32_t>(std::nearbyint(scaled[l]));
          out.q[i * BLOCK + h * W + l] = static_cast<int8_t>(c);
          sum += c;
        }
      }
      out.d[i] = d;
      out.s[i] = d * static_cast<float>(sum);
      out.sum[i] = sum;
    }
  });
  return out;
}

// The integer dot products of one tile's block of weight codes (16 channels x 32 inputs, unsigned bytes) with the
// blocks of activation codes of R rows: lane l = channel l. Part k of the codes holds in the 4 bytes of lane l the codes
// of inputs 4k .. 4k + 3 of channel l. Q4: packed as nibbles in 256 bytes (tridlm.quant.Int4Weight); Q8: the bytes
// w + 128 of int8 weights in 512 (tridlm.quant.Int8Weight).
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include "dots_avx512.h"
#elif defined(__AVXVNNI__) && defined(__AVX2__)
#include "dots_avxvnni.h"
#elif defined(__AVX2__)
#include "dots_avx2.h"
#else
#include "dots_portable.h"
#endif

// A low-rank adapter on chosen rows: y[i] += b (a x[i]), in float32. a (r, K); bt (N / 16, r, 16), both float32 or
// both bfloat16,
// b by tiles of 16 outputs, a tile's ranks contiguous; spans (N / 16, 2) int32: for each tile the rank range
// [j0, j1) outside which its part of b is zero (a group of projections has a block-diagonal b); rows (M,) bool, or
// null for all.
struct Lora {
  const void* a = nullptr;  // float32 or bfloat16 (both a and bt)
  const void* bt = nullptr;
  bool bf16 = false;
  const int32_t* spans = nullptr;
  const bool* rows = nullptr;
  int64_t r = 0, N = 0;
  std::vector<float> t;  // (M, r): a x[i] for the chosen rows

  vf weights(const void* base, int64_t offset) const {
    return bf16 ? load(static_cast<const c10::BFloat16*>(base) + offset) : load(static_cast<const float*>(base) + offset);
  }

  bool on(int64_t i) const { return a != nullptr && (rows == nullptr || rows[i]); }

  template <typename T>
  void project(const T* x, int64_t M, int64_t K) {
    t.assign(M * r, 0.f);
    for (int64_t j = 0; j < r; ++j)  // on one thread: a few rows of a few ranks, less than a fork would cost
      for (int64_t i = 0; i < M; ++i) {
        if (!on(i)) continue;
        vf lanes{};
        for (int64_t c = 0; c < K; c += W) lanes += weights(a, j * K + c) * load(x + i * K + c);
        t[i * r + j] = sum_lanes(lanes);
      }
  }

  vf delta(int64_t i, int64_t tile) const {  // the 16 outputs of ``tile`` for row i
    vf out{};
    for (int64_t j = spans[2 * tile]; j < spans[2 * tile + 1]; ++j) out += weights(bt, (tile * r + j) * W) * t[i * r + j];
    return out;
  }
};

// Rows r0 .. r0 + R of one tile of int4 weights: R accumulators stay in registers while each block of codes is
// unpacked once. scales: (tiles, blocks, 2, 16) float16, d then m.
template <int R, typename T>
void int4_tile(const uint8_t* codes, const c10::Half* scales, const QuantizedRows& x, const Lora& lora, int64_t K,
               int64_t r0, T* out, int64_t N, int64_t tile) {
  const int64_t blocks = K / BLOCK;
  vf acc[R] = {};
  for (int64_t b = 0; b < blocks; ++b) {
    const Q4 w(codes + (tile * blocks + b) * Q4::bytes);
    const vf d = load(scales + (tile * blocks + b) * 2 * W), m = load(scales + ((tile * blocks + b) * 2 + 1) * W);
    vi dot[R];
    w.template dots<R>(x.q.data() + r0 * K + b * BLOCK, K, dot);
    for (int r = 0; r < R; ++r) {
      const int64_t row = r0 + r;
      acc[r] += convert<vf>(dot[r]) * (d * x.d[row * blocks + b]);
      acc[r] += m * x.s[row * blocks + b];
    }
  }
  for (int r = 0; r < R; ++r) {
    if (lora.on(r0 + r)) acc[r] += lora.delta(r0 + r, tile);
    store(out + (r0 + r) * N + tile * W, acc[r]);
  }
}

// The same for int8 weights (codes w + 128): per block the exact integer sum(w * xq) = dot - Q8::offset * sum(xq)
// (the VNNI builds' dot products are sum((w + 128) * xq), offset 128; AVX2's are sum(w * xq)), times dx, and the
// weights' scale: S = float, one per channel (scales (tiles, 16)), applied at the end; S = c10::Half, one per channel
// and block as GGUF Q8_0 has them (scales (tiles, blocks, 16)), applied per block.
template <int R, typename S, typename T>
void int8_tile(const uint8_t* codes, const S* scales, const QuantizedRows& x, int64_t K, int64_t r0, T* out,
               int64_t N, int64_t tile) {
  constexpr bool per_block = std::is_same_v<S, c10::Half>;
  const int64_t blocks = K / BLOCK;
  const vf one = vf{} + 1.f;  // the scale not applied at this level (x 1 leaves a float as it is)
  vf acc[R] = {};
  for (int64_t b = 0; b < blocks; ++b) {
    const Q8 w(codes + (tile * blocks + b) * Q8::bytes);
    vi dot[R];
    w.template dots<R>(x.q.data() + r0 * K + b * BLOCK, K, dot);
    const vf d = per_block ? load(scales + (tile * blocks + b) * W) : one;
    for (int r = 0; r < R; ++r) {
      const int64_t row = (r0 + r) * blocks + b;
      acc[r] += convert<vf>(dot[r] - Q8::offset * x.sum[row]) * (d * x.d[row]);
    }
  }
  const vf scale = per_block ? one : load(scales + tile * W);
  for (int r = 0; r < R; ++r) store(out + (r0 + r) * N + tile * W, acc[r] * scale);
}

}  // namespace

// q (B, n, H, D); k, v (B, KV, P, D), each with its last dimension contiguous; mask (B, n, P) bool, true where
// a query may attend -> (B, n, H, D) in q's dtype or float32 (``to_float``); a row with no allowed key gets zeros.
// With ``tokens`` (int64 indices b * n + i, ascending, non-empty), q is (1, T, H, D): those T queries only, and so
// is the result.
torch::Tensor attend_tokens(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor mask, double scale,
                            const torch::Tensor& tokens, bool to_float) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && mask.dim() == 3, "attend: bad ranks");
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu() && mask.device().is_cpu(),
              "attend: CPU tensors only");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), "attend: mixed dtypes");
  TORCH_CHECK(mask.scalar_type() == torch::kBool, "attend: the mask must be bool");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1 && mask.stride(2) == 1,
              "attend: last dimensions must be contiguous");
  const bool chosen = tokens.numel() > 0;
  const int64_t B = mask.size(0), n = mask.size(1), H = q.size(2), D = q.size(3), KV = k.size(1), P = k.size(2);
  const int64_t queries = chosen ? tokens.numel() : B * n;
  TORCH_CHECK(KV > 0 && H % KV == 0 && k.size(0) == B && v.sizes() == k.sizes() && k.size(3) == D &&
              mask.size(2) == P && (chosen ? q.size(0) == 1 && q.size(1) == queries : q.size(0) == B && q.size(1) == n),
              "attend: shapes disagree");
  TORCH_CHECK(!chosen || tokens.scalar_type() == torch::kLong, "attend: tokens must be int64");
  TORCH_CHECK(D == 64 || D == 128 || D == 256, "attend: head sizes 64, 128 and 256 only, not ", D);
  auto out = torch::zeros(q.sizes(), q.options().dtype(to_float ? torch::kFloat : q.scalar_type()));
  dispatch(q, "attend", [&](auto zero) {
    using T = decltype(zero);
    auto run = [&](auto* o) {
      using O = std::remove_pointer_t<decltype(o)>;
      auto rows = D == 64 ? attend_rows<T, O, 4> : D == 128 ? attend_rows<T, O, 8> : attend_rows<T, O, 16>;
      rows(q.data_ptr<T>(), k.data_ptr<T>(), v.data_ptr<T>(), mask.data_ptr<bool>(), o, B, n, H, KV, P,
           {q.stride(0), q.stride(2), q.stride(1)}, {k.stride(0), k.stride(1), k.stride(2)},
           {v.stride(0), v.stride(1), v.stride(2)}, {mask.stride(0), 0, mask.stride(1)}, static_cast<float>(scale),
           chosen ? tokens.data_ptr<int64_t>() : nullptr, queries);
    };
    if (to_float) run(out.data_ptr<float>());
    else run(out.data_ptr<T>());
  });
  return out;
}

torch::Tensor attend(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor mask, double scale,
                     bool to_float) {
  return attend_tokens(q, k, v, mask, scale, torch::empty({0}, torch::kLong), to_float);
}

// x (..., dim) with contiguous rows, weight (dim,) -> weight * (x / sqrt(mean(x^2) + eps)), the normalized x
// rounded to x's dtype before the weight multiplies it, as the reference implementations do.
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps) {
  const int64_t dim = x.size(-1);
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu() && weight.scalar_type() == x.scalar_type() &&
              weight.dim() == 1 && weight.size(0) == dim && weight.is_contiguous(), "rms_norm: bad weight");
  TORCH_CHECK(dim % W == 0, "rms_norm: the size must be a multiple of 16");
  x = x.contiguous();
  auto out = torch::empty_like(x);
  const int64_t rows = x.numel() / dim;
  dispatch(x, "rms_norm", [&](auto zero) {
    using T = decltype(zero);
    const T* src = x.data_ptr<T>();
    const T* w = weight.data_ptr<T>();
    T* dst = out.data_ptr<T>();
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      std::vector<T> rounded(W);
      for (int64_t r = begin; r < end; ++r) {
        const T* xr = src + r * dim;
        vf sq{};
        for (int64_t c = 0; c < dim; c += W) {
          const vf a = load(xr + c);
          sq += a * a;
        }
        const float scale = 1.f / std::sqrt(sum_lanes(sq) / static_cast<float>(dim) + static_cast<float>(eps));
        for (int64_t c = 0; c < dim; c += W) {
          store(rounded.data(), load(xr + c) * scale);
          store(dst + r * dim + c, load(w + c) * load(rounded.data()));
        }
      }
    });
  });
  return out;
}

// x (B, n, heads, D) with contiguous rows; cos, sin (B, n, 1, D), sin signed as rope.cos_sin makes it
// -> x * cos + [x2, x1] * sin, contiguous (B, n, heads, D), in ``dtype`` (default: x's), rounded once. Both products
// rounded before the sum: the compiler fused one or the other into the add by instruction set (the AVX2 and AVX-512
// builds' keys differed in their last bits).
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
torch::Tensor rope(torch::Tensor x, torch::Tensor cos, torch::Tensor sin, std::optional<at::ScalarType> dtype) {
  TORCH_CHECK(x.dim() == 4 && cos.dim() == 4 && x.stride(3) == 1, "rope: bad ranks or strides");
  const int64_t B = x.size(0), n = x.size(1), heads = x.size(2), D = x.size(3), half = D / 2;
  TORCH_CHECK(half % W == 0, "rope: the head size must be a multiple of 32");
  TORCH_CHECK(cos.scalar_type() == x.scalar_type() && sin.scalar_type() == x.scalar_type(), "rope: mixed dtypes");
  cos = cos.expand({B, n, 1, D}).contiguous();
  sin = sin.expand({B, n, 1, D}).contiguous();
  auto out = torch::empty({B, n, heads, D}, x.options().dtype(dtype.value_or(x.scalar_type())));
  dispatch(x, "rope", [&](auto zero) {
    using T = decltype(zero);
    dispatch(out, "rope", [&](auto out_zero) {
      using O = decltype(out_zero);
      const T* src = x.data_ptr<T>();
      O* dst = out.data_ptr<O>();
      at::parallel_for(0, B * n * heads, 64, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const int64_t b = r / (n * heads), i = r / heads % n, h = r % heads;
          const T* xr = src + b * x.stride(0) + i * x.stride(1) + h * x.stride(2);
          const T* cr = cos.data_ptr<T>() + (b * n + i) * D;
          const T* sr = sin.data_ptr<T>() + (b * n + i) * D;
          for (int64_t c = 0; c < D; c += W) {
            const int64_t partner = (c + half) % D;
            store(dst + r * D + c, load(xr + c) * load(cr + c) + load(xr + partner) * load(sr + c));
          }
        }
      });
    });
  });
  return out;
}
#pragma GCC pop_options

// The adapter arguments of int4_linear and lora_add (see Lora); an empty a means none.
static Lora lora_args(const torch::Tensor& a, const torch::Tensor& bt, const torch::Tensor& spans,
                      const torch::Tensor& rows,
               int64_t M, int64_t N, int64_t K) {
  Lora lora;
  if (a.numel() == 0) return lora;
  const int64_t r = a.size(0);
  TORCH_CHECK((a.scalar_type() == torch::kFloat || a.scalar_type() == torch::kBFloat16) &&
              bt.scalar_type() == a.scalar_type() && a.is_contiguous() &&
              bt.is_contiguous() && a.sizes() == torch::IntArrayRef({r, K}) &&
              bt.sizes() == torch::IntArrayRef({N / W, r, W}),
              "adapter: a (r, K) and bt (N / 16, r, 16) must be contiguous, both float32 or both bfloat16");
  TORCH_CHECK(spans.scalar_type() == torch::kInt && spans.is_contiguous() &&
              spans.sizes() == torch::IntArrayRef({N / W, 2}), "adapter: spans must be (N / 16, 2) int32");
  TORCH_CHECK(rows.numel() == 0 || (rows.scalar_type() == torch::kBool && rows.numel() == M && rows.is_contiguous()),
              "adapter: rows must be M bools");
  const int32_t* sp = spans.data_ptr<int32_t>();
  for (int64_t i = 0; i < 2 * (N / W); i += 2)
    TORCH_CHECK(0 <= sp[i] && sp[i] <= sp[i + 1] && sp[i + 1] <= r, "adapter: bad span");
  lora.a = a.data_ptr();
  lora.bt = bt.data_ptr();
  lora.bf16 = a.scalar_type() == torch::kBFloat16;
  lora.spans = sp;
  lora.rows = rows.numel() ? rows.data_ptr<bool>() : nullptr;
  lora.r = r;
  lora.N = N;
  return lora;
}

// Rows per pass over a tile's codes: more rows reuse each unpacked block more often, while their accumulators
// stay in registers (8 against 4 and 5 on AVX-512: docs/measurements.md; bench/kernel_costs.py times 1-16 rows).
constexpr int ROW_GROUP = 8;

// f(std::integral_constant<int, n>{}) for a run-time n in 1 .. ROW_GROUP.
template <int R = 1, typename F>
void with_rows(int64_t n, F&& f) {
  if constexpr (R < ROW_GROUP) {
    if (n != R) return with_rows<R + 1>(n, f);
  }
  f(std::integral_constant<int, R>{});
}

// What int4_linear and int8_linear share: x (M, K) contiguous float32/bfloat16/float16, codes (N / 16, K / 32,
// bytes) -> (M, N) in x's dtype; the rows quantized once, tiles split between the threads, each tile's rows in
// groups of ROW_GROUP. rows_of_tile(R, xq, y, r0, tile) computes rows r0 .. r0 + R of a tile (R: an integral constant).
template <typename RowsOfTile>
torch::Tensor low_bit_linear(const char* name, const torch::Tensor& x, const torch::Tensor& codes, int64_t bytes,
                             RowsOfTile rows_of_tile) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.device().is_cpu(), name, ": x must be a contiguous CPU matrix");
  TORCH_CHECK(codes.dim() == 3 && codes.size(2) == bytes && codes.scalar_type() == torch::kUInt8 &&
              codes.is_contiguous(), name, ": bad codes");
  const int64_t M = x.size(0), K = x.size(1), tiles = codes.size(0);
  TORCH_CHECK(K % BLOCK == 0 && codes.size(1) == K / BLOCK, name, ": the input size disagrees with the codes");
  auto out = torch::empty({M, tiles * W}, x.options());
  dispatch(x, name, [&](auto zero) {
    using T = decltype(zero);
    const QuantizedRows xq = quantize_rows(x.data_ptr<T>(), M, K);
    T* y = out.data_ptr<T>();
    at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t)
        for (int64_t r = 0; r < M; r += ROW_GROUP)
          with_rows(std::min<int64_t>(M - r, ROW_GROUP), [&](auto R) { rows_of_tile(R, xq, y, r, t); });
    });
  });
  return out;
}

// x times int4 weights (codes and scales as above), plus an optional adapter (lora_args), each row rounded once.
torch::Tensor int4_linear(torch::Tensor x, torch::Tensor codes, torch::Tensor scales, torch::Tensor a, torch::Tensor bt,
                          torch::Tensor spans, torch::Tensor rows) {
  const int64_t M = x.size(0), K = x.size(1), tiles = codes.size(0), N = tiles * W;
  TORCH_CHECK(scales.scalar_type() == torch::kHalf && scales.is_contiguous() &&
              scales.sizes() == torch::IntArrayRef({tiles, K / BLOCK, 2, W}), "int4_linear: bad scales");
  Lora lora = lora_args(a, bt, spans, rows, M, N, K);
  dispatch(x, "int4_linear", [&](auto zero) { lora.project(x.contiguous().data_ptr<decltype(zero)>(), M, K); });
  const uint8_t* c = codes.data_ptr<uint8_t>();
  const c10::Half* s = scales.data_ptr<c10::Half>();
  return low_bit_linear("int4_linear", x, codes, Q4::bytes, [&](auto R, const QuantizedRows& xq, auto* y, int64_t r0,
                                                                 int64_t t) {
    int4_tile<decltype(R)::value>(c, s, xq, lora, K, r0, y, N, t);
  });
}

// x times int8 weights: codes (N / 16, K / 32, 512) bytes w + 128 (Q8 above); scales (N / 16, 16) float32, one per
// channel, or (N / 16, K / 32, 16) float16, one per channel and block of 32 inputs (GGUF Q8_0).
torch::Tensor int8_linear(torch::Tensor x, torch::Tensor codes, torch::Tensor scales) {
  const int64_t K = x.size(1), tiles = codes.size(0), N = tiles * W;
  const bool per_block = scales.scalar_type() == torch::kHalf;
  TORCH_CHECK(scales.is_contiguous() &&
                  (per_block ? scales.sizes() == torch::IntArrayRef({tiles, K / BLOCK, W})
                             : scales.scalar_type() == torch::kFloat && scales.sizes() == torch::IntArrayRef({tiles, W})),
              "int8_linear: bad scales");
  const uint8_t* c = codes.data_ptr<uint8_t>();
  return low_bit_linear("int8_linear", x, codes, Q8::bytes, [&](auto R, const QuantizedRows& xq, auto* y, int64_t r0,
                                                                 int64_t t) {
    if (per_block)
      int8_tile<decltype(R)::value>(c, scales.const_data_ptr<c10::Half>(), xq, K, r0, y, N, t);
    else
      int8_tile<decltype(R)::value>(c, scales.const_data_ptr<float>(), xq, K, r0, y, N, t);
  });
}

// y (M, N) and x (M, K) contiguous, one dtype; an adapter (lora_args): in place, y[i] += its contribution for the
// chosen rows, rounded once to y's dtype (one call where torch needs two matmuls, a mask and an add).
torch::Tensor lora_add(torch::Tensor y, torch::Tensor x, torch::Tensor a, torch::Tensor bt, torch::Tensor spans,
                       torch::Tensor rows) {
  TORCH_CHECK(y.dim() == 2 && x.dim() == 2 && y.size(0) == x.size(0) && y.is_contiguous() && x.is_contiguous() &&
              y.scalar_type() == x.scalar_type(), "lora_add: y and x must be contiguous matrices of one dtype and rows");
  const int64_t M = y.size(0), N = y.size(1), K = x.size(1);
  TORCH_CHECK(K % W == 0 && N % W == 0 && a.numel() > 0, "lora_add: sizes must be multiples of 16");
  Lora lora = lora_args(a, bt, spans, rows, M, N, K);
  dispatch(y, "lora_add", [&](auto zero) {
    using T = decltype(zero);
    lora.project(x.data_ptr<T>(), M, K);
    T* yd = y.data_ptr<T>();
    for (int64_t i = 0; i < M; ++i) {
      if (!lora.on(i)) continue;
      for (int64_t tile = 0; tile < N / W; ++tile) {
        T* p = yd + i * N + tile * W;
        store(p, load(p) + lora.delta(i, tile));
      }
    }
  });
  return y;
}

// gate, up (..., F) with contiguous rows (views of one gate/up output) -> silu(gate) * up, contiguous (..., F),
// computed in float32 and rounded once.
torch::Tensor silu_mul(torch::Tensor gate, torch::Tensor up) {
  TORCH_CHECK(gate.sizes() == up.sizes() && gate.scalar_type() == up.scalar_type() && gate.stride(-1) == 1 &&
              up.stride(-1) == 1 && gate.dim() >= 2, "silu_mul: gate and up must have one shape, dtype and unit stride");
  const int64_t F = gate.size(-1);
  TORCH_CHECK(F % W == 0, "silu_mul: the size must be a multiple of 16");
  auto g2 = gate.reshape({-1, F}), u2 = up.reshape({-1, F});  // views: rows keep their strides
  auto out = torch::empty(gate.sizes(), gate.options());
  const int64_t rows = g2.size(0), gs = g2.stride(0), us = u2.stride(0);
  dispatch(gate, "silu_mul", [&](auto zero) {
    using T = decltype(zero);
    const T* gd = g2.data_ptr<T>();
    const T* ud = u2.data_ptr<T>();
    T* od = out.data_ptr<T>();
    at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r)
        for (int64_t c = 0; c < F; c += W) {
          const vf x = load(gd + r * gs + c);
          const vf e = exp_nonpositive(select(x < 0, x, -x));  // exp(-|x|), no overflow
          const vf sigmoid = select(x < 0, e / (1.f + e), 1.f / (1.f + e));
          store(od + r * F + c, x * sigmoid * load(ud + r * us + c));
        }
    });
  });
  return out;
}

// GGUF Q4_1 blocks (n, K / 32 * 20) bytes: float16 d, float16 m, 16 bytes holding element j in the low nibble and
// element j + 16 in the high nibble of byte j) -> tridlm.quant.Int4Weight's codes (tiles, K / 32, 256) and scales
// (tiles, K / 32, 2, 16) float16, rows padded to whole tiles of 16 with zeros: the layout its constructor builds, in
// one pass (loading a model's projections).
std::vector<torch::Tensor> repack_q4_1(torch::Tensor blocks, int64_t n, int64_t K) {
  TORCH_CHECK(blocks.scalar_type() == torch::kUInt8 && blocks.is_contiguous() && K % BLOCK == 0 &&
              blocks.numel() == n * (K / BLOCK) * 20, "repack_q4_1: blocks must be (n, K / 32 * 20) contiguous bytes");
  const int64_t kb = K / BLOCK, tiles = (n + W - 1) / W;
  auto codes = torch::zeros({tiles, kb, 256}, blocks.options());
  auto scales = torch::zeros({tiles, kb, 2, W}, torch::TensorOptions().dtype(torch::kHalf));
  const uint8_t* src = blocks.data_ptr<uint8_t>();
  uint8_t* dst = codes.data_ptr<uint8_t>();
  auto* sc = reinterpret_cast<uint16_t*>(scales.data_ptr<c10::Half>());
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      for (int64_t l = 0; l < W && t * W + l < n; ++l)
        for (int64_t b = 0; b < kb; ++b) {
          const uint8_t* blk = src + ((t * W + l) * kb + b) * 20;
          std::memcpy(sc + ((t * kb + b) * 2) * W + l, blk, 2);
          std::memcpy(sc + ((t * kb + b) * 2 + 1) * W + l, blk + 2, 2);
          auto q = [&](int e) { return e < 16 ? blk[4 + e] & 0x0F : blk[4 + e - 16] >> 4; };
          for (int c = 0; c < 4; ++c)
            for (int j = 0; j < 4; ++j)
              dst[(t * kb + b) * 256 + (c * W + l) * 4 + j] = static_cast<uint8_t>(q(8 * c + j) | q(8 * c + 4 + j) << 4);
        }
  });
  return {codes, scales};
}

// Copy the current tokens' keys or values, x (B, n, KV, D) with the last dimension contiguous, into one layer's cache
// buffer (B, KV, S, D), in its dtype: token i of row b to slot slots[b, i], or prefix + i where slots is empty. With
// ``tokens`` (indices b * n + i of the full n), x is (1, T, KV, D): those tokens only.
void store_slots(const torch::Tensor& x, torch::Tensor cache, const torch::Tensor& slots, int64_t prefix,
                 const torch::Tensor& tokens, int64_t n_full) {
  const int64_t B = x.size(0), n = x.size(1), KV = x.size(2), D = x.size(3);
  TORCH_CHECK(x.stride(3) == 1 && cache.stride(3) == 1 && D % W == 0, "decode_layers: the cache's layout disagrees");
  // one row of D elements, converted to the cache's dtype where it has another (rounded to nearest even)
  std::function<void(char*, const char*)> copy_row = [&](char* to, const char* from) {
    std::memcpy(to, from, D * x.element_size());
  };
  if (x.scalar_type() != cache.scalar_type())
    dispatch(x, "decode_layers", [&](auto zero) {
      dispatch(cache, "decode_layers", [&](auto cache_zero) {
        using T = decltype(zero);
        using C = decltype(cache_zero);
        copy_row = [D](char* to, const char* from) {
          for (int64_t c = 0; c < D; c += W)
            store(reinterpret_cast<C*>(to) + c, load(reinterpret_cast<const T*>(from) + c));
        };
      });
    });
  const auto* src = static_cast<const char*>(x.data_ptr());
  auto* dst = static_cast<char*>(cache.data_ptr());
  const int64_t e = x.element_size(), ce = cache.element_size();
  for (int64_t bb = 0; bb < B; ++bb)
    for (int64_t ii = 0; ii < n; ++ii) {
      const int64_t token = tokens.numel() ? tokens.data_ptr<int64_t>()[ii] : bb * n_full + ii;
      const int64_t b = token / n_full, i = token % n_full;
      const int64_t slot = slots.numel() ? slots.data_ptr<int64_t>()[token] : prefix + i;
      TORCH_CHECK(0 <= slot && slot < cache.size(2), "decode_layers: cache slot out of range");
      for (int64_t h = 0; h < KV; ++h)
        copy_row(dst + (b * cache.stride(0) + h * cache.stride(1) + slot * cache.stride(2)) * ce,
                 src + (bb * x.stride(0) + ii * x.stride(1) + h * x.stride(2)) * e);
    }
}

// A forward's decoder layers in one call, for decoding with int4 weights (tridlm.model's native path):
// what each layer's modules do in Python, by the same kernels in the same order, so the values are the same bit for
// bit, without the interpreter's time between them. x (B, n, dim); weights: per layer the input norm, the fused
// q/k/v codes and scales, the o codes and scales, the post-attention norm, the fused gate/up codes and scales, the
// down codes and scales (10 tensors); adapters: none, or per layer the kernel form (a, bt, spans) of the q/k/v, o,
// gate/up and down adapters (12 tensors, an empty a where a projection has none), applied to the token rows ``rows``
// (B * n bools, or empty for all); kc, vc (layers, B, KV, S, D) the cache buffers, in the dtype queries, keys and
// values attend in (the model's ``kv_dtype``), the current keys and values stored at slots (B, n) int64, or at prefix + i where slots is empty, then attended in place over the first
// prefix + n slots; cos, sin (B, n, 1, D); mask (B, n, prefix + n) bool. tokens: the indices among the B * n
// tokens of those to compute (int64, ascending; empty: all): the others are padding, which no token attends to;
// their rows of the result are x's, and their cache slots are left alone. Every kernel
// then runs over the computed tokens only (a ragged verify: rows with candidates are wider than those without).
torch::Tensor decode_layers(torch::Tensor x, std::vector<torch::Tensor> weights, std::vector<torch::Tensor> adapters,
                            torch::Tensor rows, torch::Tensor kc, torch::Tensor vc, torch::Tensor cos, torch::Tensor sin,
                            torch::Tensor mask, torch::Tensor slots, torch::Tensor tokens, int64_t prefix, int64_t heads,
                            double eps, double scale) {
  const int64_t L = kc.size(0);
  TORCH_CHECK(x.dim() == 3 && kc.dim() == 5 && vc.sizes() == kc.sizes() &&
              static_cast<int64_t>(weights.size()) == 10 * L &&
              (adapters.empty() || static_cast<int64_t>(adapters.size()) == 12 * L), "decode_layers: bad arguments");
  const int64_t B = x.size(0), n = x.size(1), dim = x.size(2), KV = kc.size(2), D = kc.size(4);
  const int64_t F = weights[8].size(1) * BLOCK;  // the down projection's input size
  const auto none = torch::empty({0}), no_spans = torch::empty({0}, torch::kInt);
  // projection j (q/k/v, o, gate/up, down) of layer l, with its adapter on ``rows`` where one is given
  auto linear = [&](const torch::Tensor& in, int64_t k, int64_t l, int j) {
    const torch::Tensor* w = weights.data() + 10 * l + (j == 0 ? 1 : j == 1 ? 3 : j == 2 ? 6 : 8);
    const auto in2 = in.reshape({-1, k}).contiguous();
    if (adapters.empty()) return int4_linear(in2, w[0], w[1], none, none, no_spans, rows);
    const torch::Tensor* a = adapters.data() + 12 * l + 3 * j;
    return int4_linear(in2, w[0], w[1], a[0], a[1], a[2], rows);
  };
  const bool packed = tokens.numel() > 0;
  TORCH_CHECK(!packed || (tokens.scalar_type() == torch::kLong && tokens.dim() == 1), "decode_layers: bad tokens");
  // The computed tokens as (Bq, nq): all of them as (B, n), or the chosen T as (1, T), which every kernel takes
  if (packed && rows.numel()) rows = rows.index_select(0, tokens);
  const int64_t Bq = packed ? 1 : B, nq = packed ? tokens.numel() : n;
  if (packed) {
    cos = cos.expand({B, n, 1, D}).reshape({B * n, D}).index_select(0, tokens).view({1, nq, 1, D});
    sin = sin.expand({B, n, 1, D}).reshape({B * n, D}).index_select(0, tokens).view({1, nq, 1, D});
  }
  const auto input = x;
  x = packed ? x.reshape({B * n, dim}).index_select(0, tokens) : x.reshape({B * n, dim});
  for (int64_t l = 0; l < L; ++l) {
    const torch::Tensor* w = weights.data() + 10 * l;
    auto qkv = linear(rms_norm(x, w[0], eps), dim, l, 0).view({Bq, nq, -1});
    // queries and keys rotated into the cache's dtype, values converted as they are stored; the attention's output
    // in the activations' dtype where that is float32 (else the cache's, as the modules' path has it)
    auto q = rope(qkv.narrow(2, 0, heads * D).view({Bq, nq, heads, D}), cos, sin, kc.scalar_type());
    auto k = rope(qkv.narrow(2, heads * D, KV * D).view({Bq, nq, KV, D}), cos, sin, kc.scalar_type());
    auto v = qkv.narrow(2, (heads + KV) * D, KV * D).view({Bq, nq, KV, D});
    store_slots(k, kc[l], slots, prefix, tokens, n);
    store_slots(v, vc[l], slots, prefix, tokens, n);
    auto o = attend_tokens(q, kc[l].narrow(2, 0, prefix + n), vc[l].narrow(2, 0, prefix + n), mask, scale, tokens,
                           x.scalar_type() == torch::kFloat);
    x = x + linear(o, heads * D, l, 1).narrow(1, 0, dim);
    auto gate_up = linear(rms_norm(x, w[5], eps), dim, l, 2);
    auto hidden = silu_mul(gate_up.narrow(1, 0, F), gate_up.narrow(1, F, F));
    x = x + linear(hidden, F, l, 3).narrow(1, 0, dim);
  }
  if (!packed) return x.view({B, n, dim});
  return input.reshape({B * n, dim}).index_copy(0, tokens, x).view({B, n, dim});
}

#define TRIDLM_STRING(x) #x
#define TRIDLM_STRING_OF(x) TRIDLM_STRING(x)

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
#ifdef TRIDLM_DIGEST  // built into the package (setup.py): what it was built from (tridlm.kernels.source_digest)
  m.attr("digest") = std::string(TRIDLM_STRING_OF(TRIDLM_DIGEST));
#endif
  m.def("attend", &attend, "attention for a CPU query block, row by row");
  m.def("rms_norm", &rms_norm, "RMSNorm, row by row");
  m.def("rope", &rope, "rotary embedding, half-split convention");
  m.def("silu_mul", &silu_mul, "silu(gate) * up");
  m.def("lora_add", &lora_add, "a low-rank adapter's contribution added to chosen rows, in place");
  m.def("int8_linear", &int8_linear, "int8 weights times int8-quantized activations");
  m.def("int4_linear", &int4_linear, "int4 (Q4_1) weights times int8-quantized activations");
  m.def("repack_q4_1", &repack_q4_1, "GGUF Q4_1 blocks in the int4 kernel's layout");
  m.def("decode_layers", &decode_layers, "a forward's decoder layers with int4 weights, in one call",
        py::call_guard<py::gil_scoped_release>());
}
