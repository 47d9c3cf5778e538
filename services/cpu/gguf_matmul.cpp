// Matrix products on GGUF's quantized weights (Q4_K, Q6_K, Q4_0, Q5_0, Q8_0) with each
// activation row quantized to 8 bits, as llama.cpp computes them.
//
// Why: decoding on a CPU is bound by the weight bytes read per token, and the packaged 1.5B target
// is 1.1 GB of Q4_K/Q6_K blocks, 6.2 GB as float32.
//
// Layout: at load, each tensor's blocks are regrouped (`repack`) per 16 weight rows into columns,
// as llama.cpp repacks K-quants for its CPU kernels: the same bits, arranged so that a 64-byte
// row of a record holds 4 consecutive values of each of the 16 weight rows. One vpdpbusd of such
// a row with 4 activation values (broadcast) adds to all 16 rows' products at once, in 16 lanes
// that are the 16 outputs: no horizontal sums, for one activation row or many. (These 8 x 64-byte
// tiles are also the layout of AMX's B tiles.)
//
// Exactness: the integer part of every product is exact (u8 x s8 sums, scales in int32),
// however it is computed; the float part combines those integers in one fixed sequence per output
// (`combine_k`, `combine_b`). So an output row is bitwise the same whether it is computed alone
// (a decode step), with a few others (a verify tree) or with hundreds (a prompt prefill).
//
// Two families:
//   K-quants (Q4_K, Q6_K): super-blocks of 256 weights with a scale (and min) per 32 or 16.
//     x rows in "Q8_K": int8 with one float scale per 256 and int16 sums per 16. Per (x row,
//     weight row, super-block): I = sum_j scale_j * (q_j . x_j), Mn = sum_j min_j * xsum_j, then
//     acc = (acc + (xd * d) * I) - (xd * dmin) * Mn.
//   32-blocks (Q4_0, Q5_0, Q8_0): one fp16 scale per 32 weights, values stored with an offset.
//     x rows in "Q8_0": int8 with one float scale per 32 and each block's sum. Per block:
//     J = q . x - offset * xsum, acc = acc + (xd * d) * J.
// Threads split the output columns in groups of 16 weight rows; each group's records are read
// from memory once for all x rows (64 at a time).
#include <immintrin.h>
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

#include <sys/syscall.h>
#include <unistd.h>

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

// ---- repacked records: 16 weight rows x one super-block (K) or two blocks (32) -------------------
// A tile is 8 rows of 64 bytes over 32 values: byte 4n + i of row r holds value 4r + i of weight row
// n. Q4_K / Q6_K: tile t covers values 32t .. 32t + 31 of the super-block; their low 4 bits are
// packed two tiles to a byte (tile 2p in the low nibble, 2p + 1 in the high one).
struct Q4KRec {
  uint8_t qs[4][8][64];
  uint8_t scales[8][NG];  // [sub-block of 32][row]: six-bit scale
  uint8_t mins[8][NG];    // six-bit min
  uint16_t d[NG], dmin[NG];
};
struct Q6KRec {
  uint8_t ql[4][8][64];  // low 4 bits, as Q4_K's
  uint8_t qh[2][8][64];  // high 2 bits: plane h, bits 2u, 2u + 1 hold tile 4h + u's
  int8_t scales[16][NG];  // [group of 16][row]
  uint16_t d[NG];
};
// Q4_0 / Q5_0 / Q8_0: two blocks of 32 values; block b is a tile (Q4_0 / Q5_0: block 0 in the low
// nibbles, block 1 in the high ones; Q5_0's fifth bits as one 64-bit mask per tile row).
struct Q40Rec {
  uint8_t qs[8][64];
  uint16_t d[2][NG];
};
struct Q50Rec {
  uint8_t qs[8][64];
  uint64_t qh[2][8];
  uint16_t d[2][NG];
};
struct Q80Rec {
  int8_t qs[2][8][64];
  uint16_t d[2][NG];
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

// Regroup one weight row's blocks into its group's records (r: the row within the group).
void repack_row(int type, const uint8_t* row, int64_t k, uint8_t* group_records, int r) {
  const int64_t records = k / values_per_record(type), rec_bytes = record_bytes(type);
  auto at = [r](int value) { return 4 * r + (value % 4) + 64 * ((value / 4) % 8); };  // byte of a tile
  for (int64_t s = 0; s < records; ++s) {
    uint8_t* rec = group_records + s * rec_bytes;
    if (type == kQ4_K || type == kQ6_K) {
      uint8_t v[256];
      if (type == kQ4_K) {
        const BlockQ4K* b = reinterpret_cast<const BlockQ4K*>(row) + s;
        Q4KRec* out = reinterpret_cast<Q4KRec*>(rec);
        q4k_values(b, v);
        for (int value = 0; value < 256; ++value)  // tile t = value / 32: pair p = t / 2, nibble t % 2
          (&out->qs[value / 64][0][0])[at(value)] |= static_cast<uint8_t>(v[value] << (4 * ((value / 32) % 2)));
        uint8_t sm[16];
        q4k_scales_mins(b->scales, sm);
        for (int j = 0; j < 8; ++j) out->scales[j][r] = sm[j], out->mins[j][r] = sm[8 + j];
        out->d[r] = b->d, out->dmin[r] = b->dmin;
      } else {
        const BlockQ6K* b = reinterpret_cast<const BlockQ6K*>(row) + s;
        Q6KRec* out = reinterpret_cast<Q6KRec*>(rec);
        q6k_values(b, v);
        for (int value = 0; value < 256; ++value) {
          const int t = value / 32;
          (&out->ql[t / 2][0][0])[at(value)] |= static_cast<uint8_t>((v[value] & 0xF) << (4 * (t % 2)));
          (&out->qh[t / 4][0][0])[at(value)] |= static_cast<uint8_t>((v[value] >> 4) << (2 * (t % 4)));
        }
        for (int g = 0; g < 16; ++g) out->scales[g][r] = b->scales[g];
        out->d[r] = b->d;
      }
    } else {
      const int64_t bb = block_bytes(type);
      for (int half = 0; half < 2; ++half) {
        uint8_t v[32];
        uint16_t d;
        b_values(type, row + (2 * s + half) * bb, v, d);
        for (int value = 0; value < 32; ++value) {
          if (type == kQ8_0) {
            (&reinterpret_cast<Q80Rec*>(rec)->qs[half][0][0])[at(value)] = v[value] ^ 0x80;  // the file's signed value
          } else {
            uint8_t* qs = type == kQ5_0 ? &reinterpret_cast<Q50Rec*>(rec)->qs[0][0] : &reinterpret_cast<Q40Rec*>(rec)->qs[0][0];
            qs[at(value)] |= static_cast<uint8_t>((v[value] & 0xF) << (4 * half));
            if (type == kQ5_0 && (v[value] & 0x10))
              reinterpret_cast<Q50Rec*>(rec)->qh[half][value / 4] |= uint64_t{1} << (4 * r + value % 4);
          }
        }
        uint16_t* ds = type == kQ8_0   ? reinterpret_cast<Q80Rec*>(rec)->d[half]
                       : type == kQ5_0 ? reinterpret_cast<Q50Rec*>(rec)->d[half]
                                       : reinterpret_cast<Q40Rec*>(rec)->d[half];
        ds[r] = d;
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
  std::vector<int16_t> sums16;  // K-quants: per 16 values
  std::vector<int16_t> pairs32;  // K-quants: per 32 values (Q4_K's sub-blocks)
  std::vector<int32_t> sums32;  // 32-blocks: per block
  const int8_t* row_q(int64_t m) const { return q.data() + m * k; }
  float scale(int64_t m, int64_t b) const { return d[m * (k / block) + b]; }
};

Act quantize_rows(const float* x, int64_t rows, int64_t k, int64_t block) {
  Act a;
  a.rows = rows, a.k = k, a.block = block;
  a.q.resize(rows * k);
  a.d.resize(rows * (k / block));
  if (block == 256) {
    a.sums16.resize(rows * (k / 16));
    a.pairs32.resize(rows * (k / 32));
  } else {
    a.sums32.resize(rows * (k / block));
  }
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
        for (int j = 0; j < 8; ++j)
          a.pairs32[m * (k / 32) + 8 * b + j] = static_cast<int16_t>(a.sums16[m * (k / 16) + 16 * b + 2 * j] +
                                                                      a.sums16[m * (k / 16) + 16 * b + 2 * j + 1]);
      } else {
        int32_t s = 0;
        for (int64_t i = 0; i < block; ++i) s += dst[i];
        a.sums32[m * (k / block) + b] = s;
      }
    }
  }
  return a;
}

// ---- integer products of a record's 16 weight rows with one x row -----------------------------
// Tiles of unsigned values come from a `Tiles` source: straight from the record (one x row: each
// byte is read once anyway) or from tiles unpacked once for many x rows. Both give the same
// integers, so the same outputs.
struct KInts {
  alignas(64) int32_t I[NG];
  alignas(64) int32_t Mn[NG];
};
struct BInts {
  alignas(64) int32_t J[2][NG];
};

#ifdef SPECWIRE_AVX512
using Vec = __m512i;  // a tile row: 16 weight rows x 4 values
inline Vec dot4(Vec acc, Vec values, const int8_t* x4) {  // acc[n] += values[n] . x[0..3]
  int32_t word;
  std::memcpy(&word, x4, 4);
  return _mm512_dpbusd_epi32(acc, values, _mm512_set1_epi32(word));
}
inline Vec mul_add(Vec acc, Vec a, Vec b) { return _mm512_add_epi32(acc, _mm512_mullo_epi32(a, b)); }
inline Vec load_vec(const void* p) { return _mm512_loadu_si512(p); }
inline void store_vec(void* p, Vec v) { _mm512_storeu_si512(p, v); }
inline Vec low4(Vec v) { return _mm512_and_si512(v, _mm512_set1_epi8(0x0F)); }
inline Vec high4(Vec v) { return _mm512_and_si512(_mm512_srli_epi16(v, 4), _mm512_set1_epi8(0x0F)); }
inline Vec bits2(Vec v, int shift) { return _mm512_and_si512(_mm512_srli_epi16(v, shift), _mm512_set1_epi8(0x03)); }
inline Vec or_high(Vec low, Vec high2) { return _mm512_or_si512(low, _mm512_slli_epi16(high2, 4)); }
inline Vec fifth_bits(uint64_t mask) { return _mm512_maskz_mov_epi8(mask, _mm512_set1_epi8(0x10)); }
inline Vec flip_sign(Vec v) { return _mm512_xor_si512(v, _mm512_set1_epi8(char(0x80))); }
inline Vec widen_u8(const uint8_t* p) { return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline Vec widen_s8(const int8_t* p) { return _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline Vec zero_vec() { return _mm512_setzero_si512(); }
inline Vec sub_bcast(Vec v, int32_t a) { return _mm512_sub_epi32(v, _mm512_set1_epi32(a)); }
#else
// AVX2: a tile row as two 8-lane halves (weight rows 0..7 and 8..15)
struct Vec {
  __m256i lo, hi;
};
// u8 x s8 pair sums saturate above 32767: values up to 127 are safe (2 * 127 * 127); larger ones
// (Q8_0 with its offset, 0..255) go through in two parts, bit 7 and the rest.
inline __m256i dot4_half(__m256i acc, __m256i values, __m256i x) {
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i top = _mm256_and_si256(values, _mm256_set1_epi8(char(0x80)));
  const __m256i rest = _mm256_andnot_si256(_mm256_set1_epi8(char(0x80)), values);
  acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(rest, x), ones));
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(top, x), ones));
}
inline Vec dot4(Vec acc, Vec values, const int8_t* x4) {
  int32_t word;
  std::memcpy(&word, x4, 4);
  const __m256i x = _mm256_set1_epi32(word);
  return {dot4_half(acc.lo, values.lo, x), dot4_half(acc.hi, values.hi, x)};
}
inline Vec mul_add(Vec acc, Vec a, Vec b) {
  return {_mm256_add_epi32(acc.lo, _mm256_mullo_epi32(a.lo, b.lo)), _mm256_add_epi32(acc.hi, _mm256_mullo_epi32(a.hi, b.hi))};
}
inline Vec load_vec(const void* p) {
  const __m256i* q = reinterpret_cast<const __m256i*>(p);
  return {_mm256_loadu_si256(q), _mm256_loadu_si256(q + 1)};
}
inline void store_vec(void* p, Vec v) {
  __m256i* q = reinterpret_cast<__m256i*>(p);
  _mm256_storeu_si256(q, v.lo);
  _mm256_storeu_si256(q + 1, v.hi);
}
inline Vec low4(Vec v) {
  const __m256i m = _mm256_set1_epi8(0x0F);
  return {_mm256_and_si256(v.lo, m), _mm256_and_si256(v.hi, m)};
}
inline Vec high4(Vec v) {
  const __m256i m = _mm256_set1_epi8(0x0F);
  return {_mm256_and_si256(_mm256_srli_epi16(v.lo, 4), m), _mm256_and_si256(_mm256_srli_epi16(v.hi, 4), m)};
}
inline Vec bits2(Vec v, int shift) {
  const __m256i m = _mm256_set1_epi8(0x03);
  return {_mm256_and_si256(_mm256_srl_epi16(v.lo, _mm_cvtsi32_si128(shift)), m),
          _mm256_and_si256(_mm256_srl_epi16(v.hi, _mm_cvtsi32_si128(shift)), m)};
}
inline Vec or_high(Vec low, Vec high2) {
  return {_mm256_or_si256(low.lo, _mm256_slli_epi16(high2.lo, 4)), _mm256_or_si256(low.hi, _mm256_slli_epi16(high2.hi, 4))};
}
inline __m256i bits_to_bytes(uint32_t bits) {  // byte i: 0x10 where bit i is set
  const __m256i spread = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(bits)),
                                             _mm256_setr_epi64x(0, 0x0101010101010101, 0x0202020202020202, 0x0303030303030303));
  const __m256i set = _mm256_cmpeq_epi8(_mm256_or_si256(spread, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe)), _mm256_set1_epi64x(-1));
  return _mm256_and_si256(set, _mm256_set1_epi8(0x10));
}
inline Vec fifth_bits(uint64_t mask) {
  return {bits_to_bytes(static_cast<uint32_t>(mask)), bits_to_bytes(static_cast<uint32_t>(mask >> 32))};
}
inline Vec flip_sign(Vec v) {
  const __m256i m = _mm256_set1_epi8(char(0x80));
  return {_mm256_xor_si256(v.lo, m), _mm256_xor_si256(v.hi, m)};
}
inline Vec widen_u8(const uint8_t* p) {
  return {_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))),
          _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8)))};
}
inline Vec widen_s8(const int8_t* p) {
  return {_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))),
          _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8)))};
}
inline Vec zero_vec() { return {_mm256_setzero_si256(), _mm256_setzero_si256()}; }
inline Vec sub_bcast(Vec v, int32_t a) {
  const __m256i b = _mm256_set1_epi32(a);
  return {_mm256_sub_epi32(v.lo, b), _mm256_sub_epi32(v.hi, b)};
}
#endif

// A tile row of unsigned values straight from a record: tile t (0..7), row r (0..7).
inline Vec k_tile_row(int type, const uint8_t* rec, int t, int r) {
  if (type == kQ4_K) {
    const Vec packed = load_vec(reinterpret_cast<const Q4KRec*>(rec)->qs[t / 2][r]);
    return t % 2 ? high4(packed) : low4(packed);
  }
  const Q6KRec* q = reinterpret_cast<const Q6KRec*>(rec);
  const Vec packed = load_vec(q->ql[t / 2][r]);
  return or_high(t % 2 ? high4(packed) : low4(packed), bits2(load_vec(q->qh[t / 4][r]), 2 * (t % 4)));
}

inline Vec b_tile_row(int type, const uint8_t* rec, int t, int r) {
  if (type == kQ8_0) return flip_sign(load_vec(reinterpret_cast<const Q80Rec*>(rec)->qs[t][r]));
  const uint8_t* qs = type == kQ5_0 ? reinterpret_cast<const Q50Rec*>(rec)->qs[r] : reinterpret_cast<const Q40Rec*>(rec)->qs[r];
  const Vec packed = load_vec(qs);
  const Vec values = t ? high4(packed) : low4(packed);
  if (type == kQ4_0) return values;
#ifdef SPECWIRE_AVX512
  return _mm512_or_si512(values, fifth_bits(reinterpret_cast<const Q50Rec*>(rec)->qh[t][r]));
#else
  const Vec bits = fifth_bits(reinterpret_cast<const Q50Rec*>(rec)->qh[t][r]);
  return {_mm256_or_si256(values.lo, bits.lo), _mm256_or_si256(values.hi, bits.hi)};
#endif
}

// Tiles unpacked once, for many x rows.
struct Unpacked {
  alignas(64) uint8_t rows[8][8][64];
};

// The scales of a record (per sub-block, 16 rows as int32 lanes) and the mins' pairs.
struct KScales {
  Vec scale[16];  // Q4_K: 8 sub-blocks of 32; Q6_K: 16 groups of 16
  Vec mins[16];   // Q4_K: per sub-block of 32; Q6_K: 32 * scale per group of 16
  int groups;     // 8 or 16
};

inline void k_scales(int type, const uint8_t* rec, KScales& out) {
  if (type == kQ4_K) {
    const Q4KRec* q = reinterpret_cast<const Q4KRec*>(rec);
    out.groups = 8;
    for (int j = 0; j < 8; ++j) out.scale[j] = widen_u8(q->scales[j]), out.mins[j] = widen_u8(q->mins[j]);
  } else {
    const Q6KRec* q = reinterpret_cast<const Q6KRec*>(rec);
    out.groups = 16;
    for (int g = 0; g < 16; ++g) {
      out.scale[g] = widen_s8(q->scales[g]);
#ifdef SPECWIRE_AVX512
      out.mins[g] = _mm512_slli_epi32(out.scale[g], 5);
#else
      out.mins[g] = {_mm256_slli_epi32(out.scale[g].lo, 5), _mm256_slli_epi32(out.scale[g].hi, 5)};
#endif
    }
  }
}

// Mn of a K record's 16 rows with one x super-block: mins times the x sums of their groups.
inline Vec k_mins(const KScales& sc, const int16_t* xsums16, const int16_t* xpairs32) {
  const int16_t* sums = sc.groups == 8 ? xpairs32 : xsums16;
  Vec Mn = zero_vec();
  for (int g = 0; g < sc.groups; ++g) {
#ifdef SPECWIRE_AVX512
    Mn = mul_add(Mn, sc.mins[g], _mm512_set1_epi32(sums[g]));
#else
    const __m256i b = _mm256_set1_epi32(sums[g]);
    Mn = mul_add(Mn, sc.mins[g], Vec{b, b});
#endif
  }
  return Mn;
}

// I and Mn of a K record's 16 rows with one x super-block. `tile_row(t, r)` gives tile rows.
template <typename TileRow>
inline void k_ints(const KScales& sc, TileRow tile_row, const int8_t* xq, const int16_t* xsums16, const int16_t* xpairs32,
                   KInts& out) {
  Vec I = zero_vec(), Mn = zero_vec();
  const int rows_per_group = sc.groups == 8 ? 8 : 4;
  for (int t = 0; t < 8; ++t) {
    for (int half = 0; half < 8 / rows_per_group; ++half) {
      Vec c = zero_vec();
      for (int r = half * rows_per_group; r < (half + 1) * rows_per_group; ++r) c = dot4(c, tile_row(t, r), xq + 32 * t + 4 * r);
      const int g = sc.groups == 8 ? t : 2 * t + half;
      I = mul_add(I, c, sc.scale[g]);
    }
  }
  store_vec(out.I, I);
  store_vec(out.Mn, k_mins(sc, xsums16, xpairs32));
}

// J of a 32-block record's 16 rows with one x block pair.
template <typename TileRow>
inline void b_ints(TileRow tile_row, const int8_t* xq, int32_t offset0, int32_t offset1, BInts& out) {
  for (int t = 0; t < 2; ++t) {
    Vec c = zero_vec();
    for (int r = 0; r < 8; ++r) c = dot4(c, tile_row(t, r), xq + 32 * t + 4 * r);
    store_vec(out.J[t], sub_bcast(c, t ? offset1 : offset0));
  }
}

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

#if defined(SPECWIRE_AVX512) && defined(__AMX_TILE__) && defined(__AMX_INT8__)
#define SPECWIRE_AMX 1
// AMX: one tile product multiplies up to 16 x rows with a group's tile (its 16 weight rows) over a
// group of 32 (Q4_K) or 16 (Q6_K) values: C[m][n] = x[m] . q[n], exact int32, 16 x 16 at a time.
// The scales are applied to C in vectors afterwards, so the integers are those of `k_ints`.
bool amx_ready() {
  static const bool ok = [] {
    constexpr long kReqPerm = 0x1023, kTileData = 18;  // arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)
    return syscall(SYS_arch_prctl, kReqPerm, kTileData) == 0;
  }();
  return ok;
}

struct TileConfig {
  uint8_t palette = 1, start = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// tmm0: C (m x 16 int32), tmm1: A (m x k bytes of x), tmm2: B (k / 4 rows of a tile)
inline void configure_tiles(int m, int k) {
  thread_local int current_m = -1, current_k = -1;
  if (m == current_m && k == current_k) return;
  TileConfig c;
  c.rows[0] = static_cast<uint8_t>(m), c.colsb[0] = 64;
  c.rows[1] = static_cast<uint8_t>(m), c.colsb[1] = static_cast<uint16_t>(k);
  c.rows[2] = static_cast<uint8_t>(k / 4), c.colsb[2] = 64;
  _tile_loadconfig(&c);
  current_m = m, current_k = k;
}

// I for x rows m0 .. m0 + m - 1 (I[i]: 16 lanes of row m0 + i) from unpacked tiles.
inline void k_ints_amx(const KScales& sc, const Unpacked& tiles, const int8_t* x0, int64_t stride, int m, Vec* I) {
  const int k = sc.groups == 8 ? 32 : 16;  // values per group
  configure_tiles(m, k);
  alignas(64) int32_t c[16][16];
  for (int i = 0; i < m; ++i) I[i] = zero_vec();
  for (int g = 0; g < sc.groups; ++g) {
    _tile_zero(0);
    _tile_loadd(1, x0 + g * k, stride);
    _tile_loadd(2, &tiles.rows[g * k / 32][(g * k % 32) / 4][0], 64);
    _tile_dpbsud(0, 1, 2);
    _tile_stored(0, c, 64);
    for (int i = 0; i < m; ++i) I[i] = mul_add(I[i], load_vec(c[i]), sc.scale[g]);
  }
}
#endif

void k_group(const uint8_t* records, int type, const Act& x, float* out, int64_t n_dim, int64_t n0, int ng) {
  const int64_t blocks = x.k / 256, rec_bytes = record_bytes(type);
  std::vector<F16> acc(x.rows, f16_zero());
  KScales sc;
  KInts ints;
  Unpacked tiles;
  for (int64_t s = 0; s < blocks; ++s) {
    const uint8_t* rec = records + s * rec_bytes;
    prefetch_ahead(rec, rec_bytes);
    k_scales(type, rec, sc);
    const uint16_t* d = type == kQ4_K ? reinterpret_cast<const Q4KRec*>(rec)->d : reinterpret_cast<const Q6KRec*>(rec)->d;
    const uint16_t* dmin = type == kQ4_K ? reinterpret_cast<const Q4KRec*>(rec)->dmin : d;
    const F16 dv = f16_from_half(d), dminv = f16_from_half(dmin);
    const auto x_at = [&](int64_t m) {
      return std::make_tuple(x.row_q(m) + 256 * s, x.sums16.data() + m * (x.k / 16) + 16 * s,
                             x.pairs32.data() + m * (x.k / 32) + 8 * s);
    };
    if (x.rows == 1) {  // one x row: tile rows straight from the record, nothing stored
      const auto [xq, xs16, xs32] = x_at(0);
      k_ints(sc, [&](int t, int r) { return k_tile_row(type, rec, t, r); }, xq, xs16, xs32, ints);
      acc[0] = combine_k(acc[0], x.scale(0, s), dv, dminv, ints.I, ints.Mn);
      continue;
    }
    for (int t = 0; t < 8; ++t)
      for (int r = 0; r < 8; ++r) store_vec(tiles.rows[t][r], k_tile_row(type, rec, t, r));
#ifdef SPECWIRE_AMX
    if (amx_ready()) {
      Vec I[16];
      for (int64_t m0 = 0; m0 < x.rows; m0 += 16) {
        const int rows = static_cast<int>(std::min<int64_t>(16, x.rows - m0));
        k_ints_amx(sc, tiles, x.row_q(m0) + 256 * s, x.k, rows, I);
        for (int i = 0; i < rows; ++i) {
          const auto [xq, xs16, xs32] = x_at(m0 + i);
          store_vec(ints.I, I[i]);
          store_vec(ints.Mn, k_mins(sc, xs16, xs32));
          acc[m0 + i] = combine_k(acc[m0 + i], x.scale(m0 + i, s), dv, dminv, ints.I, ints.Mn);
        }
      }
      continue;
    }
#endif
    for (int64_t m = 0; m < x.rows; ++m) {
      const auto [xq, xs16, xs32] = x_at(m);
      k_ints(sc, [&](int t, int r) { return load_vec(tiles.rows[t][r]); }, xq, xs16, xs32, ints);
      acc[m] = combine_k(acc[m], x.scale(m, s), dv, dminv, ints.I, ints.Mn);
    }
  }
  store_group(acc, out, n_dim, n0, ng);
}

void b_group(const uint8_t* records, int type, const Act& x, float* out, int64_t n_dim, int64_t n0, int ng) {
  const int64_t pairs = x.k / 64, rec_bytes = record_bytes(type), blocks = x.k / 32;
  std::vector<F16> acc(x.rows, f16_zero());
  BInts ints;
  Unpacked tiles;
  const int offset = b_offset(type);
  for (int64_t p = 0; p < pairs; ++p) {
    const uint8_t* rec = records + p * rec_bytes;
    prefetch_ahead(rec, rec_bytes);
    const uint16_t(*d)[NG] = type == kQ8_0   ? reinterpret_cast<const Q80Rec*>(rec)->d
                             : type == kQ5_0 ? reinterpret_cast<const Q50Rec*>(rec)->d
                                             : reinterpret_cast<const Q40Rec*>(rec)->d;
    const F16 dv0 = f16_from_half(d[0]), dv1 = f16_from_half(d[1]);
    const bool direct = x.rows == 1;
    if (!direct)
      for (int t = 0; t < 2; ++t)
        for (int r = 0; r < 8; ++r) store_vec(tiles.rows[t][r], b_tile_row(type, rec, t, r));
    for (int64_t m = 0; m < x.rows; ++m) {
      const int32_t* sums = x.sums32.data() + m * blocks + 2 * p;
      const int8_t* xq = x.row_q(m) + 64 * p;
      if (direct) b_ints([&](int t, int r) { return b_tile_row(type, rec, t, r); }, xq, offset * sums[0], offset * sums[1], ints);
      else b_ints([&](int t, int r) { return load_vec(tiles.rows[t][r]); }, xq, offset * sums[0], offset * sums[1], ints);
      acc[m] = combine_b(acc[m], x.scale(m, 2 * p), dv0, ints.J[0]);
      acc[m] = combine_b(acc[m], x.scale(m, 2 * p + 1), dv1, ints.J[1]);
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
