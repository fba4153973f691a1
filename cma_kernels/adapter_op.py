"""Fused Cross-Modal Adapter: one Triton launch forward, one backward (weight grads included).

    out = residual + h + [W_up_unique; W_up_shared] . act(W_down . h + b_down) + [b_up_unique; b_up_shared]

Forward reads h (and the residual) once and writes out once: a program owns BLOCK_N rows,
loops over D in BLOCK_D chunks to accumulate the r-wide bottleneck z in fp32, applies the
activation, then loops over D again (h chunks come back from cache) writing the output.

Backward recomputes z from h instead of saving it, so nothing of size N x D is saved beyond h.
A program owns a contiguous run of row tiles; per tile it accumulates z and
da = dy . W_up, then sweeps D again writing dh = dy + (da * act'(z)) . W_down and adding the
tile's weight-gradient products into ITS OWN fp32 partials (no atomics; its first tile writes
them, so no zero-fill). All six partials of a program sit in one row of a [programs, grads]
buffer, summed over programs by ONE torch reduction afterwards: the same inputs give
bit-identical gradients, and the six gradients are views of that sum. Launch configuration SPLIT
(a candidate the tuner times) does the same in two launches: a and dz per row tile, then one
program per (row group, D chunk) with its weight-gradient products in registers.
The residual's gradient is dy itself. Where h needs no gradient (each tower's first attention
adapter: its h comes from frozen layers over the input), dh is neither computed nor written.

r < 16 is padded to 16 with masked zero rows so tl.dot sees K >= 16 on the GPU (REFERENCE.md
section 7). 16-bit inputs use tensor cores with fp32 accumulation. fp32 inputs follow
torch.set_float32_matmul_precision as PyTorch's matmuls do (FP32_DOT_PRECISION): at the default
"highest", IEEE fp32, and for r <= 16 (launch configuration FMA) not through tl.dot at all: its
IEEE lowering reads each operand from shared memory per multiply-add, where the H200 ran the fp32
op slower than eager PyTorch. The FMA kernels multiply broadcast tiles instead, [R_PAD, rows, D
chunk], r to the next power of two without the padding to 16, and sum the products in registers:
over D once per tile, over rows inside each thread (the backward runs in two launches there).
"high" runs three TF32 tensor-core dots each. 16-bit inputs may take the FMA kernels too (products
in fp32): a backward candidate the tuner times.
"""
import functools
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from .reference import ACTIVATIONS

MAX_RANK = 64   # r up to this runs fused; larger bottlenecks use the reference path

# Launch configurations. The forward owns BLOCK_N rows per program; the backward runs at most
# PROGRAMS_PER_SM programs per SM, each over a contiguous run of BLOCK_N-row tiles, with one set of
# fp32 weight-gradient partials per program. FWD_CONFIG / BWD_CONFIG serve 16-bit inputs with
# r <= 32 (the paper's configurations; benchmarks/tune_adapter.py sweeps them on a GPU). fp32 dots
# run on FMA units with their operands in registers, and r = 64 doubles the bottleneck tiles: there
# those tiles would make ptxas spill registers to local memory on sm_90 (the fp32 backward by about
# 4 KB per thread), so they get smaller tiles or more warps. tests/sm90_compile.py reports every
# configuration's registers and spills and fails on more than a value or two spilled. One table
# serves every GPU: the 16-bit forward at r = 64 takes 64-wide D chunks, as its 128-wide ones need
# 140 KB of shared memory (the fp32 weight tiles, pipelined), more than the 99 KB of an A10, L4 or
# RTX 4090; sm90_compile.py checks that each configuration fits A100, sm_86/89 and T4 too.
# SPLIT=True runs the backward in two launches instead (_launch_backward_split): a candidate the
# tuner times, not the default until a GPU has measured it faster. fp32 at r <= 16 takes
# FP32_FMA_CONFIGS (below) at the default matmul precision.
FWD_CONFIG = dict(BLOCK_N=32, BLOCK_D=128, num_warps=4, num_stages=3)
BWD_CONFIG = dict(BLOCK_N=64, BLOCK_D=64, num_warps=4, num_stages=2, PROGRAMS_PER_SM=2, SPLIT=False, FMA=False)
_CONFIGS = {   # (fp32 inputs, r > 32) -> (forward, backward)
    (False, False): (FWD_CONFIG, BWD_CONFIG),
    (False, True): (dict(FWD_CONFIG, BLOCK_D=64), dict(BWD_CONFIG, num_warps=8, PROGRAMS_PER_SM=1)),
    (True, False): (FWD_CONFIG, dict(BLOCK_N=32, BLOCK_D=32, num_warps=8, num_stages=2, PROGRAMS_PER_SM=1)),
    (True, True): (dict(FWD_CONFIG, BLOCK_D=64),
                   dict(BLOCK_N=16, BLOCK_D=32, num_warps=8, num_stages=2, PROGRAMS_PER_SM=1)),
}
# fp32 inputs with r <= 16 at the default "highest" matmul precision: FMA (the module docstring),
# the backward in two launches. Keyed by r <= 8: the products summed in registers take r per value
# of h a thread holds, so r = 16 gets half the values per thread (tests/sm90_compile.py, triton 3.6:
# 124 to 244 registers at r = 8 and 16, no spill). Chosen from the compiled code without a GPU:
# against the tl.dot kernels they replace, about a fifth of the shared-memory traffic per value of h
# and fewer instructions. Not measured yet: FMA_MAX_RANK = 0 restores the tl.dot kernels.
FMA_MAX_RANK = 16
FP32_FMA_CONFIGS = {
    True: (dict(BLOCK_N=16, BLOCK_D=64, num_warps=4, num_stages=2, FMA=True),
           dict(BLOCK_N=4, BLOCK_D=128, num_warps=2, num_stages=2, PROGRAMS_PER_SM=4, SPLIT=True, FMA=True)),
    False: (dict(BLOCK_N=16, BLOCK_D=64, num_warps=8, num_stages=2, FMA=True),
            dict(BLOCK_N=2, BLOCK_D=128, num_warps=4, num_stages=2, PROGRAMS_PER_SM=2, SPLIT=True, FMA=True)),
}


# Triton's interpreter (CPU) runs each program and each D chunk as a few ms of Python whatever the
# tile's size, so there the largest tiles win: launches 2-6x faster than with the GPU's tiles. The
# GPU's tile shapes (multi-tile loops, partial chunks) are checked in the interpreter by
# test_every_gpu_launch_configuration_in_the_interpreter.
INTERPRETER_CONFIGS = (dict(BLOCK_N=128, BLOCK_D=256, num_warps=4, num_stages=1),
                       dict(BLOCK_N=128, BLOCK_D=256, num_warps=4, num_stages=1, PROGRAMS_PER_SM=1))


def launch_configs(dtype: torch.dtype, r: int, device: torch.device = torch.device("cuda")) -> tuple[dict, dict]:
    """(forward, backward) launch configuration for inputs h of this dtype and bottleneck width r
    (on the CPU, the interpreter's; fp32 at r <= 16 under matmul precision "highest": the FMA
    kernels')."""
    if device.type == "cpu":
        return INTERPRETER_CONFIGS
    if dtype == torch.float32 and r <= FMA_MAX_RANK and _dot_precision(dtype, device) == "ieee":
        return FP32_FMA_CONFIGS[r <= 8]
    return _CONFIGS[dtype == torch.float32, r > 32]


# Triton supports NVIDIA GPUs of compute capability 8.0+ (A100, H100, RTX 30xx and newer), where
# backend "auto" fuses. On 7.x (V100, T4) it still compiles, its matmuls on slower FMA code
# (untested here): only backend "triton" runs the kernels there. Below 7.0 (P100) it compiles nothing.
FUSED_MIN_CAPABILITY = 8
TRITON_MIN_CAPABILITY = 7


def triton_runs_on(device: torch.device) -> bool:
    """True where the kernels can launch: a CUDA GPU of compute capability 7.0+, or the CPU under
    TRITON_INTERPRET=1."""
    if device.type == "cuda":   # get_device_properties: torch.compile folds it to a constant
        return torch.cuda.get_device_properties(device).major >= TRITON_MIN_CAPABILITY
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def fuses_by_default(device: torch.device) -> bool:
    """True where backend "auto" runs the fused kernels: a CUDA GPU of compute capability 8.0+."""
    return device.type == "cuda" and torch.cuda.get_device_properties(device).major >= FUSED_MIN_CAPABILITY


def describe_device(device: torch.device) -> str:
    """`device` for a message: "cpu", or "cuda:0 (Tesla T4, compute capability 7.5)"."""
    if device.type != "cuda":
        return str(device)
    props = torch.cuda.get_device_properties(device)
    return f"{device} ({props.name}, compute capability {props.major}.{props.minor})"


@triton.jit
def _activation(z, ACT: tl.constexpr):
    if ACT == 0:  # quick_gelu
        return z * tl.sigmoid(1.702 * z)
    else:  # exact gelu
        return 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))


@triton.jit
def _activation_grad(z, ACT: tl.constexpr):
    if ACT == 0:
        s = tl.sigmoid(1.702 * z)
        return s + 1.702 * z * s * (1.0 - s)
    else:
        cdf = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476))
        return cdf + z * tl.exp(-0.5 * z * z) * 0.3989422804014327


@triton.jit
def _load_w_up(w_up_unique_ptr, w_up_shared_ptr, cols, col_mask, ranks, rank_mask, D_UNIQUE, R: tl.constexpr):
    """W_up rows for output channels `cols` as a [BLOCK_D, R_PAD] tile: unique rows, then shared."""
    is_shared = cols >= D_UNIQUE
    unique = tl.load(w_up_unique_ptr + cols[:, None] * R + ranks[None, :],
                     mask=(col_mask & ~is_shared)[:, None] & rank_mask[None, :], other=0.0)
    shared = tl.load(w_up_shared_ptr + (cols - D_UNIQUE)[:, None] * R + ranks[None, :],
                     mask=(col_mask & is_shared)[:, None] & rank_mask[None, :], other=0.0)
    return unique + shared


@triton.jit
def _rank_product(small, w, FMA: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """small [BLOCK_N, R_PAD] . w [R_PAD, BLOCK_D] -> [BLOCK_N, BLOCK_D] fp32 (a product over the
    bottleneck's r): tl.dot, or with FMA fp32 products summed over r inside each thread."""
    if FMA:
        product = tl.sum(tl.trans(small).to(tl.float32)[:, :, None] * w.to(tl.float32)[:, None, :], axis=0)
    else:
        product = tl.dot(small, w, input_precision=DOT_PRECISION)
    return product


@triton.jit
def _adapter_fwd_kernel(
    h_ptr,              # [N, D] row stride stride_h, unit column stride
    residual_ptr,       # [N, D] row stride stride_res; unused unless HAS_RESIDUAL
    out_ptr,            # [N, D] contiguous
    w_down_ptr,         # [R, D] contiguous
    b_down_ptr,         # [R]
    w_up_unique_ptr,    # [D - DS, R] contiguous
    b_up_unique_ptr,    # [D - DS]
    w_up_shared_ptr,    # [DS, R] contiguous
    b_up_shared_ptr,    # [DS]
    N, D, DS, stride_h, stride_res,
    R: tl.constexpr, R_PAD: tl.constexpr, ACT: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr, FMA: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    dtype = h_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    rows = rows.to(tl.int64)
    ranks = tl.arange(0, R_PAD)
    rank_mask = ranks < R
    D_UNIQUE = D - DS

    # z = h . W_down^T, accumulated over D chunks in fp32: [BLOCK_N, R_PAD]
    if FMA:   # every chunk's products summed in registers, then over D once
        z_parts = tl.zeros((R_PAD, BLOCK_N, BLOCK_D), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            col_mask = cols < D
            h = tl.load(h_ptr + rows[:, None] * stride_h + cols[None, :],
                        mask=row_mask[:, None] & col_mask[None, :], other=0.0)
            w_down = tl.load(w_down_ptr + ranks[:, None] * D + cols[None, :],
                             mask=rank_mask[:, None] & col_mask[None, :], other=0.0)
            z_parts += w_down.to(dtype).to(tl.float32)[:, None, :] * h.to(tl.float32)[None, :, :]
        z = tl.trans(tl.sum(z_parts, axis=2))
    else:
        z = tl.zeros((BLOCK_N, R_PAD), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            col_mask = cols < D
            h = tl.load(h_ptr + rows[:, None] * stride_h + cols[None, :],
                        mask=row_mask[:, None] & col_mask[None, :], other=0.0)
            w_down_t = tl.load(w_down_ptr + ranks[None, :] * D + cols[:, None],
                               mask=rank_mask[None, :] & col_mask[:, None], other=0.0)
            z = tl.dot(h, w_down_t.to(dtype), z, input_precision=DOT_PRECISION)
    z += tl.load(b_down_ptr + ranks, mask=rank_mask, other=0.0).to(tl.float32)[None, :]
    a = _activation(z, ACT).to(dtype)

    # out = residual + h + a . W_up^T + b_up, one D chunk at a time
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_mask = cols < D
        mask = row_mask[:, None] & col_mask[None, :]
        w_up = _load_w_up(w_up_unique_ptr, w_up_shared_ptr, cols, col_mask, ranks, rank_mask, D_UNIQUE, R)
        is_shared = cols >= D_UNIQUE
        b_up = (tl.load(b_up_unique_ptr + cols, mask=col_mask & ~is_shared, other=0.0)
                + tl.load(b_up_shared_ptr + (cols - D_UNIQUE), mask=col_mask & is_shared, other=0.0))
        y = _rank_product(a, tl.trans(w_up.to(dtype)), FMA, DOT_PRECISION)
        h = tl.load(h_ptr + rows[:, None] * stride_h + cols[None, :], mask=mask, other=0.0)
        y += h.to(tl.float32) + b_up.to(tl.float32)[None, :]
        if HAS_RESIDUAL:
            res = tl.load(residual_ptr + rows[:, None] * stride_res + cols[None, :], mask=mask, other=0.0)
            y += res.to(tl.float32)
        tl.store(out_ptr + rows[:, None] * D + cols[None, :], y, mask=mask)


@triton.jit
def _bottleneck_grads(dy_ptr, h_ptr, w_down_ptr, b_down, w_up_unique_ptr, w_up_shared_ptr, rows, row_mask, ranks,
                      rank_mask, D, D_UNIQUE, stride_dy, stride_h, R: tl.constexpr, R_PAD: tl.constexpr,
                      ACT: tl.constexpr, DOT_PRECISION: tl.constexpr, FMA: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_D: tl.constexpr):
    """One row tile's bottleneck, recomputed from h, and its gradient, one sweep over D: (a, dz),
    [BLOCK_N, R_PAD] fp32 each: a = act(z), z = h . W_down^T + b_down; dz = (dy . W_up) * act'(z),
    zero on masked rows (dy is zero there; a is not)."""
    dtype = h_ptr.dtype.element_ty
    if FMA:   # as the forward's: products summed in registers, then over D once
        z_parts = tl.zeros((R_PAD, BLOCK_N, BLOCK_D), dtype=tl.float32)
        da_parts = tl.zeros((R_PAD, BLOCK_N, BLOCK_D), dtype=tl.float32)
    else:
        z = tl.zeros((BLOCK_N, R_PAD), dtype=tl.float32)
        da = tl.zeros((BLOCK_N, R_PAD), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_mask = cols < D
        mask = row_mask[:, None] & col_mask[None, :]
        h = tl.load(h_ptr + rows[:, None] * stride_h + cols[None, :], mask=mask, other=0.0)
        dy = tl.load(dy_ptr + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(dtype)
        w_up = _load_w_up(w_up_unique_ptr, w_up_shared_ptr, cols, col_mask, ranks, rank_mask, D_UNIQUE, R)
        if FMA:
            w_down = tl.load(w_down_ptr + ranks[:, None] * D + cols[None, :],
                             mask=rank_mask[:, None] & col_mask[None, :], other=0.0)
            z_parts += w_down.to(dtype).to(tl.float32)[:, None, :] * h.to(tl.float32)[None, :, :]
            da_parts += tl.trans(w_up.to(dtype)).to(tl.float32)[:, None, :] * dy.to(tl.float32)[None, :, :]
        else:
            w_down_t = tl.load(w_down_ptr + ranks[None, :] * D + cols[:, None],
                               mask=rank_mask[None, :] & col_mask[:, None], other=0.0)
            z = tl.dot(h, w_down_t.to(dtype), z, input_precision=DOT_PRECISION)
            da = tl.dot(dy, w_up.to(dtype), da, input_precision=DOT_PRECISION)
    if FMA:
        z, da = tl.trans(tl.sum(z_parts, axis=2)), tl.trans(tl.sum(da_parts, axis=2))
    z += b_down[None, :]
    return _activation(z, ACT), da * _activation_grad(z, ACT)


@triton.jit
def _adapter_bwd_kernel(
    dy_ptr,             # [N, D] row stride stride_dy, unit column stride
    h_ptr,              # [N, D] row stride stride_h, unit column stride
    dh_ptr,             # [N, D] contiguous; unused unless NEED_DH
    w_down_ptr,         # [R, D] contiguous
    b_down_ptr,         # [R]
    w_up_unique_ptr,    # [D - DS, R] contiguous
    w_up_shared_ptr,    # [DS, R] contiguous
    grads_part_ptr,     # [P, stride_part] fp32: per program, its partial gradients laid out as grads_flat
    N, D, DS, stride_part, stride_dy, stride_h, TILES_PER_PROGRAM,
    R: tl.constexpr, R_PAD: tl.constexpr, ACT: tl.constexpr, NEED_DH: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    dtype = h_ptr.dtype.element_ty
    pid = tl.program_id(0)
    ranks = tl.arange(0, R_PAD)
    rank_mask = ranks < R
    D_UNIQUE = D - DS
    b_down = tl.load(b_down_ptr + ranks, mask=rank_mask, other=0.0).to(tl.float32)
    dw_down_part_ptr = grads_part_ptr + pid.to(tl.int64) * stride_part   # [R, D]
    db_down_part_ptr = dw_down_part_ptr + R * D                            # [R]
    dw_up_part_ptr = db_down_part_ptr + R                                  # [D, R]: unique rows, then shared rows
    db_up_part_ptr = dw_up_part_ptr + D * R                                # [D]
    db_down = tl.zeros((R_PAD,), dtype=tl.float32)
    first_tile = pid * TILES_PER_PROGRAM

    for tile in range(first_tile, first_tile + TILES_PER_PROGRAM):
        accumulate = tile != first_tile   # the first tile writes the partials, so they need no zero-fill
        rows = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < N
        rows = rows.to(tl.int64)

        # sweep 1: the bottleneck a and its gradient dz, [BLOCK_N, R_PAD] fp32
        a, dz = _bottleneck_grads(dy_ptr, h_ptr, w_down_ptr, b_down, w_up_unique_ptr, w_up_shared_ptr, rows, row_mask,
                                  ranks, rank_mask, D, D_UNIQUE, stride_dy, stride_h, R, R_PAD, ACT, DOT_PRECISION,
                                  False, BLOCK_N, BLOCK_D)
        db_down += tl.sum(dz, axis=0)
        a = tl.where(row_mask[:, None], a, 0.0).to(dtype)
        dz = dz.to(dtype)

        # sweep 2: dh = dy + dz . W_down (where h needs it), plus this tile's weight-gradient products
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            col_mask = cols < D
            mask = row_mask[:, None] & col_mask[None, :]
            h = tl.load(h_ptr + rows[:, None] * stride_h + cols[None, :], mask=mask, other=0.0)
            dy = tl.load(dy_ptr + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0)
            if NEED_DH:
                w_down = tl.load(w_down_ptr + ranks[:, None] * D + cols[None, :],
                                 mask=rank_mask[:, None] & col_mask[None, :], other=0.0)
                dh = dy.to(tl.float32) + tl.dot(dz, w_down.to(dtype), input_precision=DOT_PRECISION)
                tl.store(dh_ptr + rows[:, None] * D + cols[None, :], dh, mask=mask)

            part = dw_up_part_ptr + cols[:, None] * R + ranks[None, :]
            part_mask = col_mask[:, None] & rank_mask[None, :]
            acc = tl.load(part, mask=part_mask & accumulate, other=0.0)
            acc = tl.dot(tl.trans(dy.to(dtype)), a, acc, input_precision=DOT_PRECISION)
            tl.store(part, acc, mask=part_mask)

            part = dw_down_part_ptr + ranks[:, None] * D + cols[None, :]
            part_mask = rank_mask[:, None] & col_mask[None, :]
            acc = tl.load(part, mask=part_mask & accumulate, other=0.0)
            acc = tl.dot(tl.trans(dz), h, acc, input_precision=DOT_PRECISION)
            tl.store(part, acc, mask=part_mask)

            part = db_up_part_ptr + cols
            tl.store(part, tl.load(part, mask=col_mask & accumulate, other=0.0) + tl.sum(dy.to(tl.float32), axis=0),
                     mask=col_mask)

    tl.store(db_down_part_ptr + ranks, db_down, mask=rank_mask)


# The backward in two launches (launch configuration SPLIT): each a plain streaming kernel with
# fewer registers, so more programs share an SM, for two more reads of h and dy (they come back
# from memory, not from cache). Same dots on the same values as _adapter_bwd_kernel; the weight
# gradients are summed over tokens in another order (deterministic too).
@triton.jit
def _adapter_bwd_bottleneck_kernel(
    dy_ptr,             # [N, D] row stride stride_dy, unit column stride
    h_ptr,              # [N, D] row stride stride_h, unit column stride
    w_down_ptr,         # [R, D] contiguous
    b_down_ptr,         # [R]
    w_up_unique_ptr,    # [D - DS, R] contiguous
    w_up_shared_ptr,    # [DS, R] contiguous
    a_ptr,              # [N, R] fp32 out: act(z)
    dz_ptr,             # [N, R] fp32 out: dz
    N, D, DS, stride_dy, stride_h,
    R: tl.constexpr, R_PAD: tl.constexpr, ACT: tl.constexpr, DOT_PRECISION: tl.constexpr, FMA: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    rows = rows.to(tl.int64)
    ranks = tl.arange(0, R_PAD)
    rank_mask = ranks < R
    b_down = tl.load(b_down_ptr + ranks, mask=rank_mask, other=0.0).to(tl.float32)
    a, dz = _bottleneck_grads(dy_ptr, h_ptr, w_down_ptr, b_down, w_up_unique_ptr, w_up_shared_ptr, rows, row_mask,
                              ranks, rank_mask, D, D - DS, stride_dy, stride_h, R, R_PAD, ACT, DOT_PRECISION, FMA,
                              BLOCK_N, BLOCK_D)
    mask = row_mask[:, None] & rank_mask[None, :]
    tl.store(a_ptr + rows[:, None] * R + ranks[None, :], a, mask=mask)
    tl.store(dz_ptr + rows[:, None] * R + ranks[None, :], dz, mask=mask)


@triton.jit
def _adapter_bwd_stream_kernel(
    dy_ptr,             # [N, D] row stride stride_dy, unit column stride
    h_ptr,              # [N, D] row stride stride_h, unit column stride
    dh_ptr,             # [N, D] contiguous; unused unless NEED_DH
    w_down_ptr,         # [R, D] contiguous
    a_ptr,              # [N, R] fp32: act(z), from _adapter_bwd_bottleneck_kernel
    dz_ptr,             # [N, R] fp32: dz, from _adapter_bwd_bottleneck_kernel
    grads_part_ptr,     # [G, stride_part] fp32: per row group, its partial gradients laid out as grads_flat
    N, D, stride_part, stride_dy, stride_h, TILES_PER_GROUP,
    R: tl.constexpr, R_PAD: tl.constexpr, NEED_DH: tl.constexpr, DOT_PRECISION: tl.constexpr, FMA: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program (g, c): the D chunk c of row group g's tiles: dh = dy + dz . W_down there, and the
    weight-gradient products over its rows, accumulated in registers, written once into row g's
    partials (db_down by the chunk-0 programs)."""
    dtype = h_ptr.dtype.element_ty
    group, chunk = tl.program_id(0), tl.program_id(1)
    ranks = tl.arange(0, R_PAD)
    rank_mask = ranks < R
    cols = chunk * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < D
    w_down = tl.load(w_down_ptr + ranks[:, None] * D + cols[None, :], mask=rank_mask[:, None] & col_mask[None, :],
                     other=0.0).to(dtype)
    if FMA:
        dw_up_t = tl.zeros((R_PAD, BLOCK_D), dtype=tl.float32)
    else:
        dw_up = tl.zeros((BLOCK_D, R_PAD), dtype=tl.float32)
    dw_down = tl.zeros((R_PAD, BLOCK_D), dtype=tl.float32)
    db_up = tl.zeros((BLOCK_D,), dtype=tl.float32)
    db_down = tl.zeros((R_PAD,), dtype=tl.float32)
    first_tile = group * TILES_PER_GROUP
    for tile in range(first_tile, first_tile + TILES_PER_GROUP):
        rows = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < N
        rows = rows.to(tl.int64)
        small = row_mask[:, None] & rank_mask[None, :]
        a = tl.load(a_ptr + rows[:, None] * R + ranks[None, :], mask=small, other=0.0).to(dtype)
        dz = tl.load(dz_ptr + rows[:, None] * R + ranks[None, :], mask=small, other=0.0)
        db_down += tl.sum(dz, axis=0)
        dz = dz.to(dtype)
        mask = row_mask[:, None] & col_mask[None, :]
        h = tl.load(h_ptr + rows[:, None] * stride_h + cols[None, :], mask=mask, other=0.0)
        dy = tl.load(dy_ptr + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0)
        if NEED_DH:
            dh = dy.to(tl.float32) + _rank_product(dz, w_down, FMA, DOT_PRECISION)
            tl.store(dh_ptr + rows[:, None] * D + cols[None, :], dh, mask=mask)
        if FMA:   # [BLOCK_N, R_PAD, BLOCK_D] products summed over the rows (axis 0: not made a tl.dot)
            dw_up_t += tl.sum(a.to(tl.float32)[:, :, None] * dy.to(dtype).to(tl.float32)[:, None, :], axis=0)
            dw_down += tl.sum(dz.to(tl.float32)[:, :, None] * h.to(tl.float32)[:, None, :], axis=0)
        else:
            dw_up = tl.dot(tl.trans(dy.to(dtype)), a, dw_up, input_precision=DOT_PRECISION)
            dw_down = tl.dot(tl.trans(dz), h, dw_down, input_precision=DOT_PRECISION)
        db_up += tl.sum(dy.to(tl.float32), axis=0)
    if FMA:
        dw_up = tl.trans(dw_up_t)

    part = grads_part_ptr + group.to(tl.int64) * stride_part   # [dW_down R x D | db_down R | dW_up D x R | db_up D]
    tl.store(part + ranks[:, None] * D + cols[None, :], dw_down, mask=rank_mask[:, None] & col_mask[None, :])
    tl.store(part + R * D + ranks, db_down, mask=rank_mask & (chunk == 0))
    tl.store(part + R * D + R + cols[:, None] * R + ranks[None, :], dw_up, mask=col_mask[:, None] & rank_mask[None, :])
    tl.store(part + 2 * R * D + R + cols, db_up, mask=col_mask)


# ----------------------------------------------------------------------------------------------
# launchers

# The host side is kept lean: a ViT-B training step makes 96 adapter calls, and on an H200 the
# ViT-B/32 step is bound by the host (benchmarks/bench_host.py times it). So plain Python arithmetic
# (triton.cdiv / next_power_of_2 are constexpr functions whose call wrapper costs more), no view or
# cast where the tensor already fits, and one split for the six weight gradients.
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _rank_pad(rank: int, fma: bool = False) -> int:
    """The bottleneck's tile width: r to a power of two, at least 16 where tl.dot takes it."""
    return 1 << (rank - 1).bit_length() if fma else max(16, 1 << (rank - 1).bit_length())


def _fma(cfg: dict) -> bool:
    """Whether the launch configuration takes the FMA kernels: fp32 at r <= 16 (FP32_FMA_CONFIGS);
    16-bit inputs where the tuner tries them (their products in fp32, as tensor cores make them)."""
    return cfg.get("FMA", False)


def _rows(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """[..., D] -> (tensor holding the N rows of D values with unit column stride, row stride): t
    itself where contiguous, else a [N, D] view whenever the layout allows, else a copy."""
    if t.is_contiguous():
        return t, t.shape[-1]
    t2 = t.reshape(-1, t.shape[-1])
    if t2.stride(-1) != 1 and t2.shape[0] > 0:
        t2 = t2.contiguous()
    return t2, t2.stride(0)


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t.to(dtype), without the call where t has that dtype already."""
    return t if t.dtype == dtype else t.to(dtype)


# fp32 dots follow torch.set_float32_matmul_precision, as PyTorch's own fp32 matmuls do: "highest"
# (the default) runs them in IEEE fp32 on the FMA units; "high" as three TF32 tensor-core dots
# (tf32x3: the operands split into a TF32 part and a TF32 remainder, about fp32's accuracy);
# "medium" as one TF32 dot (10-bit mantissas). GPUs before compute capability 8.0 have no TF32:
# IEEE there, as in PyTorch.
FP32_DOT_PRECISION = {"highest": "ieee", "high": "tf32x3", "medium": "tf32"}


def _dot_precision(dtype: torch.dtype, device: torch.device) -> str:
    if dtype != torch.float32:
        return "tf32"   # ignored: 16-bit dots run on tensor cores as they are
    precision = FP32_DOT_PRECISION[torch.get_float32_matmul_precision()]
    if precision != "ieee" and device.type == "cuda" and _capability_major(_index(device)) < 8:
        return "ieee"
    return precision


def _num_programs_cap(device: torch.device, programs_per_sm: int) -> int:
    if device.type == "cuda":
        return programs_per_sm * _sm_count(_index(device))
    return 4   # interpreter: a few programs, so the multi-tile loop is exercised


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.lru_cache(maxsize=None)
def _capability_major(index: int) -> int:
    return torch.cuda.get_device_properties(index).major


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def check_adapter_args(h, w_down, b_down, w_up_unique, b_up_unique, w_up_shared, b_up_shared,
                       residual=None, activation="quick_gelu"):
    """Raise ValueError naming the first argument whose shape, dtype or device does not fit."""
    if h.dim() < 1:
        raise ValueError("h must have shape [..., D], got a scalar")
    D = h.shape[-1]
    if w_down.dim() != 2 or w_down.shape[1] != D:
        raise ValueError(f"w_down must be [r, D={D}], got {list(w_down.shape)}")
    r = w_down.shape[0]
    ds = w_up_shared.shape[0] if w_up_shared.dim() == 2 else -1
    expected = {"b_down": (b_down, [r]), "w_up_unique": (w_up_unique, [D - ds, r]),
                "b_up_unique": (b_up_unique, [D - ds]), "w_up_shared": (w_up_shared, [ds, r]),
                "b_up_shared": (b_up_shared, [ds])}
    if residual is not None:
        expected["residual"] = (residual, list(h.shape))
    for name, (t, shape) in expected.items():
        if list(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} (h is {list(h.shape)}, r={r}, d_s={ds}), "
                             f"got {list(t.shape)}")
        if t.device != h.device:
            raise ValueError(f"{name} is on {t.device} but h is on {h.device}")
    for name, t in [("h", h), ("w_down", w_down)] + [(n, t) for n, (t, _) in expected.items()]:
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating point tensor, got {t.dtype}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; allowed: {', '.join(ACTIVATIONS)}")


def adapter_forward(h, w_down, b_down, w_up_unique, b_up_unique, w_up_shared, b_up_shared,
                    residual=None, activation="quick_gelu"):
    """Launch the fused forward. Shapes as `fused_adapter`; returns out [..., D] in the promoted
    dtype of h and residual. Weights may be another float dtype than h (fp32 masters under bf16
    autocast): they are cast to h's dtype inside the kernel."""
    D, r, ds = h.shape[-1], w_down.shape[0], w_up_shared.shape[0]
    out_dtype = h.dtype if residual is None else torch.promote_types(h.dtype, residual.dtype)
    out = torch.empty(h.shape, dtype=out_dtype, device=h.device)   # contiguous: rows of D values
    N = out.numel() // D if D else 0
    if N == 0:
        return out
    h2, stride_h = _rows(h)
    res2, stride_res = _rows(residual) if residual is not None else (h2, stride_h)
    cfg = launch_configs(h.dtype, r, h.device)[0]
    fma = _fma(cfg)
    _adapter_fwd_kernel[(_cdiv(N, cfg["BLOCK_N"]),)](
        h2, res2, out, w_down.contiguous(), b_down.contiguous(),
        _real(w_up_unique, w_up_shared), _real(b_up_unique, b_up_shared),
        _real(w_up_shared, w_up_unique), _real(b_up_shared, b_up_unique),
        N, D, ds, stride_h, stride_res,
        R=r, R_PAD=_rank_pad(r, fma), ACT=ACTIVATIONS.index(activation), HAS_RESIDUAL=residual is not None,
        DOT_PRECISION=_dot_precision(h.dtype, h.device), FMA=fma, BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out


def _real(t, stand_in):
    """d_s = 0 or d_s = D leaves one up-projection half empty: hand the kernel a real pointer
    (the other half's), which it never reads because every access to it is masked off."""
    return (stand_in if t.numel() == 0 else t).contiguous()


def adapter_backward_flat(dy, h, w_down, b_down, w_up_unique, w_up_shared, activation="quick_gelu", need_dh=True):
    """Launch the fused backward; the weight gradients come as ONE fp32 vector.

    dy, h: [..., D]. Returns (dh [..., D] in h's dtype, or None with need_dh=False, grads_flat
    [2 r D + r + D] fp32), grads_flat = [dW_down [r, D] | db_down [r] | dW_up [D, r] (unique rows,
    then shared) | db_up [D]], reduced over tokens deterministically (per-program fp32 partials,
    then one sum); split_grads cuts it.
    The weights reach the kernel in h's dtype, cast here where they differ (fp32 master weights
    under autocast; r x D values each): its dots round them to that dtype anyway (autocast's linears
    round b_down too), and, fed fp32 weights with 16-bit h, it computed wrong gradients on an H200
    (triton 3.6; relative error 2.1 in benchmarks/gpu_cases.py, and an illegal memory access inside
    a training step). dy may have another dtype than h (a text tower's fp32 residual stream): that
    mix measured right.
    """
    return _launch_backward(dy, h, *(_as(w, h.dtype) for w in (w_down, b_down, w_up_unique, w_up_shared)),
                            activation, need_dh)


def _launch_backward(dy, h, w_down, b_down, w_up_unique, w_up_shared, activation, need_dh):
    """The backward launch itself, no casts: adapter_backward_flat's contract for weights already in
    h's dtype (benchmarks/gpu_cases.py calls it directly, as its "raw" cases)."""
    D, r, ds = h.shape[-1], w_down.shape[0], w_up_shared.shape[0]
    N = h.numel() // D if D else 0
    cfg = launch_configs(h.dtype, r, h.device)[1]
    if (cfg.get("SPLIT") or _fma(cfg)) and N > 0:
        return _launch_backward_split(dy, h, w_down, b_down, w_up_unique, w_up_shared, activation, need_dh, cfg)
    num_tiles = _cdiv(N, cfg["BLOCK_N"])
    tiles_per_program = max(1, _cdiv(num_tiles, _num_programs_cap(h.device, cfg["PROGRAMS_PER_SM"])))
    P = max(1, _cdiv(num_tiles, tiles_per_program))
    grads = 2 * r * D + r + D
    # rows padded to a multiple of 16 values: the kernel then knows each program's partials are aligned
    # and accesses them with vector loads and stores. Every program writes all of its partials (no
    # zero-fill); N = 0 runs no program.
    stride_part = _cdiv(grads, 16) * 16
    grads_part = (torch.empty if N > 0 else torch.zeros)((P, stride_part), dtype=torch.float32, device=h.device)
    dh = torch.empty(h.shape, dtype=h.dtype, device=h.device) if need_dh else None   # contiguous
    if N > 0:
        (h2, stride_h), (dy2, stride_dy) = _rows(h), _rows(dy)
        _adapter_bwd_kernel[(P,)](
            dy2, h2, dh if need_dh else h2, w_down.contiguous(), b_down.contiguous(),
            _real(w_up_unique, w_up_shared), _real(w_up_shared, w_up_unique), grads_part,
            N, D, ds, stride_part, stride_dy, stride_h, tiles_per_program,
            R=r, R_PAD=_rank_pad(r), ACT=ACTIVATIONS.index(activation), NEED_DH=need_dh,
            DOT_PRECISION=_dot_precision(h.dtype, h.device), BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"],
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
    return dh, grads_part[:, :grads].sum(0)


def _launch_backward_split(dy, h, w_down, b_down, w_up_unique, w_up_shared, activation, need_dh, cfg):
    """_launch_backward in two launches (cfg["SPLIT"], or "FMA" with fp32 inputs): the bottleneck a
    and dz per row tile, then one program per (row group, D chunk). N > 0."""
    D, r, ds = h.shape[-1], w_down.shape[0], w_up_shared.shape[0]
    N = h.numel() // D
    block_n, block_d = cfg["BLOCK_N"], cfg["BLOCK_D"]
    num_tiles, chunks = _cdiv(N, block_n), _cdiv(D, block_d)
    tiles_per_group = max(1, _cdiv(num_tiles, max(1, _num_programs_cap(h.device, cfg["PROGRAMS_PER_SM"]) // chunks)))
    groups = _cdiv(num_tiles, tiles_per_group)   # every group has a tile: each writes all of its partials
    grads = 2 * r * D + r + D
    stride_part = _cdiv(grads, 16) * 16
    grads_part = torch.empty((groups, stride_part), dtype=torch.float32, device=h.device)
    a, dz = torch.empty((2, N, r), dtype=torch.float32, device=h.device)
    dh = torch.empty(h.shape, dtype=h.dtype, device=h.device) if need_dh else None
    (h2, stride_h), (dy2, stride_dy) = _rows(h), _rows(dy)
    w_down = w_down.contiguous()
    fma = _fma(cfg)
    common = dict(R=r, R_PAD=_rank_pad(r, fma), DOT_PRECISION=_dot_precision(h.dtype, h.device), FMA=fma,
                  BLOCK_N=block_n, BLOCK_D=block_d, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    _adapter_bwd_bottleneck_kernel[(num_tiles,)](
        dy2, h2, w_down, b_down.contiguous(), _real(w_up_unique, w_up_shared), _real(w_up_shared, w_up_unique),
        a, dz, N, D, ds, stride_dy, stride_h, ACT=ACTIVATIONS.index(activation), **common)
    _adapter_bwd_stream_kernel[(groups, chunks)](
        dy2, h2, dh if need_dh else h2, w_down, a, dz, grads_part, N, D, stride_part, stride_dy, stride_h,
        tiles_per_group, NEED_DH=need_dh, **common)
    return dh, grads_part[:, :grads].sum(0)


def split_grads(grads_flat, w_down, b_down, w_up_unique, w_up_shared):
    """grads_flat (from adapter_backward_flat) -> (dw_down, db_down, dw_up_unique, db_up_unique,
    dw_up_shared, db_up_shared): contiguous views, cast to each weight's dtype where it differs."""
    (r, D), du, ds = w_down.shape, w_up_unique.shape[0], w_up_shared.shape[0]
    # dW_up's unique rows, then its shared rows, then db_up likewise: one split cuts all six
    dw_down, db_down, dw_up_unique, dw_up_shared, db_up_unique, db_up_shared = grads_flat.split_with_sizes(
        (r * D, r, du * r, ds * r, du, ds))
    return (_as(dw_down.view(r, D), w_down.dtype), _as(db_down, b_down.dtype),
            _as(dw_up_unique.view(du, r), w_up_unique.dtype), _as(db_up_unique, w_up_unique.dtype),
            _as(dw_up_shared.view(ds, r), w_up_shared.dtype), _as(db_up_shared, w_up_shared.dtype))


def adapter_backward(dy, h, w_down, b_down, w_up_unique, w_up_shared, activation="quick_gelu", need_dh=True):
    """Launch the fused backward.

    dy, h: [..., D]. Returns (dh [..., D] in h's dtype (None with need_dh=False), dw_down [r, D], db_down [r],
    dw_up_unique [D - d_s, r], db_up_unique [D - d_s], dw_up_shared [d_s, r], db_up_shared [d_s]),
    each weight gradient in its weight's dtype, reduced over tokens in fp32 deterministically.
    The weight gradients are views of one buffer (one reduction launch for all six).
    """
    dh, grads_flat = adapter_backward_flat(dy, h, w_down, b_down, w_up_unique, w_up_shared, activation, need_dh)
    return dh, *split_grads(grads_flat, w_down, b_down, w_up_unique, w_up_shared)


# ----------------------------------------------------------------------------------------------
# autograd: a plain autograd.Function in eager mode (low per-call overhead: 96 calls per ViT-B
# training step), the same launchers registered through torch.library for torch.compile.


class FusedAdapterFunction(torch.autograd.Function):
    """fused_adapter in eager mode: forward and backward one launch each (adapter_forward,
    adapter_backward); saves h and the weights, no activation of size N x D."""

    @staticmethod
    def forward(ctx, h, w_down, b_down, w_up_unique, b_up_unique, w_up_shared, b_up_shared, residual, activation):
        ctx.save_for_backward(h, w_down, b_down, w_up_unique, w_up_shared)
        ctx.activation, ctx.has_residual = activation, residual is not None
        return adapter_forward(h, w_down, b_down, w_up_unique, b_up_unique, w_up_shared, b_up_shared, residual,
                               activation)

    @staticmethod
    def backward(ctx, dy):
        grads = adapter_backward(dy, *ctx.saved_tensors, ctx.activation, need_dh=ctx.needs_input_grad[0])
        return *grads, dy if ctx.has_residual else None, None   # the residual's gradient is dy itself


@torch.library.custom_op("cma::fused_adapter", mutates_args=())
def _fused_adapter_op(h: torch.Tensor, w_down: torch.Tensor, b_down: torch.Tensor,
                      w_up_unique: torch.Tensor, b_up_unique: torch.Tensor,
                      w_up_shared: torch.Tensor, b_up_shared: torch.Tensor,
                      residual: Optional[torch.Tensor], activation: str) -> torch.Tensor:
    return adapter_forward(h, w_down, b_down, w_up_unique, b_up_unique, w_up_shared, b_up_shared,
                           residual, activation)


@_fused_adapter_op.register_fake
def _(h, w_down, b_down, w_up_unique, b_up_unique, w_up_shared, b_up_shared, residual, activation):
    dtype = h.dtype if residual is None else torch.promote_types(h.dtype, residual.dtype)
    return h.new_empty(h.shape, dtype=dtype)


@torch.library.custom_op("cma::fused_adapter_backward", mutates_args=())
def _fused_adapter_backward_op(dy: torch.Tensor, h: torch.Tensor, w_down: torch.Tensor, b_down: torch.Tensor,
                               w_up_unique: torch.Tensor, w_up_shared: torch.Tensor, activation: str,
                               need_dh: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """adapter_backward_flat as an op; without need_dh, dh is an empty [0] tensor."""
    dh, grads_flat = adapter_backward_flat(dy, h, w_down, b_down, w_up_unique, w_up_shared, activation, need_dh)
    return (dh if need_dh else h.new_empty(0)), grads_flat


@_fused_adapter_backward_op.register_fake
def _(dy, h, w_down, b_down, w_up_unique, w_up_shared, activation, need_dh):
    (r, D) = w_down.shape
    return h.new_empty(h.shape if need_dh else (0,)), h.new_empty(2 * r * D + r + D, dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    h, w_down, b_down, w_up_unique, _, w_up_shared, _, residual, activation = inputs
    ctx.save_for_backward(h, w_down, b_down, w_up_unique, w_up_shared)
    ctx.activation, ctx.has_residual = activation, residual is not None


def _op_backward(ctx, dy):
    _, w_down, b_down, w_up_unique, w_up_shared = ctx.saved_tensors
    need_dh = ctx.needs_input_grad[0]
    dh, grads_flat = torch.ops.cma.fused_adapter_backward(dy, *ctx.saved_tensors, ctx.activation, need_dh)
    return dh if need_dh else None, *split_grads(grads_flat, w_down, b_down, w_up_unique, w_up_shared), \
        dy if ctx.has_residual else None, None


_fused_adapter_op.register_autograd(_op_backward, setup_context=_setup_context)


def fused_adapter_unchecked(h, w_down, b_down, w_up_unique, b_up_unique, w_up_shared, b_up_shared,
                            residual=None, activation="quick_gelu"):
    """fused_adapter without the argument checks, for callers whose shapes hold by construction."""
    args = (h, w_down, b_down, w_up_unique, b_up_unique, w_up_shared, b_up_shared, residual, activation)
    if torch.compiler.is_compiling():
        return torch.ops.cma.fused_adapter(*args)
    return FusedAdapterFunction.apply(*args)


def fused_adapter(h, w_down, b_down, w_up_unique, b_up_unique, w_up_shared, b_up_shared,
                  residual=None, activation="quick_gelu"):
    """Cross-Modal Adapter (plus the block's residual add) in one Triton launch; differentiable.

    h, residual: [..., D] (fp32, fp16 or bf16; any layout, a copy is made only when rows cannot
    be viewed with unit column stride); w_down: [r, D]; b_down: [r]; w_up_unique: [D - d_s, r];
    b_up_unique: [D - d_s]; w_up_shared: [d_s, r]; b_up_shared: [d_s]; 1 <= r <= 64, 0 <= d_s <= D.
    Returns residual + h + W_up . act(W_down . h + b_down) + b_up, [..., D]. Runs on CUDA
    tensors (compute capability 7.0+), or on CPU tensors under TRITON_INTERPRET=1. Under
    torch.compile it is the registered op torch.ops.cma.fused_adapter (no graph break).
    """
    check_adapter_args(h, w_down, b_down, w_up_unique, b_up_unique, w_up_shared, b_up_shared, residual, activation)
    if not 1 <= w_down.shape[0] <= MAX_RANK:
        raise ValueError(f"fused_adapter supports 1 <= r <= {MAX_RANK}, got r={w_down.shape[0]}; "
                         f"use cma_kernels.adapter_reference for larger bottlenecks")
    if not triton_runs_on(h.device):
        raise ValueError(f"fused_adapter runs on CUDA GPUs of compute capability 7.0+ (or on CPU tensors with "
                         f"TRITON_INTERPRET=1 set before import), got {describe_device(h.device)}; use "
                         f"cma_kernels.adapter_reference there")
    return fused_adapter_unchecked(h, w_down, b_down, w_up_unique, b_up_unique, w_up_shared, b_up_shared,
                                   residual, activation)
