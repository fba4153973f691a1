"""The issues' targets against measured results: one table, read from the result files alone.

    python benchmarks/targets.py [--results benchmarks/results] [--device "NVIDIA H200"]

Reads the newest adapter_<device>_<date>.json (issue #3: fused adapter op; each time as called and,
where measured, as the GPU's time alone, the call replayed as a CUDA graph) and the newest
train_step[_compile-*]_<device>_<date>.json of each kind (issue #6: the training step; the
77-token bf16 runs, as in REFERENCE.md's baselines) and prints every target with the measured value
and whether it is met. Each fused training variant gets its own rows, so the table also shows
which configuration meets which target (what the defaults should be). Measures nothing itself;
exit status 0 whether the targets are met or not, 1 when there are no results.
"""
import argparse
import glob
import json
import os

try:
    from cma_benchmarks.common import device_name, slug
except ImportError:   # run from a checkout that is not pip-installed
    from common import device_name, slug

# issue #3, bf16, D = 768: (N, "fwd" or "fwdbwd", most ms)
ADAPTER_MS = [(153600, "fwd", 0.20), (153600, "fwdbwd", 0.45), (19200, "fwd", 0.035), (19200, "fwdbwd", 0.10)]
ADAPTER_FWD_PCT_OF_COPY_BW = (153600, 83.0)
# issue #6: (architecture, row key, most)
STEP_TARGETS = [("ViT-B-32", "step_vs_floor", 1.05), ("ViT-B-32", "step_vs_full", 0.70),
                ("ViT-B-16", "step_vs_full", 0.70), ("ViT-B-32", "mem_vs_full", 0.55),
                ("ViT-B-16", "mem_vs_full", 0.55), ("ViT-B-32", "encode_vs_plain", 1.03),
                ("ViT-B-16", "encode_vs_plain", 1.03)]


def newest(results, pattern):
    """(path, parsed JSON) of the newest file matching pattern (ISO dates sort), or (None, None)."""
    paths = sorted(glob.glob(os.path.join(results, pattern)))
    if not paths:
        return None, None
    with open(paths[-1]) as f:
        return paths[-1], json.load(f)


def adapter_checks(data):
    """[(issue, what, measured, bound, met)] for the fused adapter op results."""
    rows = {(r["dtype"], r["N"], r["D"]): r for r in data["rows"]}
    checks = []
    for N, kind, bound in ADAPTER_MS:
        r = rows.get(("bfloat16", N, 768))
        if r:
            checks.append(("#3", f"fused {kind} ms, bf16 {N}x768", r[f"fused_{kind}_ms"], f"<={bound}",
                           r[f"fused_{kind}_ms"] <= bound))
        if r and r.get(f"fused_{kind}_gpu_ms"):   # the same call replayed as a CUDA graph: GPU time alone
            gpu = r[f"fused_{kind}_gpu_ms"]
            checks.append(("#3", f"fused {kind} ms, bf16 {N}x768, GPU alone", gpu, f"<={bound}", gpu <= bound))
    N, pct = ADAPTER_FWD_PCT_OF_COPY_BW
    r = rows.get(("bfloat16", N, 768))
    if r:
        checks.append(("#3", f"fused fwd % of copy bandwidth, bf16 {N}x768", r["fused_fwd_pct_of_copy_bw"],
                       f">={pct}", r["fused_fwd_pct_of_copy_bw"] >= pct))
    slower = [f"{r['dtype']} {r['N']}x{r['D']} {kind}" for r in data["rows"] for kind in ("fwd", "fwdbwd")
              if r[f"fused_{kind}_ms"] > min(r[f"eager_{kind}_ms"], r[f"compile_{kind}_ms"])]
    skipped = data.get("skipped", [])   # shapes a time budget left out: "never slower" is not shown for them
    checks.append(("#3", "shapes where fused is slower than eager or compile"
                   + (f" ({len(skipped)} not measured)" if skipped else ""), len(slower), "==0",
                   not slower and not skipped))
    return checks, slower


def step_checks(rows):
    """[(issue, what, measured, bound, met)] for every fused variant of the training-step results."""
    checks = []
    for arch, key, bound in STEP_TARGETS:
        for r in rows:
            if r["arch"] == arch and r["variant"].startswith("fused") and key in r:
                checks.append(("#6", f"{arch} {r['variant']} {key}", r[key], f"<={bound}", r[key] <= bound))
    return checks


def step_files(results, dev):
    """Newest train_step JSON per kind (plain, each compile-mode set) for device slug dev: the
    77-token, bf16, non-smoke runs, plain first."""
    newest_per_kind = {}
    for path in sorted(glob.glob(os.path.join(results, f"train_step*_{dev}_*.json"))):
        kind = os.path.basename(path).split(f"_{dev}_")[0]
        if not any(tag in kind for tag in ("_smoke", "_words", "_fp16")):
            newest_per_kind[kind] = path   # sorted: ISO dates, so the last one is the newest
    return [newest_per_kind[k] for k in sorted(newest_per_kind, key=lambda k: (k != "train_step", k))]


def main(argv=None, prog=None, results=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")):
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=results, help=f"folder of result files (default {results})")
    p.add_argument("--device", help="device name as in the result files (default: this machine's CUDA device)")
    args = p.parse_args(argv)
    if args.device is None:
        import torch
        if not torch.cuda.is_available():
            p.error("no CUDA device here: name the device whose results to read with --device")
        args.device = device_name(torch.device("cuda"))
    dev = slug(args.device)

    checks, sources, slower = [], [], []
    path, data = newest(args.results, f"adapter_{dev}_*.json")
    if data:
        sources.append((path, data))
        checks, slower = adapter_checks(data)
    step_rows = {}
    for path in step_files(args.results, dev):
        with open(path) as f:
            data = json.load(f)
        sources.append((path, data))
        for r in data["rows"]:   # a variant measured in several runs: the plain run's row counts
            step_rows.setdefault((r["arch"], r["variant"]), r)
    checks += step_checks(list(step_rows.values()))
    if not checks:
        print(f"no results for {args.device} in {args.results}")
        return 1
    for path, data in sources:
        print(f"{os.path.basename(path)}: {data['device']}, {data['date']}, commit {data['commit']}"
              + ("" if data.get("complete", True) else " (cut short)"))
        if data.get("skipped"):
            print(f"  not measured (time budget): {', '.join(data['skipped'])}")
        for variant, error in data.get("failed", {}).items():
            print(f"  FAILED {variant}: {error}")
        if "loss_curves" in data:
            curves = data["loss_curves"]
            graphs = (f"; fused with CUDA graphs vs without: {curves['graphs_max_rel_diff']:.2e}"
                      if "graphs_max_rel_diff" in curves else "")
            print(f"  #6 loss curves, reference vs fused adapters: max relative difference "
                  f"{curves['max_rel_diff']:.2e}{graphs}")
    width = max(len(c[1]) for c in checks)
    print(f"{'issue':5}  {'target':{width}}  {'measured':>9}  {'bound':>8}  met")
    for issue, what, value, bound, met in checks:
        print(f"{issue:5}  {what:{width}}  {value:9.3f}  {bound:>8}  {'yes' if met else 'NO'}")
    if slower:
        print("fused slower than eager or compile at: " + "; ".join(slower))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
