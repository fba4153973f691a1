"""cma_kernels.quick_gelu against z * sigmoid(1.702 z) in float64 (CPU: Triton's interpreter)."""
import pytest
import torch
from conftest import gpu_check, requires_cuda

from cma_kernels.quick_gelu import block_size, fused_quick_gelu

TOLERANCE = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}   # relative to max |value|


def _reference(z):
    z = z.double()
    return z * torch.sigmoid(1.702 * z)


def _check(z, dtype):
    """Forward and dz of fused_quick_gelu(z) against float64 autograd of the reference."""
    z = z.to(dtype).requires_grad_()
    y = fused_quick_gelu(z)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.device, dtype)
    (dz,) = torch.autograd.grad(y, z, dy)
    z64 = z.detach().double().requires_grad_()
    y64 = _reference(z64)
    (dz64,) = torch.autograd.grad(y64, z64, dy.double())
    assert y.dtype == dz.dtype == dtype and y.shape == z.shape and dz.shape == z.shape
    for got, want in ((y, y64), (dz, dz64)):
        if want.numel():
            scale = max(want.abs().max().item(), 1e-6)
            assert (got.double() - want).abs().max().item() <= TOLERANCE[dtype] * scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(0, 64), (1,), (7, 33), "blocks"])
def test_matches_float64(shape, dtype):
    """Sizes around the block size (masked tails), 3-D over several programs, empty; values over
    [-8, 8] (both tails)."""
    if shape == "blocks":   # 9 whole programs of the block size the launch takes, and a masked tail
        shape = (3, 5, 3 * block_size(torch.empty(0)) // 5 + 1)
    z = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 3
    _check(z.clamp(-8, 8), dtype)


def test_non_contiguous_input():
    z = torch.randn(40, 30, generator=torch.Generator().manual_seed(2)).t()   # a transposed view
    _check(z, torch.float32)


def test_keeps_only_its_input_for_backward():
    z = torch.randn(10, 20, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fused_quick_gelu(z)
    assert len(saved) == 1 and saved[0] is z


@gpu_check
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_matches_float64(dtype):
    """The MLP hidden activation of ViT-B/32 at 2 videos (1200 tokens x 3072) on the GPU (fp16:
    --precision fp16, what a T4 trains in)."""
    z = torch.randn(1200, 3072, generator=torch.Generator().manual_seed(3)) * 3
    _check(z.cuda(), dtype)
