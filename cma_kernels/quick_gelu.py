"""quick_gelu, y = z * sigmoid(1.702 z), in one Triton launch forward and one backward.

OpenAI's CLIP weights (the paper's backbone) use quick_gelu in every MLP. Eager PyTorch runs it
as three kernels forward (scale, sigmoid, multiply) and about seven backward, each a full pass over
the [tokens, 4 * width] hidden activation, the largest tensor of the block. Here forward reads z
and writes y once; backward reads z and dy and writes dz once, recomputing the sigmoid. Only z is
kept for backward. Arithmetic is fp32 whatever the storage dtype.
"""
import torch
import triton
import triton.language as tl

BLOCK = 2048                  # elements per program on the GPU
INTERPRETER_BLOCK = 1 << 15   # on the CPU (Triton's interpreter) a program is ms of Python: few, large ones
NUM_WARPS = 8


def block_size(z: torch.Tensor) -> int:
    """Elements per program for a launch on z's device."""
    return BLOCK if z.is_cuda else INTERPRETER_BLOCK


@triton.jit
def _quick_gelu_fwd_kernel(
    z_ptr,    # [n] fp32/fp16/bf16, contiguous
    y_ptr,    # [n] z's dtype
    n,
    BLOCK: tl.constexpr,
):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    z = tl.load(z_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    y = z * tl.sigmoid(1.702 * z)
    tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _quick_gelu_bwd_kernel(
    z_ptr,    # [n] fp32/fp16/bf16, contiguous
    dy_ptr,   # [n] contiguous
    dz_ptr,   # [n] z's dtype
    n,
    BLOCK: tl.constexpr,
):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    z = tl.load(z_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(1.702 * z)
    dz = dy * (s + 1.702 * z * s * (1.0 - s))
    tl.store(dz_ptr + offsets, dz.to(dz_ptr.dtype.element_ty), mask=mask)


def quick_gelu_forward(z: torch.Tensor) -> torch.Tensor:
    """y = z * sigmoid(1.702 z) in one launch. z: any shape, fp32/fp16/bf16, CUDA (or CPU under
    TRITON_INTERPRET=1); returns y, z's shape and dtype, contiguous."""
    z = z.contiguous()
    y = torch.empty_like(z)
    n = z.numel()
    if n:
        block = block_size(z)
        _quick_gelu_fwd_kernel[(-(-n // block),)](z, y, n, BLOCK=block, num_warps=NUM_WARPS)
    return y


def quick_gelu_backward(dy: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """dz = dy * d/dz quick_gelu(z) in one launch. dy, z: the same shape; returns dz in z's dtype."""
    z, dy = z.contiguous(), dy.contiguous()
    dz = torch.empty_like(z)
    n = z.numel()
    if n:
        block = block_size(z)
        _quick_gelu_bwd_kernel[(-(-n // block),)](z, dy, dz, n, BLOCK=block, num_warps=NUM_WARPS)
    return dz


class FusedQuickGELUFunction(torch.autograd.Function):
    """fused_quick_gelu in eager mode: saves its input z only and recomputes the sigmoid in backward."""

    @staticmethod
    def forward(ctx, z):
        ctx.save_for_backward(z)
        return quick_gelu_forward(z)

    @staticmethod
    def backward(ctx, dy):
        (z,) = ctx.saved_tensors
        return quick_gelu_backward(dy, z)


def fused_quick_gelu(z: torch.Tensor) -> torch.Tensor:
    """quick_gelu(z) = z * sigmoid(1.702 z), differentiable, one Triton launch each way; keeps only
    z for backward. z: any shape, fp32/fp16/bf16, on CUDA (or CPU under TRITON_INTERPRET=1)."""
    return FusedQuickGELUFunction.apply(z)
