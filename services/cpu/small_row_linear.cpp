// Weight-stationary linear for a few rows on x86 CPUs with AVX2 + FMA: y = x W^T (+ b), with W in
// float32, bfloat16, or int8 with a scale per output row (a draft's weight-only quantization).
//
// A decode step or a small verify is memory-bound: its cost is streaming W once. Each thread
// takes bands of 8 W rows and runs every row of x against a band (x in blocks of up to 6 rows,
// a few W rows at a time) while it sits in cache, so W is read from memory once whatever the
// number of x rows. Each output element is accumulated the same way (lanes over k in order, then
// a fixed lane sum), so a row's result is bitwise the same whether it is computed alone or with
// others.
//
// int8 weights meet x rounded to int16 (one scale per x row, small enough that no int32 lane can
// overflow): vpmaddwd sums 16 exact products an instruction, where widening int8 to float did 8,
// and that widening, not memory, bounded an int8 draft step.
#include <immintrin.h>
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

namespace {

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }

inline __m256 load8(const at::BFloat16* p) {
  __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
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

// How a weight type meets x: float lanes (fp32 or bf16 W, float x, FMA) ...
template <typename W>
struct FloatLanes {
  using Weight = W;
  using X = float;
  using Acc = __m256;
  static constexpr int kStep = 8;
  static Acc zero() { return _mm256_setzero_ps(); }
  static Acc load_w(const W* p) { return load8(p); }
  static Acc madd(Acc acc, Acc w, const float* x) { return _mm256_fmadd_ps(w, _mm256_loadu_ps(x), acc); }
  static float finish(Acc acc, const W* w, const float* x, int64_t k_vec, int64_t k_dim) {
    float sum = hsum(acc);
    for (int64_t k = k_vec; k < k_dim; ++k) sum += to_float(w[k]) * x[k];
    return sum;
  }
};

// ... or int32 lanes (int8 W, int16 x, exact integer products and sums).
struct Int8Lanes {
  using Weight = int8_t;
  using X = int16_t;
  using Acc = __m256i;
  static constexpr int kStep = 16;
  static Acc zero() { return _mm256_setzero_si256(); }
  static Acc load_w(const int8_t* p) { return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static Acc madd(Acc acc, Acc w, const int16_t* x) {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(w, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x))));
  }
  static float finish(Acc acc, const int8_t* w, const int16_t* x, int64_t k_vec, int64_t k_dim) {
    alignas(32) int32_t lanes[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), acc);
    int64_t sum = 0;
    for (int32_t lane : lanes) sum += lane;
    for (int64_t k = k_vec; k < k_dim; ++k) sum += static_cast<int64_t>(w[k]) * x[k];
    return static_cast<float>(sum);
  }
};

// Scales of a product: W's per output row (int8) and x's per x row (int16); null: none.
struct Scales {
  const float* w;
  const float* x;
  float at(int64_t r, int64_t m) const { return (w ? w[r] : 1.0f) * (x ? x[m] : 1.0f); }
  Scales rows(int64_t r, int64_t m) const { return {w ? w + r : nullptr, x ? x + m : nullptr}; }
};

// RW rows of W (1..8) against MB rows of x (1..6): RW * MB accumulators in registers.
template <typename L, int RW, int MB>
inline void block(const typename L::Weight* w, Scales scales, const typename L::X* x, int64_t k_dim, int64_t k_vec,
                  float* out_rows[MB], int64_t n, const typename L::Weight* next = nullptr) {
  typename L::Acc acc[RW][MB];
  for (int r = 0; r < RW; ++r)
    for (int m = 0; m < MB; ++m) acc[r][m] = L::zero();
  for (int64_t k = 0; k < k_vec; k += L::kStep) {
    typename L::Acc wv[RW];
    for (int r = 0; r < RW; ++r) wv[r] = L::load_w(w + r * k_dim + k);
    if (next) {  // keep the band's later W rows streaming from memory while these are used
      for (int r = 0; r < RW; ++r) _mm_prefetch(reinterpret_cast<const char*>(next + r * k_dim + k), _MM_HINT_T0);
    }
    for (int m = 0; m < MB; ++m)
      for (int r = 0; r < RW; ++r) acc[r][m] = L::madd(acc[r][m], wv[r], x + m * k_dim + k);
  }
  for (int r = 0; r < RW; ++r)
    for (int m = 0; m < MB; ++m)
      out_rows[m][n + r] = L::finish(acc[r][m], w + r * k_dim, x + m * k_dim, k_vec, k_dim) * scales.at(r, m);
}

// MB rows of x (a block) against the RW_BAND rows of W from output column n, RW at a time: about
// 8-12 accumulator chains in flight (one chain is latency bound; 16 registers hold them and RW W
// vectors). `first`: this block is the first to read these W rows, so it prefetches the next ones.
template <typename L, int RW_BAND, int MB>
inline void block_of_band(const typename L::Weight* w, Scales scales, const typename L::X* x, int64_t k_dim,
                          int64_t k_vec, float* rows[MB], int64_t n, bool first) {
  constexpr int RW = RW_BAND == 1 ? 1 : MB >= 4 ? 2 : MB >= 2 ? 4 : 8;
  for (int r = 0; r < RW_BAND; r += RW) {
    const typename L::Weight* next = first && r + RW < RW_BAND ? w + (r + RW) * k_dim : nullptr;
    block<L, RW, MB>(w + r * k_dim, scales.rows(r, 0), x, k_dim, k_vec, rows, n + r, next);
  }
}

// All rows of x against RW_BAND rows of W (8, or 1 for a tail) from output column n, in blocks of
// up to 6 x rows split evenly (8 rows: 4 + 4, not 6 + 2; a small block has too few chains).
template <typename L, int RW_BAND>
inline void rows_of_w(const typename L::Weight* w, Scales scales, const typename L::X* x, int64_t m_dim,
                      int64_t k_dim, float* out, int64_t n_dim, int64_t n) {
  const int64_t k_vec = k_dim - k_dim % L::kStep;
  if (m_dim == 1) {  // short bands (the draft's int8 rows) fetch the next band early; long ones stream well
    const bool short_band = RW_BAND == 8 && RW_BAND * k_dim * sizeof(typename L::Weight) <= 16384;
    float* rows[1] = {out};
    block<L, RW_BAND, 1>(w, scales, x, k_dim, k_vec, rows, n, short_band ? w + RW_BAND * k_dim : nullptr);
    return;
  }
  const int64_t blocks = (m_dim + 5) / 6;
  for (int64_t b = 0, m = 0; b < blocks; ++b) {
    const int64_t mb = (m_dim - m + (blocks - b) - 1) / (blocks - b);
    float* rows[6];
    for (int64_t i = 0; i < mb; ++i) rows[i] = out + (m + i) * n_dim;
    const typename L::X* xm = x + m * k_dim;
    const Scales sm = scales.rows(0, m);
    switch (mb) {
      case 1: block_of_band<L, RW_BAND, 1>(w, sm, xm, k_dim, k_vec, rows, n, b == 0); break;
      case 2: block_of_band<L, RW_BAND, 2>(w, sm, xm, k_dim, k_vec, rows, n, b == 0); break;
      case 3: block_of_band<L, RW_BAND, 3>(w, sm, xm, k_dim, k_vec, rows, n, b == 0); break;
      case 4: block_of_band<L, RW_BAND, 4>(w, sm, xm, k_dim, k_vec, rows, n, b == 0); break;
      case 5: block_of_band<L, RW_BAND, 5>(w, sm, xm, k_dim, k_vec, rows, n, b == 0); break;
      default: block_of_band<L, RW_BAND, 6>(w, sm, xm, k_dim, k_vec, rows, n, b == 0); break;
    }
    m += mb;
  }
}

template <typename L>
void linear_rows(const typename L::Weight* w, Scales scales, const typename L::X* x, float* out, int64_t m_dim,
                 int64_t n_dim, int64_t k_dim) {
  const int64_t bands = n_dim / 8;
  at::parallel_for(0, bands, 4, [&](int64_t begin, int64_t end) {
    for (int64_t band = begin; band < end; ++band)
      rows_of_w<L, 8>(w + 8 * band * k_dim, scales.rows(8 * band, 0), x, m_dim, k_dim, out, n_dim, 8 * band);
  });
  for (int64_t n = 8 * bands; n < n_dim; ++n)
    rows_of_w<L, 1>(w + n * k_dim, scales.rows(n, 0), x, m_dim, k_dim, out, n_dim, n);
}

// x rounded to int16 with one scale per row, as large as lets no int32 lane of a product overflow:
// a lane adds k_dim / 16 pairs of products, each at most 2 * 127 * |x| in magnitude.
std::pair<torch::Tensor, torch::Tensor> quantize_rows_int16(const torch::Tensor& xf) {
  const int64_t m_dim = xf.size(0), k_dim = xf.size(1);
  const double steps = std::max<int64_t>(k_dim / Int8Lanes::kStep, 1);
  const float limit = static_cast<float>(std::min(32767.0, std::floor(2147483647.0 / (254.0 * steps))));
  auto xq = torch::empty({m_dim, k_dim}, xf.options().dtype(torch::kInt16));
  auto scale = torch::empty({m_dim}, xf.options());
  const float* src = xf.data_ptr<float>();
  int16_t* dst = xq.data_ptr<int16_t>();
  for (int64_t m = 0; m < m_dim; ++m) {
    const float* row = src + m * k_dim;
    float amax = 0.0f;
    for (int64_t k = 0; k < k_dim; ++k) amax = std::max(amax, std::fabs(row[k]));
    const float s = amax > 0.0f ? amax / limit : 1.0f;
    scale.data_ptr<float>()[m] = s;
    for (int64_t k = 0; k < k_dim; ++k)
      dst[m * k_dim + k] = static_cast<int16_t>(std::clamp(std::nearbyint(row[k] / s), -limit, limit));
  }
  return {xq, scale};
}

}  // namespace

// x [M, K] float32 or bfloat16; weight [N, K] float32, bfloat16, or int8 with `scale` [N] float32
// (row n of W is weight[n] * scale[n]); bias [N] or None -> [M, N] in x's dtype. x is converted to
// float32 once (it is small; int16 for int8 weights) and every product accumulates in float32
// (int32 for int8 weights).
torch::Tensor small_row_linear(torch::Tensor x, torch::Tensor weight, c10::optional<torch::Tensor> bias,
                               c10::optional<torch::Tensor> scale) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1), "shapes: x [M, K], weight [N, K]");
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(weight.is_contiguous(), "weight must be contiguous");
  auto xf = x.to(torch::kFloat32).contiguous();
  const int64_t m_dim = x.size(0), n_dim = weight.size(0), k_dim = weight.size(1);
  auto out = torch::empty({m_dim, n_dim}, xf.options());
  float* y = out.data_ptr<float>();
  if (weight.scalar_type() == torch::kInt8) {
    TORCH_CHECK(scale.has_value() && scale->scalar_type() == torch::kFloat32 && scale->numel() == n_dim &&
                scale->is_contiguous(), "an int8 weight needs a contiguous float32 scale per output row");
    auto [xq, x_scale] = quantize_rows_int16(xf);
    linear_rows<Int8Lanes>(weight.data_ptr<int8_t>(), {scale->data_ptr<float>(), x_scale.data_ptr<float>()},
                           xq.data_ptr<int16_t>(), y, m_dim, n_dim, k_dim);
  } else if (weight.scalar_type() == torch::kBFloat16) {
    linear_rows<FloatLanes<at::BFloat16>>(weight.data_ptr<at::BFloat16>(), {}, xf.data_ptr<float>(), y, m_dim, n_dim,
                                          k_dim);
  } else {
    TORCH_CHECK(weight.scalar_type() == torch::kFloat32, "weight must be float32, bfloat16 or int8");
    linear_rows<FloatLanes<float>>(weight.data_ptr<float>(), {}, xf.data_ptr<float>(), y, m_dim, n_dim, k_dim);
  }
  if (bias.has_value()) out.add_(bias->to(torch::kFloat32));
  return out.to(x.scalar_type());
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("small_row_linear", &small_row_linear, "weight-stationary x @ W^T (+ b) for a few rows (AVX2 + FMA)",
        py::arg("x"), py::arg("weight"), py::arg("bias") = py::none(), py::arg("scale") = py::none());
}
