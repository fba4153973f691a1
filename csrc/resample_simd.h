// The inner loops of the two resampling passes, in three versions that compute the same integer sums, so
// the bytes never depend on the path: AVX-512 VNNI (blocks of 16 rows), AVX2 (8 rows) and plain C++. The
// best one the CPU has is picked when the library loads; CMA_SIMD=avx2 or CMA_SIMD=none caps it (tests
// compare every path against Pillow).
//
// Horizontal pass, per block of R source rows:
//   pair_rows:   rows [R][W * 3] uint8 -> block [W / 2][3][R][2] int16, pixels (2q, 2q + 1) of channel c
//                side by side for each row: the lanes are the rows, the int16 pairs meet weight pairs;
//   horizontal:  block -> out [size * 3][R] uint8 (one multiply-add per weight pair, per channel);
//   untranspose: out -> R rows of size * 3 bytes.
// Vertical pass, per output row: vertical_row over contiguous bytes, rows 2p and 2p + 1 interleaved.
#pragma once
#include "pil_taps.h"

#include <cstdlib>
#include <cstring>
#include <string>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define CMA_X86 1
#define CMA_AVX2 __attribute__((target("avx2")))
#define CMA_AVX512 __attribute__((target("avx2,avx512f,avx512bw,avx512vnni")))
#endif

namespace cma_preprocess {

enum class Isa { kPlain, kAvx2, kAvx512 };

inline Isa detect_isa() {
  const char* cap = std::getenv("CMA_SIMD");
  const std::string limit = cap ? cap : "";
  if (limit == "none") return Isa::kPlain;
#ifdef CMA_X86
  if (limit != "avx2" && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vnni"))
    return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2")) return Isa::kAvx2;
#endif
  return Isa::kPlain;
}

inline const Isa kIsa = detect_isa();
inline const int kBlockRows = kIsa == Isa::kAvx512 ? 16 : 8;   // source rows per horizontal block

inline const char* isa_name() { return kIsa == Isa::kAvx512 ? "avx512" : kIsa == Isa::kAvx2 ? "avx2" : "none"; }

#ifdef CMA_X86
// hi * 2^11 + lo + rounding, >> 22, clamped to uint8: Pillow's clip8 over int32 lanes.
CMA_AVX2 inline __m128i clip8_avx2(__m256i hi, __m256i lo) {   // 8 lanes -> low 8 bytes
  const __m256i sum = _mm256_add_epi32(_mm256_slli_epi32(hi, kLoBits), lo);
  const __m256i v = _mm256_srai_epi32(_mm256_add_epi32(sum, _mm256_set1_epi32(1 << (kPrecisionBits - 1))),
                                      kPrecisionBits);
  const __m128i v16 = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  return _mm_packus_epi16(v16, v16);
}

CMA_AVX512 inline __m128i clip8_avx512(__m512i hi, __m512i lo) {   // 16 lanes -> 16 bytes
  const __m512i sum = _mm512_add_epi32(_mm512_slli_epi32(hi, kLoBits), lo);
  const __m512i v = _mm512_srai_epi32(_mm512_add_epi32(sum, _mm512_set1_epi32(1 << (kPrecisionBits - 1))),
                                      kPrecisionBits);
  return _mm512_cvtusepi32_epi8(_mm512_max_epi32(v, _mm512_setzero_si512()));
}

// acc += pairwise int16 dot products (vpdpwssd). Inline asm because GCC 12 copies the accumulator to a
// fresh register around the intrinsic, which doubles the instructions of the tap loops.
CMA_AVX512 inline __m512i dot_pairs(__m512i acc, __m512i pixels, __m512i weights) {
  asm("vpdpwssd %2, %1, %0" : "+v"(acc) : "v"(pixels), "v"(weights));
  return acc;
}

// 16 bytes from `low` into the low 128-bit lane and 16 from `high` into the high one; `*_left` bytes are
// readable there, and past the end of a row the lane is filled with zeros.
CMA_AVX2 inline __m256i load_lanes(const uint8_t* low, int low_left, const uint8_t* high, int high_left) {
  if (low_left >= 16 && high_left >= 16)
    return _mm256_loadu2_m128i(reinterpret_cast<const __m128i*>(high), reinterpret_cast<const __m128i*>(low));
  alignas(32) uint8_t tail[32] = {};
  std::memcpy(tail, low, std::max(0, std::min(16, low_left)));
  std::memcpy(tail + 16, high, std::max(0, std::min(16, high_left)));
  return _mm256_load_si256(reinterpret_cast<const __m256i*>(tail));
}

// Each 128-bit lane of r[j] holds 16 bytes of row j from a pixel-pair boundary: pixel pairs 2k and 2k + 1 in
// its first 12 bytes. A byte shuffle turns them into 6 16-bit units (RR GG BB per pair), and a 16-bit 8x8
// transpose gathers each unit over the 8 registers: unit[u] lane l = unit u of rows 0..7, lane by lane.
CMA_AVX2 inline void transpose_units(__m256i r[8], __m256i unit[6]) {
  const __m256i units =   // RGBRGB RGBRGB xxxx -> RR GG BB RR GG BB, 16-bit units
      _mm256_broadcastsi128_si256(_mm_setr_epi8(0, 3, 1, 4, 2, 5, 6, 9, 7, 10, 8, 11, -1, -1, -1, -1));
  __m256i a[8], b[6];
  for (int j = 0; j < 8; ++j) r[j] = _mm256_shuffle_epi8(r[j], units);
  for (int j = 0; j < 4; ++j) {   // rows 2j, 2j + 1: a[2j] units 0-3, a[2j + 1] units 4-7
    a[2 * j] = _mm256_unpacklo_epi16(r[2 * j], r[2 * j + 1]);
    a[2 * j + 1] = _mm256_unpackhi_epi16(r[2 * j], r[2 * j + 1]);
  }
  for (int h = 0; h < 2; ++h) {   // rows 4h to 4h + 3: units (0, 1), (2, 3), (4, 5)
    b[3 * h + 0] = _mm256_unpacklo_epi32(a[4 * h], a[4 * h + 2]);
    b[3 * h + 1] = _mm256_unpackhi_epi32(a[4 * h], a[4 * h + 2]);
    b[3 * h + 2] = _mm256_unpacklo_epi32(a[4 * h + 1], a[4 * h + 3]);
  }
  for (int u = 0; u < 6; u += 2) {
    unit[u] = _mm256_unpacklo_epi64(b[u / 2], b[3 + u / 2]);
    unit[u + 1] = _mm256_unpackhi_epi64(b[u / 2], b[3 + u / 2]);
  }
}

// 16 rows: rows j and j + 8 share a register, so a unit's two lanes are its 16 rows; widen to int16 pairs.
CMA_AVX512 void pair_rows_avx512(const uint8_t* const rows[16], int row_bytes, int npairs, int16_t* block) {
  for (int k = 0; 2 * k < npairs; ++k) {
    __m256i r[8], unit[6];
    const int left = row_bytes - 12 * k;
    for (int j = 0; j < 8; ++j) r[j] = load_lanes(rows[j] + 12 * k, left, rows[j + 8] + 12 * k, left);
    transpose_units(r, unit);
    for (int u = 0; u < 6 && 2 * k + u / 3 < npairs; ++u)
      _mm512_storeu_si512(block + (6 * k + u) * 32, _mm512_cvtepu8_epi16(unit[u]));
  }
}

// 8 rows: steps k (low lane) and k + 1 (high lane) of a row share a register.
CMA_AVX2 void pair_rows_avx2(const uint8_t* const rows[8], int row_bytes, int npairs, int16_t* block) {
  for (int k = 0; 2 * k < npairs; k += 2) {
    __m256i r[8], unit[6];
    const int left = row_bytes - 12 * k;
    for (int j = 0; j < 8; ++j) r[j] = load_lanes(rows[j] + 12 * k, left, rows[j] + 12 * k + 12, left - 12);
    transpose_units(r, unit);
    for (int u = 0; u < 6; ++u) {
      if (2 * k + u / 3 < npairs)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(block + (6 * k + u) * 16),
                            _mm256_cvtepu8_epi16(_mm256_castsi256_si128(unit[u])));
      if (2 * k + 2 + u / 3 < npairs)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(block + (6 * k + 6 + u) * 16),
                            _mm256_cvtepu8_epi16(_mm256_extracti128_si256(unit[u], 1)));
    }
  }
}

// Horizontal taps, lanes are the block's rows: channel sums += pixel pair (2p, 2p + 1) . weight pair p.
CMA_AVX512 void horizontal_avx512(const int16_t* block, const PairTaps& taps, int size, uint8_t* out) {
  for (int x = 0; x < size; ++x) {
    const int32_t* hi = taps.hi.data() + static_cast<size_t>(x) * taps.max_pairs;
    const int32_t* lo = taps.lo.data() + static_cast<size_t>(x) * taps.max_pairs;
    const int16_t* px = block + taps.start[x] / 2 * 96;
    __m512i r_hi = _mm512_setzero_si512(), g_hi = r_hi, b_hi = r_hi, r_lo = r_hi, g_lo = r_hi, b_lo = r_hi;
    for (int p = 0; p < taps.pairs[x]; ++p, px += 96) {
      const __m512i k_hi = _mm512_set1_epi32(hi[p]), k_lo = _mm512_set1_epi32(lo[p]);
      const __m512i r = _mm512_loadu_si512(px), g = _mm512_loadu_si512(px + 32), b = _mm512_loadu_si512(px + 64);
      r_hi = dot_pairs(r_hi, r, k_hi);
      r_lo = dot_pairs(r_lo, r, k_lo);
      g_hi = dot_pairs(g_hi, g, k_hi);
      g_lo = dot_pairs(g_lo, g, k_lo);
      b_hi = dot_pairs(b_hi, b, k_hi);
      b_lo = dot_pairs(b_lo, b, k_lo);
    }
    uint8_t* o = out + 3 * x * 16;
    _mm_storeu_si128(reinterpret_cast<__m128i*>(o), clip8_avx512(r_hi, r_lo));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(o + 16), clip8_avx512(g_hi, g_lo));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(o + 32), clip8_avx512(b_hi, b_lo));
  }
}

CMA_AVX2 void horizontal_avx2(const int16_t* block, const PairTaps& taps, int size, uint8_t* out) {
  for (int x = 0; x < size; ++x) {
    const int32_t* hi = taps.hi.data() + static_cast<size_t>(x) * taps.max_pairs;
    const int32_t* lo = taps.lo.data() + static_cast<size_t>(x) * taps.max_pairs;
    const __m256i* px = reinterpret_cast<const __m256i*>(block + taps.start[x] / 2 * 48);
    __m256i acc_hi[3], acc_lo[3];
    for (int c = 0; c < 3; ++c) acc_hi[c] = acc_lo[c] = _mm256_setzero_si256();
    for (int p = 0; p < taps.pairs[x]; ++p, px += 3) {
      const __m256i k_hi = _mm256_set1_epi32(hi[p]), k_lo = _mm256_set1_epi32(lo[p]);
      for (int c = 0; c < 3; ++c) {
        const __m256i v = _mm256_loadu_si256(px + c);
        acc_hi[c] = _mm256_add_epi32(acc_hi[c], _mm256_madd_epi16(v, k_hi));
        acc_lo[c] = _mm256_add_epi32(acc_lo[c], _mm256_madd_epi16(v, k_lo));
      }
    }
    for (int c = 0; c < 3; ++c)
      _mm_storel_epi64(reinterpret_cast<__m128i*>(out + (3 * x + c) * 8), clip8_avx2(acc_hi[c], acc_lo[c]));
  }
}

// The horizontal results back into rows, 16 at a time: rows[j][col] = src[col * 16 + j]. Columns col + i and
// col + i + 8 share a register (one per 128-bit lane), so one 8x8 unpack network transposes both.
CMA_AVX2 void untranspose16_avx2(const uint8_t* src, int ncols, uint8_t* const rows[16]) {
  int col = 0;
  for (; col + 16 <= ncols; col += 16) {
    __m256i r[8], a[8], b[8];
    for (int i = 0; i < 8; ++i)
      r[i] = _mm256_loadu2_m128i(reinterpret_cast<const __m128i*>(src + (col + i + 8) * 16),
                                 reinterpret_cast<const __m128i*>(src + (col + i) * 16));
    for (int i = 0; i < 4; ++i) {   // columns (2i, 2i + 1) as byte pairs: a[2i] rows 0-7, a[2i + 1] rows 8-15
      a[2 * i] = _mm256_unpacklo_epi8(r[2 * i], r[2 * i + 1]);
      a[2 * i + 1] = _mm256_unpackhi_epi8(r[2 * i], r[2 * i + 1]);
    }
    for (int h = 0; h < 2; ++h) {   // columns 4h to 4h + 3: b[4h + k] rows 4k to 4k + 3
      b[4 * h + 0] = _mm256_unpacklo_epi16(a[4 * h + 0], a[4 * h + 2]);
      b[4 * h + 1] = _mm256_unpackhi_epi16(a[4 * h + 0], a[4 * h + 2]);
      b[4 * h + 2] = _mm256_unpacklo_epi16(a[4 * h + 1], a[4 * h + 3]);
      b[4 * h + 3] = _mm256_unpackhi_epi16(a[4 * h + 1], a[4 * h + 3]);
    }
    for (int q = 0; q < 4; ++q) {   // rows (4q, 4q + 1) and (4q + 2, 4q + 3), 16 columns each
      const __m256i even = _mm256_permute4x64_epi64(_mm256_unpacklo_epi32(b[q], b[4 + q]), 0xD8);
      const __m256i odd = _mm256_permute4x64_epi64(_mm256_unpackhi_epi32(b[q], b[4 + q]), 0xD8);
      _mm256_storeu2_m128i(reinterpret_cast<__m128i*>(rows[4 * q + 1] + col),
                           reinterpret_cast<__m128i*>(rows[4 * q] + col), even);
      _mm256_storeu2_m128i(reinterpret_cast<__m128i*>(rows[4 * q + 3] + col),
                           reinterpret_cast<__m128i*>(rows[4 * q + 2] + col), odd);
    }
  }
  for (; col < ncols; ++col)
    for (int j = 0; j < 16; ++j) rows[j][col] = src[col * 16 + j];
}

// The same for 8 rows with SSE2 (the x86-64 baseline): 8x8 byte transposes.
inline void untranspose8_sse2(const uint8_t* src, int ncols, uint8_t* const rows[8]) {
  int col = 0;
  for (; col + 8 <= ncols; col += 8) {
    __m128i in[8], a[4], b[4];
    for (int k = 0; k < 8; ++k) in[k] = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + (col + k) * 8));
    for (int k = 0; k < 4; ++k) a[k] = _mm_unpacklo_epi8(in[2 * k], in[2 * k + 1]);   // rows 0-7, columns 2k, 2k + 1
    b[0] = _mm_unpacklo_epi16(a[0], a[1]);   // rows 0-3, columns 0-3
    b[1] = _mm_unpackhi_epi16(a[0], a[1]);   // rows 4-7, columns 0-3
    b[2] = _mm_unpacklo_epi16(a[2], a[3]);   // rows 0-3, columns 4-7
    b[3] = _mm_unpackhi_epi16(a[2], a[3]);   // rows 4-7, columns 4-7
    const __m128i pairs[4] = {_mm_unpacklo_epi32(b[0], b[2]), _mm_unpackhi_epi32(b[0], b[2]),
                              _mm_unpacklo_epi32(b[1], b[3]), _mm_unpackhi_epi32(b[1], b[3])};
    for (int k = 0; k < 4; ++k) {   // rows 2k and 2k + 1
      _mm_storel_epi64(reinterpret_cast<__m128i*>(rows[2 * k] + col), pairs[k]);
      _mm_storel_epi64(reinterpret_cast<__m128i*>(rows[2 * k + 1] + col), _mm_unpackhi_epi64(pairs[k], pairs[k]));
    }
  }
  for (; col < ncols; ++col)
    for (int j = 0; j < 8; ++j) rows[j][col] = src[col * 8 + j];
}

// Vertical taps: rows 2p and 2p + 1 interleaved as int16 pairs, then multiply-add; 32 / 16 columns a step.
// unpacklo/hi work per 128-bit lane, so each accumulator holds 4 of every 8 columns; the stores interleave
// them back. Returns how many columns were done.
CMA_AVX512 int vertical_avx512(const uint8_t* base, int64_t stride, const int32_t* hi, const int32_t* lo, int count,
                               int n, uint8_t* out) {
  const int n32 = n / 32 * 32;
  for (int i = 0; i < n32; i += 32) {
    __m512i acc_hi[2] = {_mm512_setzero_si512(), _mm512_setzero_si512()}, acc_lo[2] = {acc_hi[0], acc_hi[0]};
    for (int p = 0; 2 * p < count; ++p) {
      const uint8_t* row = base + 2 * p * stride + i;
      const uint8_t* next = 2 * p + 1 < count ? row + stride : row;   // its weight is 0 past the end
      const __m512i a = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row)));
      const __m512i b = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(next)));
      const __m512i k_hi = _mm512_set1_epi32(hi[p]), k_lo = _mm512_set1_epi32(lo[p]);
      const __m512i ab[2] = {_mm512_unpacklo_epi16(a, b), _mm512_unpackhi_epi16(a, b)};
      for (int h = 0; h < 2; ++h) {
        acc_hi[h] = dot_pairs(acc_hi[h], ab[h], k_hi);
        acc_lo[h] = dot_pairs(acc_lo[h], ab[h], k_lo);
      }
    }
    const __m128i first = clip8_avx512(acc_hi[0], acc_lo[0]), second = clip8_avx512(acc_hi[1], acc_lo[1]);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), _mm_unpacklo_epi32(first, second));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i + 16), _mm_unpackhi_epi32(first, second));
  }
  return n32;
}

CMA_AVX2 int vertical_avx2(const uint8_t* base, int64_t stride, const int32_t* hi, const int32_t* lo, int count,
                           int n, uint8_t* out) {
  const int n16 = n / 16 * 16;
  for (int i = 0; i < n16; i += 16) {
    __m256i acc_hi[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()}, acc_lo[2] = {acc_hi[0], acc_hi[0]};
    for (int p = 0; 2 * p < count; ++p) {
      const uint8_t* row = base + 2 * p * stride + i;
      const uint8_t* next = 2 * p + 1 < count ? row + stride : row;
      const __m256i a = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row)));
      const __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(next)));
      const __m256i k_hi = _mm256_set1_epi32(hi[p]), k_lo = _mm256_set1_epi32(lo[p]);
      const __m256i ab[2] = {_mm256_unpacklo_epi16(a, b), _mm256_unpackhi_epi16(a, b)};
      for (int h = 0; h < 2; ++h) {
        acc_hi[h] = _mm256_add_epi32(acc_hi[h], _mm256_madd_epi16(ab[h], k_hi));
        acc_lo[h] = _mm256_add_epi32(acc_lo[h], _mm256_madd_epi16(ab[h], k_lo));
      }
    }
    const __m128i first = clip8_avx2(acc_hi[0], acc_lo[0]), second = clip8_avx2(acc_hi[1], acc_lo[1]);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), _mm_unpacklo_epi32(first, second));
  }
  return n16;
}
#endif  // CMA_X86

// ---- dispatch, with the plain loops as the fallback ----

// rows: kBlockRows pointers to row_bytes = W * 3 bytes; block: [npairs][3][kBlockRows][2] int16, 0 past the row.
inline void pair_rows(const uint8_t* const rows[], int row_bytes, int npairs, int16_t* block) {
#ifdef CMA_X86
  if (kIsa == Isa::kAvx512) return pair_rows_avx512(rows, row_bytes, npairs, block);
  if (kIsa == Isa::kAvx2) return pair_rows_avx2(rows, row_bytes, npairs, block);
#endif
  const int R = kBlockRows;
  for (int q = 0; q < npairs; ++q)
    for (int c = 0; c < 3; ++c)
      for (int j = 0; j < R; ++j)
        for (int e = 0; e < 2; ++e) {
          const int byte = (2 * q + e) * 3 + c;
          block[((3 * q + c) * R + j) * 2 + e] = byte < row_bytes ? rows[j][byte] : 0;
        }
}

// out[(3x + c) * R + j] = clip8(sum_t pixel(row j, start[x] + t, c) * w[x][t]) for a block of R rows.
inline void horizontal(const int16_t* block, const PairTaps& taps, int size, uint8_t* out) {
#ifdef CMA_X86
  if (kIsa == Isa::kAvx512) return horizontal_avx512(block, taps, size, out);
  if (kIsa == Isa::kAvx2) return horizontal_avx2(block, taps, size, out);
#endif
  const int R = kBlockRows;
  for (int x = 0; x < size; ++x) {
    const int32_t* w = taps.weight.data() + static_cast<size_t>(x) * 2 * taps.max_pairs;
    const int16_t* px = block + taps.start[x] / 2 * 6 * R;
    int32_t acc[3 * 16];   // [channel][row]
    std::fill(acc, acc + 3 * R, 1 << (kPrecisionBits - 1));
    for (int p = 0; p < taps.pairs[x]; ++p, px += 6 * R)
      for (int i = 0; i < 3 * R; ++i) acc[i] += px[2 * i] * w[2 * p] + px[2 * i + 1] * w[2 * p + 1];
    for (int i = 0; i < 3 * R; ++i) out[3 * x * R + i] = clip8(acc[i]);
  }
}

// rows[j][col] = src[col * R + j] for the R rows of a block.
inline void untranspose(const uint8_t* src, int ncols, uint8_t* const rows[]) {
  const int R = kBlockRows;
#ifdef CMA_X86
  if (R == 16) return untranspose16_avx2(src, ncols, rows);
  if (R == 8) return untranspose8_sse2(src, ncols, rows);
#endif
  for (int col = 0; col < ncols; ++col)
    for (int j = 0; j < R; ++j) rows[j][col] = src[col * R + j];
}

// One output row of the vertical pass over n contiguous bytes: out[i] = clip8(sum_t base[t * stride + i] * w[t]).
inline void vertical_row(const uint8_t* base, int64_t stride, const PairTaps& taps, int y, int n, uint8_t* out) {
  const int count = taps.count[y];
  int i = 0;
#ifdef CMA_X86
  const int32_t* hi = taps.hi.data() + static_cast<size_t>(y) * taps.max_pairs;
  const int32_t* lo = taps.lo.data() + static_cast<size_t>(y) * taps.max_pairs;
  if (kIsa == Isa::kAvx512) i = vertical_avx512(base, stride, hi, lo, count, n, out);
  if (kIsa != Isa::kPlain) i += vertical_avx2(base + i, stride, hi, lo, count, n - i, out + i);
#endif
  const int32_t* w = taps.weight.data() + static_cast<size_t>(y) * 2 * taps.max_pairs;
  for (; i < n; ++i) {
    int32_t sum = 1 << (kPrecisionBits - 1);
    for (int t = 0; t < count; ++t) sum += base[t * stride + i] * w[t];
    out[i] = clip8(sum);
  }
}

}  // namespace cma_preprocess
