// uint8 video frames [T, H, W, 3] -> normalised CLIP input [T, 3, size, size] in one pass per frame
// (or, with dtype uint8, the resized and cropped frames [T, size, size, 3] that the frame cache keeps).
//
// Reproduces the CLIP4Clip pipeline byte for byte: torchvision Resize(size) on a PIL image (shorter side to
// `size`, bicubic with antialias), CenterCrop(size), ToTensor, Normalize. PIL resizes in two separable
// passes, horizontal then vertical, with fixed-point filter weights (22 fractional bits) and a
// clamp-and-round to uint8 after each pass (Pillow's Resample.c); the same integer arithmetic here gives
// the same bytes (pil_taps.h), computed with SIMD multiply-adds (resample_simd.h). Only the pixels inside
// the crop window are computed. Frames run in parallel (at::parallel_for); through torch.ops the GIL is
// released.
#if defined(__GNUC__) && !defined(__clang__)
// GCC 12 warns inside its own AVX-512 headers (_mm512_undefined_epi32, GCC bug 105593), not about this code.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "pil_taps.h"
#include "resample_simd.h"

namespace cma_preprocess {
namespace {

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
  int block_pairs;            // pixel pairs per horizontal block: covers every tap
  PairTaps htaps, vtaps;      // for the crop window's columns / rows
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
  p.block_pairs = 0;
  if (p.horizontal) {
    p.htaps = make_pair_taps(make_taps(w, p.rw, p.left, size), true);
    for (int x = 0; x < size; ++x) p.block_pairs = std::max(p.block_pairs, p.htaps.start[x] / 2 + p.htaps.pairs[x]);
  }
  if (p.vertical) {
    const Taps v = make_taps(h, p.rh, p.top, size);
    p.vtaps = make_pair_taps(v, false);
    p.row_first = v.start.front();
    p.row_count = v.start.back() + v.count.back() - p.row_first;
  } else {
    p.row_first = p.top;
    p.row_count = size;
  }
  return p;
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
  std::vector<uint8_t> tmp, block_out, line;
  std::vector<int16_t> block;
};

template <typename scalar_t, bool kPlanes>
void resize_crop_frame(const uint8_t* src, int w, int size, const Plan& p, const Sink<scalar_t, kPlanes>& sink,
                       Scratch& s) {
  // pass 1 (horizontal), R source rows at a time: rows [row_first, row_first + row_count) -> tmp
  const uint8_t* rows;
  int64_t row_stride;
  const int n = size * 3, R = kBlockRows;
  if (p.horizontal) {
    row_stride = n;
    s.tmp.resize(static_cast<size_t>((p.row_count + R - 1) / R * R) * row_stride);
    s.block.resize(static_cast<size_t>(p.block_pairs) * 6 * R);
    s.block_out.resize(static_cast<size_t>(n) * R);
    for (int y0 = 0; y0 < p.row_count; y0 += R) {
      const uint8_t* in_rows[16];
      uint8_t* out_rows[16];
      for (int j = 0; j < R; ++j) {   // past the last row: repeat it (those outputs are never read)
        in_rows[j] = src + static_cast<int64_t>(p.row_first + std::min(y0 + j, p.row_count - 1)) * w * 3;
        out_rows[j] = s.tmp.data() + (y0 + j) * row_stride;
      }
      pair_rows(in_rows, w * 3, p.block_pairs, s.block.data());
      horizontal(s.block.data(), p.htaps, size, s.block_out.data());
      untranspose(s.block_out.data(), n, out_rows);
    }
    rows = s.tmp.data();
  } else {   // width already right: read the crop columns straight from the source
    rows = src + static_cast<int64_t>(p.row_first) * w * 3 + p.left * 3;
    row_stride = static_cast<int64_t>(w) * 3;
  }

  // pass 2 (vertical), then normalise + HWC -> CHW on the way out
  s.line.resize(n);
  for (int y = 0; y < size; ++y) {
    if (p.vertical) {
      vertical_row(rows + (p.vtaps.start[y] - p.row_first) * row_stride, row_stride, p.vtaps, y, n, s.line.data());
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
      for (int64_t f = begin; f < end; ++f)
        resize_crop_frame(src + f * h * w * 3, w, s, plan, sink_of_frame(f), scratch);
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

std::string preprocess_simd() { return isa_name(); }

}  // namespace
}  // namespace cma_preprocess

TORCH_LIBRARY_FRAGMENT(cma, m) {
  m.def("preprocess_frames(Tensor frames, int size, float[] mean, float[] std, ScalarType dtype) -> Tensor");
  m.def("preprocess_simd() -> str", &cma_preprocess::preprocess_simd);
}

TORCH_LIBRARY_IMPL(cma, CPU, m) { m.impl("preprocess_frames", &cma_preprocess::preprocess_frames); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {}
