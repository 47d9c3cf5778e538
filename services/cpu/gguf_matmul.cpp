// Matrix products on GGUF's quantized weights (Q4_K, Q6_K, Q4_0, Q5_0, Q8_0) with each
// activation row quantized to 8 bits, as llama.cpp computes them.
//
// Why: decoding on a CPU is bound by the weight bytes read per token, and the packaged 1.5B target
// is 1.1 GB of Q4_K/Q6_K blocks, 6.2 GB as float32.
//
// Layout: at load, each tensor's blocks are regrouped (`repack`) per 16 weight rows, as llama.cpp
// repacks K-quants for its CPU kernels: the same bits, arranged so that one 64-byte load and a
// mask or shift give 64 values in the activations' order, and 16 rows' scales sit side by side.
//
// Exactness: the integer part of every product is exact (u8 x s8 pair sums, 16-bit scales,
// int32), however it is computed; the float part combines those integers in one fixed sequence per
// output (`combine_k`, `combine_b`). So an output row is bitwise the same whether it is computed
// alone (a decode step), with a few others (a verify tree) or with hundreds (a prompt prefill).
//
// Two families:
//   K-quants (Q4_K, Q6_K): super-blocks of 256 weights with a scale (and min) per 16 or 32.
//     x rows in "Q8_K": int8 with one float scale per 256 and int16 sums per 16. Per (x row,
//     weight row, super-block): I = sum_j scale_j * (q_j . x_j), Mn = sum_g min_g * xsum_g, then
//     acc = (acc + (xd * d) * I) - (xd * dmin) * Mn.
//   32-blocks (Q4_0, Q5_0, Q8_0): one fp16 scale per 32 weights, values stored with an offset.
//     x rows in "Q8_0": int8 with one float scale per 32 and each block's sum. Per block:
//     J = q . x - offset * xsum, acc = acc + (xd * d) * J.
// Threads split the output columns in groups of 16 weight rows; each group's blocks are read from
// memory once for all x rows (64 at a time).
#include <immintrin.h>
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#define SPECWIRE_AVX512 1
#elif !(defined(__AVX2__) && defined(__FMA__) && defined(__F16C__))
#error "the GGUF kernels need AVX2, FMA and F16C (AVX-512 VNNI where the CPU has it)"
#endif

namespace {

constexpr int NG = 16;  // weight rows per group: one float lane each in the combine

// ---- ggml's block layouts (ggml-common.h) and type ids ---------------------------------------
constexpr int kQ4_0 = 2, kQ5_0 = 6, kQ8_0 = 8, kQ4_K = 12, kQ6_K = 14;
struct BlockQ4K { uint16_t d, dmin; uint8_t scales[12]; uint8_t qs[128]; };
struct BlockQ6K { uint8_t ql[128]; uint8_t qh[64]; int8_t scales[16]; uint16_t d; };
struct BlockQ4_0 { uint16_t d; uint8_t qs[16]; };
struct BlockQ5_0 { uint16_t d; uint8_t qh[4]; uint8_t qs[16]; };
struct BlockQ8_0 { uint16_t d; int8_t qs[32]; };
static_assert(sizeof(BlockQ4K) == 144 && sizeof(BlockQ6K) == 210 && sizeof(BlockQ4_0) == 18 &&
              sizeof(BlockQ5_0) == 22 && sizeof(BlockQ8_0) == 34, "ggml block sizes");

// ---- repacked records: 16 weight rows x one super-block (K) or two blocks (32) ------------------
// Q4_K / Q6_K: byte i of the 64-byte chunk c holds values 128c + i (low nibble) and 128c + 64 + i
// (high nibble), so chunk c gives values 128c .. 128c + 63 and 128c + 64 .. 128c + 127 in order.
struct Q4KRec {
  uint8_t qs[NG][128];
  uint8_t scales_mins[NG][16];  // 8 six-bit scales, then 8 six-bit mins, one byte each
  uint16_t d[NG], dmin[NG];
};
struct Q6KRec {
  uint8_t ql[NG][128];  // low 4 bits, arranged as Q4_K's nibbles
  uint8_t qh[NG][64];   // high 2 bits: byte i holds those of values i, 64 + i, 128 + i, 192 + i
  int8_t scales[NG][16];
  uint16_t d[NG];
};
// Q4_0 / Q5_0 / Q8_0 over 64 values (two blocks): nibble byte i holds values i and 32 + i.
struct Q40Rec {
  uint8_t qs[NG][32];
  uint16_t d[NG][2];
};
struct Q50Rec {
  uint8_t qs[NG][32];
  uint64_t qh[NG];  // bit v: the fifth bit of value v
  uint16_t d[NG][2];
};
struct Q80Rec {
  int8_t qs[NG][64];
  uint16_t d[NG][2];
};

bool is_k_quant(int type) { return type == kQ4_K || type == kQ6_K; }
int64_t values_per_record(int type) { return is_k_quant(type) ? 256 : 64; }
int64_t record_bytes(int type) {
  switch (type) {
    case kQ4_K: return sizeof(Q4KRec);
    case kQ6_K: return sizeof(Q6KRec);
    case kQ4_0: return sizeof(Q40Rec);
    case kQ5_0: return sizeof(Q50Rec);
    case kQ8_0: return sizeof(Q80Rec);
    default: TORCH_CHECK(false, "GGUF tensor type ", type, " is not supported (Q4_K, Q6_K, Q4_0, Q5_0 and Q8_0 are)");
  }
}
int64_t block_bytes(int type) {
  switch (type) {
    case kQ4_K: return sizeof(BlockQ4K);
    case kQ6_K: return sizeof(BlockQ6K);
    case kQ4_0: return sizeof(BlockQ4_0);
    case kQ5_0: return sizeof(BlockQ5_0);
    case kQ8_0: return sizeof(BlockQ8_0);
    default: TORCH_CHECK(false, "GGUF tensor type ", type, " is not supported (Q4_K, Q6_K, Q4_0, Q5_0 and Q8_0 are)");
  }
}
int64_t block_values(int type) { return is_k_quant(type) ? 256 : 32; }

inline float fp16(uint16_t h) { return _cvtsh_ss(h); }

// Q4_K's 12 bytes of packed 6-bit scales and mins -> 8 scales, then 8 mins.
void q4k_scales_mins(const uint8_t* s, uint8_t out[16]) {
  for (int j = 0; j < 4; ++j) {
    out[j] = s[j] & 63;
    out[8 + j] = s[j + 4] & 63;
    out[4 + j] = (s[j + 8] & 0xF) | ((s[j] >> 6) << 4);
    out[12 + j] = (s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4);
  }
}

// One weight row's values of a block (or two) as plain integers, from the file's layout.
void q4k_values(const BlockQ4K* b, uint8_t v[256]) {
  for (int p = 0; p < 4; ++p)
    for (int i = 0; i < 32; ++i) {
      v[64 * p + i] = b->qs[32 * p + i] & 0xF;
      v[64 * p + 32 + i] = b->qs[32 * p + i] >> 4;
    }
}
void q6k_values(const BlockQ6K* b, uint8_t v[256]) {
  for (int h = 0; h < 2; ++h)
    for (int l = 0; l < 32; ++l) {
      const uint8_t* ql = b->ql + 64 * h;
      const uint8_t qh = b->qh[32 * h + l];
      v[128 * h + l] = (ql[l] & 0xF) | ((qh & 3) << 4);
      v[128 * h + l + 32] = (ql[l + 32] & 0xF) | (((qh >> 2) & 3) << 4);
      v[128 * h + l + 64] = (ql[l] >> 4) | (((qh >> 4) & 3) << 4);
      v[128 * h + l + 96] = (ql[l + 32] >> 4) | (((qh >> 6) & 3) << 4);
    }
}
// 32-blocks' values as unsigned (with the type's offset added: Q4_0 8, Q5_0 16, Q8_0 128).
void b_values(int type, const uint8_t* block, uint8_t v[32], uint16_t& d) {
  if (type == kQ8_0) {
    const BlockQ8_0* b = reinterpret_cast<const BlockQ8_0*>(block);
    d = b->d;
    for (int i = 0; i < 32; ++i) v[i] = static_cast<uint8_t>(b->qs[i] + 128);
    return;
  }
  const uint8_t* qs = type == kQ5_0 ? reinterpret_cast<const BlockQ5_0*>(block)->qs : reinterpret_cast<const BlockQ4_0*>(block)->qs;
  d = type == kQ5_0 ? reinterpret_cast<const BlockQ5_0*>(block)->d : reinterpret_cast<const BlockQ4_0*>(block)->d;
  uint32_t qh = 0;
  if (type == kQ5_0) std::memcpy(&qh, reinterpret_cast<const BlockQ5_0*>(block)->qh, 4);
  for (int j = 0; j < 16; ++j) {
    v[j] = (qs[j] & 0xF) | (type == kQ5_0 ? ((qh >> j) & 1) << 4 : 0);
    v[j + 16] = (qs[j] >> 4) | (type == kQ5_0 ? ((qh >> (j + 16)) & 1) << 4 : 0);
  }
}
constexpr int b_offset(int type) { return type == kQ8_0 ? 128 : type == kQ5_0 ? 16 : 8; }

// Regroup one weight row's blocks into the records of its group (r: the row within the group).
void repack_row(int type, const uint8_t* row, int64_t k, uint8_t* group_records, int r) {
  const int64_t records = k / values_per_record(type), rec_bytes = record_bytes(type);
  for (int64_t s = 0; s < records; ++s) {
    uint8_t* rec = group_records + s * rec_bytes;
    if (is_k_quant(type)) {
      uint8_t v[256];
      if (type == kQ4_K) {
        const BlockQ4K* b = reinterpret_cast<const BlockQ4K*>(row) + s;
        Q4KRec* out = reinterpret_cast<Q4KRec*>(rec);
        q4k_values(b, v);
        for (int c = 0; c < 2; ++c)
          for (int i = 0; i < 64; ++i) out->qs[r][64 * c + i] = v[128 * c + i] | (v[128 * c + 64 + i] << 4);
        q4k_scales_mins(b->scales, out->scales_mins[r]);
        out->d[r] = b->d, out->dmin[r] = b->dmin;
      } else {
        const BlockQ6K* b = reinterpret_cast<const BlockQ6K*>(row) + s;
        Q6KRec* out = reinterpret_cast<Q6KRec*>(rec);
        q6k_values(b, v);
        for (int c = 0; c < 2; ++c)
          for (int i = 0; i < 64; ++i) out->ql[r][64 * c + i] = (v[128 * c + i] & 0xF) | ((v[128 * c + 64 + i] & 0xF) << 4);
        for (int i = 0; i < 64; ++i)
          out->qh[r][i] = (v[i] >> 4) | ((v[64 + i] >> 4) << 2) | ((v[128 + i] >> 4) << 4) | ((v[192 + i] >> 4) << 6);
        std::memcpy(out->scales[r], b->scales, 16);
        out->d[r] = b->d;
      }
    } else {
      uint8_t v[64];
      uint16_t d[2];
      const int64_t bb = block_bytes(type);
      for (int half = 0; half < 2; ++half) b_values(type, row + (2 * s + half) * bb, v + 32 * half, d[half]);
      if (type == kQ8_0) {
        Q80Rec* out = reinterpret_cast<Q80Rec*>(rec);
        for (int i = 0; i < 64; ++i) out->qs[r][i] = static_cast<int8_t>(v[i] ^ 0x80);  // the file's signed values
        std::memcpy(out->d[r], d, 4);
      } else if (type == kQ5_0) {
        Q50Rec* out = reinterpret_cast<Q50Rec*>(rec);
        uint64_t qh = 0;
        for (int i = 0; i < 32; ++i) {
          out->qs[r][i] = (v[i] & 0xF) | ((v[32 + i] & 0xF) << 4);
          qh |= static_cast<uint64_t>(v[i] >> 4) << i;
          qh |= static_cast<uint64_t>(v[32 + i] >> 4) << (32 + i);
        }
        out->qh[r] = qh;
        std::memcpy(out->d[r], d, 4);
      } else {
        Q40Rec* out = reinterpret_cast<Q40Rec*>(rec);
        for (int i = 0; i < 32; ++i) out->qs[r][i] = v[i] | (v[32 + i] << 4);
        std::memcpy(out->d[r], d, 4);
      }
    }
  }
}

// ---- 16 float lanes: the combine, one lane per weight row of a group ---------------------------
// (two 8-lane halves without AVX-512: the same IEEE operations per lane, so the same numbers)
#ifdef SPECWIRE_AVX512
struct F16 {
  __m512 v;
};
inline F16 f16_zero() { return {_mm512_setzero_ps()}; }
inline F16 f16_set1(float a) { return {_mm512_set1_ps(a)}; }
inline F16 f16_from_half(const uint16_t* p) { return {_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))}; }
inline F16 f16_from_int(const int32_t* p) { return {_mm512_cvtepi32_ps(_mm512_loadu_si512(p))}; }
inline F16 operator*(F16 a, F16 b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline F16 operator+(F16 a, F16 b) { return {_mm512_add_ps(a.v, b.v)}; }
inline F16 operator-(F16 a, F16 b) { return {_mm512_sub_ps(a.v, b.v)}; }
inline void f16_store(float* p, F16 a) { _mm512_storeu_ps(p, a.v); }
#else
struct F16 {
  __m256 lo, hi;
};
inline F16 f16_zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline F16 f16_set1(float a) { return {_mm256_set1_ps(a), _mm256_set1_ps(a)}; }
inline F16 f16_from_half(const uint16_t* p) {
  return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))),
          _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)))};
}
inline F16 f16_from_int(const int32_t* p) {
  return {_mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))),
          _mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 8)))};
}
inline F16 operator*(F16 a, F16 b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
inline F16 operator+(F16 a, F16 b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
inline F16 operator-(F16 a, F16 b) { return {_mm256_sub_ps(a.lo, b.lo), _mm256_sub_ps(a.hi, b.hi)}; }
inline void f16_store(float* p, F16 a) {
  _mm256_storeu_ps(p, a.lo);
  _mm256_storeu_ps(p + 8, a.hi);
}
#endif

// The only float arithmetic of an output element: one step per super-block (K) or block (32).
inline F16 combine_k(F16 acc, float xd, F16 d, F16 dmin, const int32_t* I, const int32_t* Mn) {
  const F16 xdv = f16_set1(xd);
  return (acc + xdv * d * f16_from_int(I)) - xdv * dmin * f16_from_int(Mn);
}
inline F16 combine_b(F16 acc, float xd, F16 d, const int32_t* J) { return acc + f16_set1(xd) * d * f16_from_int(J); }

// ---- activations --------------------------------------------------------------------------
// x rows quantized for the integer products: int8 values (|q| <= 127), a float scale per block
// (256: K-quants; 32: 32-blocks), int16 sums per 16 values (K-quants) or int32 sums per block.
struct Act {
  int64_t rows = 0, k = 0, block = 0;
  std::vector<int8_t> q;
  std::vector<float> d;
  std::vector<int16_t> sums16;
  std::vector<int32_t> sums32;
  const int8_t* row_q(int64_t m) const { return q.data() + m * k; }
  float scale(int64_t m, int64_t b) const { return d[m * (k / block) + b]; }
};

Act quantize_rows(const float* x, int64_t rows, int64_t k, int64_t block) {
  Act a;
  a.rows = rows, a.k = k, a.block = block;
  a.q.resize(rows * k);
  a.d.resize(rows * (k / block));
  if (block == 256) a.sums16.resize(rows * (k / 16));
  else a.sums32.resize(rows * (k / block));
  for (int64_t m = 0; m < rows; ++m) {
    for (int64_t b = 0; b < k / block; ++b) {
      const float* src = x + m * k + b * block;
      float amax = 0.0f;
      for (int64_t i = 0; i < block; ++i) amax = std::max(amax, std::fabs(src[i]));
      const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
      int8_t* dst = a.q.data() + m * k + b * block;
      for (int64_t i = 0; i < block; ++i) dst[i] = static_cast<int8_t>(std::nearbyint(src[i] * inv));
      a.d[m * (k / block) + b] = amax / 127.0f;
      if (block == 256) {
        for (int g = 0; g < 16; ++g) {
          int32_t s = 0;
          for (int i = 0; i < 16; ++i) s += dst[16 * g + i];
          a.sums16[m * (k / 16) + 16 * b + g] = static_cast<int16_t>(s);
        }
      } else {
        int32_t s = 0;
        for (int64_t i = 0; i < block; ++i) s += dst[i];
        a.sums32[m * (k / block) + b] = s;
      }
    }
  }
  return a;
}

#ifdef SPECWIRE_AVX512
// ---- AVX-512 VNNI integer products ---------------------------------------------------------
// Sums of 16 vectors' lanes as one vector (lane r: the sum of row r), by a tree of lane permutes.
// Level L turns vectors holding 2^L rows (16 / 2^L lanes each) into ones holding twice the rows.
alignas(64) const int32_t kMerge[4][32] = {
    {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31},
    {0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31},
    {0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29, 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31},
    {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31},
};
inline __m512i merge(__m512i a, __m512i b, int level) {
  const __m512i lo = _mm512_load_si512(kMerge[level]), hi = _mm512_load_si512(kMerge[level] + 16);
  return _mm512_add_epi32(_mm512_permutex2var_epi32(a, lo, b), _mm512_permutex2var_epi32(a, hi, b));
}
// v: 16 vectors of one row each (first_level 0) or 8 vectors of two rows each (first_level 1)
inline __m512i reduce_rows(__m512i* v, int first_level) {
  for (int level = first_level, n = 16 >> first_level; level < 4; ++level, n /= 2)
    for (int i = 0; i < n / 2; ++i) v[i] = merge(v[2 * i], v[2 * i + 1], level);
  return v[0];
}

// int16 lane l of 64 values (values 2l, 2l + 1) lies in group 4c + l / 8 of 16 values (chunk c)
alignas(64) const int16_t kLaneGroup16[32] = {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                              2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3};

// One weight row of a K-quant record, unpacked into registers.
struct KRow {
  __m512i q[4];      // values 64p .. 64p + 63
  __m512i scale[4];  // each int16 pair-sum lane's scale
  __m256i mins;      // 16 int16: per 16 values, in units of dmin
};

inline KRow k_row(int type, const uint8_t* rec, int r) {
  KRow row;
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  __m256i sc16;
  if (type == kQ4_K) {
    const Q4KRec* p = reinterpret_cast<const Q4KRec*>(rec);
    for (int c = 0; c < 2; ++c) {
      const __m512i v = _mm512_loadu_si512(p->qs[r] + 64 * c);
      row.q[2 * c] = _mm512_and_si512(v, low4);
      row.q[2 * c + 1] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
    }
    const __m256i sm = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p->scales_mins[r])));
    // scales per 32 values -> per 16 (each twice); mins likewise
    const __m256i twice = _mm256_setr_epi16(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
    sc16 = _mm256_permutexvar_epi16(twice, sm);
    row.mins = _mm256_permutexvar_epi16(_mm256_add_epi16(twice, _mm256_set1_epi16(8)), sm);
  } else {
    const Q6KRec* p = reinterpret_cast<const Q6KRec*>(rec);
    const __m512i h = _mm512_loadu_si512(p->qh[r]), top2 = _mm512_set1_epi8(0x30);
    const __m512i high[4] = {_mm512_and_si512(_mm512_slli_epi16(h, 4), top2), _mm512_and_si512(_mm512_slli_epi16(h, 2), top2),
                             _mm512_and_si512(h, top2), _mm512_and_si512(_mm512_srli_epi16(h, 2), top2)};
    for (int c = 0; c < 2; ++c) {
      const __m512i v = _mm512_loadu_si512(p->ql[r] + 64 * c);
      row.q[2 * c] = _mm512_or_si512(_mm512_and_si512(v, low4), high[2 * c]);
      row.q[2 * c + 1] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(v, 4), low4), high[2 * c + 1]);
    }
    sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p->scales[r])));
    row.mins = _mm256_slli_epi16(sc16, 5);  // the offset 32, times the scale
  }
  const __m512i sc = _mm512_broadcast_i64x4(sc16), lanes = _mm512_load_si512(kLaneGroup16);
  for (int c = 0; c < 4; ++c)
    row.scale[c] = _mm512_permutexvar_epi16(_mm512_add_epi16(lanes, _mm512_set1_epi16(static_cast<int16_t>(4 * c))), sc);
  return row;
}

inline __m512i k_dot(const KRow& w, const __m512i x[4]) {
  __m512i sum = _mm512_dpwssd_epi32(_mm512_setzero_si512(), _mm512_maddubs_epi16(w.q[0], x[0]), w.scale[0]);
  sum = _mm512_dpwssd_epi32(sum, _mm512_maddubs_epi16(w.q[1], x[1]), w.scale[1]);
  sum = _mm512_dpwssd_epi32(sum, _mm512_maddubs_epi16(w.q[2], x[2]), w.scale[2]);
  return _mm512_dpwssd_epi32(sum, _mm512_maddubs_epi16(w.q[3], x[3]), w.scale[3]);
}

// I and Mn of 16 weight rows (unpacked) with one x super-block.
inline void k_ints(const KRow* rows, const int8_t* xq, const int16_t* xsums16, int32_t* I, int32_t* Mn) {
  const __m512i x[4] = {_mm512_loadu_si512(xq), _mm512_loadu_si512(xq + 64), _mm512_loadu_si512(xq + 128),
                        _mm512_loadu_si512(xq + 192)};
  __m512i v[NG];
  for (int r = 0; r < NG; ++r) v[r] = k_dot(rows[r], x);
  _mm512_storeu_si512(I, reduce_rows(v, 0));
  const __m512i xs = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xsums16)));
  for (int i = 0; i < NG / 2; ++i)  // rows 2i and 2i + 1 side by side: pair form
    v[i] = _mm512_madd_epi16(_mm512_inserti64x4(_mm512_castsi256_si512(rows[2 * i].mins), rows[2 * i + 1].mins, 1), xs);
  _mm512_storeu_si512(Mn, reduce_rows(v, 1));
}

// The same for one x row, unpacking each weight row only into registers.
inline void k_ints_direct(int type, const uint8_t* rec, const int8_t* xq, const int16_t* xsums16, int32_t* I, int32_t* Mn) {
  const __m512i x[4] = {_mm512_loadu_si512(xq), _mm512_loadu_si512(xq + 64), _mm512_loadu_si512(xq + 128),
                        _mm512_loadu_si512(xq + 192)};
  const __m512i xs = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xsums16)));
  __m512i v[NG], mins[NG / 2];
  for (int r = 0; r < NG; r += 2) {
    const KRow a = k_row(type, rec, r), b = k_row(type, rec, r + 1);
    v[r] = k_dot(a, x);
    v[r + 1] = k_dot(b, x);
    mins[r / 2] = _mm512_madd_epi16(_mm512_inserti64x4(_mm512_castsi256_si512(a.mins), b.mins, 1), xs);
  }
  _mm512_storeu_si512(I, reduce_rows(v, 0));
  _mm512_storeu_si512(Mn, reduce_rows(mins, 1));
}

// 32-blocks: a row's 64 values (two blocks) as unsigned bytes.
inline __m512i b_row(int type, const uint8_t* rec, int r) {
  if (type == kQ8_0)
    return _mm512_xor_si512(_mm512_loadu_si512(reinterpret_cast<const Q80Rec*>(rec)->qs[r]), _mm512_set1_epi8(char(0x80)));
  const uint8_t* qs = type == kQ5_0 ? reinterpret_cast<const Q50Rec*>(rec)->qs[r] : reinterpret_cast<const Q40Rec*>(rec)->qs[r];
  const __m256i n = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs)), low4 = _mm256_set1_epi8(0x0F);
  const __m512i values = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(n, low4)),
                                            _mm256_and_si256(_mm256_srli_epi16(n, 4), low4), 1);
  if (type == kQ4_0) return values;
  const __m512i fifth = _mm512_maskz_mov_epi8(reinterpret_cast<const Q50Rec*>(rec)->qh[r], _mm512_set1_epi8(0x10));
  return _mm512_or_si512(values, fifth);
}

// J of 16 weight rows with one pair of x blocks: J0 for the first block, J1 for the second.
inline void b_ints(const __m512i* rows, int /*type*/, const int8_t* xq, int32_t offset0, int32_t offset1, int32_t* J0,
                   int32_t* J1) {
  const __m512i x = _mm512_loadu_si512(xq);
  __m512i v[NG], w[NG];
  for (int r = 0; r < NG; ++r)  // vpdpbusd: u8 x s8 in groups of 4, int32 sums without saturation
    (r < 8 ? v[r] : w[r - 8]) = _mm512_dpbusd_epi32(_mm512_setzero_si512(), rows[r], x);
  // each vector holds one row's two blocks: reduce rows 0..7 and 8..15 separately in pair form
  const __m512i a = reduce_rows(v, 1), b = reduce_rows(w, 1);
  // a: lane 2i = (row i, block 0), 2i + 1 = (row i, block 1); b likewise for rows 8..15
  alignas(64) static const int32_t even[16] = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};
  alignas(64) static const int32_t odd[16] = {1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31};
  const __m512i j0 = _mm512_permutex2var_epi32(a, _mm512_load_si512(even), b);
  const __m512i j1 = _mm512_permutex2var_epi32(a, _mm512_load_si512(odd), b);
  _mm512_storeu_si512(J0, _mm512_sub_epi32(j0, _mm512_set1_epi32(offset0)));
  _mm512_storeu_si512(J1, _mm512_sub_epi32(j1, _mm512_set1_epi32(offset1)));
}
#else
// ---- AVX2 integer products: each row on its own, horizontal sums ------------------------------
inline int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// A row of a record as plain values, scales per int16 lane and mins (K) or values (32).
struct KRow {
  alignas(32) uint8_t q[256];
  alignas(32) int16_t scale[128];
  alignas(32) int16_t mins[16];
};

inline KRow k_row(int type, const uint8_t* rec, int r) {
  KRow row;
  uint8_t sc[16];
  if (type == kQ4_K) {
    const Q4KRec* p = reinterpret_cast<const Q4KRec*>(rec);
    for (int c = 0; c < 2; ++c)
      for (int i = 0; i < 64; ++i) {
        row.q[128 * c + i] = p->qs[r][64 * c + i] & 0xF;
        row.q[128 * c + 64 + i] = p->qs[r][64 * c + i] >> 4;
      }
    for (int g = 0; g < 16; ++g) {
      sc[g] = p->scales_mins[r][g / 2];
      row.mins[g] = p->scales_mins[r][8 + g / 2];
    }
    for (int l = 0; l < 128; ++l) row.scale[l] = sc[l / 8];
  } else {
    const Q6KRec* p = reinterpret_cast<const Q6KRec*>(rec);
    for (int c = 0; c < 2; ++c)
      for (int i = 0; i < 64; ++i) {
        const uint8_t h = p->qh[r][i] >> (4 * c);
        row.q[128 * c + i] = (p->ql[r][64 * c + i] & 0xF) | ((h & 3) << 4);
        row.q[128 * c + 64 + i] = (p->ql[r][64 * c + i] >> 4) | (((h >> 2) & 3) << 4);
      }
    for (int g = 0; g < 16; ++g) row.mins[g] = static_cast<int16_t>(32 * p->scales[r][g]);
    for (int l = 0; l < 128; ++l) row.scale[l] = p->scales[r][l / 8];
  }
  return row;
}

inline void k_ints(const KRow* rows, const int8_t* xq, const int16_t* xsums16, int32_t* I, int32_t* Mn) {
  const __m256i xs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xsums16));
  for (int r = 0; r < NG; ++r) {
    __m256i sum = _mm256_setzero_si256();
    for (int p = 0; p < 8; ++p) {
      const __m256i prod = _mm256_maddubs_epi16(_mm256_load_si256(reinterpret_cast<const __m256i*>(rows[r].q + 32 * p)),
                                                _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 32 * p)));
      sum = _mm256_add_epi32(sum, _mm256_madd_epi16(prod, _mm256_load_si256(reinterpret_cast<const __m256i*>(rows[r].scale + 16 * p))));
    }
    I[r] = hsum_epi32(sum);
    Mn[r] = hsum_epi32(_mm256_madd_epi16(_mm256_load_si256(reinterpret_cast<const __m256i*>(rows[r].mins)), xs));
  }
}

struct BRow {
  alignas(32) uint8_t q[64];
};

inline BRow b_row(int type, const uint8_t* rec, int r) {
  BRow row;
  if (type == kQ8_0) {
    for (int i = 0; i < 64; ++i) row.q[i] = static_cast<uint8_t>(reinterpret_cast<const Q80Rec*>(rec)->qs[r][i] + 128);
    return row;
  }
  const uint8_t* qs = type == kQ5_0 ? reinterpret_cast<const Q50Rec*>(rec)->qs[r] : reinterpret_cast<const Q40Rec*>(rec)->qs[r];
  const uint64_t qh = type == kQ5_0 ? reinterpret_cast<const Q50Rec*>(rec)->qh[r] : 0;
  for (int i = 0; i < 32; ++i) {
    row.q[i] = (qs[i] & 0xF) | (((qh >> i) & 1) << 4);
    row.q[32 + i] = (qs[i] >> 4) | (((qh >> (32 + i)) & 1) << 4);
  }
  return row;
}

// sum over 32 bytes of u8 q * s8 x, exact: maddubs saturates a pair sum above 32767, so values
// above 127 (Q8_0 with its offset) are split at bit 7
inline int32_t dot32(const uint8_t* q, const int8_t* x) {
  const __m256i qv = _mm256_load_si256(reinterpret_cast<const __m256i*>(q));
  const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)), ones = _mm256_set1_epi16(1);
  const __m256i lo = _mm256_and_si256(qv, _mm256_set1_epi8(0x7F)), hi = _mm256_and_si256(qv, _mm256_set1_epi8(char(0x80)));
  return hsum_epi32(_mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(lo, xv), ones),
                                     _mm256_madd_epi16(_mm256_maddubs_epi16(hi, xv), ones)));
}

inline void b_ints(const BRow* rows, int type, const int8_t* xq, int32_t offset0, int32_t offset1, int32_t* J0, int32_t* J1) {
  for (int r = 0; r < NG; ++r) {
    J0[r] = dot32(rows[r].q, xq) - offset0;
    J1[r] = dot32(rows[r].q + 32, xq + 32) - offset1;
  }
}
#endif

// ---- the products of one group of 16 weight rows ------------------------------------------
constexpr int64_t kRowChunk = 64;  // x rows per pass over the weights (their quantized rows stay in L2)

// Ask for the next record while this one is computed: a decode step's integer work per byte is
// close to its memory time, and only overlapping the two approaches the bandwidth (one record
// ahead measured fastest on the 2-core VM: 58 ms for the 1.5B's linears, 61 at two, 71 at eight).
inline void prefetch_ahead(const uint8_t* rec, int64_t rec_bytes) {
  const uint8_t* ahead = rec + rec_bytes;
  for (int64_t off = 0; off < rec_bytes; off += 64) _mm_prefetch(reinterpret_cast<const char*>(ahead + off), _MM_HINT_T0);
}  // x rows per pass over the weights (their quantized rows stay in L2)

void store_group(const std::vector<F16>& acc, float* out, int64_t n_dim, int64_t n0, int ng) {
  alignas(64) float lanes[NG];
  for (size_t m = 0; m < acc.size(); ++m) {
    f16_store(lanes, acc[m]);
    std::memcpy(out + m * n_dim + n0, lanes, ng * sizeof(float));
  }
}

void k_group(const uint8_t* records, int type, const Act& x, float* out, int64_t n_dim, int64_t n0, int ng) {
  const int64_t blocks = x.k / 256, rec_bytes = record_bytes(type);
  std::vector<F16> acc(x.rows, f16_zero());
  std::vector<KRow> rows(NG);
  alignas(64) int32_t I[NG], Mn[NG];
  for (int64_t s = 0; s < blocks; ++s) {
    const uint8_t* rec = records + s * rec_bytes;
    prefetch_ahead(rec, rec_bytes);
    const uint16_t* d = type == kQ4_K ? reinterpret_cast<const Q4KRec*>(rec)->d : reinterpret_cast<const Q6KRec*>(rec)->d;
    const uint16_t* dmin = type == kQ4_K ? reinterpret_cast<const Q4KRec*>(rec)->dmin : d;
    const F16 dv = f16_from_half(d), dminv = f16_from_half(dmin);
#ifdef SPECWIRE_AVX512
    if (x.rows == 1) {  // one x row: straight from the record into the products, nothing stored
      k_ints_direct(type, rec, x.row_q(0) + 256 * s, x.sums16.data() + 16 * s, I, Mn);
      acc[0] = combine_k(acc[0], x.scale(0, s), dv, dminv, I, Mn);
      continue;
    }
#endif
    for (int r = 0; r < NG; ++r) rows[r] = k_row(type, rec, r);
    for (int64_t m = 0; m < x.rows; ++m) {
      k_ints(rows.data(), x.row_q(m) + 256 * s, x.sums16.data() + m * (x.k / 16) + 16 * s, I, Mn);
      acc[m] = combine_k(acc[m], x.scale(m, s), dv, dminv, I, Mn);
    }
  }
  store_group(acc, out, n_dim, n0, ng);
}

void b_group(const uint8_t* records, int type, const Act& x, float* out, int64_t n_dim, int64_t n0, int ng) {
  const int64_t pairs = x.k / 64, rec_bytes = record_bytes(type), blocks = x.k / 32;
  std::vector<F16> acc(x.rows, f16_zero());
#ifdef SPECWIRE_AVX512
  __m512i rows[NG];
#else
  BRow rows[NG];
#endif
  alignas(64) int32_t J0[NG], J1[NG];
  alignas(64) uint16_t d0[NG], d1[NG];
  const int offset = b_offset(type);
  for (int64_t p = 0; p < pairs; ++p) {
    const uint8_t* rec = records + p * rec_bytes;
    prefetch_ahead(rec, rec_bytes);
    for (int r = 0; r < NG; ++r) rows[r] = b_row(type, rec, r);
    const uint16_t(*d)[2] = type == kQ8_0   ? reinterpret_cast<const Q80Rec*>(rec)->d
                            : type == kQ5_0 ? reinterpret_cast<const Q50Rec*>(rec)->d
                                            : reinterpret_cast<const Q40Rec*>(rec)->d;
    for (int r = 0; r < NG; ++r) d0[r] = d[r][0], d1[r] = d[r][1];
    const F16 dv0 = f16_from_half(d0), dv1 = f16_from_half(d1);
    for (int64_t m = 0; m < x.rows; ++m) {
      const int32_t* sums = x.sums32.data() + m * blocks + 2 * p;
      b_ints(rows, type, x.row_q(m) + 64 * p, offset * sums[0], offset * sums[1], J0, J1);
      acc[m] = combine_b(acc[m], x.scale(m, 2 * p), dv0, J0);
      acc[m] = combine_b(acc[m], x.scale(m, 2 * p + 1), dv1, J1);
    }
  }
  store_group(acc, out, n_dim, n0, ng);
}

struct Weight {
  const uint8_t* data;
  int type;
  int64_t n, k, group_bytes;
};

// A repacked weight: uint8 [groups, records per group * record bytes] for N rows of K values.
Weight check_weight(const torch::Tensor& w, int64_t type, int64_t n, int64_t k) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kUInt8 && w.is_contiguous() && w.device().is_cpu(),
              "a repacked GGUF weight is a contiguous CPU uint8 tensor [groups, bytes]");
  const int t = static_cast<int>(type);
  const int64_t group_bytes = k / values_per_record(t) * record_bytes(t);  // (refuses an unsupported type)
  TORCH_CHECK(k % values_per_record(t) == 0, "in_features ", k, " is not a multiple of ", values_per_record(t));
  TORCH_CHECK(w.size(0) == (n + NG - 1) / NG && w.size(1) == group_bytes, "repacked weight shape [", w.size(0), ", ",
              w.size(1), "] does not fit ", n, " x ", k, " of type ", type);
  return {w.data_ptr<uint8_t>(), t, n, k, group_bytes};
}

}  // namespace

// The file's blocks of a [N, K] matrix (uint8 [N, K / block values * block bytes]) regrouped for
// `gguf_linear`: uint8 [ceil(N / 16), group bytes]; rows past N are zero.
torch::Tensor gguf_repack(torch::Tensor blocks, int64_t type, int64_t k) {
  const int t = static_cast<int>(type);
  const int64_t group_bytes = k / values_per_record(t) * record_bytes(t);  // (refuses an unsupported type)
  TORCH_CHECK(blocks.dim() == 2 && blocks.scalar_type() == torch::kUInt8 && blocks.is_contiguous(),
              "GGUF blocks: a contiguous uint8 tensor [N, row bytes]");
  TORCH_CHECK(k % values_per_record(t) == 0, "in_features ", k, " is not a multiple of ", values_per_record(t));
  TORCH_CHECK(blocks.size(1) == k / block_values(t) * block_bytes(t), "row bytes do not fit ", k, " values");
  const int64_t n = blocks.size(0), groups = (n + NG - 1) / NG;
  auto out = torch::zeros({groups, group_bytes}, torch::kUInt8);
  const uint8_t* src = blocks.data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g)
      for (int r = 0; r < NG && g * NG + r < n; ++r) repack_row(t, src + (g * NG + r) * blocks.size(1), k, dst + g * group_bytes, r);
  });
  return out;
}

// y_i = x @ W_i^T (+ b_i) for repacked weights sharing the input x [M, K] (float32): x is
// quantized once per activation format.
std::vector<torch::Tensor> gguf_linear(torch::Tensor x, std::vector<torch::Tensor> weights, std::vector<int64_t> types,
                                       std::vector<int64_t> out_features, std::vector<c10::optional<torch::Tensor>> biases) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.device().is_cpu(), "x: float32 CPU [M, K]");
  TORCH_CHECK(weights.size() == types.size() && weights.size() == biases.size() && weights.size() == out_features.size(),
              "one type, size and bias per weight");
  auto xc = x.contiguous();
  const int64_t m_dim = xc.size(0), k = xc.size(1);
  std::vector<Weight> ws;
  bool need_k = false, need_b = false;
  for (size_t i = 0; i < weights.size(); ++i) {
    ws.push_back(check_weight(weights[i], types[i], out_features[i], k));
    (is_k_quant(ws.back().type) ? need_k : need_b) = true;
  }
  std::vector<torch::Tensor> outs;
  std::vector<int64_t> group_start{0};  // every weight's groups, numbered in one range for the threads
  for (const Weight& w : ws) {
    outs.push_back(torch::empty({m_dim, w.n}, xc.options()));
    group_start.push_back(group_start.back() + (w.n + NG - 1) / NG);
  }
  for (int64_t m0 = 0; m0 < m_dim; m0 += kRowChunk) {
    const int64_t rows = std::min(kRowChunk, m_dim - m0);
    const float* xs = xc.data_ptr<float>() + m0 * k;
    Act act_k, act_b;
    if (need_k) act_k = quantize_rows(xs, rows, k, 256);
    if (need_b) act_b = quantize_rows(xs, rows, k, 32);
    at::parallel_for(0, group_start.back(), 1, [&](int64_t begin, int64_t end) {
      for (size_t i = 0; i < ws.size(); ++i) {
        const Weight& w = ws[i];
        float* out = outs[i].data_ptr<float>() + m0 * w.n;
        for (int64_t g = std::max(begin, group_start[i]); g < std::min(end, group_start[i + 1]); ++g) {
          const int ng = static_cast<int>(std::min<int64_t>(NG, w.n - (g - group_start[i]) * NG));
          const uint8_t* records = w.data + (g - group_start[i]) * w.group_bytes;
          if (is_k_quant(w.type)) k_group(records, w.type, act_k, out, w.n, (g - group_start[i]) * NG, ng);
          else b_group(records, w.type, act_b, out, w.n, (g - group_start[i]) * NG, ng);
        }
      }
    });
  }
  for (size_t i = 0; i < ws.size(); ++i)
    if (biases[i].has_value()) outs[i].add_(*biases[i]);
  return outs;
}

// Rows `ids` of a GGUF matrix in the file's layout [N, row bytes] as float32 [len(ids), K] (an
// embedding lookup).
torch::Tensor gguf_dequantize_rows(torch::Tensor blocks, int64_t type, int64_t k, torch::Tensor ids) {
  const int t = static_cast<int>(type);
  TORCH_CHECK(blocks.dim() == 2 && blocks.scalar_type() == torch::kUInt8 && blocks.is_contiguous(),
              "GGUF blocks: a contiguous uint8 tensor [N, row bytes]");
  TORCH_CHECK(blocks.size(1) == k / block_values(t) * block_bytes(t), "row bytes do not fit ", k, " values");
  auto ids_c = ids.to(torch::kInt64).contiguous();
  const int64_t rows = ids_c.numel(), n = blocks.size(0), bb = block_bytes(t);
  const int64_t* id = ids_c.data_ptr<int64_t>();
  for (int64_t i = 0; i < rows; ++i) TORCH_CHECK(id[i] >= 0 && id[i] < n, "row id ", id[i], " outside [0, ", n, ")");
  auto out = torch::empty({rows, k}, torch::dtype(torch::kFloat32));
  for (int64_t i = 0; i < rows; ++i) {
    const uint8_t* row = blocks.data_ptr<uint8_t>() + id[i] * blocks.size(1);
    float* y = out.data_ptr<float>() + i * k;
    for (int64_t b = 0; b < k / block_values(t); ++b) {
      const uint8_t* block = row + b * bb;
      if (t == kQ4_K) {
        const BlockQ4K* q = reinterpret_cast<const BlockQ4K*>(block);
        uint8_t v[256], sm[16];
        q4k_values(q, v);
        q4k_scales_mins(q->scales, sm);
        const float d = fp16(q->d), dmin = fp16(q->dmin);
        for (int j = 0; j < 256; ++j) y[256 * b + j] = d * sm[j / 32] * v[j] - dmin * sm[8 + j / 32];
      } else if (t == kQ6_K) {
        const BlockQ6K* q = reinterpret_cast<const BlockQ6K*>(block);
        uint8_t v[256];
        q6k_values(q, v);
        const float d = fp16(q->d);
        for (int j = 0; j < 256; ++j) y[256 * b + j] = d * q->scales[j / 16] * (static_cast<int>(v[j]) - 32);
      } else {
        uint8_t v[32];
        uint16_t d;
        b_values(t, block, v, d);
        for (int j = 0; j < 32; ++j) y[32 * b + j] = fp16(d) * static_cast<float>(static_cast<int>(v[j]) - b_offset(t));
      }
    }
  }
  return out;
}
