"""Compile the fused adapter and quick_gelu kernels for sm_90 (H100/H200) on a machine without a
GPU, and report what each needs: registers and local memory per thread (spills), shared memory,
and how many of its global loads and stores are 128 bits wide. Then compile the adapter kernels
for the GPUs with less shared memory per block (sm_86 for A100, A10, RTX 30xx, L4, RTX 40xx;
sm_75 for T4) and check that each fits there: one that does not fails at its first launch on such
a GPU (Triton's OutOfResources), and Triton's shared-memory use differs from one architecture to
the next.

Triton lowers to PTX and runs its bundled ptxas without a device, which catches what the CPU
interpreter lets through (tl.dot shape rules, dtype mixes, shared-memory overflow). The kernels are
specialised as a launch specialises them (16-byte aligned pointers; sizes and row strides that are
multiples of 16, as D, d_s and N are in every model's shapes), so the registers are those the GPU
will run with; the forward with fp32 weights (autocast's masters), the backward with its weights in
h's dtype, as adapter_backward_flat hands them over. A kernel that spills more than MAX_STACK_BYTES
per thread to local memory fails: in these memory-bound kernels spills add their own memory traffic.
So does a 16-bit kernel at r >= 4 (every r issue #3 lists) with under MIN_WIDE_SHARE of its global
memory instructions 128 bits wide: the sign of h, dy or out moved in narrow pieces (a lost alignment
or a layout change), where a 64 x 64 bf16 tile takes 32 scalar loads per thread instead of 4. The
share counts instructions in the SASS, not bytes moved; the few narrow ones load biases and weights
or update the backward's weight-gradient partials (at r = 1 and in fp32 those are most of the count,
so these are not checked). A kernel whose fp32 products must be IEEE fails on any tensor-core
instruction in its PTX: Triton turns some broadcast products summed over an axis into TF32 dots on
its own.
Run in a process WITHOUT TRITON_INTERPRET:
    python tests/sm90_compile.py [--all]
"""
import collections
import itertools
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import cma_kernels.adapter_op as op
import cma_kernels.quick_gelu as qg

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
from tune_adapter import BWD_FIRST  # noqa: E402  (the tuner's candidates, benchmarks/ as a plain folder)

# Shared memory per block (the opt-in maximum) of each architecture the kernels must launch on.
# A100 (sm_80, 163 KB) gets the code of sm_86 with more memory: what fits sm_86 fits it.
SHARED_BYTES = {90: 227 * 1024,   # H100, H200; B200 (sm_100) the same
                86: 99 * 1024,    # A10, A40, RTX 30xx; sm_89 (L4, L40S, RTX 40xx) the same
                75: 64 * 1024}    # T4: fp16 and fp32 (cma_train picks fp16 there, no bf16)
MAX_STACK_BYTES = 32   # a value or two; the configurations this replaced spilled 344 to 3944 bytes
MIN_WIDE_SHARE = 0.8   # 16-bit, r >= 4: 0.82 (the backward at r = 4: 8-byte weight rows) to 0.96
DIVISIBLE_BY_16 = {"N", "D", "DS", "stride_h", "stride_res", "stride_dy", "stride_part", "n"}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
NVDISASM = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
GLOBAL_ACCESS = re.compile(r"\b(LDGSTS|LDG|STG)\.E(?:\.BYPASS)?(\.\d+)?\b")   # e.g. LDG.E.128, LDGSTS.E.BYPASS.128


def signature(kernel, pointers, ints):
    return {a: pointers.get(a) or ("i32" if a in ints else "constexpr") for a in kernel.arg_names}


def resources(cubin):
    """(registers, stack bytes, {global memory instruction: count}) per thread of a cubin, from the
    cuobjdump and nvdisasm bundled with Triton; instructions as "LDG.128", "STG" (32-bit), ..."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
        sass = subprocess.run([NVDISASM, "-c", f.name], capture_output=True, text=True, check=True).stdout
    line = next(line for line in out.splitlines() if "REG:" in line)
    accesses = collections.Counter(op + width for op, width in GLOBAL_ACCESS.findall(sass))
    return int(line.split("REG:")[1].split()[0]), int(line.split("STACK:")[1].split()[0]), accesses


def wide_share(accesses):
    """Share of global memory instructions that move 128 bits."""
    return sum(n for op, n in accesses.items() if op.endswith(".128")) / max(1, sum(accesses.values()))


def compile_sm90(kernel, pointers, ints, constexprs, num_warps, num_stages=3, arch=90):
    """Compile one kernel for sm_90 (or sm_`arch`) as a launch would specialise it; returns
    (registers, stack bytes, shared bytes, global accesses), refusing more shared memory than the
    architecture has, or, on sm_90, spills over MAX_STACK_BYTES, or a tensor-core instruction in a
    kernel whose fp32 products must be IEEE (DOT_PRECISION "ieee"): Triton turns a broadcast
    product summed over its middle axis into a TF32 tl.dot on its own. Other architectures: shared
    bytes only (None for the rest)."""
    aligned = {a for a in kernel.arg_names if a in pointers or a in DIVISIBLE_BY_16 & set(ints)}
    attrs = {(kernel.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    src = ASTSource(fn=kernel, signature=signature(kernel, pointers, ints), constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages))
    if constexprs.get("DOT_PRECISION") == "ieee" and re.search(r"\b(mma|wgmma)\.", compiled.asm["ptx"]):
        raise RuntimeError(f"{kernel.__name__} {constexprs}: its IEEE fp32 products run on tensor cores")
    if compiled.metadata.shared > SHARED_BYTES[arch]:
        raise RuntimeError(f"{kernel.__name__} {constexprs} needs {compiled.metadata.shared} bytes of shared memory, "
                           f"sm_{arch} has {SHARED_BYTES[arch]}")
    if arch != 90:
        return None, None, compiled.metadata.shared, None
    registers, stack, accesses = resources(compiled.asm["cubin"])
    if stack > MAX_STACK_BYTES:
        raise RuntimeError(f"{kernel.__name__} {constexprs} spills: {stack} bytes of stack per thread")
    return registers, stack, compiled.metadata.shared, accesses


def compile_pair(dtype, r, act, need_dh=True, weight_dtype="fp32", arch=90, fp32_precision="ieee"):
    """Compile forward and backward, each with its launch configuration (op.launch_configs), for one
    (activation dtype, r, activation, dh or not) for sm_`arch`; returns [(kernel, (registers, stack,
    shared, accesses))] per kernel ("fwd", "bwd" or the two of a backward in two launches), refusing
    (on sm_90) a 16-bit kernel at r >= 4 whose share of 128-bit global accesses is under
    MIN_WIDE_SHARE. fp32_precision: the fp32 dots' input_precision (op.FP32_DOT_PRECISION's values).
    weight_dtype: the forward's weights (fp32 masters under autocast); the backward gets them in
    h's dtype, as adapter_backward_flat hands them over."""
    precision = fp32_precision if dtype == "fp32" else "tf32"
    fwd_cfg, bwd_cfg = configs(dtype, r, precision)
    fma = op._fma(fwd_cfg)
    w = {n: f"*{weight_dtype}" for n in ("w_down_ptr", "b_down_ptr", "w_up_unique_ptr", "b_up_unique_ptr",
                                         "w_up_shared_ptr", "b_up_shared_ptr")}
    fwd = compile_sm90(op._adapter_fwd_kernel,
                       {"h_ptr": f"*{dtype}", "residual_ptr": f"*{dtype}", "out_ptr": f"*{dtype}", **w},
                       {"N", "D", "DS", "stride_h", "stride_res"},
                       dict(R=r, R_PAD=op._rank_pad(r, fma), ACT=act, HAS_RESIDUAL=True, DOT_PRECISION=precision,
                            FMA=fma, BLOCK_N=fwd_cfg["BLOCK_N"], BLOCK_D=fwd_cfg["BLOCK_D"]),
                       fwd_cfg["num_warps"], fwd_cfg["num_stages"], arch)
    if bwd_cfg.get("SPLIT") or op._fma(bwd_cfg):   # the backward in two launches, as the launcher decides
        bottleneck, stream = compile_split(dtype, r, arch, act, need_dh, precision, bwd_cfg)
        out = [("fwd", fwd), ("bwd bottleneck", bottleneck), ("bwd stream", stream)]
    else:
        bwd = compile_sm90(op._adapter_bwd_kernel,
                           {"dy_ptr": f"*{dtype}", "h_ptr": f"*{dtype}", "dh_ptr": f"*{dtype}",
                            **{n: f"*{dtype}" for n in w}, "grads_part_ptr": "*fp32"},
                           {"N", "D", "DS", "stride_part", "stride_dy", "stride_h", "TILES_PER_PROGRAM"},
                           dict(R=r, R_PAD=op._rank_pad(r), ACT=act, NEED_DH=need_dh, DOT_PRECISION=precision,
                                BLOCK_N=bwd_cfg["BLOCK_N"], BLOCK_D=bwd_cfg["BLOCK_D"]),
                           bwd_cfg["num_warps"], bwd_cfg["num_stages"], arch)
        out = [("fwd", fwd), ("bwd", bwd)]
    for kernel, (*_, accesses) in out:
        if arch == 90 and dtype != "fp32" and r >= 4 and wide_share(accesses) < MIN_WIDE_SHARE:
            raise RuntimeError(f"{kernel} {dtype} r={r}: only {wide_share(accesses):.0%} of its global "
                               f"memory instructions are 128-bit: {dict(accesses)}")
    return out


def configs(dtype, r, precision="ieee"):
    """op.launch_configs on an sm_90 GPU, for fp32 inputs under the matmul precision giving
    `precision` (the launchers' device queries answered as that GPU would, without one)."""
    before = torch.get_float32_matmul_precision(), op._capability_major, op._index
    torch.set_float32_matmul_precision({v: k for k, v in op.FP32_DOT_PRECISION.items()}[precision])
    op._capability_major, op._index = (lambda index: 9), (lambda device: 0)
    try:
        return op.launch_configs(DTYPES[dtype], r)
    finally:
        torch.set_float32_matmul_precision(before[0])
        op._capability_major, op._index = before[1:]


def compile_split(dtype, r, arch=90, act=0, need_dh=True, precision=None, cfg=None):
    """Compile the two kernels of the backward in two launches (SPLIT, and the fp32 FMA kernels'
    backward) with the tiles of cfg (by default that of the launch configuration for (dtype, r),
    made SPLIT); returns [(registers, stack, shared, accesses)] per kernel."""
    precision = precision or ("tf32" if dtype != "fp32" else "ieee")
    cfg = cfg or configs(dtype, r, precision)[1]
    fma = op._fma(cfg)
    w = {n: f"*{dtype}" for n in ("w_down_ptr", "b_down_ptr", "w_up_unique_ptr", "w_up_shared_ptr")}
    tiles = dict(R=r, R_PAD=op._rank_pad(r, fma), DOT_PRECISION=precision, FMA=fma,
                 BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"])
    small = {"a_ptr": "*fp32", "dz_ptr": "*fp32"}
    kernels = [(op._adapter_bwd_bottleneck_kernel, {"dy_ptr": f"*{dtype}", "h_ptr": f"*{dtype}", **w, **small},
                {"N", "D", "DS", "stride_dy", "stride_h"}, dict(tiles, ACT=act)),
               (op._adapter_bwd_stream_kernel, {"dy_ptr": f"*{dtype}", "h_ptr": f"*{dtype}", "dh_ptr": f"*{dtype}",
                                                 "w_down_ptr": f"*{dtype}", **small, "grads_part_ptr": "*fp32"},
                {"N", "D", "stride_part", "stride_dy", "stride_h", "TILES_PER_GROUP"}, dict(tiles, NEED_DH=need_dh))]
    return [compile_sm90(kernel, pointers, ints, constexprs, cfg["num_warps"], cfg["num_stages"], arch)
            for kernel, pointers, ints, constexprs in kernels]


def compile_quick_gelu(dtype):
    """Compile the quick_gelu forward and backward kernels for one storage dtype."""
    for kernel, pointers in ((qg._quick_gelu_fwd_kernel, ("z_ptr", "y_ptr")),
                             (qg._quick_gelu_bwd_kernel, ("z_ptr", "dy_ptr", "dz_ptr"))):
        compile_sm90(kernel, {a: f"*{dtype}" for a in pointers}, {"n"}, dict(BLOCK=qg.BLOCK), qg.NUM_WARPS)


def main(argv):
    cases = list(itertools.product(["bf16", "fp16", "fp32"], [1, 4, 8, 16, 32, 64], [0], [True])) \
        + [("bf16", 8, 1, True), ("bf16", 8, 0, False)] if "--all" in argv else \
        [("bf16", 8, 0, True), ("bf16", 8, 0, False), ("bf16", 4, 1, True), ("fp16", 16, 0, True),
         ("fp32", 8, 0, True), ("fp32", 8, 1, False), ("fp32", 16, 0, True), ("bf16", 64, 0, True),
         ("fp32", 64, 0, True)]
    cases = [(*case, "ieee") for case in cases] + [("fp32", r, 0, True, precision) for r in (8, 64)
                                                   for precision in ("tf32x3", "tf32")]
    for dtype, r, act, need_dh, precision in cases:
        kernels = compile_pair(dtype, r, act, need_dh, fp32_precision=precision)
        print(f"{dtype}{'' if dtype != 'fp32' else ' ' + precision} r={r} {('quick_gelu', 'gelu')[act]} "
              f"{'dh' if need_dh else 'no dh'}: registers / stack "
              f"bytes / shared bytes / 128-bit global accesses: "
              + ", ".join(f"{kind} {regs} / {stack} / {shared} / {wide_share(acc):.0%}"
                          for kind, (regs, stack, shared, acc) in kernels), flush=True)
    for dtype, r in (("bf16", 8), ("bf16", 64)):
        (k1, _, s1, _), (k2, _, s2, _) = compile_split(dtype, r)
        print(f"{dtype} r={r} backward SPLIT (a tuner candidate): registers / shared bytes: bottleneck {k1} / {s1}, "
              f"stream {k2} / {s2}", flush=True)
    for cfg in (c for c in BWD_FIRST if c["FMA"]):
        (k1, _, s1, _), (k2, _, s2, _) = compile_split("bf16", 8, cfg=cfg)
        print(f"bf16 r=8 backward FMA, {cfg['BLOCK_N']} x {cfg['BLOCK_D']} tiles, {cfg['num_warps']} warps (a tuner "
              f"candidate): registers / shared bytes: bottleneck {k1} / {s1}, stream {k2} / {s2}", flush=True)
    for dtype in ("bf16", "fp16", "fp32"):
        compile_quick_gelu(dtype)
    print("quick_gelu bf16/fp16/fp32 compiled")
    print("all compiled for sm_90")
    # shared memory grows with r within each launch configuration (op._CONFIGS): r = 32 and 64 are
    # the largest of each; fp16 needs what bf16 needs. --all compiles every r and dtype.
    most = collections.defaultdict(int)   # arch -> the most shared memory a kernel needs
    for arch in (86, 75):
        dtypes = ["bf16" if arch >= 80 else "fp16", "fp32"] + (["fp16"] if "--all" in argv and arch >= 80 else [])
        for dtype, r in itertools.product(dtypes, [1, 4, 8, 16, 32, 64] if "--all" in argv else [32, 64]):
            most[arch] = max(most[arch], *(shared for _, (_, _, shared, _) in compile_pair(dtype, r, 0, True,
                                                                                           arch=arch)))
    print("shared memory fits: " + ", ".join(f"sm_{arch} needs at most {n} of {SHARED_BYTES[arch]} bytes"
                                             for arch, n in most.items()))


if __name__ == "__main__":
    main(sys.argv[1:])
