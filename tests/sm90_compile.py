"""Compile the fused adapter and quick_gelu kernels for sm_90 (H100/H200) on a machine without a GPU.

Triton lowers to PTX and runs its bundled ptxas without a device, which catches what the CPU
interpreter lets through (tl.dot shape rules, dtype mixes, shared-memory overflow). Run in a
process WITHOUT TRITON_INTERPRET:  python tests/sm90_compile.py [--all]
"""
import itertools
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import cma_kernels.adapter_op as op
import cma_kernels.quick_gelu as qg

SM90_SHARED_BYTES = 227 * 1024


def signature(kernel, pointers, ints):
    return {a: pointers.get(a) or ("i32" if a in ints else "constexpr") for a in kernel.arg_names}


def compile_sm90(kernel, pointers, ints, constexprs, num_warps, num_stages=3):
    """Compile one kernel for sm_90; returns the shared memory it needs, refusing more than sm_90 has."""
    src = ASTSource(fn=kernel, signature=signature(kernel, pointers, ints), constexprs=constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages))
    if compiled.metadata.shared > SM90_SHARED_BYTES:
        raise RuntimeError(f"{kernel.__name__} needs {compiled.metadata.shared} bytes of shared memory")
    return compiled.metadata.shared


def compile_pair(dtype, r, act, need_dh=True, weight_dtype="fp32"):
    """Compile forward and backward for one (activation dtype, r, activation, dh or not); returns
    shared bytes."""
    r_pad = max(16, triton.next_power_of_2(r))
    precision = "ieee" if dtype == "fp32" else "tf32"
    w = {n: f"*{weight_dtype}" for n in ("w_down_ptr", "b_down_ptr", "w_up_unique_ptr", "b_up_unique_ptr",
                                         "w_up_shared_ptr", "b_up_shared_ptr")}
    fwd = (op._adapter_fwd_kernel,
           {"h_ptr": f"*{dtype}", "residual_ptr": f"*{dtype}", "out_ptr": f"*{dtype}", **w},
           {"N", "D", "DS", "stride_h", "stride_res"},
           dict(R=r, R_PAD=r_pad, ACT=act, HAS_RESIDUAL=True, DOT_PRECISION=precision,
                BLOCK_N=op.FWD_CONFIG["BLOCK_N"], BLOCK_D=op.FWD_CONFIG["BLOCK_D"]), op.FWD_CONFIG)
    bwd = (op._adapter_bwd_kernel,
           {"dy_ptr": f"*{dtype}", "h_ptr": f"*{dtype}", "dh_ptr": f"*{dtype}", **w, "grads_part_ptr": "*fp32"},
           {"N", "D", "DS", "GRADS", "stride_dy", "stride_h", "TILES_PER_PROGRAM"},
           dict(R=r, R_PAD=r_pad, ACT=act, NEED_DH=need_dh, DOT_PRECISION=precision,
                BLOCK_N=op.BWD_CONFIG["BLOCK_N"], BLOCK_D=op.BWD_CONFIG["BLOCK_D"]), op.BWD_CONFIG)
    return [compile_sm90(kernel, pointers, ints, constexprs, cfg["num_warps"], cfg["num_stages"])
            for kernel, pointers, ints, constexprs, cfg in (fwd, bwd)]


def compile_quick_gelu(dtype):
    """Compile the quick_gelu forward and backward kernels for one storage dtype."""
    for kernel, pointers in ((qg._quick_gelu_fwd_kernel, ("z_ptr", "y_ptr")),
                             (qg._quick_gelu_bwd_kernel, ("z_ptr", "dy_ptr", "dz_ptr"))):
        compile_sm90(kernel, {a: f"*{dtype}" for a in pointers}, {"n"}, dict(BLOCK=qg.BLOCK), qg.NUM_WARPS)


def main(argv):
    cases = list(itertools.product(["bf16", "fp16", "fp32"], [1, 4, 8, 16, 32, 64], [0], [True])) \
        + [("bf16", 8, 1, True), ("bf16", 8, 0, False)] if "--all" in argv else \
        [("bf16", 8, 0, True), ("bf16", 8, 0, False), ("bf16", 4, 1, True), ("fp16", 16, 0, True),
         ("fp32", 64, 0, True), ("bf16", 64, 0, True)]
    for dtype, r, act, need_dh in cases:
        print(dtype, f"r={r}", ("quick_gelu", "gelu")[act], "dh" if need_dh else "no dh", "shared bytes fwd/bwd",
              compile_pair(dtype, r, act, need_dh), flush=True)
    for dtype in ("bf16", "fp16", "fp32"):
        compile_quick_gelu(dtype)
    print("quick_gelu bf16/fp16/fp32 compiled")
    print("all compiled for sm_90")


if __name__ == "__main__":
    main(sys.argv[1:])
