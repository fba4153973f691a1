// Pillow's fixed-point resampling filter (Resample.c, 8 bits per channel), and the same taps rearranged for
// the SIMD loops in resample_simd.h. Everything here depends only on the frame geometry and runs once per call.
#pragma once
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace cma_preprocess {

constexpr int kPrecisionBits = 32 - 8 - 2;   // Pillow's PRECISION_BITS: 22 fractional bits per weight
constexpr int kLoBits = 11;                   // weights split as hi * 2^11 + lo, see PairTaps

inline double bicubic(double x) {   // Keys cubic, a = -0.5, support 2 (Pillow's bicubic_filter)
  constexpr double a = -0.5;
  x = std::fabs(x);
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0;
  if (x < 2.0) return (((x - 5.0) * x + 8.0) * x - 4.0) * a;
  return 0.0;
}

inline uint8_t clip8(int32_t v) {   // v already holds the rounding half
  if (v >= (1 << kPrecisionBits << 8)) return 255;
  if (v <= 0) return 0;
  return static_cast<uint8_t>(v >> kPrecisionBits);
}

// Pillow's precompute_coeffs + normalize_coeffs_8bpc for output positions [first, first + count_out) of a
// resize in_size -> out_size: per output position, the first input index, the tap count and ksize weights.
struct Taps {
  int ksize = 0;
  std::vector<int> start, count;
  std::vector<int32_t> weight;   // [count_out, ksize]
};

inline Taps make_taps(int in_size, int out_size, int first, int count_out) {
  const double scale = static_cast<double>(in_size) / out_size;
  const double filterscale = std::max(scale, 1.0);
  const double support = 2.0 * filterscale;
  Taps t;
  t.ksize = static_cast<int>(std::ceil(support)) * 2 + 1;
  t.start.resize(count_out);
  t.count.resize(count_out);
  t.weight.assign(static_cast<size_t>(count_out) * t.ksize, 0);
  std::vector<double> w(t.ksize);
  for (int i = 0; i < count_out; ++i) {
    const double center = (first + i + 0.5) * scale;
    int xmin = static_cast<int>(center - support + 0.5);
    int xmax = static_cast<int>(center + support + 0.5);
    xmin = std::max(xmin, 0);
    xmax = std::min(xmax, in_size) - xmin;
    double total = 0.0;
    for (int x = 0; x < xmax; ++x) {
      w[x] = bicubic((x + xmin - center + 0.5) / filterscale);
      total += w[x];
    }
    for (int x = 0; x < xmax; ++x) {
      const double k = total != 0.0 ? w[x] / total : w[x];
      t.weight[static_cast<size_t>(i) * t.ksize + x] =
          static_cast<int32_t>(k < 0 ? -0.5 + k * (1 << kPrecisionBits) : 0.5 + k * (1 << kPrecisionBits));
    }
    t.start[i] = xmin;
    t.count[i] = xmax;
  }
  return t;
}

// The taps as int16 pairs for the multiply-add instructions: output i reads inputs [start[i], start[i] +
// 2 * pairs[i]), and weight pair p covers inputs start + 2p and start + 2p + 1 (zero weights pad the ends).
// A weight w is split exactly into w = hi * 2^11 + lo with lo in [0, 2^11): both halves fit int16, every
// product sum stays an exact int32, and hi_sum * 2^11 + lo_sum is Pillow's sum to the bit.
struct PairTaps {
  int max_pairs = 0;
  std::vector<int> start, count, pairs;   // count: taps from start that may be nonzero (<= 2 * pairs)
  std::vector<int32_t> weight;            // [count_out, 2 * max_pairs] whole weights, for the plain loops
  std::vector<int32_t> hi, lo;            // [count_out, max_pairs] int16 halves of taps (2p, 2p + 1) packed
};

inline int32_t pack16(int32_t first, int32_t second) {   // first in the low 16 bits: it meets tap 2p
  const uint32_t low = static_cast<uint16_t>(first), high = static_cast<uint16_t>(second);
  return static_cast<int32_t>(low | high << 16);
}

// even_start: move each start down to an even input (the horizontal pass stores pixels in pairs from even columns).
inline PairTaps make_pair_taps(const Taps& t, bool even_start) {
  PairTaps p;
  p.max_pairs = (t.ksize + 2) / 2;
  const size_t n = t.start.size(), stride = 2 * p.max_pairs;
  p.start.resize(n);
  p.count.resize(n);
  p.pairs.resize(n);
  p.weight.assign(n * stride, 0);
  p.hi.assign(n * p.max_pairs, 0);
  p.lo.assign(n * p.max_pairs, 0);
  for (size_t i = 0; i < n; ++i) {
    const int shift = even_start ? t.start[i] & 1 : 0;
    p.start[i] = t.start[i] - shift;
    p.count[i] = shift + t.count[i];
    p.pairs[i] = (p.count[i] + 1) / 2;
    int32_t* w = p.weight.data() + i * stride;
    std::copy_n(t.weight.data() + i * t.ksize, t.count[i], w + shift);
    for (int k = 0; k < p.max_pairs; ++k) {
      const int32_t first = w[2 * k], second = w[2 * k + 1];
      TORCH_INTERNAL_ASSERT(std::abs(first) < (1 << 26) && std::abs(second) < (1 << 26), "filter weight too large");
      p.hi[i * p.max_pairs + k] = pack16(first >> kLoBits, second >> kLoBits);
      p.lo[i * p.max_pairs + k] = pack16(first & ((1 << kLoBits) - 1), second & ((1 << kLoBits) - 1));
    }
  }
  return p;
}

}  // namespace cma_preprocess
