"""Host time of one fused adapter call: the CPU's work around the kernels (arguments, allocations,
autograd, the launches), which bounds a training step whose kernels are short. On an H200 the
ViT-B/32 step with fused adapters kept the GPU busy 57% of the time (train_step results): 96
adapter calls per step, each paying this.

    python benchmarks/bench_host.py [--out benchmarks/results] [--calls 2000]

Each case as a training step under bf16 autocast makes it: h and the residual bf16 [64, 768] (so
few tokens that the GPU's part is negligible; fp16 on a GPU without bf16, as `cma train` picks),
the weights fp32 master weights, r=8, d_s=16.
- fused_fwd: the forward without autograd (inference);
- fused_fwdbwd: forward and backward, the weights' gradients accumulated into .grad;
- autograd_floor: the same for an autograd.Function with the same inputs that does no work
  (empty outputs): what any such op pays PyTorch's autograd.
Microseconds per call in the fastest of 7 rounds of --calls calls, the cases in turn in each
round. On a GPU the kernels run, launch cost included. On the CPU the two kernel launches are
replaced by no-ops (Triton's interpreter would time numpy): everything but Triton's own launcher.
"""
import argparse
import contextlib
from unittest import mock

import torch

try:
    from cma_benchmarks.common import bar_chart, interleaved_ms, print_table, run_info, slug, write_results
except ImportError:   # run from a checkout that is not pip-installed
    from common import bar_chart, interleaved_ms, print_table, run_info, slug, write_results
import cma_kernels.adapter_op as adapter_op
from cma_kernels import describe_device, triton_runs_on
from cma_train.backbone import autocast_dtype

N, D, R, DS = 64, 768, 8, 16


class _NoWork(torch.autograd.Function):
    """FusedAdapterFunction's inputs and outputs, no work: the autograd floor."""

    @staticmethod
    def forward(ctx, h, w_down, b_down, w_up_unique, b_up_unique, w_up_shared, b_up_shared, residual, activation):
        ctx.save_for_backward(h, w_down, b_down, w_up_unique, w_up_shared)   # what the fused op saves
        ctx.weights = (w_down, b_down, w_up_unique, b_up_unique, w_up_shared, b_up_shared)
        return torch.empty_like(h)

    @staticmethod
    def backward(ctx, dy):
        h = ctx.saved_tensors[0]
        return (torch.empty_like(h), *(torch.empty_like(w) for w in ctx.weights), dy, None)


def kernels_not_launched():
    """Context manager: the adapter kernels replaced by launches that do nothing (the CPU case)."""
    class NoLaunch:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None
    return mock.patch.multiple(adapter_op, _adapter_fwd_kernel=NoLaunch(), _adapter_bwd_kernel=NoLaunch())


def time_calls_us(fns, calls, device, rounds=7):
    """{name: microseconds per call of fn in the fastest of `rounds` rounds of `calls` calls} for
    {name: fn}, the functions timed in turn within each round (one round first to warm up). The
    fastest: other work on the machine only ever adds time, and it comes and goes (medians of two
    runs on a shared 2-core machine differed by 40%)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def batch(fn):
        def run():
            for _ in range(calls):
                fn()
            sync()
        return run
    ms = interleaved_ms({name: batch(fn) for name, fn in fns.items()}, rounds, warmup=1, statistic=min)
    return {name: t / calls * 1e3 for name, t in ms.items()}


def bench(device, calls, dtype=torch.bfloat16):
    """[{case, us_per_call}] for the three cases, h and the residual in `dtype`."""
    g = torch.Generator(device=device).manual_seed(0)
    h, residual, dy = (torch.randn(N, D, generator=g, device=device, dtype=dtype) for _ in range(3))
    shapes = [(R, D), (R,), (D - DS, R), (D - DS,), (DS, R), (DS,)]
    weights = [(0.02 * torch.randn(s, generator=g, device=device)).requires_grad_() for s in shapes]
    h.requires_grad_(), residual.requires_grad_()

    def fwdbwd(function):
        def step():
            function.apply(h, *weights, residual, "quick_gelu").backward(dy)
            for t in (h, residual, *weights):   # as zero_grad(set_to_none=True): each call's grads are new
                t.grad = None
        return step

    def fwd():
        with torch.no_grad():
            adapter_op.FusedAdapterFunction.apply(h, *weights, residual, "quick_gelu")

    cases = {"fused_fwd": fwd, "fused_fwdbwd": fwdbwd(adapter_op.FusedAdapterFunction),
             "autograd_floor": fwdbwd(_NoWork)}
    with kernels_not_launched() if device.type == "cpu" else contextlib.nullcontext():
        us = time_calls_us(cases, calls, device)
    return [{"case": name, "us_per_call": t} for name, t in us.items()]


def main(argv=None, prog=None):
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench", help="folder for the JSON/CSV/PNG results (default runs/bench)")
    p.add_argument("--calls", type=int, default=2000, help="calls per timing round (default 2000)")
    args = p.parse_args(argv)
    if args.calls < 1:
        p.error(f"--calls must be >= 1, got {args.calls}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and not triton_runs_on(device):
        print(f"The fused kernels do not run on {describe_device(device)} (compute capability 7.0+ needed).")
        return None
    dtype = autocast_dtype("auto", device) if device.type == "cuda" else torch.bfloat16   # fp16 without bf16
    info = {**run_info(device), "N": N, "D": D, "r": R, "d_s": DS, "dtype": str(dtype).removeprefix("torch."),
            "kernels": "launched" if device.type == "cuda" else "not launched (no-op stand-ins)"}
    rows = bench(device, args.calls, dtype)
    print(f"{info['device']}: host time per adapter call, kernels {info['kernels']}")
    print_table(rows, ["case", "us_per_call"])
    path = write_results(args.out, f"host_{slug(info['device'])}_{info['date']}", info, rows)
    bar_chart(path + ".png", [(f"host time per adapter call ({info['device']})", "us",
                               [f"r={R}, [{N}, {D}] {info['dtype']}"],
                               {r["case"]: [r["us_per_call"]] for r in rows}, False)])
    print(f"wrote {path}.json, .csv, .png")
    return rows


if __name__ == "__main__":
    main()
