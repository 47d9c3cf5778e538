// Weight-stationary linear for a few rows on x86 CPUs with AVX2 + FMA: y = x W^T (+ b), with W in
// float32, bfloat16, or int8 with a scale per output row (a draft's weight-only quantization).
//
// A decode step or a small verify is memory-bound: its cost is streaming W once. Each thread
// takes a band of W's rows and, for two rows of W at a time, runs every row of x against them
// while they sit in L1, so W is read from memory once whatever the number of x rows. Each output
// element is accumulated the same way (8 lanes over k in order, then a fixed pairwise lane sum),
// so a row's result is bitwise the same whether it is computed alone or with others.
#include <immintrin.h>
#include <torch/extension.h>
#include <ATen/Parallel.h>

namespace {

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }

inline __m256 load8(const at::BFloat16* p) {
  __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}

inline __m256 load8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 0x55));
  return _mm_cvtss_f32(lo);
}

inline float to_float(float v) { return v; }
inline float to_float(at::BFloat16 v) { return static_cast<float>(v); }
inline float to_float(int8_t v) { return static_cast<float>(v); }

// RW rows of W (1 or 2) against MB rows of x (1..4): RW * MB accumulators in registers.
template <typename W, typename X, int RW, int MB>
inline void block(const W* w, const float* scale, const X* x, int64_t k_dim, int64_t k_vec, X* out_rows[MB], int64_t n,
                  const W* next = nullptr) {
  __m256 acc[RW][MB];
  for (int r = 0; r < RW; ++r)
    for (int m = 0; m < MB; ++m) acc[r][m] = _mm256_setzero_ps();
  for (int64_t k = 0; k < k_vec; k += 8) {
    __m256 wv[RW];
    for (int r = 0; r < RW; ++r) wv[r] = load8(w + r * k_dim + k);
    if (next) {  // keep the band's later W rows streaming from memory while these are used
      for (int r = 0; r < RW; ++r) _mm_prefetch(reinterpret_cast<const char*>(next + r * k_dim + k), _MM_HINT_T0);
    }
    for (int m = 0; m < MB; ++m) {
      __m256 xv = load8(x + m * k_dim + k);
      for (int r = 0; r < RW; ++r) acc[r][m] = _mm256_fmadd_ps(wv[r], xv, acc[r][m]);
    }
  }
  for (int r = 0; r < RW; ++r) {
    for (int m = 0; m < MB; ++m) {
      float sum = hsum(acc[r][m]);
      for (int64_t k = k_vec; k < k_dim; ++k) sum += to_float(w[r * k_dim + k]) * to_float(x[m * k_dim + k]);
      out_rows[m][n + r] = static_cast<X>(scale ? sum * scale[r] : sum);
    }
  }
}

// All rows of x against RW rows of W starting at output column n. Blocks of 4 x rows use RW = 2
// at a time; a remainder of 1-3 rows takes more W rows per block, so that every block keeps
// about 8 independent accumulator chains in flight (one chain is FMA-latency bound).
template <typename W, typename X, int RW>
inline void rows_of_w(const W* w, const float* scale, const X* x, int64_t m_dim, int64_t k_dim, X* out,
                      int64_t n_dim, int64_t n) {
  static_assert(RW == 8 || RW == 1, "8-row bands, or single tail rows");
  const int64_t k_vec = k_dim - k_dim % 8;
  auto at = [&](int r) { return scale ? scale + r : nullptr; };
  constexpr int pair = RW == 8 ? 2 : 1, quad = RW == 8 ? 4 : 1;
  int64_t m = 0;
  for (; m + 4 <= m_dim; m += 4) {
    X* rows[4] = {out + m * n_dim, out + (m + 1) * n_dim, out + (m + 2) * n_dim, out + (m + 3) * n_dim};
    for (int r = 0; r < RW; r += pair) {
      const W* ahead = m == 0 && r + pair < RW ? w + (r + pair) * k_dim : nullptr;
      block<W, X, pair, 4>(w + r * k_dim, at(r), x + m * k_dim, k_dim, k_vec, rows, n + r, ahead);
    }
  }
  const int64_t left = m_dim - m;
  X* rows[3] = {out + m * n_dim, out + (m + 1) * n_dim, out + (m + 2) * n_dim};
  auto next = [&](int r, int step) { return m == 0 && r + step < RW ? w + (r + step) * k_dim : nullptr; };
  if (left == 3)
    for (int r = 0; r < RW; r += pair)
      block<W, X, pair, 3>(w + r * k_dim, at(r), x + m * k_dim, k_dim, k_vec, rows, n + r, next(r, pair));
  if (left == 2)
    for (int r = 0; r < RW; r += quad)
      block<W, X, quad, 2>(w + r * k_dim, at(r), x + m * k_dim, k_dim, k_vec, rows, n + r, next(r, quad));
  if (left == 1) block<W, X, RW, 1>(w, at(0), x + m * k_dim, k_dim, k_vec, rows, n);
}

template <typename W, typename X>
void linear_rows(const W* w, const float* scale, const X* x, X* out, int64_t m_dim, int64_t n_dim, int64_t k_dim) {
  const int64_t bands = n_dim / 8;
  at::parallel_for(0, bands, 4, [&](int64_t begin, int64_t end) {
    for (int64_t band = begin; band < end; ++band) {
      const int64_t n = 8 * band;
      rows_of_w<W, X, 8>(w + n * k_dim, scale ? scale + n : nullptr, x, m_dim, k_dim, out, n_dim, n);
    }
  });
  for (int64_t n = 8 * bands; n < n_dim; ++n)
    rows_of_w<W, X, 1>(w + n * k_dim, scale ? scale + n : nullptr, x, m_dim, k_dim, out, n_dim, n);
}

}  // namespace

template <typename X>
void dispatch_weight(const torch::Tensor& weight, const torch::Tensor& x, torch::Tensor& out) {
  const int64_t m_dim = x.size(0), n_dim = weight.size(0), k_dim = weight.size(1);
  if (weight.scalar_type() == torch::kFloat32) {
    linear_rows(weight.data_ptr<float>(), x.data_ptr<X>(), out.data_ptr<X>(), m_dim, n_dim, k_dim);
  } else {
    linear_rows(weight.data_ptr<at::BFloat16>(), x.data_ptr<X>(), out.data_ptr<X>(), m_dim, n_dim, k_dim);
  }
}

// x [M, K] float32 or bfloat16; weight [N, K] float32, bfloat16, or int8 with `scale` [N] float32
// (row n of W is weight[n] * scale[n]); bias [N] or None -> [M, N] in x's dtype. x is converted to
// float32 once (it is small) and every product accumulates in float32.
torch::Tensor small_row_linear(torch::Tensor x, torch::Tensor weight, c10::optional<torch::Tensor> bias,
                               c10::optional<torch::Tensor> scale) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1), "shapes: x [M, K], weight [N, K]");
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(weight.is_contiguous(), "weight must be contiguous");
  auto xf = x.to(torch::kFloat32).contiguous();
  const int64_t m_dim = x.size(0), n_dim = weight.size(0), k_dim = weight.size(1);
  auto out = torch::empty({m_dim, n_dim}, xf.options());
  float* y = out.data_ptr<float>();
  const float* xs = xf.data_ptr<float>();
  if (weight.scalar_type() == torch::kInt8) {
    TORCH_CHECK(scale.has_value() && scale->scalar_type() == torch::kFloat32 && scale->numel() == n_dim &&
                scale->is_contiguous(), "an int8 weight needs a contiguous float32 scale per output row");
    linear_rows(weight.data_ptr<int8_t>(), scale->data_ptr<float>(), xs, y, m_dim, n_dim, k_dim);
  } else if (weight.scalar_type() == torch::kBFloat16) {
    linear_rows(weight.data_ptr<at::BFloat16>(), nullptr, xs, y, m_dim, n_dim, k_dim);
  } else {
    TORCH_CHECK(weight.scalar_type() == torch::kFloat32, "weight must be float32, bfloat16 or int8");
    linear_rows(weight.data_ptr<float>(), nullptr, xs, y, m_dim, n_dim, k_dim);
  }
  if (bias.has_value()) out.add_(bias->to(torch::kFloat32));
  return out.to(x.scalar_type());
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("small_row_linear", &small_row_linear, "weight-stationary x @ W^T (+ b) for a few rows (AVX2 + FMA)",
        py::arg("x"), py::arg("weight"), py::arg("bias") = py::none(), py::arg("scale") = py::none());
}
