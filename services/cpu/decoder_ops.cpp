// The non-matmul parts of a decoder layer on a CPU: RMSNorm, and RoPE + KV write + attention in
// one call. Each output row is computed by a fixed sequence that depends only on that row's own
// inputs and on the keys it sees, taken in slot order: a row of a verify tree (it sees the cached
// prefix, its ancestors and itself) gets bitwise the numbers a decode step over the same context
// gets, and a prompt prefill's rows those of decoding the prompt token by token.
#include <immintrin.h>
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

// Sum of 16-lane partial sums in a fixed order (vectors of 16 floats, then the lanes in order).
inline float dot(const float* a, const float* b, int64_t n) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, _mm256_add_ps(acc0, acc1));
  float sum = 0.0f;
  for (float lane : lanes) sum += lane;
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

// exp(x) for 8 lanes: n = round(x / ln 2), r = x - n ln 2 (in two parts), a degree-6 polynomial
// for exp(r), times 2^n (about 1 ulp; inputs below -87 give 0). The same sequence whatever lane
// or position a value has, so every element's result is fixed.
inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.0f)), _mm256_set1_ps(-87.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

// f(8 lanes) over n values in place; a tail is padded into one more vector, so it gets the
// arithmetic of a full one.
template <typename F>
inline void map8(float* x, int64_t n, F f) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, f(_mm256_loadu_ps(x + i)));
  if (i < n) {
    alignas(32) float tail[8] = {};
    std::memcpy(tail, x + i, (n - i) * sizeof(float));
    _mm256_store_ps(tail, f(_mm256_load_ps(tail)));
    std::memcpy(x + i, tail, (n - i) * sizeof(float));
  }
}

inline void axpy(float a, const float* x, float* y, int64_t n) {  // y += a * x
  const __m256 av = _mm256_set1_ps(a);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += a * x[i];
}

// RoPE on one head vector in place: rotate-half pairs (d, d + D/2), as Qwen2 and HF's Llama.
inline void rope(float* x, const float* cos, const float* sin, int64_t dim) {
  const int64_t half = dim / 2;
  for (int64_t d = 0; d < half; ++d) {
    const float a = x[d], b = x[d + half];
    x[d] = a * cos[d] - b * sin[d];
    x[d + half] = b * cos[d] + a * sin[d];
  }
}

}  // namespace

// y = x / sqrt(mean(x^2) + eps) * weight, per row of x [M, N].
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && weight.scalar_type() == torch::kFloat32,
              "rms_norm: float32 x [M, N] and weight [N]");
  auto xc = x.contiguous(), wc = weight.contiguous();
  const int64_t m_dim = xc.size(0), n = xc.size(1);
  TORCH_CHECK(wc.numel() == n, "rms_norm: weight has ", wc.numel(), " values, rows ", n);
  auto out = torch::empty_like(xc);
  const float* w = wc.data_ptr<float>();
  at::parallel_for(0, m_dim, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const float* row = xc.data_ptr<float>() + m * n;
      float* y = out.data_ptr<float>() + m * n;
      const float inv = 1.0f / std::sqrt(dot(row, row, n) / static_cast<float>(n) + static_cast<float>(eps));
      for (int64_t i = 0; i < n; ++i) y[i] = row[i] * inv * w[i];
    }
  });
  return out;
}

// One layer's attention for `n` new rows of one sequence:
//   q [n, H, D], k and v [n, KVH, D] (before RoPE; float32), cos and sin [n, D / 2] per row;
//   k_cache and v_cache [KVH, capacity, D]: slots [0, prefix) hold earlier entries, and new row j
//   is written to slot prefix + j (after RoPE for k);
//   visible [n, n] bool (row i sees new row j), or None: causal (row i sees new rows 0..i).
// Row i attends to slots [0, prefix) and the slots of the new rows it sees, in slot order.
// Returns [n, H, D].
torch::Tensor attention_step(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor cos, torch::Tensor sin,
                             torch::Tensor k_cache, torch::Tensor v_cache, int64_t prefix,
                             c10::optional<torch::Tensor> visible) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "attention_step: q [n, H, D], k and v [n, KVH, D]");
  const int64_t n = q.size(0), heads = q.size(1), dim = q.size(2), kv_heads = k.size(1);
  TORCH_CHECK(heads % kv_heads == 0 && k.size(0) == n && v.sizes() == k.sizes() && k.size(2) == dim, "attention_step: shapes");
  TORCH_CHECK(k_cache.dim() == 3 && k_cache.size(0) == kv_heads && k_cache.size(2) == dim && k_cache.is_contiguous() &&
                  v_cache.sizes() == k_cache.sizes() && v_cache.is_contiguous() && k_cache.scalar_type() == torch::kFloat32,
              "attention_step: caches [KVH, capacity, D] float32, contiguous");
  const int64_t capacity = k_cache.size(1);
  TORCH_CHECK(prefix >= 0 && prefix + n <= capacity, "attention_step: ", prefix + n, " slots needed, ", capacity, " held");
  TORCH_CHECK(cos.size(0) == n && cos.size(1) == dim / 2 && sin.sizes() == cos.sizes(), "attention_step: cos/sin [n, D/2]");
  auto qc = q.contiguous().clone(), kc = k.contiguous(), vc = v.contiguous();
  auto cc = cos.contiguous(), sc = sin.contiguous();
  const bool* mask = nullptr;
  torch::Tensor mask_c;
  if (visible.has_value()) {
    mask_c = visible->to(torch::kBool).contiguous();
    TORCH_CHECK(mask_c.dim() == 2 && mask_c.size(0) == n && mask_c.size(1) == n, "attention_step: visible [n, n]");
    mask = mask_c.data_ptr<bool>();
  }
  float* kcache = k_cache.data_ptr<float>();
  float* vcache = v_cache.data_ptr<float>();
  float* qd = qc.data_ptr<float>();
  // RoPE on q in place and on k into the cache; v into the cache
  at::parallel_for(0, n, 8, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* c = cc.data_ptr<float>() + i * (dim / 2);
      const float* s = sc.data_ptr<float>() + i * (dim / 2);
      for (int64_t h = 0; h < heads; ++h) rope(qd + (i * heads + h) * dim, c, s, dim);
      for (int64_t g = 0; g < kv_heads; ++g) {
        float* kslot = kcache + (g * capacity + prefix + i) * dim;
        std::memcpy(kslot, kc.data_ptr<float>() + (i * kv_heads + g) * dim, dim * sizeof(float));
        rope(kslot, c, s, dim);
        std::memcpy(vcache + (g * capacity + prefix + i) * dim, vc.data_ptr<float>() + (i * kv_heads + g) * dim,
                    dim * sizeof(float));
      }
    }
  });
  auto out = torch::zeros({n, heads, dim}, q.options());
  float* od = out.data_ptr<float>();
  const int64_t group = heads / kv_heads;
  const float scale = 1.0f / std::sqrt(static_cast<float>(dim));
  at::parallel_for(0, n * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> slots;
    std::vector<float> scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i = task / kv_heads, g = task % kv_heads;
      slots.clear();
      for (int64_t j = 0; j < prefix; ++j) slots.push_back(j);
      for (int64_t j = 0; j < n; ++j)
        if (mask ? mask[i * n + j] : j <= i) slots.push_back(prefix + j);
      const float* keys = kcache + g * capacity * dim;
      const float* values = vcache + g * capacity * dim;
      scores.resize(slots.size());
      for (int64_t h = g * group; h < (g + 1) * group; ++h) {
        const float* qh = qd + (i * heads + h) * dim;
        float best = -INFINITY;
        for (size_t t = 0; t < slots.size(); ++t) {
          scores[t] = dot(qh, keys + slots[t] * dim, dim) * scale;
          best = std::max(best, scores[t]);
        }
        const __m256 shift = _mm256_set1_ps(best);
        map8(scores.data(), static_cast<int64_t>(scores.size()), [&](__m256 s) { return exp8(_mm256_sub_ps(s, shift)); });
        float total = 0.0f;
        for (float p : scores) total += p;
        float* oh = od + (i * heads + h) * dim;
        for (size_t t = 0; t < slots.size(); ++t) axpy(scores[t], values + slots[t] * dim, oh, dim);
        const float inv = 1.0f / total;
        for (int64_t d = 0; d < dim; ++d) oh[d] *= inv;
      }
    }
  });
  return out;
}

// silu(gate) * up, elementwise: the input of a SwiGLU MLP's down projection.
torch::Tensor silu_mul(torch::Tensor gate, torch::Tensor up) {
  TORCH_CHECK(gate.sizes() == up.sizes() && gate.scalar_type() == torch::kFloat32 && up.scalar_type() == torch::kFloat32,
              "silu_mul: float32 tensors of one shape");
  auto gc = gate.contiguous(), uc = up.contiguous();
  auto out = torch::empty_like(gc);
  const float* g = gc.data_ptr<float>();
  const float* u = uc.data_ptr<float>();
  float* y = out.data_ptr<float>();
  auto eight = [](__m256 gv, __m256 uv) {
    const __m256 one = _mm256_set1_ps(1.0f);
    return _mm256_mul_ps(_mm256_div_ps(gv, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv)))), uv);
  };
  const int64_t n = gc.numel(), vectors = n / 8;
  at::parallel_for(0, vectors, 512, [&](int64_t begin, int64_t end) {
    for (int64_t v = begin; v < end; ++v)
      _mm256_storeu_ps(y + 8 * v, eight(_mm256_loadu_ps(g + 8 * v), _mm256_loadu_ps(u + 8 * v)));
  });
  if (n > 8 * vectors) {  // the tail, padded into one more vector: the same arithmetic
    alignas(32) float gt[8] = {}, ut[8] = {};
    const int64_t rest = n - 8 * vectors;
    std::memcpy(gt, g + 8 * vectors, rest * sizeof(float));
    std::memcpy(ut, u + 8 * vectors, rest * sizeof(float));
    _mm256_store_ps(gt, eight(_mm256_load_ps(gt), _mm256_load_ps(ut)));
    std::memcpy(y + 8 * vectors, gt, rest * sizeof(float));
  }
  return out;
}
