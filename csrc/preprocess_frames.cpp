// uint8 video frames [T, H, W, 3] -> normalised CLIP input [T, 3, size, size] in one pass per frame
// (or, with dtype uint8, the resized and cropped frames [T, size, size, 3] that the frame cache keeps).
//
// Reproduces the CLIP4Clip pipeline byte for byte: torchvision Resize(size) on a PIL image
// (shorter side to `size`, bicubic with antialias), CenterCrop(size), ToTensor, Normalize.
// PIL resizes in two separable passes, horizontal then vertical, with fixed-point filter weights
// (22 fractional bits) and a clamp-and-round to uint8 after each pass (Pillow's Resample.c); the
// same arithmetic here gives the same bytes. Only the pixels inside the crop window are computed.
// Frames run in parallel (at::parallel_for); called through torch.ops, the GIL is released.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int kPrecisionBits = 32 - 8 - 2;

double bicubic(double x) {   // Keys cubic, a = -0.5, support 2 (Pillow's bicubic_filter)
  constexpr double a = -0.5;
  x = std::fabs(x);
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0;
  if (x < 2.0) return (((x - 5.0) * x + 8.0) * x - 4.0) * a;
  return 0.0;
}

inline uint8_t clip8(int32_t v) {
  if (v >= (1 << kPrecisionBits << 8)) return 255;
  if (v <= 0) return 0;
  return static_cast<uint8_t>(v >> kPrecisionBits);
}

// Pillow's precompute_coeffs + normalize_coeffs_8bpc for output positions [first, first + count)
// of a resize in_size -> out_size: per output position, the first input index, the tap count and
// ksize fixed-point weights.
struct Taps {
  int ksize = 0;
  std::vector<int> start, count;
  std::vector<int32_t> weight;   // [count_out, ksize]
};

Taps make_taps(int in_size, int out_size, int first, int count_out) {
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

// The same taps with a fixed count of ksize each (zero weights pad), starts moved left where
// needed so a tap never reads past max(in_size, ksize): loops of fixed length vectorise.
Taps fixed_length(Taps t, int in_size) {
  const int limit = std::max(in_size, t.ksize);
  for (size_t i = 0; i < t.start.size(); ++i) {
    const int shift = std::max(0, t.start[i] + t.ksize - limit);
    int32_t* w = t.weight.data() + i * t.ksize;
    std::copy_backward(w, w + t.count[i], w + t.count[i] + shift);
    std::fill(w, w + shift, 0);
    t.start[i] -= shift;
    t.count[i] = t.ksize;
  }
  return t;
}

// torchvision's Resize(size) output for a PIL image: shorter side -> size, longer side truncated.
std::pair<int, int> resized_hw(int h, int w, int size) {
  const int shorter = std::min(h, w), longer = std::max(h, w);
  const int new_long = static_cast<int>(static_cast<double>(size) * longer / shorter);
  return w <= h ? std::make_pair(new_long, size) : std::make_pair(size, new_long);
}

struct Plan {   // everything that depends only on the frame geometry, shared by all frames
  int rh, rw;                 // resized size
  bool horizontal, vertical;  // which passes PIL runs
  int row_first, row_count;   // source rows the vertical pass reads
  Taps htaps, vtaps;          // for the crop window's columns / rows
  int top, left;
};

Plan make_plan(int h, int w, int size) {
  Plan p;
  std::tie(p.rh, p.rw) = resized_hw(h, w, size);
  p.horizontal = p.rw != w;
  p.vertical = p.rh != h;
  // CenterCrop: int(round((dim - size) / 2.0)), Python rounds half to even like nearbyint
  p.top = static_cast<int>(std::nearbyint((p.rh - size) / 2.0));
  p.left = static_cast<int>(std::nearbyint((p.rw - size) / 2.0));
  if (p.horizontal) p.htaps = fixed_length(make_taps(w, p.rw, p.left, size), w);
  if (p.vertical) {
    p.vtaps = make_taps(h, p.rh, p.top, size);
    p.row_first = p.vtaps.start.front();
    p.row_count = p.vtaps.start.back() + p.vtaps.count.back() - p.row_first;
  } else {
    p.row_first = p.top;
    p.row_count = size;
  }
  return p;
}

// 8 rows side by side: dst[col * 8 + j] = rows[j][col] for col < ncols, so that the horizontal
// taps below run over 8 rows at once in contiguous lanes. SSE2 (x86-64 baseline) 8x16-byte steps.
void transpose8(const uint8_t* const rows[8], int ncols, uint8_t* dst) {
  int col = 0;
#if defined(__SSE2__)
  for (; col + 16 <= ncols; col += 16) {
    __m128i r[8], a[8], b[8];
    for (int j = 0; j < 8; ++j) r[j] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[j] + col));
    for (int j = 0; j < 4; ++j) {   // byte pairs (rows 2j, 2j+1): a[2j] columns 0-7, a[2j+1] columns 8-15
      a[2 * j] = _mm_unpacklo_epi8(r[2 * j], r[2 * j + 1]);
      a[2 * j + 1] = _mm_unpackhi_epi8(r[2 * j], r[2 * j + 1]);
    }
    for (int h = 0; h < 2; ++h) {   // rows 0-3 (h = 0) and 4-7 (h = 1), 4 columns per register
      b[4 * h + 0] = _mm_unpacklo_epi16(a[4 * h + 0], a[4 * h + 2]);
      b[4 * h + 1] = _mm_unpackhi_epi16(a[4 * h + 0], a[4 * h + 2]);
      b[4 * h + 2] = _mm_unpacklo_epi16(a[4 * h + 1], a[4 * h + 3]);
      b[4 * h + 3] = _mm_unpackhi_epi16(a[4 * h + 1], a[4 * h + 3]);
    }
    for (int q = 0; q < 4; ++q) {   // two columns of 8 rows per register
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + (col + 4 * q) * 8), _mm_unpacklo_epi32(b[q], b[4 + q]));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + (col + 4 * q + 2) * 8), _mm_unpackhi_epi32(b[q], b[4 + q]));
    }
  }
#endif
  for (; col < ncols; ++col)
    for (int j = 0; j < 8; ++j) dst[col * 8 + j] = rows[j][col];
}

// The two tap loops, 8 int32 lanes at a time: AVX2 where the CPU has it (checked at run time), plain
// loops elsewhere. Both compute the same integer sums, so the bytes do not depend on the path.
#if defined(__x86_64__) || defined(__i386__)
#define CMA_X86 1
__attribute__((target("avx2"))) inline __m256i widen8(const uint8_t* p) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}

__attribute__((target("avx2"))) inline void store_clip8(__m256i v, uint8_t* out, int64_t stride) {
  alignas(32) int32_t lanes[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), v);
  for (int j = 0; j < 8; ++j) out[j * stride] = clip8(lanes[j]);
}

__attribute__((target("avx2")))
void horizontal_block8_avx2(const uint8_t* block, const Taps& taps, int size, uint8_t* out, int64_t out_stride) {
  const __m256i half = _mm256_set1_epi32(1 << (kPrecisionBits - 1));
  for (int x = 0; x < size; ++x) {
    const int32_t* k = taps.weight.data() + static_cast<size_t>(x) * taps.ksize;
    const uint8_t* px = block + static_cast<size_t>(taps.start[x]) * 24;
    __m256i r = half, g = half, b = half;   // lanes are the 8 rows
    for (int t = 0; t < taps.ksize; ++t, px += 24) {
      const __m256i kt = _mm256_set1_epi32(k[t]);
      r = _mm256_add_epi32(r, _mm256_mullo_epi32(widen8(px), kt));
      g = _mm256_add_epi32(g, _mm256_mullo_epi32(widen8(px + 8), kt));
      b = _mm256_add_epi32(b, _mm256_mullo_epi32(widen8(px + 16), kt));
    }
    store_clip8(r, out + 3 * x, out_stride);
    store_clip8(g, out + 3 * x + 1, out_stride);
    store_clip8(b, out + 3 * x + 2, out_stride);
  }
}

__attribute__((target("avx2")))
int vertical_row_avx2(const uint8_t* base, int64_t stride, const int32_t* k, int count, int n, uint8_t* out) {
  const int n8 = n / 8 * 8;
  for (int i = 0; i < n8; i += 8) {
    __m256i sum = _mm256_set1_epi32(1 << (kPrecisionBits - 1));
    for (int t = 0; t < count; ++t)
      sum = _mm256_add_epi32(sum, _mm256_mullo_epi32(widen8(base + t * stride + i), _mm256_set1_epi32(k[t])));
    store_clip8(sum, out + i, 1);
  }
  return n8;
}

const bool kHaveAvx2 = __builtin_cpu_supports("avx2");
#endif

// Horizontal taps over 8 transposed rows: out[j][3x + c] = clip8(sum_t block[(start[x] + t) * 3 + c][j] * k[x][t]).
void horizontal_block8(const uint8_t* block, const Taps& taps, int size, uint8_t* out, int64_t out_stride) {
#ifdef CMA_X86
  if (kHaveAvx2) return horizontal_block8_avx2(block, taps, size, out, out_stride);
#endif
  for (int x = 0; x < size; ++x) {
    const int32_t* k = taps.weight.data() + static_cast<size_t>(x) * taps.ksize;
    const uint8_t* px = block + static_cast<size_t>(taps.start[x]) * 24;
    int32_t acc[24];   // [channel][row]
    std::fill(acc, acc + 24, 1 << (kPrecisionBits - 1));
    for (int t = 0; t < taps.ksize; ++t)
      for (int i = 0; i < 24; ++i) acc[i] += px[24 * t + i] * k[t];
    for (int c = 0; c < 3; ++c)
      for (int j = 0; j < 8; ++j) out[j * out_stride + 3 * x + c] = clip8(acc[c * 8 + j]);
  }
}

// Vertical taps for one output row over n contiguous bytes: out[i] = clip8(sum_t base[t * stride + i] * k[t]).
void vertical_row(const uint8_t* base, int64_t stride, const int32_t* k, int count, int n, uint8_t* out) {
  int i = 0;
#ifdef CMA_X86
  if (kHaveAvx2) i = vertical_row_avx2(base, stride, k, count, n, out);
#endif
  for (; i < n; ++i) {
    int32_t sum = 1 << (kPrecisionBits - 1);
    for (int t = 0; t < count; ++t) sum += base[t * stride + i] * k[t];
    out[i] = clip8(sum);
  }
}

// Writes output rows: normalised channel planes [3, size, size], or uint8 [size, size, 3] as is.
template <typename scalar_t, bool kPlanes>
struct Sink {
  scalar_t* out;
  int size;
  const scalar_t (*lut)[256];
  void put_row(int y, const uint8_t* rgb) const {
    if (kPlanes) {
      for (int c = 0; c < 3; ++c) {
        scalar_t* o = out + (static_cast<int64_t>(c) * size + y) * size;
        const scalar_t* table = lut[c];
        for (int x = 0; x < size; ++x) o[x] = table[rgb[3 * x + c]];
      }
    } else {
      std::copy_n(rgb, size * 3, out + static_cast<int64_t>(y) * size * 3);
    }
  }
};

struct Scratch {   // per-thread buffers, reused across frames
  std::vector<uint8_t> tmp, block, line;
};

template <typename scalar_t, bool kPlanes>
void resize_crop_frame(const uint8_t* src, int w, int size, const Plan& p, const Sink<scalar_t, kPlanes>& sink,
                       Scratch& s) {
  // pass 1 (horizontal), 8 source rows at a time: rows [row_first, row_first + row_count) -> tmp
  const uint8_t* rows;
  int64_t row_stride;
  if (p.horizontal) {
    row_stride = static_cast<int64_t>(size) * 3;
    s.tmp.resize(static_cast<size_t>((p.row_count + 7) / 8 * 8) * row_stride);
    s.block.assign(static_cast<size_t>(std::max(w, p.htaps.ksize)) * 3 * 8, 0);
    for (int y0 = 0; y0 < p.row_count; y0 += 8) {
      const uint8_t* block_rows[8];
      for (int j = 0; j < 8; ++j)   // past the last row: repeat it (those outputs are never read)
        block_rows[j] = src + static_cast<int64_t>(p.row_first + std::min(y0 + j, p.row_count - 1)) * w * 3;
      transpose8(block_rows, w * 3, s.block.data());
      horizontal_block8(s.block.data(), p.htaps, size, s.tmp.data() + y0 * row_stride, row_stride);
    }
    rows = s.tmp.data();
  } else {   // width already right: read the crop columns straight from the source
    rows = src + static_cast<int64_t>(p.row_first) * w * 3 + p.left * 3;
    row_stride = static_cast<int64_t>(w) * 3;
  }

  // pass 2 (vertical), then normalise + HWC -> CHW on the way out
  const int n = size * 3;
  s.line.resize(n);
  for (int y = 0; y < size; ++y) {
    if (p.vertical) {
      const int32_t* k = p.vtaps.weight.data() + static_cast<size_t>(y) * p.vtaps.ksize;
      vertical_row(rows + (p.vtaps.start[y] - p.row_first) * row_stride, row_stride, k, p.vtaps.count[y], n,
                   s.line.data());
      sink.put_row(y, s.line.data());
    } else {
      sink.put_row(y, rows + static_cast<int64_t>(y) * row_stride);
    }
  }
}

at::Tensor preprocess_frames(const at::Tensor& frames, int64_t size, at::ArrayRef<double> mean,
                             at::ArrayRef<double> std, at::ScalarType dtype) {
  TORCH_CHECK(frames.device().is_cpu(), "preprocess_frames: frames must be a CPU tensor");
  TORCH_CHECK(frames.scalar_type() == at::kByte, "preprocess_frames: frames must be uint8, got ", frames.scalar_type());
  TORCH_CHECK(frames.dim() == 4 && frames.size(3) == 3, "preprocess_frames: frames must be [T, H, W, 3], got ",
              frames.sizes());
  TORCH_CHECK(frames.size(0) > 0 && frames.size(1) > 0 && frames.size(2) > 0,
              "preprocess_frames: empty input ", frames.sizes());
  TORCH_CHECK(frames.is_contiguous(), "preprocess_frames: frames must be contiguous");
  TORCH_CHECK(size > 0 && size <= 4096, "preprocess_frames: size must be in [1, 4096], got ", size);
  TORCH_CHECK(mean.size() == 3 && std.size() == 3, "preprocess_frames: mean and std need 3 values");
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kByte,
              "preprocess_frames: dtype must be float32, float16, bfloat16 or uint8");
  const int64_t T = frames.size(0);
  const int h = static_cast<int>(frames.size(1)), w = static_cast<int>(frames.size(2)), s = static_cast<int>(size);
  const Plan plan = make_plan(h, w, s);
  const uint8_t* src = frames.data_ptr<uint8_t>();

  auto run = [&](auto sink_of_frame) {
    at::parallel_for(0, T, 1, [&](int64_t begin, int64_t end) {
      Scratch scratch;
      for (int64_t f = begin; f < end; ++f) resize_crop_frame(src + f * h * w * 3, w, s, plan, sink_of_frame(f), scratch);
    });
  };
  if (dtype == at::kByte) {   // resized and cropped uint8 [T, size, size, 3]: what the frame cache stores
    auto out = at::empty({T, size, size, 3}, frames.options());
    uint8_t* dst = out.data_ptr<uint8_t>();
    run([&](int64_t f) { return Sink<uint8_t, false>{dst + f * size * size * 3, s, nullptr}; });
    return out;
  }
  auto out = at::empty({T, 3, size, size}, frames.options().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "preprocess_frames", [&] {
    scalar_t lut[3][256];   // ToTensor then Normalize, in float32 exactly as torch computes them
    for (int c = 0; c < 3; ++c) {
      const float m = static_cast<float>(mean[c]), sd = static_cast<float>(std[c]);
      for (int v = 0; v < 256; ++v) lut[c][v] = static_cast<scalar_t>((static_cast<float>(v) / 255.0f - m) / sd);
    }
    scalar_t* dst = out.data_ptr<scalar_t>();
    run([&](int64_t f) { return Sink<scalar_t, true>{dst + f * 3 * size * size, s, lut}; });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(cma, m) {
  m.def("preprocess_frames(Tensor frames, int size, float[] mean, float[] std, ScalarType dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(cma, CPU, m) { m.impl("preprocess_frames", &preprocess_frames); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {}
