"""Whole training step on one GPU: full fine-tuning vs the frozen-backbone floor vs reference
adapters vs fused adapters (what `cma train` uses), plus image-encode inference.

    python benchmarks/bench_train_step.py [--out benchmarks/results] [--archs ViT-B-32 ViT-B-16]

Batch: 32 videos x 12 frames + 32 captions x 77 tokens, bf16 autocast, AdamW, random weights.
The floor freezes everything and adds no adapters, but back-propagates through every block to the
inputs: what any adapter method must pay. Per variant: median step time over the timed steps,
peak memory, videos/s, ratios to full fine-tuning, and the top CUDA kernels of one profiled step.
Last, 50 steps with reference and with fused adapters from the same start on the same batches:
the two loss curves must agree within bf16 noise.

--compile MODE [MODE ...] adds fused adapters on towers compiled with torch.compile (`cma train
--compile MODE`), e.g. default and reduce-overhead (CUDA graphs); compiling takes a minute or more
per mode and architecture, and the results file then says which modes ran.
"""
import argparse
import copy
import statistics

import open_clip
import torch

try:
    from cma_benchmarks.common import bar_chart, print_table, run_info, slug, write_results
except ImportError:
    from common import bar_chart, print_table, run_info, slug, write_results
from cma_model import CrossModalAdapterConfig, add_cross_modal_adapters, set_adapter_backend
from cma_model.losses import infonce, similarity
from cma_model.retrieval import COMPILE_MODES, compile_towers

VIDEOS, FRAMES, WORDS = 32, 12, 77
VARIANTS = ("full", "floor", "ref_adapters", "fused_adapters")


def make_batch(device, seed=0):
    g = torch.Generator().manual_seed(seed)
    frames = torch.randn(VIDEOS * FRAMES, 3, 224, 224, generator=g).to(device)
    tokens = torch.randint(1, 49407, (VIDEOS, WORDS), generator=g).to(device)
    return frames, tokens


def make_variant(base, name):
    """(model, optimizer or None, images need grad) for one variant."""
    model = copy.deepcopy(base)
    if name == "full":
        return model, torch.optim.AdamW(model.parameters(), lr=1e-5), False
    if name == "floor":
        model.requires_grad_(False)
        model.token_embedding.register_forward_hook(lambda m, i, out: out.detach().requires_grad_())
        return model, None, True
    add_cross_modal_adapters(model, CrossModalAdapterConfig(8, 16), backend="reference" if name == "ref_adapters" else "auto")
    if name.startswith("fused_compile-"):
        compile_towers(model, name.split("-", 1)[1])
    params = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(params, lr=1e-5), False


def step_fn(model, optimizer, frames, tokens, images_need_grad):
    videos = tokens.shape[0]
    mask = torch.ones(videos, FRAMES, dtype=torch.bool, device=frames.device)

    def step():
        x = frames.requires_grad_() if images_need_grad else frames
        with torch.autocast("cuda", dtype=torch.bfloat16):
            img = model.encode_image(x).float().view(videos, FRAMES, -1)
            txt = model.encode_text(tokens).float()
        loss = infonce(similarity(txt, img, mask, "meanP"), model.logit_scale.detach())
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if images_need_grad:
            frames.grad = None
        return loss
    return step


def time_steps(step, warmup=5, steps=20):
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def top_kernels(step, n=8):
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, "device_time_total", 0), reverse=True)[:n]
    return [{"kernel": e.key[:80], "ms": getattr(e, "device_time_total", 0) / 1e3, "calls": e.count} for e in events]


def encode_ms(model, frames):
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        return time_steps(lambda: model.encode_image(frames), warmup=3, steps=20)


def loss_curves(base, frames, tokens, steps=50):
    """Reference vs fused adapters from the same initial weights on the same batches."""
    ref, opt_ref, _ = make_variant(base, "ref_adapters")
    fused = set_adapter_backend(copy.deepcopy(ref), "auto")
    opt_fused = torch.optim.AdamW([p for p in fused.parameters() if p.requires_grad], lr=1e-4)
    opt_ref = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-4)
    curves = []
    for model, opt in ((ref, opt_ref), (fused, opt_fused)):
        step = step_fn(model, opt, frames, tokens, False)
        curves.append([step().item() for _ in range(steps)])
    rel = max(abs(a - b) / abs(a) for a, b in zip(*curves))
    return {"reference": curves[0], "fused": curves[1], "max_rel_diff": rel}


def plot(rows, path):
    archs = sorted({r["arch"] for r in rows})
    variants = [r["variant"] for r in rows if r["arch"] == archs[0]]
    value = {(r["arch"], r["variant"]): r for r in rows}
    bar_chart(path, [(title, title, archs, {v: [value[a, v][key] for a in archs] for v in variants}, False)
                     for key, title in (("step_ms", "step time (ms)"), ("peak_GiB", "peak memory (GiB)"))])


def main(argv=None, prog=None):
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--archs", nargs="+", default=["ViT-B-32", "ViT-B-16"])
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant (default 20)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS, help="(default: all)")
    p.add_argument("--compile", nargs="+", default=[], choices=COMPILE_MODES, metavar="MODE",
                   help=f"also fused adapters on compiled towers, per mode: {', '.join(COMPILE_MODES)}")
    p.add_argument("--curves", action=argparse.BooleanOptionalAction, default=True,
                   help="the 50-step reference-vs-fused loss-curve check (default: on)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("The end-to-end training-step benchmark needs CUDA: no GPU here, nothing timed.")
        return None
    device = torch.device("cuda")
    info = {**run_info(device), "compile_modes": args.compile}
    frames, tokens = make_batch(device)
    rows, kernels = [], {}
    variants = args.variants + [f"fused_compile-{mode}" for mode in args.compile]
    for arch in args.archs:
        base = open_clip.create_model(arch).to(device)
        for name in variants:
            model, optimizer, need_grad = make_variant(base, name)
            step = step_fn(model, optimizer, frames, tokens, need_grad)
            torch.cuda.reset_peak_memory_stats()
            ms = time_steps(step, steps=args.steps)
            peak = torch.cuda.max_memory_allocated() / 2 ** 30
            kernels[f"{arch}/{name}"] = top_kernels(step)
            row = {"arch": arch, "variant": name, "step_ms": ms, "peak_GiB": peak, "videos_per_s": VIDEOS / ms * 1e3}
            if name == "full" or name.startswith("fused"):
                row["encode_384_frames_ms"] = encode_ms(model, frames)
            rows.append(row)
            del model, optimizer
            torch.cuda.empty_cache()
        mine = {r["variant"]: r for r in rows if r["arch"] == arch}
        for r in mine.values():
            for ref, key in (("full", "step_vs_full"), ("floor", "step_vs_floor")):
                if ref in mine:
                    r[key] = r["step_ms"] / mine[ref]["step_ms"]
            if "full" in mine:
                r["mem_vs_full"] = r["peak_GiB"] / mine["full"]["peak_GiB"]
                if "encode_384_frames_ms" in r and r is not mine["full"]:
                    r["encode_vs_plain"] = r["encode_384_frames_ms"] / mine["full"]["encode_384_frames_ms"]
    print_table(rows, ["arch", "variant", "step_ms", "peak_GiB", "videos_per_s", "step_vs_full", "step_vs_floor",
                       "mem_vs_full", "encode_384_frames_ms", "encode_vs_plain"])
    if args.curves:
        curves = loss_curves(open_clip.create_model(args.archs[0]).to(device), frames[: 8 * FRAMES], tokens[:8])
        print(f"loss curves, reference vs fused adapters, 50 steps bf16: max relative difference "
              f"{curves['max_rel_diff']:.2e}")
        info["loss_curves"] = curves
    info["top_kernels"] = kernels
    stem = "train_step" + "".join(f"_compile-{mode}" for mode in args.compile)
    path = write_results(args.out, f"{stem}_{slug(info['device'])}_{info['date']}", info, rows)
    plot(rows, path + ".png")
    print(f"wrote {path}.json, .csv, .png")
    return rows


if __name__ == "__main__":
    main()
