"""Frame preprocessing: uint8 frames [T, H, W, 3] -> normalised CLIP input [T, 3, size, size].

The C++ op (csrc/preprocess_frames.cpp) reproduces the CLIP4Clip PIL pipeline byte for byte
(Resize(size, BICUBIC) with PIL's antialias, CenterCrop, ToTensor, Normalize) in one pass per
frame, threads over frames and releases the GIL. Its resampling loops use AVX-512 VNNI or AVX2
multiply-adds where the CPU has them (simd_level() says which; the environment variable
CMA_SIMD=avx2 or CMA_SIMD=none, set before import, caps it); every path gives the same bytes.

Without the compiled extension a torchvision v2 path runs instead (warned once): its uint8
bicubic rounds its two passes differently from PIL, so it can differ by up to two uint8 steps
(~0.03 in normalised units) on sharp content.
"""
import functools
import warnings

import torch

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.uint8)

try:
    from . import _C  # noqa: F401  (registers torch.ops.cma.preprocess_frames)
    _CPP_ERROR = None
except ImportError as e:   # not compiled, or compiled against another torch
    _CPP_ERROR = e
_warned = False


def has_cpp_extension() -> bool:
    """True when the compiled frame op is available."""
    return _CPP_ERROR is None


def simd_level():
    """The instruction set the C++ op's loops use: "avx512", "avx2" or "none"; None without the extension."""
    return torch.ops.cma.preprocess_simd() if has_cpp_extension() else None


def check_frames(frames, size=224, mean=CLIP_MEAN, std=CLIP_STD, dtype=torch.float32):
    """Raise ValueError naming what is wrong with a preprocess_frames call."""
    if not isinstance(frames, torch.Tensor):
        raise ValueError(f"frames must be a torch.Tensor, got {type(frames).__name__}")
    if frames.dtype != torch.uint8:
        raise ValueError(f"frames must be uint8 (as decord returns them), got {frames.dtype}")
    if frames.dim() != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must have shape [T, H, W, 3], got {list(frames.shape)}")
    if frames.shape[0] == 0 or frames.shape[1] == 0 or frames.shape[2] == 0:
        raise ValueError(f"frames must hold at least one non-empty frame, got shape {list(frames.shape)}")
    if frames.device.type != "cpu":
        raise ValueError(f"frames must be on the CPU, got {frames.device}")
    if not frames.is_contiguous():
        raise ValueError("frames must be contiguous; call .contiguous() first")
    if not isinstance(size, int) or not 1 <= size <= 4096:
        raise ValueError(f"size must be an integer in [1, 4096], got {size!r}")
    if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
        raise ValueError(f"mean and std need 3 values each, std positive; got mean={mean}, std={std}")
    if dtype not in OUT_DTYPES:
        raise ValueError(f"dtype must be one of {OUT_DTYPES}, got {dtype}")


def preprocess_frames(frames, size=224, mean=CLIP_MEAN, std=CLIP_STD, dtype=torch.float32):
    """uint8 frames [T, H, W, 3] (RGB, contiguous, CPU) -> [T, 3, size, size] in `dtype`
    (float32, float16 or bfloat16): shorter side resized to `size` (bicubic, antialias, PIL
    semantics), center crop, /255, (x - mean) / std. dtype=torch.uint8 stops before the
    normalisation and returns the resized, cropped frames [T, size, size, 3]."""
    check_frames(frames, size, mean, std, dtype)
    if has_cpp_extension():
        return torch.ops.cma.preprocess_frames(frames, size, [float(m) for m in mean], [float(s) for s in std], dtype)
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(f"cma's C++ frame op is not available ({_CPP_ERROR}); using torchvision, which differs "
                      f"from PIL by up to two uint8 steps. Reinstall with `pip install --no-build-isolation -e .`.")
    return preprocess_frames_torchvision(frames, size, mean, std, dtype)


def normalize_frames(frames, mean=CLIP_MEAN, std=CLIP_STD, dtype=torch.float32):
    """uint8 frames [..., S, S, 3] (as preprocess_frames(dtype=torch.uint8) or a frame cache gives
    them), on any device -> [..., 3, S, S] in `dtype`: /255, (x - mean) / std in fp32, the same
    bytes as preprocess_frames' normalisation. Lets the loader ship uint8 (4x fewer bytes to the
    GPU than fp32) and the GPU normalise."""
    if frames.dtype != torch.uint8 or frames.dim() < 3 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [..., S, S, 3], got {frames.dtype} {list(frames.shape)}")
    mean_t, std_t = _channel_stats(tuple(mean), tuple(std), frames.device)
    x = frames.movedim(-1, -3).to(torch.float32)
    return ((x / 255.0 - mean_t) / std_t).to(dtype)


@functools.lru_cache(maxsize=None)
def _channel_stats(mean, std, device):
    """mean and std as fp32 [3, 1, 1] tensors on `device`, made once (not a host-to-device copy per batch)."""
    return tuple(torch.tensor(v, dtype=torch.float32, device=device).view(3, 1, 1) for v in (mean, std))


def preprocess_frames_torchvision(frames, size=224, mean=CLIP_MEAN, std=CLIP_STD, dtype=torch.float32):
    """The torchvision v2 path (uint8 resize with antialias, crop, normalise); same shapes as preprocess_frames."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as TF
    x = frames.permute(0, 3, 1, 2)
    x = TF.resize(x, [size], interpolation=InterpolationMode.BICUBIC, antialias=True)
    x = TF.center_crop(x, [size, size])
    if dtype == torch.uint8:
        return x.permute(0, 2, 3, 1).contiguous()
    x = TF.normalize(x.float().div_(255), list(mean), list(std))
    return x.to(dtype).contiguous()
