"""quick_gelu on the MLP hidden activation: fused Triton vs eager open_clip QuickGELU vs
torch.compile of it vs the memory floor (bytes that must move / measured device copy bandwidth).

    python benchmarks/bench_quick_gelu.py [--out benchmarks/results]

Shapes: the [tokens, 4 x width] hidden activation of ViT-B/32 and ViT-B/16 at 32 videos x 12
frames (19200 and 75648 tokens, width 768), bf16 (fp16 on a GPU without bf16). Floor bytes:
forward reads z and writes y; backward reads z and dy and writes dz. Needs CUDA; --smoke runs the
fused path on the CPU in Triton's interpreter and the compiled one through aot_eager (tiny shape,
TRITON_INTERPRET=1): no meaningful numbers.
"""
import argparse
import os

import torch
from open_clip.transformer import QuickGELU

try:
    from cma_benchmarks.common import (copy_bandwidth_gbps, fresh_compile, print_table, run_info, slug, time_ms,
                                       write_results)
except ImportError:   # run from a checkout that is not pip-installed
    from common import copy_bandwidth_gbps, fresh_compile, print_table, run_info, slug, time_ms, write_results
from cma_kernels import fused_quick_gelu
from cma_train.backbone import autocast_dtype

GPU_SHAPES = [(19200, 3072), (75648, 3072)]
SMOKE_SHAPES = [(64, 256)]


def bench_shape(N, width, dtype, device, variants, bandwidth, compile_backend=None):
    """One result row: median ms of each variant {name: function}, forward and fwd+bwd, and the
    floor. compile_backend adds torch.compile of the eager variant, compiled afresh for this shape."""
    if compile_backend:
        variants = {**variants, "compile": fresh_compile(variants["eager"], compile_backend)}
    z = torch.randn(N, width, dtype=dtype, device=device, requires_grad=True)
    dy = torch.randn_like(z)
    row = {"N": N, "hidden": width, "dtype": str(dtype).replace("torch.", "")}
    for name, fn in variants.items():
        with torch.no_grad():
            row[f"{name}_fwd_ms"] = time_ms(lambda: fn(z), device)
        row[f"{name}_fwdbwd_ms"] = time_ms(lambda: torch.autograd.grad(fn(z), z, dy), device)
    nbytes = z.numel() * dtype.itemsize
    row["floor_fwd_ms"] = 2 * nbytes / (bandwidth * 1e9) * 1e3
    row["floor_fwdbwd_ms"] = 5 * nbytes / (bandwidth * 1e9) * 1e3
    row["fused_fwdbwd_pct_of_copy_bw"] = 100 * row["floor_fwdbwd_ms"] / row["fused_fwdbwd_ms"]
    if "eager" in variants:
        row["eager_over_fused_fwdbwd"] = row["eager_fwdbwd_ms"] / row["fused_fwdbwd_ms"]
    return row


def main(argv=None, prog=None):
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench", help="folder for the JSON/CSV results (default runs/bench)")
    p.add_argument("--smoke", action="store_true", help="the fused and compiled paths on the CPU, tiny shape (needs "
                   "TRITON_INTERPRET=1): exercises the script only")
    args = p.parse_args(argv)
    if args.smoke and os.environ.get("TRITON_INTERPRET") != "1":
        p.error("--smoke runs the kernel in Triton's interpreter: set TRITON_INTERPRET=1")
    if not args.smoke and not torch.cuda.is_available():
        print("The quick_gelu benchmark needs CUDA: no GPU here, nothing timed (--smoke tries the script).")
        return None
    device = torch.device("cpu" if args.smoke else "cuda")
    variants = {"fused": fused_quick_gelu, "eager": QuickGELU()}
    compile_backend = "aot_eager" if args.smoke else "inductor"   # smoke: no inductor build, same path
    info = {**run_info(device), "smoke": args.smoke, "copy_GBps": copy_bandwidth_gbps(device)}
    shapes = SMOKE_SHAPES if args.smoke else GPU_SHAPES
    dtype = torch.float32 if args.smoke else autocast_dtype("auto", device)   # bf16; fp16 without it (T4)
    rows = [bench_shape(N, width, dtype, device, variants, info["copy_GBps"], compile_backend) for N, width in shapes]
    names = [*variants, "compile"] if compile_backend else list(variants)
    times = [f"{v}_{k}_ms" for k in ("fwd", "fwdbwd") for v in [*names, "floor"]]
    print_table(rows, ["dtype", "N", "hidden", *times, "fused_fwdbwd_pct_of_copy_bw", "eager_over_fused_fwdbwd"])
    stem = f"quick_gelu{'_smoke' if args.smoke else ''}_{slug(info['device'])}_{info['date']}"
    path = write_results(args.out, stem, info, rows)
    print(f"wrote {path}.json, .csv")
    return rows


if __name__ == "__main__":
    main()
