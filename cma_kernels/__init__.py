"""cma_kernels: fused Triton kernels for the Cross-Modal Adapter (and quick_gelu, the MLP
activation of OpenAI's CLIP weights), the plain PyTorch reference they are tested against, and
the C++ frame-preprocessing op."""
from .reference import ACTIVATIONS, activation_fn, adapter_reference
from .adapter_op import (MAX_RANK, FusedAdapterFunction, adapter_backward, adapter_forward, describe_device,
                         fused_adapter, fused_adapter_unchecked, fuses_by_default, triton_runs_on)
from .preprocess import CLIP_MEAN, CLIP_STD, has_cpp_extension, normalize_frames, preprocess_frames, simd_level
from .quick_gelu import fused_quick_gelu

__all__ = ["ACTIVATIONS", "activation_fn", "adapter_reference", "MAX_RANK", "FusedAdapterFunction", "adapter_backward",
           "adapter_forward", "describe_device", "fused_adapter", "fused_adapter_unchecked", "fuses_by_default",
           "triton_runs_on", "CLIP_MEAN", "CLIP_STD", "has_cpp_extension", "normalize_frames", "preprocess_frames",
           "simd_level", "fused_quick_gelu"]
