"""Whole training step on one GPU: full fine-tuning vs the frozen-backbone floor vs reference
adapters vs fused adapters (what `cma train` uses), plus image-encode inference.

    python benchmarks/bench_train_step.py [--out benchmarks/results] [--archs ViT-B-32 ViT-B-16]

Batch: 32 videos x 12 frames + 32 captions x 77 tokens (REFERENCE.md's baselines), bf16 autocast
(--precision fp16 scales the loss; auto picks it on a GPU without bf16, as `cma train` does),
AdamW (fused on CUDA, as in `cma train`), random weights. `cma train` encodes captions at their
--max-words (32) positions, not 77 (cma_model.retrieval.encode_text, exact for CLIP's causal text
tower); `--words 32` measures that, for every variant alike.
The floor freezes everything and adds no adapters, but back-propagates through every block to the
inputs: what any adapter method must pay (stock open_clip blocks, as are full fine-tuning's and the
reference adapters'). floor_lean is the same with cma's lean frozen blocks, so fused_adapters over
floor_lean is the adapters' own cost. fused_adapters is what `cma train` runs by default (fused
adapters, lean frozen blocks: cma_model.frozen_block, frozen linears stored in the autocast dtype,
the attention adapter's input and output recomputed in backward); fused_keep_attn_out keeps them
(`--no-recompute-out-proj`: two [tokens, width] activations more per block, one matmul and one
adapter forward less);
fused_graphs adds `--cuda-graphs` (each tower's forward and backward replayed as CUDA graphs,
cma_model.cuda_graphs; no activations counted: the graphs keep them out of autograd's sight, and
they are fused_adapters' own); fused_recompute adds `--recompute-mlp`, fused_recompute_graphs both
(under graphs recomputing costs only its GPU time; eager, it also adds launches to a step the
host already holds up). floor_lean_graphs is floor_lean replayed as graphs: fused_graphs over it
is the adapters' own cost once the host is out of the way (what the kernels of #3 can still win).

Per variant: median step time over the timed steps, peak memory (peak_GiB, allocated; with graphs,
what their recording allocated, which their memory pool keeps; reserved_GiB, what the caching
allocator held), the activations autograd keeps (saved_GiB, measured with saved-tensor hooks),
videos/s, ratios to full fine-tuning, and from one profiled step its top CUDA kernels and
gpu_busy_pct: the time any kernel ran over the step time (well under 100: the GPU waits for
launches, and CUDA graphs, `--compile reduce-overhead`, would pay; under them, cudagraph_skips
counts the graphs inductor declined to record, which ran without CUDA graphs). Results are written
after every variant ("complete": false until the end), so a run cut short keeps what it measured; a
*_graphs variant whose graphs fail to record or replay is said and listed under "failed", and the
other variants run. Then the time to bring one batch of frames to the device, which the variants
leave out: fp32 from pageable memory vs uint8 from pinned memory normalised there (what `cma train`
does). Last, 50 steps with reference and with fused adapters from the same start on the same
batches: the two loss curves must agree within bf16 (fp16) noise; and 50 with fused adapters
replayed as CUDA graphs, against the fused curve.

--compile MODE [MODE ...] adds, per mode, fused adapters on towers compiled with torch.compile
(`cma train --compile MODE`): fused_compile-MODE, and fused_recompute_compile-MODE (`--compile MODE
--recompute-mlp`) where fused_recompute is among --variants; modes e.g. reduce-overhead (CUDA graphs)
and default. Compiling takes a minute or more per variant, mode and architecture; the results file
says which modes ran.

--memory-only measures only the activations each variant keeps (no timing), on any device, the
CPU included (bf16 autocast there too; CPU autocast keeps LayerNorm in bf16 where CUDA's runs it
in fp32, so the stock variants keep about 2 [tokens, width] activations per block more on a GPU),
and estimates each variant's peak memory (peak_est_GiB): what a step holds before it starts
(parameters, optimizer state, the batch) plus the highest rise of its allocations during one
step, on the CPU from the profiler's memory events. Not a GPU measurement: the adapters run as
PyTorch there (other temporaries than the fused kernels'), the caching allocator's rounding is not
counted, and the stock variants miss CUDA autocast's fp32 LayerNorm copies, so their estimate is
low and the ratios of the lean variants to full fine-tuning come out high. --videos sets the
batch (the CPU's memory bounds it: ViT-B/32 at 32 videos did not fit in 24 GiB).

--smoke runs every code path on the CPU with a tiny model and a tiny batch, under bf16 (or
--precision fp16) autocast as on the GPU (no meaningful numbers; the tests use it so that a GPU
run never meets a broken script).
"""
import argparse
import copy
import gc
import statistics
import time
from dataclasses import dataclass

import open_clip
import torch
from torch._dynamo.utils import counters

try:
    from cma_benchmarks.common import bar_chart, print_table, run_info, saved_activation_bytes, slug, write_results
except ImportError:
    from common import bar_chart, print_table, run_info, saved_activation_bytes, slug, write_results
from cma_model import (CrossModalAdapterConfig, add_cross_modal_adapters, frozen_block, set_adapter_backend,
                       set_recompute)
from cma_kernels import fuses_by_default, normalize_frames
from cma_model.cuda_graphs import graph_towers, recording
from cma_model.losses import infonce, similarity
from cma_model.retrieval import COMPILE_MODES, CUDA_GRAPH_MODES, compile_towers, encode_text
from cma_train.backbone import autocast_dtype

PRECISION_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16"}
VARIANTS = ("full", "floor", "floor_lean", "ref_adapters", "fused_adapters", "fused_keep_attn_out", "fused_graphs",
            "fused_recompute", "fused_recompute_graphs", "floor_lean_graphs")
SMOKE_CLIP = {"embed_dim": 32, "quick_gelu": True,
              "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
              "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 48, "heads": 4, "layers": 2}}


@dataclass
class Setup:
    """One benchmark configuration: device, batch shape (videos x frames, words, image size), the
    autocast dtype, and the steps of the loss-curve comparison."""
    device: torch.device
    videos: int = 32
    frames: int = 12
    words: int = 77
    image_size: int = 224
    curve_steps: int = 50
    cpu_autocast: bool = False
    dtype: torch.dtype = torch.bfloat16   # of autocast; fp16 scales the loss

    def batch(self, seed=0):
        g = torch.Generator().manual_seed(seed)
        frames = torch.randn(self.videos * self.frames, 3, self.image_size, self.image_size, generator=g)
        tokens = torch.randint(1, 49407, (self.videos, self.words), generator=g)
        return frames.to(self.device), tokens.to(self.device)

    def autocasts(self):
        return self.device.type == "cuda" or self.cpu_autocast

    def file_suffix(self):
        """Results files of fp16 runs end in _fp16: targets.py reads the bf16 runs only."""
        return "_fp16" if self.dtype == torch.float16 else ""

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.autocasts())

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def make_model(arch, setup, device=None, seed=0):
    """open_clip model `arch` ("smoke": the tiny SMOKE_CLIP) with random weights drawn from `seed`
    (every run the same model, whatever ran before in the process), on `device` (default
    setup.device)."""
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(**SMOKE_CLIP) if arch == "smoke" else open_clip.create_model(arch)
    return model.to(device or setup.device)


class ResidualAdd(torch.nn.Module):
    """Stands in for an adapter in floor_lean: the block's plain residual add, nothing trained."""
    backend = "auto"

    def forward(self, h, residual):
        return residual + h

    def uses_triton(self, h):   # as the fused adapters would: the block's fused quick_gelu where they fuse
        return fuses_by_default(h.device)


def adamw(params, lr):
    """AdamW as `cma train` makes it: fused (one kernel) on CUDA, for every variant alike."""
    params = list(params)
    return torch.optim.AdamW(params, lr=lr, fused=params[0].is_cuda)


def frozen_floor(model):
    """No parameter trains, but backward runs through every block to the inputs."""
    model.requires_grad_(False)
    model.token_embedding.register_forward_hook(lambda m, i, out: out.detach().requires_grad_())
    return model, None, True


def make_variant(base, name, autocast_dtype=None, device=None):
    """(model, optimizer or None, images need grad) for one variant, on a copy of base (moved to
    `device` where given: the base can then stay off the GPU, out of every variant's peak memory).
    Lean variants (all but full, floor and ref_adapters) store their frozen linears in
    autocast_dtype (None: no autocast, they stay), as `cma train` does on CUDA."""
    model = copy.deepcopy(base)
    model, optimizer, images_need_grad = _variant(model.to(device) if device else model, name)
    if autocast_dtype is not None and name not in ("full", "floor", "ref_adapters"):
        frozen_block.store_frozen_linears(model, autocast_dtype)
    return model, optimizer, images_need_grad


def _variant(model, name):
    if name == "full":
        return model, adamw(model.parameters(), lr=1e-5), False
    if name == "floor":
        return frozen_floor(model)
    backend = "reference" if name == "ref_adapters" else "auto"
    add_cross_modal_adapters(model, CrossModalAdapterConfig(8, 16), backend=backend)
    if name.endswith("_graphs"):
        graph_towers(model)   # recorded by record_graphs, on the variant's batch
    if name.startswith("floor_lean"):
        for block in [m for m in model.modules() if hasattr(m, "adapter_attn")]:
            block.adapter_attn, block.adapter_mlp = ResidualAdd(), ResidualAdd()
        return frozen_floor(model)
    if name.startswith("fused_recompute"):
        set_recompute(model, mlp=True)
    if name == "fused_keep_attn_out":
        set_recompute(model, out_proj=False)
    if "_compile-" in name:
        compile_towers(model, name.split("_compile-", 1)[1])
    params = [p for p in model.parameters() if p.requires_grad]
    return model, adamw(params, lr=1e-5), False


def compiled_variants(variants, modes):
    """Per compile mode: fused_compile-MODE, then fused_recompute_compile-MODE where fused_recompute
    is among the variants."""
    bases = ["fused"] + (["fused_recompute"] if "fused_recompute" in variants else [])
    return [f"{base}_compile-{mode}" for mode in modes for base in bases]


def step_fn(model, optimizer, frames, tokens, images_need_grad, setup):
    """(step, forward): one optimizer step, and the forward alone returning the loss. Under fp16
    autocast the step scales the loss and unscales the gradients (torch.amp.GradScaler), as `cma
    train` does."""
    videos = tokens.shape[0]
    mask = torch.ones(videos, setup.frames, dtype=torch.bool, device=frames.device)
    scaler = torch.amp.GradScaler(setup.device.type, enabled=setup.autocasts() and setup.dtype == torch.float16)

    def forward():
        x = frames.detach().requires_grad_() if images_need_grad else frames   # a fresh leaf: frames stays as it is
        with setup.autocast():
            img = model.encode_image(x).float().view(videos, setup.frames, -1)
            txt = encode_text(model, tokens).float()
        return infonce(similarity(txt, img, mask, "meanP"), model.logit_scale.detach())

    def step():
        loss = forward()
        scaler.scale(loss).backward()
        if optimizer is not None:
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
        return loss
    return step, forward


def record_graphs(model, forward, setup):
    """*_graphs: record the towers' CUDA graphs from one forward of the variant's batch (on
    the CPU, --smoke, nothing is recorded and the towers run eager: the CUDA tests cover the
    recording)."""
    if setup.device.type == "cuda":
        with recording(model):
            forward()


def time_steps(step, setup, warmup=5, steps=20):
    """Median ms per call: CUDA events on the GPU, the wall clock on the CPU."""
    for _ in range(warmup):
        step()
    setup.sync()
    times = []
    for _ in range(steps):
        if setup.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def profile_step(step, setup, n=8, ops=False):
    """One profiled step: (its top n kernels by device time, or CPU ops on the CPU; ms the GPU was
    busy, the union of every kernel's interval, 0.0 on the CPU; with ops=True the top n aten ops by
    the time of the kernels each launched itself (CPU: their own time), with their input shapes,
    else None). Busy time over the unprofiled step time says how much of the step the GPU idles,
    waiting for launches (what CUDA graphs cure); the ops name the op behind a kernel whose name
    does not (the H200 profile's non-vectorised elementwise_kernel: 6 of ViT-B/16's 104 busy ms)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    cuda = setup.device.type == "cuda"
    activities = [ProfilerActivity.CUDA] * cuda + [ProfilerActivity.CPU] * (ops or not cuda)
    with profile(activities=activities, record_shapes=ops) as prof:
        step()
        setup.sync()
    device = DeviceType.CUDA if cuda else DeviceType.CPU
    key = "device_time_total" if cuda else "self_cpu_time_total"
    events = sorted((e for e in prof.key_averages() if e.device_type == device), key=lambda e: getattr(e, key, 0),
                    reverse=True)[:n]
    kernels = [{"kernel": e.key[:160], "ms": getattr(e, key, 0) / 1e3, "calls": e.count} for e in events]
    busy = union_ms([(e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type == DeviceType.CUDA])
    if not ops:
        return kernels, busy, None
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = sorted((e for e in prof.key_averages(group_by_input_shape=True) if e.device_type == DeviceType.CPU),
                    key=lambda e: getattr(e, key, 0), reverse=True)[:n]
    return kernels, busy, [{"op": e.key, "shapes": str(e.input_shapes)[:200], "ms": getattr(e, key, 0) / 1e3,
                            "calls": e.count} for e in events]


def union_ms(intervals_us):
    """Total length in ms of the union of [start, end] intervals given in microseconds."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals_us):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total / 1e3


def encode_ms(model, frames, setup):
    """Median ms of model.encode_image(frames) under setup's autocast, no gradients (inference)."""
    with torch.no_grad(), setup.autocast():
        return time_steps(lambda: model.encode_image(frames), setup, warmup=3, steps=20)


def loss_curves(base, frames, tokens, setup):
    """Reference vs fused adapters from the same initial weights on the same batches, and fused
    adapters on towers replayed as CUDA graphs (on a GPU; the CPU runs them eager) vs fused."""
    ref, _, _ = make_variant(base, "ref_adapters")
    fused = set_adapter_backend(copy.deepcopy(ref), "auto")
    if setup.autocasts():
        frozen_block.store_frozen_linears(fused, setup.dtype)
    graphed = graph_towers(copy.deepcopy(fused))
    curves = {}
    for name, model in (("reference", ref), ("fused", fused), ("fused_graphs", graphed)):
        opt = adamw([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        step, forward = step_fn(model, opt, frames, tokens, False, setup)
        try:
            if model is graphed:
                record_graphs(model, forward, setup)
            curves[name] = [step().item() for _ in range(setup.curve_steps)]
        except RuntimeError as e:   # as in the timed variants: said, the other curves kept
            if model is not graphed:
                raise
            curves["fused_graphs_error"] = f"{type(e).__name__}: {e}"[:600]
    curves["max_rel_diff"] = _max_rel_diff(curves["reference"], curves["fused"])
    if "fused_graphs" in curves:
        curves["graphs_max_rel_diff"] = _max_rel_diff(curves["fused"], curves["fused_graphs"])
    return curves


def _max_rel_diff(want, got):
    return max(abs(a - b) / abs(a) for a, b in zip(want, got))


def batch_to_device_ms(setup):
    """What a real step adds before the model runs (the variants above start from frames already on
    the device): copying one batch of frames from the loader, as fp32 from pageable memory (a plain
    loader) and as uint8 from pinned memory normalised on the device (`cma train`)."""
    shape = (setup.videos, setup.frames, setup.image_size, setup.image_size, 3)
    raw = torch.randint(0, 256, shape, dtype=torch.uint8)
    fp32 = normalize_frames(raw)
    pinned = raw.pin_memory() if setup.device.type == "cuda" else raw
    return {"fp32_pageable": time_steps(lambda: fp32.to(setup.device), setup, warmup=2, steps=10),
            "uint8_pinned_normalised": time_steps(
                lambda: normalize_frames(pinned.to(setup.device, non_blocking=True)), setup, warmup=2, steps=10)}


def add_ratios(rows):
    """step_vs_full, step_vs_floor, mem_vs_full, encode_vs_plain against the same architecture's rows."""
    for arch in {r["arch"] for r in rows}:
        mine = {r["variant"]: r for r in rows if r["arch"] == arch}
        full, floor = mine.get("full"), mine.get("floor")
        for r in mine.values():
            if full:
                r["step_vs_full"] = r["step_ms"] / full["step_ms"]
                if full["peak_GiB"]:
                    r["mem_vs_full"] = r["peak_GiB"] / full["peak_GiB"]
                if "encode_384_frames_ms" in r and r is not full:
                    r["encode_vs_plain"] = r["encode_384_frames_ms"] / full["encode_384_frames_ms"]
            if floor:
                r["step_vs_floor"] = r["step_ms"] / floor["step_ms"]


PANELS = (("step_ms", "step time (ms)"), ("peak_GiB", "peak memory (GiB)"), ("saved_GiB", "activations kept (GiB)"))


def plot(rows, path, panels=PANELS):
    """One bar chart per (row key, title) in panels: architectures on the x axis, a bar per variant."""
    archs = sorted({r["arch"] for r in rows})
    variants = list(dict.fromkeys(r["variant"] for r in rows))   # in order; one that failed on an arch: 0 there
    value = {(r["arch"], r["variant"]): r for r in rows}
    bar_chart(path, [(title, title, archs, {v: [value.get((a, v), {}).get(key, 0.0) for a in archs] for v in variants},
                      False) for key, title in panels])


def held_bytes(model, optimizer, *batch):
    """Bytes of the distinct storages a step holds before it starts: the model's parameters, the
    optimizer's state, the batch, and the cast copies of frozen parameters kept across steps."""
    params = list(model.parameters())
    state = [t for s in (optimizer.state.values() if optimizer else ()) for t in s.values() if torch.is_tensor(t)]
    storages = {(str(t.device), t.untyped_storage().data_ptr()): t.untyped_storage().nbytes()
                for t in params + state + list(batch) + frozen_block.kept_casts(params)}
    return sum(storages.values())


def step_peak_bytes(step, device):
    """The highest rise of allocated memory above its level before one call of step(): CUDA's peak
    counter on a GPU; elsewhere the profiler's memory events, each op's own allocations less its
    frees in time order (a temporary that an op frees before it returns is not seen)."""
    from torch.profiler import ProfilerActivity, profile
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    live = peak = 0
    for e in sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start):
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def kept_activations(args, setup):
    """--memory-only: GiB of activations each variant keeps for backward, MiB per video, and the
    estimated peak of a step (held_bytes + step_peak_bytes, after a first step has made the
    optimizer's state)."""
    frames, tokens = setup.batch()
    rows = []
    for arch in args.archs:
        base = make_model(arch, setup)
        for name in [v for v in args.variants if not v.endswith("_graphs")]:   # the same activations as without
            model, optimizer, need_grad = make_variant(base, name, setup.dtype if setup.autocasts() else None)
            step, forward = step_fn(model, optimizer, frames, tokens, need_grad, setup)
            saved = saved_activation_bytes(forward, model.parameters())[1]
            step()
            peak = held_bytes(model, optimizer, frames, tokens) + step_peak_bytes(step, setup.device)
            rows.append({"arch": arch, "variant": name, "videos": setup.videos, "saved_GiB": saved / 2 ** 30,
                         "saved_MiB_per_video": saved / 2 ** 20 / setup.videos, "peak_est_GiB": peak / 2 ** 30})
            del model, optimizer, step, forward
        full = next((r for r in rows if r["arch"] == arch and r["variant"] == "full"), None)
        for r in rows:
            if full and r["arch"] == arch:
                r["saved_vs_full"] = r["saved_GiB"] / full["saved_GiB"]
                r["peak_est_vs_full"] = r["peak_est_GiB"] / full["peak_est_GiB"]
    print_table(rows, ["arch", "variant", "videos", "saved_GiB", "saved_MiB_per_video", "saved_vs_full",
                       "peak_est_GiB", "peak_est_vs_full"])
    info = {**run_info(setup.device), "autocast": PRECISION_NAMES[setup.dtype], "words": setup.words,
            "smoke": args.smoke}
    stem = f"train_memory_{'-'.join(args.archs)}_{setup.videos}videos"   # archs = ["smoke"] with --smoke
    stem += setup.file_suffix()
    path = write_results(args.out, f"{stem}_{slug(info['device'])}_{info['date']}", info, rows)
    plot(rows, path + ".png", PANELS[2:] + (("peak_est_GiB", "estimated peak memory (GiB)"),))
    print(f"wrote {path}.json, .csv, .png")
    return rows


def main(argv=None, prog=None):
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--archs", nargs="+", default=["ViT-B-32", "ViT-B-16"])
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant (default 20)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS, help="(default: all)")
    p.add_argument("--compile", nargs="+", default=[], choices=COMPILE_MODES, metavar="MODE",
                   help=f"also fused adapters on compiled towers, per mode: {', '.join(COMPILE_MODES)} (with "
                   "--recompute-mlp too where fused_recompute is among --variants)")
    p.add_argument("--curves", action=argparse.BooleanOptionalAction, default=True,
                   help="the 50-step reference-vs-fused loss-curve check (default: on)")
    p.add_argument("--memory-only", action="store_true",
                   help="only the activations each variant keeps, on any device (the CPU too); no timing")
    p.add_argument("--videos", type=int, default=32, help="videos per batch, 12 frames each (default 32)")
    p.add_argument("--words", type=int, default=77,
                   help="tokens per caption (default 77, the full context; cma train uses 32)")
    p.add_argument("--precision", choices=("auto", "bf16", "fp16"), default="auto",
                   help="autocast dtype (default auto: bf16, or fp16 with loss scaling on a GPU of compute "
                   "capability below 8.0)")
    p.add_argument("--smoke", action="store_true", help="tiny model and batch on the CPU: exercises the script only")
    args = p.parse_args(argv)
    if args.videos < 1 or args.steps < 1:
        p.error("--videos and --steps must be >= 1")
    if not 2 <= args.words <= 77:
        p.error("--words must be in [2, 77]")
    unknown = [arch for arch in args.archs if arch not in open_clip.list_models()]
    if unknown and not args.smoke:
        p.error(f"--archs {' '.join(unknown)}: not an open_clip architecture (open_clip.list_models() lists them)")
    if args.smoke:
        setup = Setup(torch.device("cpu"), videos=4, frames=2, words=min(args.words, 16), image_size=32, curve_steps=3,
                      cpu_autocast=True)   # autocast, as on the GPU: the same code paths
        args.archs, args.steps = ["smoke"], 2
    elif args.memory_only:
        setup = Setup(torch.device("cuda" if torch.cuda.is_available() else "cpu"), videos=args.videos,
                      words=args.words)
    elif torch.cuda.is_available():
        setup = Setup(torch.device("cuda"), videos=args.videos, words=args.words)
    else:
        print("The end-to-end training-step benchmark needs CUDA: no GPU here, nothing timed "
              "(--smoke tries the script).")
        return None
    try:   # the CPU (--smoke, --memory-only) autocasts to bf16 as the GPUs that have it do
        setup.dtype = autocast_dtype("bf16" if args.precision == "auto" and setup.device.type == "cpu"
                                     else args.precision, setup.device)
    except ValueError as e:   # bf16 on a GPU without it
        p.error(str(e))
    if args.memory_only:
        setup.cpu_autocast = True
        return kept_activations(args, setup)
    info = {**run_info(setup.device), "autocast": PRECISION_NAMES[setup.dtype], "compile_modes": args.compile,
            "words": setup.words, "smoke": args.smoke}
    stem = "train_step" + "".join(f"_compile-{mode}" for mode in args.compile) + ("_smoke" if args.smoke else "")
    stem += setup.file_suffix()
    stem += f"_words{setup.words}" if setup.words != 77 and not args.smoke else ""
    stem = f"{stem}_{slug(info['device'])}_{info['date']}"
    frames, tokens = setup.batch()
    rows, kernels, ops, failed = [], {}, {}, {}   # failed: "arch/variant" -> the error of a *_graphs variant

    def so_far():   # what a run cut short by a time limit keeps
        return {**info, "complete": False, "failed": failed, "top_kernels": kernels, "top_ops": ops}

    for arch in args.archs:
        base = make_model(arch, setup, device="cpu")   # each variant's copy goes to the GPU, the base stays
        for name in args.variants + compiled_variants(args.variants, args.compile):
            model, optimizer, need_grad = make_variant(base, name, setup.dtype if setup.autocasts() else None,
                                                       setup.device)
            step, forward = step_fn(model, optimizer, frames, tokens, need_grad, setup)
            if setup.device.type == "cuda":
                gc.collect()   # what an earlier variant left must not count in this one's peak (its graphs: a cycle)
                torch.cuda.empty_cache()   # nor in what the allocator holds (reserved_GiB)
                torch.cuda.reset_peak_memory_stats()
            skips = counters["inductor"]["cudagraph_skips"]
            try:
                if name.endswith("_graphs"):   # after the reset: a replay allocates nothing, the recording's peak
                    record_graphs(model, forward, setup)   # is the memory the graphs keep
                ms = time_steps(step, setup, steps=args.steps)
            except RuntimeError as e:   # graphs that would not record or replay: said, and the other variants run
                if not name.endswith("_graphs"):
                    raise
                failed[f"{arch}/{name}"] = f"{type(e).__name__}: {e}"[:600]
                print(f"{arch} {name}: FAILED, {failed[f'{arch}/{name}']}", flush=True)
                write_results(args.out, stem, so_far(), rows)
                del model, optimizer, step, forward
                continue
            cuda = setup.device.type == "cuda"
            peak = torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else 0.0
            reserved = torch.cuda.max_memory_reserved() / 2 ** 30 if cuda else 0.0   # what the process held
            kernels[f"{arch}/{name}"], busy, top_ops = profile_step(step, setup, ops=name == "fused_adapters")
            if top_ops:   # the default path's ops behind its kernels
                ops[f"{arch}/{name}"] = top_ops
            row = {"arch": arch, "variant": name, "step_ms": ms, "peak_GiB": peak, "reserved_GiB": reserved,
                   "videos_per_s": setup.videos / ms * 1e3}
            if setup.device.type == "cuda":
                row["gpu_busy_pct"] = 100 * busy / ms
                if name.endswith(CUDA_GRAPH_MODES):   # graphs inductor declined to record: those parts ran eager
                    row["cudagraph_skips"] = counters["inductor"]["cudagraph_skips"] - skips
            if "compile" not in name and not name.endswith("_graphs"):   # dynamo would trace again; graphs hide them
                saved = saved_activation_bytes(forward, model.parameters())[1]   # the loss and its graph go now
                row["saved_GiB"] = saved / 2 ** 30
            if name == "full" or name.startswith("fused") and not name.endswith("_graphs"):   # those encode eager
                row["encode_384_frames_ms"] = encode_ms(model, frames, setup)
            rows.append(row)
            print(f"{arch} {name}: {ms:.1f} ms/step, {peak:.2f} GiB peak", flush=True)
            add_ratios(rows)   # written after every variant: a run cut short by a time limit keeps what it measured
            write_results(args.out, stem, so_far(), rows)
            del model, optimizer, step, forward
            if setup.device.type == "cuda":
                torch.cuda.empty_cache()
    print_table(rows, ["arch", "variant", "step_ms", "peak_GiB", "reserved_GiB", "saved_GiB", "videos_per_s",
                       "gpu_busy_pct", "cudagraph_skips", "step_vs_full", "step_vs_floor", "mem_vs_full",
                       "encode_384_frames_ms", "encode_vs_plain"])
    copy_ms = info["batch_to_device_ms"] = batch_to_device_ms(setup)
    print("frames of one batch to the device, ms: " + ", ".join(f"{k} {v:.2f}" for k, v in copy_ms.items()))
    if args.curves:
        n = 8 if not args.smoke else setup.videos
        curves = loss_curves(make_model(args.archs[0], setup), frames[: n * setup.frames], tokens[:n], setup)
        graphs = (f"{curves['graphs_max_rel_diff']:.2e}" if "graphs_max_rel_diff" in curves
                  else f"FAILED, {curves['fused_graphs_error']}")
        print(f"loss curves, reference vs fused adapters, {setup.curve_steps} steps: max relative difference "
              f"{curves['max_rel_diff']:.2e}; fused with CUDA graphs vs without: {graphs}")
        info["loss_curves"] = curves
    info.update(complete=True, failed=failed, top_kernels=kernels, top_ops=ops)
    path = write_results(args.out, stem, info, rows)
    plot(rows, path + ".png")
    print(f"wrote {path}.json, .csv, .png")
    return rows


if __name__ == "__main__":
    main()
