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

#include <algorithm>
#include <cmath>
#include <cstdint>
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

// One source row through the horizontal taps: out[x, c] = clip8(sum_t row[start[x] + t, c] * k[x, t]).
// RGB pixels are read 4 bytes at a time (lane 3 is the next pixel's red, discarded).
__attribute__((target_clones("avx2", "sse4.1", "default")))
void horizontal_row(const uint8_t* row, const Taps& taps, int size, uint8_t* out) {
  const int ksize = taps.ksize;
  for (int x = 0; x < size; ++x) {
    const int32_t* k = taps.weight.data() + static_cast<size_t>(x) * ksize;
    const uint8_t* px = row + taps.start[x] * 3;
    int32_t acc[4] = {1 << (kPrecisionBits - 1), 1 << (kPrecisionBits - 1), 1 << (kPrecisionBits - 1), 0};
    for (int t = 0; t < ksize; ++t)
      for (int c = 0; c < 4; ++c) acc[c] += px[3 * t + c] * k[t];
    for (int c = 0; c < 3; ++c) out[3 * x + c] = clip8(acc[c]);
  }
}

// Writes one output pixel: normalised channel planes [3, size, size], or uint8 [size, size, 3] as is.
template <typename scalar_t, bool kPlanes>
struct Sink {
  scalar_t* out;
  int size;
  const scalar_t (*lut)[256];
  void put(int y, int x, const uint8_t rgb[3]) const {
    if (kPlanes) {
      const int64_t plane = static_cast<int64_t>(size) * size, i = static_cast<int64_t>(y) * size + x;
      for (int c = 0; c < 3; ++c) out[c * plane + i] = lut[c][rgb[c]];
    } else {
      for (int c = 0; c < 3; ++c) out[(static_cast<int64_t>(y) * size + x) * 3 + c] = rgb[c];
    }
  }
};

template <typename scalar_t, bool kPlanes>
void resize_crop_frame(const uint8_t* src, int w, int size, const Plan& p, const Sink<scalar_t, kPlanes>& sink,
                       std::vector<uint8_t>& tmp, std::vector<uint8_t>& padded, std::vector<int32_t>& acc) {
  // pass 1 (horizontal): source rows [row_first, row_first + row_count) -> tmp [row_count, size, 3]
  const uint8_t* rows;
  int64_t row_stride;
  if (p.horizontal) {
    tmp.resize(static_cast<size_t>(p.row_count) * size * 3);
    // a row copy padded to ksize pixels plus one byte, so 4-byte pixel reads stay inside
    padded.assign((static_cast<size_t>(std::max(w, p.htaps.ksize)) + 1) * 3, 0);
    for (int y = 0; y < p.row_count; ++y) {
      std::copy_n(src + static_cast<int64_t>(p.row_first + y) * w * 3, w * 3, padded.data());
      horizontal_row(padded.data(), p.htaps, size, tmp.data() + static_cast<size_t>(y) * size * 3);
    }
    rows = tmp.data();
    row_stride = static_cast<int64_t>(size) * 3;
  } else {   // width already right: read the crop columns straight from the source
    rows = src + static_cast<int64_t>(p.row_first) * w * 3 + p.left * 3;
    row_stride = static_cast<int64_t>(w) * 3;
  }

  // pass 2 (vertical), then normalise + HWC -> CHW on the way out
  const int n = size * 3;
  acc.resize(n);
  for (int y = 0; y < size; ++y) {
    if (p.vertical) {
      std::fill(acc.begin(), acc.end(), 1 << (kPrecisionBits - 1));
      const int32_t* k = p.vtaps.weight.data() + static_cast<size_t>(y) * p.vtaps.ksize;
      const uint8_t* base = rows + (p.vtaps.start[y] - p.row_first) * row_stride;
      for (int t = 0; t < p.vtaps.count[y]; ++t) {
        const uint8_t* in = base + t * row_stride;
        const int32_t kt = k[t];
        for (int i = 0; i < n; ++i) acc[i] += in[i] * kt;   // contiguous: the compiler vectorises this
      }
      for (int x = 0; x < size; ++x) {
        const uint8_t rgb[3] = {clip8(acc[3 * x]), clip8(acc[3 * x + 1]), clip8(acc[3 * x + 2])};
        sink.put(y, x, rgb);
      }
    } else {
      const uint8_t* line = rows + static_cast<int64_t>(y) * row_stride;
      for (int x = 0; x < size; ++x) sink.put(y, x, line + 3 * x);
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
      std::vector<uint8_t> tmp, padded;
      std::vector<int32_t> acc;
      for (int64_t f = begin; f < end; ++f)
        resize_crop_frame(src + f * h * w * 3, w, s, plan, sink_of_frame(f), tmp, padded, acc);
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
