"""cma_kernels.preprocess: the C++ frame op against the CLIP4Clip PIL pipeline and torchvision."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from cma_kernels.preprocess import (CLIP_MEAN, CLIP_STD, has_cpp_extension, normalize_frames, preprocess_frames,
                                    preprocess_frames_torchvision, simd_level)

ONE_STEP = 1 / 255 / min(CLIP_STD)   # one uint8 step in normalised units (~0.0146)
SIZES = [(240, 320), (360, 640), (720, 1280), (1080, 1920), (640, 360), (224, 224), (224, 500),
         (100, 150), (225, 301), (17, 9), (3, 500)]
requires_cpp = pytest.mark.skipif(not has_cpp_extension(), reason="the C++ extension is not compiled")

CLIP4CLIP = T.Compose([T.Resize(224, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224),
                       lambda image: image.convert("RGB"), T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])


def make_frames(h, w, content, seed=0, n=2):
    """Fresh frames: uniform noise, hard edges (stripes, boxes) or smooth gradients."""
    rng = np.random.default_rng(seed)
    if content == "noise":
        return rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    if content == "edges":
        a = np.zeros((h, w, 3), np.uint8)
        a[::7] = 255
        a[:, ::5, 1] = 255
        a[h // 3: h // 2 + 1, w // 4: w // 2 + 1, 2] = 200
        return np.stack([np.roll(a, int(rng.integers(0, 9)), axis=1) for _ in range(n)])
    a = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx + yy) % 256], -1).astype(np.uint8)
    return np.stack([a, 255 - a][:n])


def pil_reference(frames):
    return torch.stack([CLIP4CLIP(Image.fromarray(f)) for f in frames])


@requires_cpp
@pytest.mark.parametrize("content", ["noise", "edges", "smooth"])
@pytest.mark.parametrize("h,w", SIZES)
def test_cpp_op_matches_pil_pipeline(h, w, content):
    frames = make_frames(h, w, content, seed=h * w)
    out = preprocess_frames(torch.from_numpy(frames))
    ref = pil_reference(frames)
    assert out.shape == (2, 3, 224, 224) and out.dtype == torch.float32
    assert (out - ref).abs().max() <= ONE_STEP + 1e-6   # the bar; in practice the bytes are PIL's: 0.0
    assert torch.equal(out, ref)


@requires_cpp
@pytest.mark.parametrize("size", [32, 224, 336])
def test_other_sizes_and_stats(size):
    frames = make_frames(180, 260, "noise", seed=size)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    pipeline = T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size),
                          T.ToTensor(), T.Normalize(mean, std)])
    ref = torch.stack([pipeline(Image.fromarray(f)) for f in frames])
    assert torch.equal(preprocess_frames(torch.from_numpy(frames), size=size, mean=mean, std=std), ref)


@requires_cpp
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_outputs_are_the_rounded_float32_result(dtype):
    frames = torch.from_numpy(make_frames(240, 320, "noise"))
    assert torch.equal(preprocess_frames(frames, dtype=dtype), preprocess_frames(frames).to(dtype))


@requires_cpp
def test_threads_give_identical_results():
    frames = torch.from_numpy(make_frames(120, 200, "noise", n=7))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = preprocess_frames(frames)
        torch.set_num_threads(2)
        assert torch.equal(preprocess_frames(frames), one)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("h,w", [(240, 320), (720, 1280), (100, 150)])
def test_torchvision_fallback_within_two_steps_of_pil(h, w):
    frames = make_frames(h, w, "edges", seed=1)
    out = preprocess_frames_torchvision(torch.from_numpy(frames))
    assert (out - pil_reference(frames)).abs().max() <= 2 * ONE_STEP + 1e-6


@pytest.mark.parametrize("frames,kwargs,message", [
    (torch.zeros(2, 8, 8, 3), {}, "must be uint8"),
    (torch.zeros(8, 8, 3, dtype=torch.uint8), {}, r"\[T, H, W, 3\]"),
    (torch.zeros(2, 8, 8, 4, dtype=torch.uint8), {}, r"\[T, H, W, 3\]"),
    (torch.zeros(0, 8, 8, 3, dtype=torch.uint8), {}, "at least one non-empty frame"),
    (torch.zeros(2, 0, 8, 3, dtype=torch.uint8), {}, "at least one non-empty frame"),
    (torch.zeros(2, 8, 8, 3, dtype=torch.uint8).transpose(1, 2), {}, "contiguous"),
    (torch.zeros(2, 8, 8, 3, dtype=torch.uint8), {"size": 0}, "size must be"),
    (torch.zeros(2, 8, 8, 3, dtype=torch.uint8), {"dtype": torch.int32}, "dtype must be"),
    (torch.zeros(2, 8, 8, 3, dtype=torch.uint8), {"std": (1, 0, 1)}, "std positive"),
    (np.zeros((2, 8, 8, 3), np.uint8), {}, "must be a torch.Tensor"),
])
def test_bad_input_raises(frames, kwargs, message):
    with pytest.raises(ValueError, match=message):
        preprocess_frames(frames, **kwargs)


@requires_cpp
def test_the_compiled_op_checks_input_itself():
    """Called directly (bypassing the Python checks), bad input is an error, not a crash."""
    with pytest.raises(RuntimeError, match="uint8"):
        torch.ops.cma.preprocess_frames(torch.zeros(1, 4, 4, 3), 224, [0.0] * 3, [1.0] * 3, torch.float32)
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.cma.preprocess_frames(torch.zeros(1, 4, 4, 3, dtype=torch.uint8).transpose(1, 2), 8,
                                        [0.0] * 3, [1.0] * 3, torch.float32)


@requires_cpp
@pytest.mark.parametrize("h,w", [(240, 320), (224, 224), (100, 150)])
def test_uint8_mode_is_the_resized_crop_and_normalises_to_the_same_result(h, w):
    frames = torch.from_numpy(make_frames(h, w, "edges"))
    crops = preprocess_frames(frames, dtype=torch.uint8)
    pil = [T.CenterCrop(224)(T.Resize(224, interpolation=T.InterpolationMode.BICUBIC)(Image.fromarray(f.numpy())))
           for f in frames]
    assert torch.equal(crops, torch.from_numpy(np.stack([np.asarray(p) for p in pil])))
    assert torch.equal(preprocess_frames(crops), preprocess_frames(frames))   # what reading the cache does


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_normalize_frames_gives_the_bytes_of_preprocess_frames(dtype):
    """uint8 crops normalised by normalize_frames (what the GPU does to raw loader batches) are
    exactly preprocess_frames' output, batch dimensions and all; non-uint8 input is refused."""
    frames = torch.from_numpy(make_frames(120, 90, "noise"))
    crops = preprocess_frames(frames, size=64, dtype=torch.uint8)          # [T, 64, 64, 3]
    want = preprocess_frames(frames, size=64, dtype=dtype)                 # [T, 3, 64, 64]
    assert torch.equal(normalize_frames(crops, dtype=dtype), want)
    assert torch.equal(normalize_frames(crops.unsqueeze(0), dtype=dtype)[0], want)   # [B, T, S, S, 3]
    with pytest.raises(ValueError, match="uint8"):
        normalize_frames(want)


def test_the_documented_names_are_exported():
    """README and the issue name cma_kernels.preprocess_frames / has_cpp_extension."""
    import cma_kernels
    assert cma_kernels.preprocess_frames is preprocess_frames
    assert cma_kernels.has_cpp_extension() == has_cpp_extension()
    assert cma_kernels.simd_level() == simd_level()


SIMD_SCRIPT = """
import sys, numpy as np, torch
from cma_kernels.preprocess import preprocess_frames, simd_level
out = {"level": simd_level()}
for h, w in [(240, 320), (720, 1280), (640, 360), (225, 301), (17, 9), (224, 500), (1080, 1920)]:
    frames = torch.from_numpy(np.random.default_rng(h * w).integers(0, 256, (3, h, w, 3), dtype=np.uint8))
    out[(h, w)] = preprocess_frames(frames, dtype=torch.uint8)
torch.save(out, sys.argv[1])
"""


@requires_cpp
@pytest.mark.parametrize("cap", ["avx2", "none"])
def test_every_simd_path_gives_the_same_bytes(cap, tmp_path):
    """The AVX2 and plain C++ loops (forced with CMA_SIMD in a fresh process) give this process's bytes,
    which the tests above check against PIL, on frames of many shapes."""
    path = tmp_path / "out.pt"
    subprocess.run([sys.executable, "-c", SIMD_SCRIPT, str(path)], check=True, timeout=300,
                   env={**os.environ, "CMA_SIMD": cap})
    theirs = torch.load(path)
    levels = ["none", "avx2", "avx512"]
    assert levels.index(theirs.pop("level")) <= levels.index(cap)
    assert simd_level() in levels
    for (h, w), crops in theirs.items():
        frames = torch.from_numpy(np.random.default_rng(h * w).integers(0, 256, (3, h, w, 3), dtype=np.uint8))
        assert torch.equal(crops, preprocess_frames(frames, dtype=torch.uint8)), (h, w)
