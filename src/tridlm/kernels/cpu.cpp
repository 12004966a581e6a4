// CPU kernels for a decode step's small operations, each one call where torch needs several ops: attention for
// short query blocks, RMSNorm and RoPE. Every row is computed on its own in a fixed order of operations, so its
// result never depends on how many rows, keys or batch rows come with it: a spec verify row equals the AR step
// that would produce it bit for bit whatever the dtype.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace {

// GCC/Clang vector extensions: 16 float lanes, lowered to AVX-512, AVX2 or SSE as the machine allows.
typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
typedef uint32_t vu __attribute__((vector_size(64)));
typedef uint16_t vh __attribute__((vector_size(32)));
constexpr int64_t W = 16;  // lanes: elements of a row, or softmax weights of 16 keys

inline vf load(const float* p) {
  vf x;
  std::memcpy(&x, p, sizeof x);
  return x;
}
inline vf load(const c10::BFloat16* p) {  // bfloat16 is the top half of a float
  vh h;
  std::memcpy(&h, p, sizeof h);
  return reinterpret_cast<vf>(__builtin_convertvector(h, vu) << 16);
}
inline vf load(const c10::Half* p) {
  float f[W];
  for (int64_t l = 0; l < W; ++l) f[l] = static_cast<float>(p[l]);
  return load(f);
}
inline void store(float* p, vf x) { std::memcpy(p, &x, sizeof x); }
inline void store(c10::BFloat16* p, vf x) {  // round to nearest even
  const vu bits = reinterpret_cast<vu>(x);
  const vh h = __builtin_convertvector((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16, vh);
  std::memcpy(p, &h, sizeof h);
}
inline void store(c10::Half* p, vf x) {
  float f[W];
  store(f, x);
  for (int64_t l = 0; l < W; ++l) p[l] = static_cast<c10::Half>(f[l]);
}

// Calls fn(T{}) with T the tensor's element type: float32, bfloat16 or float16.
template <typename Fn>
void dispatch(const torch::Tensor& t, const char* name, Fn fn) {
  switch (t.scalar_type()) {
    case torch::kFloat: fn(float{}); break;
    case torch::kBFloat16: fn(c10::BFloat16{}); break;
    case torch::kHalf: fn(c10::Half{}); break;
    default: TORCH_CHECK(false, name, ": float32, bfloat16 or float16 only, not ", t.scalar_type());
  }
}

// exp(x) for x <= 0, lane by lane (Cephes' single-precision polynomial, about 1 ulp).
inline vf exp_nonpositive(vf x) {
  x = x < -87.0f ? vf{} - 87.0f : x;
  const vi n = __builtin_convertvector(x * 1.44269504088896341f - 0.5f, vi);  // round to nearest (x <= 0)
  const vf fn = __builtin_convertvector(n, vf);
  const vf r = x - fn * 0.693359375f + fn * 2.12194440e-4f;
  vf y = vf{} + 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  return y * reinterpret_cast<vf>((n + 127) << 23);
}

inline float sum_lanes(vf x) {  // a fixed pairwise order
  typedef float v8 __attribute__((vector_size(32)));
  typedef float v4 __attribute__((vector_size(16)));
  const v8 a = __builtin_shufflevector(x, x, 0, 1, 2, 3, 4, 5, 6, 7) + __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15);
  const v4 c = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (c[0] + c[2]) + (c[1] + c[3]);
}

struct Strides {
  int64_t b, h, j;  // batch row, head, and query or key index
};

// Every score is a sum over the head dimension and every output a sum over the allowed keys, each in a fixed
// order of its own: the same operations for a query row whatever else is in the call. C: the head size in
// lanes, a template parameter so that a query head and its output stay in registers.
template <typename T, int64_t C>
void attend_rows(const T* q, const T* k, const T* v, const bool* mask, T* out, int64_t B, int64_t n, int64_t H,
                 int64_t KV, int64_t P, Strides qs, Strides ks, Strides vs, Strides ms, float scale) {
  const int64_t G = H / KV, chunks_max = (P + W - 1) / W;
  // One task: the G query heads of one row that share a key/value head (their keys stay in cache between heads).
  at::parallel_for(0, B * n * KV, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> weights(chunks_max * W);
    std::vector<int64_t> keys(P);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / (n * KV), i = task / KV % n, kv = task % KV;
      const bool* allowed = mask + b * ms.b + i * ms.j;
      int64_t count = 0;
      for (int64_t j = 0; j < P; ++j)
        if (allowed[j]) keys[count++] = j;
      if (count == 0) continue;  // no key to attend to: the output stays zero
      const int64_t chunks = (count + W - 1) / W;
      const T* kbase = k + b * ks.b + kv * ks.h;
      const T* vbase = v + b * vs.b + kv * vs.h;
      for (int64_t g = 0; g < G; ++g) {
        const int64_t h = kv * G + g;
        vf qh[C];
        for (int64_t c = 0; c < C; ++c) qh[c] = load(q + b * qs.b + i * qs.j + h * qs.h + c * W) * scale;
        float* w = weights.data();
        for (int64_t j = 0; j < count; ++j) {  // a score: lane l sums elements l, l + W, ...; then the lanes
          const T* krow = kbase + keys[j] * ks.j;
          vf lanes = qh[0] * load(krow);
          for (int64_t c = 1; c < C; ++c) lanes += qh[c] * load(krow + c * W);
          w[j] = sum_lanes(lanes);
        }
        std::fill(w + count, w + chunks * W, -std::numeric_limits<float>::infinity());
        vf top = load(w);
        for (int64_t c = 1; c < chunks; ++c) top = top > load(w + c * W) ? top : load(w + c * W);
        float mx = top[0];
        for (int64_t l = 1; l < W; ++l) mx = std::max(mx, top[l]);
        for (int64_t c = 0; c < chunks; ++c) store(w + c * W, exp_nonpositive(load(w + c * W) - mx));
        std::fill(w + count, w + chunks * W, 0.f);
        vf sum{};
        for (int64_t c = 0; c < chunks; ++c) sum += load(w + c * W);
        const float total = sum_lanes(sum);
        vf acc[C] = {};
        for (int64_t j = 0; j < count; ++j) {  // unnormalized weights times values, in key order
          const T* vrow = vbase + keys[j] * vs.j;
          for (int64_t c = 0; c < C; ++c) acc[c] += w[j] * load(vrow + c * W);
        }
        T* orow = out + ((b * n + i) * H + h) * C * W;
        for (int64_t c = 0; c < C; ++c) store(orow + c * W, acc[c] / total);
      }
    }
  });
}

}  // namespace

// q (B, n, H, D); k, v (B, KV, P, D), each with its last dimension contiguous; mask (B, n, P) bool, true where
// a query may attend -> (B, n, H, D) in q's dtype; a row with no allowed key gets zeros.
torch::Tensor attend(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor mask, double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && mask.dim() == 3, "attend: bad ranks");
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu() && mask.device().is_cpu(),
              "attend: CPU tensors only");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), "attend: mixed dtypes");
  TORCH_CHECK(mask.scalar_type() == torch::kBool, "attend: the mask must be bool");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1 && mask.stride(2) == 1,
              "attend: last dimensions must be contiguous");
  const int64_t B = q.size(0), n = q.size(1), H = q.size(2), D = q.size(3), KV = k.size(1), P = k.size(2);
  TORCH_CHECK(KV > 0 && H % KV == 0 && k.size(0) == B && v.sizes() == k.sizes() && k.size(3) == D &&
              mask.size(0) == B && mask.size(1) == n && mask.size(2) == P, "attend: shapes disagree");
  TORCH_CHECK(D == 64 || D == 128 || D == 256, "attend: head sizes 64, 128 and 256 only, not ", D);
  auto out = torch::zeros({B, n, H, D}, q.options());
  dispatch(q, "attend", [&](auto zero) {
    using T = decltype(zero);
    auto rows = D == 64 ? attend_rows<T, 4> : D == 128 ? attend_rows<T, 8> : attend_rows<T, 16>;
    rows(q.data_ptr<T>(), k.data_ptr<T>(), v.data_ptr<T>(), mask.data_ptr<bool>(), out.data_ptr<T>(), B, n, H, KV, P,
         {q.stride(0), q.stride(2), q.stride(1)}, {k.stride(0), k.stride(1), k.stride(2)},
         {v.stride(0), v.stride(1), v.stride(2)}, {mask.stride(0), 0, mask.stride(1)}, static_cast<float>(scale));
  });
  return out;
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
// -> x * cos + [x2, x1] * sin, contiguous (B, n, heads, D).
torch::Tensor rope(torch::Tensor x, torch::Tensor cos, torch::Tensor sin) {
  TORCH_CHECK(x.dim() == 4 && cos.dim() == 4 && x.stride(3) == 1, "rope: bad ranks or strides");
  const int64_t B = x.size(0), n = x.size(1), heads = x.size(2), D = x.size(3), half = D / 2;
  TORCH_CHECK(half % W == 0, "rope: the head size must be a multiple of 32");
  TORCH_CHECK(cos.scalar_type() == x.scalar_type() && sin.scalar_type() == x.scalar_type(), "rope: mixed dtypes");
  cos = cos.expand({B, n, 1, D}).contiguous();
  sin = sin.expand({B, n, 1, D}).contiguous();
  auto out = torch::empty({B, n, heads, D}, x.options());
  dispatch(x, "rope", [&](auto zero) {
    using T = decltype(zero);
    const T* src = x.data_ptr<T>();
    T* dst = out.data_ptr<T>();
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
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("attend", &attend, "attention for a CPU query block, row by row");
  m.def("rms_norm", &rms_norm, "RMSNorm, row by row");
  m.def("rope", &rope, "rotary embedding, half-split convention");
}
