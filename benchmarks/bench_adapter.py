"""Adapter op throughput: fused Triton vs eager reference vs torch.compile(reference) vs the
memory floor (bytes that must move / measured device copy bandwidth).

    python benchmarks/bench_adapter.py [--out benchmarks/results] [--quick] [--budget-s S] [--dtypes ...]

Forward is `residual + adapter(h)`; fwd+bwd adds the gradients of h, the residual and all six
weights. Floor bytes: forward reads x and h and writes out; backward reads dy and h and writes dh.
Each call is timed twice on a GPU: as called (`*_ms`: what a model's eager step pays, the host's
launch time included wherever the host is the slower side) and replayed as a CUDA graph
(`*_gpu_ms`: the GPU's time alone, what a step recorded as graphs pays, `cma train --cuda-graphs`).
On CPU only the eager reference runs (small shapes): the fused and compiled numbers need CUDA.
--smoke runs the GPU code path on the CPU instead (tiny shapes, the kernels in Triton's
interpreter, TRITON_INTERPRET=1): no meaningful numbers, but the script is known to work.
--budget-s starts no new shape once the time is up (each shape compiles torch.compile's graphs
afresh, seconds per shape on a GPU); the shapes run targets first, and a run cut short still
prints its table, writes its plot and lists the shapes it skipped.
--dtypes: bf16 and fp32 by default, fp16 and fp32 on a GPU without bf16 (compute capability below
8.0: T4, V100), as `cma train --precision auto` picks; fp32 alone on the CPU.
--matmul-precision sets torch.set_float32_matmul_precision for the run: fp32 matmuls of eager and
compiled PyTorch and the fused kernels' fp32 dots alike ("high": TF32 in cuBLAS, three TF32 dots
each in the fused kernels). Its results go to adapter_fp32-<precision>_<device>_<date>.
--fp32-kernels tl-dot runs fp32 through the tl.dot kernels (adapter_op.FMA_MAX_RANK = 0) instead
of the FMA kernels the default precision takes at r <= 16, to compare the two in one session; its
results go to adapter_fp32-tl-dot_<device>_<date>.
"""
import argparse
import os
import time

import torch

try:
    from cma_benchmarks.common import (bar_chart, copy_bandwidth_gbps, fresh_compile, graph_ms, print_table,
                                       run_info, slug, time_ms, write_results)
except ImportError:   # run from a checkout that is not pip-installed
    from common import (bar_chart, copy_bandwidth_gbps, fresh_compile, graph_ms, print_table, run_info, slug,
                        time_ms, write_results)
import cma_kernels.adapter_op as adapter_op
from cma_kernels import MAX_RANK, adapter_reference, fused_adapter
from cma_train.backbone import autocast_dtype

GPU_SHAPES = [(N, D) for D in (768, 512) for N in (19200, 153600, 1048576)]   # the targets' shapes first
CPU_SHAPES = [(4096, 512), (4096, 768)]
SMOKE_SHAPES = [(64, 64)]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def make_inputs(N, D, r, ds, dtype, device, seed=0):
    """Fresh random adapter inputs, drawn on the device (a CPU draw of the largest shape's 1.6 G
    values took seconds): (h, residual, [w_down, b_down, w_up_unique, b_up_unique, w_up_shared,
    b_up_shared])."""
    g = torch.Generator(device=device).manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device, dtype=dtype) * scale).requires_grad_()

    weights = [rand(r, D, scale=0.02), rand(r, scale=0.02), rand(D - ds, r, scale=0.02), rand(D - ds, scale=0.02),
               rand(ds, r, scale=0.02), rand(ds, scale=0.02)]
    return rand(N, D), rand(N, D), weights


def bench_shape(N, D, dtype, device, r, ds, variants, bandwidth, compile_backend=None):
    """One result row: median ms of each variant {name: adapter function}, forward and fwd+bwd, and
    the floor. compile_backend adds torch.compile(adapter_reference) on that backend, compiled
    afresh for this shape."""
    if compile_backend:
        variants = {**variants, "compile": fresh_compile(adapter_reference, compile_backend)}
    h, x, weights = make_inputs(N, D, r, ds, dtype, device)
    inputs = [h, x] + weights
    dy = torch.randn(N, D, dtype=dtype, device=device)
    row = {"N": N, "D": D, "dtype": str(dtype).replace("torch.", ""), "r": r, "d_s": ds}
    for name, fn in variants.items():
        def forward(fn=fn):
            with torch.no_grad():
                return fn(h, *weights, residual=x)

        def forward_backward(fn=fn):
            return torch.autograd.grad(fn(h, *weights, residual=x), inputs, dy)

        for kind, call in (("fwd", forward), ("fwdbwd", forward_backward)):
            row[f"{name}_{kind}_ms"] = time_ms(call, device)
            if device.type == "cuda":   # the same call replayed as a CUDA graph: without the host's time
                row[f"{name}_{kind}_gpu_ms"] = graph_ms(call, device)
    nbytes = N * D * dtype.itemsize
    row["floor_fwd_ms"] = 3 * nbytes / (bandwidth * 1e9) * 1e3
    row["floor_fwdbwd_ms"] = 6 * nbytes / (bandwidth * 1e9) * 1e3
    if "fused" in variants:
        row["fused_fwd_pct_of_copy_bw"] = 100 * row["floor_fwd_ms"] / row["fused_fwd_ms"]
        row["fused_fwdbwd_pct_of_copy_bw"] = 100 * row["floor_fwdbwd_ms"] / row["fused_fwdbwd_ms"]
    return row


def plot(rows, variants, path):
    groups = [f"{r['dtype']}\n{r['N']}x{r['D']}" for r in rows]
    panels = []
    for kind, title in (("fwd", "forward"), ("fwdbwd", "forward + backward")):
        series = {v: [r[f"{v}_{kind}_ms"] for r in rows] for v in variants}
        if all(r.get(f"fused_{kind}_gpu_ms") for r in rows):   # CUDA: the fused op's GPU time alone too
            series["fused (graph replay)"] = [r[f"fused_{kind}_gpu_ms"] for r in rows]
        series["floor"] = [r[f"floor_{kind}_ms"] for r in rows]
        panels.append((title, "ms (median)", groups, series, True))
    bar_chart(path, panels)


def main(argv=None, prog=None):
    """Run the benchmark (arguments as the module docstring says); returns the result rows. The
    process's fp32 matmul precision and fp32 kernels are as before afterwards."""
    before = torch.get_float32_matmul_precision(), adapter_op.FMA_MAX_RANK
    try:
        return _main(argv, prog)
    finally:
        torch.set_float32_matmul_precision(before[0])
        adapter_op.FMA_MAX_RANK = before[1]


def _main(argv, prog):
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench", help="folder for the JSON/CSV/PNG results (default runs/bench)")
    p.add_argument("--quick", action="store_true", help="GPU: only N=19200 and 153600 at D=768")
    p.add_argument("--r", type=int, default=8, help="bottleneck width r (default 8, the MSR-VTT config)")
    p.add_argument("--ds", type=int, default=16, help="shared channels d_s (default 16)")
    p.add_argument("--budget-s", type=float, default=None, help="start no new shape after this many seconds "
                   "(the first always runs; the rest are listed as skipped)")
    p.add_argument("--smoke", action="store_true", help="the GPU code path on the CPU, tiny shapes (needs "
                   "TRITON_INTERPRET=1): exercises the script only")
    p.add_argument("--matmul-precision", choices=["highest", "high", "medium"],
                   help="torch.set_float32_matmul_precision for the run (default: PyTorch's, highest)")
    p.add_argument("--fp32-kernels", choices=["default", "tl-dot"], default="default",
                   help="tl-dot: fp32 through the tl.dot kernels, not the FMA kernels (default: default)")
    p.add_argument("--dtypes", nargs="+", choices=DTYPES, help="(default: bf16 fp32 on a GPU of compute capability "
                   "8.0+, fp16 fp32 below; fp32 on the CPU and with --smoke)")
    args = p.parse_args(argv)
    if args.smoke and os.environ.get("TRITON_INTERPRET") != "1":
        p.error("--smoke runs the kernels in Triton's interpreter: set TRITON_INTERPRET=1")
    if not 1 <= args.r <= MAX_RANK:
        p.error(f"--r must be in [1, {MAX_RANK}] (the fused kernel's range), got {args.r}")

    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    half = autocast_dtype("auto", device) if device.type == "cuda" else None   # bf16; fp16 on a GPU without it
    if args.dtypes is None:
        dtypes = [half, torch.float32] if half else [torch.float32]
    else:
        dtypes = [DTYPES[name] for name in dict.fromkeys(args.dtypes)]
    if torch.bfloat16 in dtypes and args.smoke:
        p.error("--dtypes bf16 --smoke: Triton's interpreter computes bf16 tl.dot wrongly; smoke-test fp32 or fp16")
    if torch.bfloat16 in dtypes and half == torch.float16:
        p.error(f"--dtypes bf16: the {torch.cuda.get_device_name(device)} has no bf16 (compute capability "
                f"8.0+ has it); benchmark fp16 instead (the default here)")
    if args.matmul_precision:
        torch.set_float32_matmul_precision(args.matmul_precision)
    if args.fp32_kernels == "tl-dot":
        adapter_op.FMA_MAX_RANK = 0
    info = {**run_info(device), "smoke": args.smoke, "fp32_matmul_precision": torch.get_float32_matmul_precision(),
            "fp32_kernels": args.fp32_kernels}
    bandwidth = copy_bandwidth_gbps(device)
    info["copy_GBps"] = bandwidth
    if args.smoke or device.type == "cuda":
        variants = {"fused": fused_adapter, "eager": adapter_reference}
        compile_backend = "aot_eager" if args.smoke else "inductor"   # smoke: no inductor build, same path
        shapes = SMOKE_SHAPES if args.smoke else [(N, 768) for N in (19200, 153600)] if args.quick else GPU_SHAPES
    else:
        print("No CUDA device: timing the eager reference on CPU only; the fused and torch.compile numbers need CUDA.")
        variants, shapes = {"eager": adapter_reference}, CPU_SHAPES
        compile_backend = None
    narrowest = min(D for _, D in shapes)
    if not 0 <= args.ds <= narrowest:
        p.error(f"--ds must be in [0, {narrowest}] (the narrowest width benchmarked here), got {args.ds}")
    names = [*variants, "compile"] if compile_backend else list(variants)
    print(f"{info['device']}  copy bandwidth {bandwidth:.0f} GB/s  r={args.r} d_s={args.ds}  "
          f"fp32 matmul precision {info['fp32_matmul_precision']}")

    precision = f"_fp32-{args.matmul_precision}" if args.matmul_precision not in (None, "highest") else ""
    precision += "_fp32-tl-dot" if args.fp32_kernels == "tl-dot" else ""
    stem = f"adapter{precision}{'_smoke' if args.smoke else ''}_{slug(info['device'])}_{info['date']}"
    rows, skipped = [], []
    deadline = time.monotonic() + args.budget_s if args.budget_s is not None else float("inf")
    for dt in dtypes:
        for N, D in shapes:
            if rows and time.monotonic() > deadline:
                skipped.append(f"{str(dt).replace('torch.', '')} {N}x{D}")
                continue
            rows.append(bench_shape(N, D, dt, device, args.r, args.ds, variants, bandwidth, compile_backend))
            print(f"{rows[-1]['dtype']} {N}x{D}: " + ", ".join(f"{v} {rows[-1][f'{v}_fwdbwd_ms']:.3f}"
                                                             for v in names) + " ms fwd+bwd", flush=True)
            write_results(args.out, stem, {**info, "complete": False}, rows)   # a run cut short keeps its rows
    cols = ["dtype", "N", "D"] + [f"{v}_{k}_ms" for k in ("fwd", "fwdbwd") for v in names + ["floor"]]
    if device.type == "cuda":
        cols += [f"{v}_{k}_gpu_ms" for k in ("fwd", "fwdbwd") for v in names]
    if "fused" in variants:
        cols += ["fused_fwd_pct_of_copy_bw", "fused_fwdbwd_pct_of_copy_bw"]
    print_table(rows, cols)
    if skipped:
        print(f"time is up after {args.budget_s:g} s: skipped {', '.join(skipped)}")
    path = write_results(args.out, stem, {**info, "complete": not skipped, "skipped": skipped}, rows)
    plot(rows, names, path + ".png")
    print(f"wrote {path}.json, .csv, .png")
    return rows


if __name__ == "__main__":
    main()
