"""Shared bits of the benchmarks: timing, device description, result files."""
import csv
import datetime
import json
import os
import platform
import statistics
import subprocess
import time

import torch


def time_ms(fn, device, warmup=5, reps=20):
    """Median milliseconds of fn(). CUDA: triton's do_bench (L2 flushed between runs); CPU: wall clock."""
    if device.type == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    return interleaved_ms({"fn": fn}, reps, warmup)["fn"]


def graph_ms(fn, device):
    """Median milliseconds of fn() recorded once as a CUDA graph and replayed, L2 flushed between
    replays as in time_ms: the GPU's time alone. time_ms times the host too, wherever launching fn's
    kernels takes the host longer than the GPU takes to run them (a small op's autograd call).
    None off CUDA, and, with the reason printed, where fn cannot be recorded."""
    if device.type != "cuda":
        return None
    import triton.testing
    side = torch.cuda.Stream()   # warm-up off the default stream, as recording needs (autograd, allocator)
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):   # errors of fn itself (a launch out of resources) are the caller's
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
    except Exception as e:   # a call that a recording forbids: no GPU-only time, the rest still runs
        print(f"  cannot record as a CUDA graph: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}")
        torch.cuda.synchronize()
        return None
    ms = triton.testing.do_bench(graph.replay, warmup=25, rep=100, return_mode="median")
    del graph
    torch.cuda.empty_cache()   # the recording's own memory pool, not to be held through the next shapes
    return ms


def interleaved_ms(fns, reps, warmup=1, statistic=statistics.median):
    """Median (or `statistic`) wall-clock ms of each function in {name: fn}, timed in turn, so a
    change in the machine's speed hits them all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistic(t) for name, t in times.items()}


def saved_activation_bytes(fn, params=()):
    """(fn(), bytes of the distinct storages autograd keeps for backward while fn runs): the
    activation memory of a forward pass, measured the same way on any device. Storages of the
    tensors in `params` (a model's parameters; autograd keeps views of them) are not counted."""
    skip = {(str(p.device), p.untyped_storage().data_ptr()) for p in params}
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        key = (str(t.device), s.data_ptr())
        if key not in skip:
            storages[key] = s.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(storages.values())


def fresh_compile(fn, backend="inductor"):
    """torch.compile(fn, dynamic=False) with dynamo's caches emptied first; benchmarks call it once
    per shape. One compiled function reused over many shapes would, after dynamo's recompile_limit
    (8) graphs per code object (a shape times grad mode times dtype each), silently run eager: the
    "compile" column would then time eager."""
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False, backend=backend)


def copy_bandwidth_gbps(device, nbytes=1 << 30):
    """Device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    nbytes = nbytes if device.type == "cuda" else nbytes // 16
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def device_name(device):
    """The GPU's name, or the CPU's with the threads torch uses: what results files name the device by."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def git_commit():
    """Short hash of HEAD, with "-dirty" when code differs from it (changes under
    benchmarks/results/ do not count: they are outputs). $CMA_COMMIT wins: a copy of the tree
    without .git (a copy sent to a GPU machine) gets the hash from whoever starts the run."""
    if os.environ.get("CMA_COMMIT"):
        return os.environ["CMA_COMMIT"]
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "rev-parse", "--short=7", "HEAD"], cwd=here, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", ":/", ":(exclude,top)benchmarks/results"],
                               cwd=here, capture_output=True).returncode != 0
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def run_info(device):
    """{device, date, commit, torch}: what every results file starts with."""
    return {"device": device_name(device), "date": datetime.date.today().isoformat(), "commit": git_commit(),
            "torch": torch.__version__}


def slug(text):
    """`text` as a file-name part: lower case, runs of other characters as one hyphen."""
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-").replace("--", "-")


def write_results(out_dir, stem, info, rows):
    """Write {stem}.json (info + rows) and {stem}.csv (columns: every key any row has; blanks where
    a row lacks one); returns the path stem."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, stem)
    with open(path + ".json", "w") as f:
        json.dump({**info, "rows": rows}, f, indent=1)
    fields = list(dict.fromkeys(key for row in rows for key in row))   # every row's keys, first-seen order
    with open(path + ".csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return path


def bar_chart(path, panels):
    """PNG of side-by-side grouped bar charts. panels: [(title, ylabel, group labels,
    {series name: one value per group}, log scale)]."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
    for ax, (title, ylabel, groups, series, log) in zip(axes[0], panels):
        width = 0.8 / len(series)
        for i, (name, values) in enumerate(series.items()):
            ax.bar([j + i * width for j in range(len(groups))], values, width, label=name)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))], groups, fontsize=7)
        if log:
            ax.set_yscale("log")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_table(rows, columns):
    """Print `rows` (dicts) as right-aligned columns, a header line first; missing values blank."""
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).rjust(w) for c, w in zip(columns, widths)))


def _fmt(v):
    if v is None:
        return "-"
    return f"{v:.3f}" if isinstance(v, float) else str(v)
