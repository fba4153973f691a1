"""Sweep the fused adapter's launch configurations on a GPU and report the best per shape.

    python benchmarks/tune_adapter.py [--out benchmarks/results]

Prints the forward's and the backward's medians per configuration (bf16, or fp16 on a GPU without
it; r=8, d_s=16), each launch replayed as a CUDA graph (the kernel's time alone, which is what a
launch configuration changes), and writes them to tune_<device>_<date>.json. Copy a winner into
FWD_CONFIG / BWD_CONFIG in cma_kernels/adapter_op.py only after it wins at every benchmarked shape.
--dtype fp32 sweeps the fp32 kernels instead (FP32_FMA_CONFIGS at r=8, their own tile space: the
products kept in registers grow with the values of h per thread), into
tune_fp32_<device>_<date>.json.

Order: the current configuration, then the candidates in BWD_FIRST (backward), then the rest of
the space, nearest to the current configuration first. --budget-s stops sweeping when the time is
up (each new configuration compiles first, a second or two) and still writes what was measured.
--smoke sweeps two configurations per kernel on the CPU in Triton's interpreter
(TRITON_INTERPRET=1): script check only.
"""
import argparse
import itertools
import os
import time

import torch

try:
    from cma_benchmarks.bench_adapter import make_inputs
    from cma_benchmarks.common import copy_bandwidth_gbps, graph_ms, run_info, slug, time_ms, write_results
except ImportError:
    from bench_adapter import make_inputs
    from common import copy_bandwidth_gbps, graph_ms, run_info, slug, time_ms, write_results
import cma_kernels.adapter_op as fa
from cma_train.backbone import autocast_dtype

FWD_SPACE = dict(BLOCK_N=[16, 32, 64, 128], BLOCK_D=[64, 128, 256], num_warps=[4, 8], num_stages=[2, 3, 4])
BWD_SPACE = dict(BLOCK_N=[32, 64, 128], BLOCK_D=[64, 128], num_warps=[4, 8], num_stages=[2, 3],
                 PROGRAMS_PER_SM=[1, 2, 4], SPLIT=[False, True], FMA=[False, True])
# the FMA kernels' (fp32): fewer values of h per thread, and the backward always in two launches
FMA_FWD_SPACE = dict(BLOCK_N=[8, 16, 32], BLOCK_D=[32, 64, 128], num_warps=[2, 4, 8], num_stages=[2])
FMA_BWD_SPACE = dict(BLOCK_N=[2, 4, 8], BLOCK_D=[64, 128, 256], num_warps=[1, 2, 4, 8], num_stages=[2],
                     PROGRAMS_PER_SM=[2, 4, 8])
# Timed right after the current backward configuration, ahead of its neighbours (not all of them
# points of BWD_SPACE). Every one-launch configuration keeps at most 12 warps on an SM (each
# compiled with tests/sm90_compile.py's compile_sm90, bf16 r=8: 148 to 255 registers per thread;
# these ranges were compiled with fp32 weight pointers, the FMA ones with bf16 as launched), and
# the H200 profile had it at 4x its memory floor: latency, not bytes.
# - the fastest at N = 19200 on the H200 (0.129 ms against the current 0.192), not timed at 153600;
# - SPLIT, the backward in two launches (two more reads of h and dy, more warps per SM: the first
#   kernel 48 to 83 registers, 20 to 32 warps; the second 122 to 144, 12 to 16);
# - 128-row tiles: half the per-row cost of the fp32 weight-gradient partials, one program per SM;
# - the FMA kernels (fp32's default at r <= 16) on bf16 inputs, products in fp32: two launches,
#   no tl.dot, 4 rows per tile (tests/sm90_compile.py, bf16 r=8: 128 to 212 registers, no
#   spill; the stream kernel's weight gradients summed over rows inside each thread).
# The sweep decides.
BWD_FIRST = [dict(BLOCK_N=64, BLOCK_D=64, num_warps=8, num_stages=2, PROGRAMS_PER_SM=4, SPLIT=False, FMA=False),
             dict(BLOCK_N=32, BLOCK_D=64, num_warps=4, num_stages=3, PROGRAMS_PER_SM=4, SPLIT=True, FMA=False),
             dict(BLOCK_N=64, BLOCK_D=64, num_warps=8, num_stages=2, PROGRAMS_PER_SM=4, SPLIT=True, FMA=False),
             dict(BLOCK_N=32, BLOCK_D=64, num_warps=8, num_stages=2, PROGRAMS_PER_SM=4, SPLIT=True, FMA=False),
             dict(BLOCK_N=128, BLOCK_D=64, num_warps=8, num_stages=2, PROGRAMS_PER_SM=1, SPLIT=False, FMA=False),
             dict(BLOCK_N=4, BLOCK_D=64, num_warps=1, num_stages=2, PROGRAMS_PER_SM=8, SPLIT=True, FMA=True),
             dict(BLOCK_N=4, BLOCK_D=128, num_warps=2, num_stages=2, PROGRAMS_PER_SM=4, SPLIT=True, FMA=True)]


def search_order(space, current, first=()):
    """Every configuration of space (a tuple of values per configuration): the current one, then
    the configurations in `first` (dicts), then the rest nearest to the current one first (those
    differing in one setting, then in two, ...; the grid's order among equals). A sweep cut short
    by its time budget has then tried the candidates and the current configuration's neighbours
    rather than one corner of the grid."""
    def distance(values):
        return sum(v != c for v, c in zip(values, current))
    ahead = [current] + [values for values in (tuple(f[k] for k in space) for f in first) if values != current]
    return ahead + sorted((values for values in itertools.product(*space.values()) if values not in ahead),
                          key=distance)


def sweep(space, target, fn, device, deadline=float("inf"), limit=None, first=()):
    """Time fn under each configuration of space (written into the config dict target) in
    search_order; stops at the deadline (time.monotonic()) or after limit configs. On a GPU each
    launch is timed replayed as a CUDA graph (graph_ms: the kernel's time, not the host's)."""
    default = dict(target)
    timer = graph_ms if device.type == "cuda" else time_ms
    rows = []
    configs = search_order(space, tuple(default.get(k) for k in space), first)
    for values in configs[:limit]:
        if time.monotonic() > deadline:
            print(f"  time is up: {len(rows)} of {len(configs)} configurations timed")
            break
        target.update(zip(space, values))
        try:
            ms = timer(fn, device)
        except Exception as e:   # out of resources for this block shape: skip it
            print(f"  skip {dict(zip(space, values))}: {type(e).__name__}")
            continue
        if ms is None:   # graph_ms could not record it (and said why)
            continue
        rows.append({**dict(zip(space, values)), "ms": ms})
    target.clear()
    target.update(default)
    return sorted(rows, key=lambda r: r["ms"])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--N", type=int, nargs="+", default=[19200, 153600])
    p.add_argument("--D", type=int, default=768)
    p.add_argument("--budget-s", type=float, default=None, help="stop sweeping after this many seconds")
    p.add_argument("--dtype", choices=["auto", "fp32"], default="auto",
                   help="auto: bf16 (fp16 on a GPU without it); fp32: the fp32 kernels (default auto)")
    p.add_argument("--smoke", action="store_true", help="two configurations on the CPU (TRITON_INTERPRET=1)")
    args = p.parse_args(argv)
    if min(args.N) < 1 or args.D < 16:
        p.error("--N must be >= 1 and --D >= 16")
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            p.error("--smoke runs the kernels in Triton's interpreter: set TRITON_INTERPRET=1")
        device, dtype, args.N, args.D, limit = torch.device("cpu"), torch.float32, [64], 64, 2
    elif torch.cuda.is_available():
        device, limit = torch.device("cuda"), None
        dtype = autocast_dtype("auto", device) if args.dtype == "auto" else torch.float32   # auto: fp16 on a T4
    else:
        print("Tuning the kernels' launch configurations needs CUDA (--smoke checks the script on the CPU).")
        return None
    deadline = time.monotonic() + args.budget_s if args.budget_s is not None else float("inf")
    info = {**run_info(device), "smoke": args.smoke, "timed": "CUDA graph replay" if device.type == "cuda" else "wall"}
    bandwidth = copy_bandwidth_gbps(device)
    kinds = ("_fp32" if args.dtype == "fp32" else "") + ("_smoke" if args.smoke else "")
    stem = f"tune{kinds}_{slug(info['device'])}_{info['date']}"
    out = []
    # the dicts the launchers read for these inputs (on the CPU, the interpreter's): each sweep
    # writes its configurations into them and puts them back
    fwd_config, bwd_config = fa.launch_configs(dtype, 8, device)
    fwd_space, bwd_space, bwd_first = ((FMA_FWD_SPACE, FMA_BWD_SPACE, ()) if fa._fma(fwd_config)
                                       else (FWD_SPACE, BWD_SPACE, BWD_FIRST))
    for i, N in enumerate(args.N):
        h, x, w = make_inputs(N, args.D, 8, 16, dtype, device)
        dy = torch.randn_like(h)
        floor = N * args.D * dtype.itemsize / (bandwidth * 1e9) * 1e3
        # the budget is shared out: this shape's two sweeps may use their part of what is left
        share = (deadline - time.monotonic()) / (2 * (len(args.N) - i))
        with torch.no_grad():
            fwd = sweep(fwd_space, fwd_config, lambda: fa.adapter_forward(h, *w, residual=x), device,
                        time.monotonic() + share, limit)
        share = (deadline - time.monotonic()) / (2 * (len(args.N) - i) - 1)
        bwd = sweep(bwd_space, bwd_config, lambda: fa.adapter_backward(dy, h, w[0], w[1], w[2], w[4]), device,
                    time.monotonic() + share, limit, bwd_first)
        for kind, rows, floor_ms in (("fwd", fwd, 3 * floor), ("bwd", bwd, 3 * floor)):
            print(f"N={N} D={args.D} {kind}: floor {floor_ms:.4f} ms; best 3:")
            for r in rows[:3]:
                print(f"  {r['ms']:.4f} ms ({100 * floor_ms / r['ms']:.0f}% of copy bw)  {r}")
            out += [{"N": N, "D": args.D, "kind": kind, "floor_ms": floor_ms, **r} for r in rows]
        path = write_results(args.out, stem, {**info, "complete": i == len(args.N) - 1},   # after every shape
                             [{k: r.get(k) for k in ["N", "D", "kind", "ms", "floor_ms", *BWD_SPACE]} for r in out])
    print(f"wrote {path}.json")
    return out


if __name__ == "__main__":
    main()
