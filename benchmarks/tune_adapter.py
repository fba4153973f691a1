"""Sweep the fused adapter's launch configurations on a GPU and report the best per shape.

    python benchmarks/tune_adapter.py [--out benchmarks/results]

Prints forward and forward+backward medians per configuration (bf16, r=8, d_s=16) and writes
them to tune_<device>_<date>.json. Copy a winner into FWD_CONFIG / BWD_CONFIG in
cma_kernels/adapter_op.py only after it wins at every benchmarked shape.
"""
import argparse
import itertools

import torch

try:
    from cma_benchmarks.bench_adapter import make_inputs
    from cma_benchmarks.common import copy_bandwidth_gbps, run_info, slug, time_ms, write_results
except ImportError:
    from bench_adapter import make_inputs
    from common import copy_bandwidth_gbps, run_info, slug, time_ms, write_results
import cma_kernels.adapter_op as fa

FWD_SPACE = dict(BLOCK_N=[16, 32, 64], BLOCK_D=[64, 128, 256], num_warps=[4, 8], num_stages=[2, 3, 4])
BWD_SPACE = dict(BLOCK_N=[32, 64, 128], BLOCK_D=[64, 128], num_warps=[4, 8], num_stages=[2, 3],
                 PROGRAMS_PER_SM=[1, 2, 4])


def sweep(space, target, fn, device):
    default = dict(target)
    rows = []
    for values in itertools.product(*space.values()):
        target.update(zip(space, values))
        try:
            ms = time_ms(fn, device)
        except Exception as e:   # out of resources for this block shape: skip it
            print(f"  skip {dict(zip(space, values))}: {type(e).__name__}")
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
    args = p.parse_args(argv)
    device = torch.device("cuda")
    info = run_info(device)
    bandwidth = copy_bandwidth_gbps(device)
    out = []
    for N in args.N:
        h, x, w = make_inputs(N, args.D, 8, 16, torch.bfloat16, device)
        dy = torch.randn_like(h)
        floor = N * args.D * 2 / (bandwidth * 1e9) * 1e3
        with torch.no_grad():
            fwd = sweep(FWD_SPACE, fa.FWD_CONFIG, lambda: fa.adapter_forward(h, *w, residual=x), device)
        bwd = sweep(BWD_SPACE, fa.BWD_CONFIG, lambda: fa.adapter_backward(dy, h, w[0], w[1], w[2], w[4]), device)
        for kind, rows, floor_ms in (("fwd", fwd, 3 * floor), ("bwd", bwd, 3 * floor)):
            print(f"N={N} D={args.D} {kind}: floor {floor_ms:.4f} ms; best 3:")
            for r in rows[:3]:
                print(f"  {r['ms']:.4f} ms ({100 * floor_ms / r['ms']:.0f}% of copy bw)  {r}")
            out += [{"N": N, "D": args.D, "kind": kind, "floor_ms": floor_ms, **r} for r in rows]
    path = write_results(args.out, f"tune_{slug(info['device'])}_{info['date']}", info,
                         [{k: r.get(k) for k in ["N", "D", "kind", "ms", "floor_ms", *BWD_SPACE]} for r in out])
    print(f"wrote {path}.json")


if __name__ == "__main__":
    main()
