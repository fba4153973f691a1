"""Frame preprocessing and video loading throughput on the CPU.

    python benchmarks/bench_preprocess.py [--out benchmarks/results] [--threads 1 2]

1. 12 frames -> 224: cma's C++ op vs torchvision v2 (batched uint8) vs the CLIP4Clip PIL
   pipeline, per input resolution and thread count (median ms per 12 frames, frames/s). cma and
   torchvision are timed in turn, so their ratio holds even when the machine's speed drifts.
2. videos/s for sampling + preprocessing from mp4 files vs from a prepared frame cache, on
   generated 240p clips (one thread, normalised fp32 frames), and what `cma train` and `cma eval`
   run: the cache's uint8 frames through a DataLoader (2 workers, batches of 8, the trainer's
   collate), normalised later on the device.
"""
import argparse
import json
import os
import tempfile

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

try:
    from cma_benchmarks.common import bar_chart, interleaved_ms, print_table, run_info, slug, time_ms, write_results
except ImportError:
    from common import bar_chart, interleaved_ms, print_table, run_info, slug, time_ms, write_results
from cma_kernels.preprocess import (CLIP_MEAN, CLIP_STD, has_cpp_extension, preprocess_frames,
                                    preprocess_frames_torchvision, simd_level)

RESOLUTIONS = [(240, 320), (360, 640), (720, 1280), (1080, 1920)]
CPU = torch.device("cpu")


def clip4clip_pil(frames):
    pipeline = T.Compose([T.Resize(224, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224),
                          lambda im: im.convert("RGB"), T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])
    return torch.stack([pipeline(Image.fromarray(f)) for f in frames.numpy()])


def bench_ops(threads, resolutions=RESOLUTIONS, reps=15):
    rows = []
    for h, w in resolutions:
        frames = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (12, h, w, 3), dtype=np.uint8))
        for n in threads:
            torch.set_num_threads(n)
            fns = {"torchvision_v2": lambda: preprocess_frames_torchvision(frames)}
            if has_cpp_extension():
                fns = {"cma_cpp": lambda: preprocess_frames(frames), **fns}
            ms = interleaved_ms(fns, reps)
            if n == 1:   # PIL runs on one thread
                ms["pil_clip4clip"] = time_ms(lambda: clip4clip_pil(frames), CPU, warmup=1, reps=3)
            row = {"input": f"{h}x{w}", "threads": n}
            for name, t in ms.items():
                row[f"{name}_ms"] = t
                row[f"{name}_fps"] = 12 / t * 1e3
            if "cma_cpp" in ms:
                row["torchvision_over_cma"] = ms["torchvision_v2"] / ms["cma_cpp"]
            rows.append(row)
    return rows


def bench_loading(num_videos=16):
    from cma_model.cache import FrameCache, prepare_cache
    from cma_model.data import VideoDataset, VideoFrames, collate
    from cma_model.datasets import Annotations
    import av
    with tempfile.TemporaryDirectory() as d:
        ids, paths = [], []
        for i in range(num_videos):
            path = os.path.join(d, f"v{i}.mp4")
            with av.open(path, "w") as c:
                s = c.add_stream("mpeg4", rate=25)
                s.width, s.height, s.pix_fmt = 426, 240, "yuv420p"
                rng = np.random.default_rng(i)
                for _ in range(25 * 15):   # 15 s clips
                    img = np.full((240, 426, 3), rng.integers(0, 256, 3), np.uint8)
                    for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                        c.mux(p)
                for p in s.encode():
                    c.mux(p)
            ids.append(f"v{i}")
            paths.append(path)
        prepare_cache(ids, paths, os.path.join(d, "cache"), workers=1, progress=False)
        torch.set_num_threads(1)
        rows = []
        cached = VideoFrames(cache=FrameCache(os.path.join(d, "cache")))
        for source, frames in (("mp4", VideoFrames()), ("cache", cached)):
            ms = time_ms(lambda: [frames(v, p) for v, p in zip(ids, paths)], CPU, warmup=1, reps=3)
            rows.append({"source": source, "videos": num_videos, "ms_per_video": ms / num_videos,
                         "videos_per_s": num_videos / ms * 1e3})
        ann = Annotations()
        for v, path in zip(ids, paths):
            ann.add(v, path, [v])
        raw = VideoDataset(ann, VideoFrames(cache=FrameCache(os.path.join(d, "cache")), raw=True))
        passes = 8   # workers started once (warm-up): the steady state of an epoch
        loader = torch.utils.data.DataLoader(raw, batch_size=8, sampler=list(range(num_videos)) * passes,
                                             num_workers=2, collate_fn=collate, persistent_workers=True)
        ms = time_ms(lambda: [b["frames"] for b in loader], CPU, warmup=1, reps=3)
        n = passes * num_videos
        rows.append({"source": "cache_uint8_loader", "videos": n, "ms_per_video": ms / n, "videos_per_s": n / ms * 1e3})
        return rows


def main(argv=None, prog=None):
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--quick", action="store_true", help="240x320 only and 4 videos (a smoke test)")
    p.add_argument("--replot", metavar="STEM", help="measure nothing: redraw STEM.png from STEM.json and "
                   "STEM_loading.json (results of earlier runs)")
    args = p.parse_args(argv)
    if args.replot:
        plot(args.replot)
        return
    info = {**run_info(CPU), "cma_simd": simd_level()}
    before = torch.get_num_threads()
    try:
        ops = bench_ops(args.threads, RESOLUTIONS[:1] if args.quick else RESOLUTIONS)
        loading = bench_loading(4 if args.quick else 16)
    finally:
        torch.set_num_threads(before)
    if not has_cpp_extension():
        print("cma's C++ op is not compiled: only torchvision and PIL were timed")
    print_table(ops, list(ops[0]))
    print()
    print_table(loading, list(loading[0]))
    stem = f"preprocess_{slug(info['device'])}_{info['date']}"
    path = write_results(args.out, stem, info, ops)
    write_results(args.out, stem + "_loading", info, loading)
    plot(path)
    print(f"wrote {path}.json, .csv, .png (+ _loading)")


def plot(path):
    """{path}.png from the results in {path}.json (ops) and {path}_loading.json (loading); each
    panel names the commit its numbers were measured at."""
    with open(path + ".json") as f:
        ops = json.load(f)
    with open(path + "_loading.json") as f:
        loading = json.load(f)
    one = [r for r in ops["rows"] if r["threads"] == 1]
    methods = [k[:-3] for k in one[0] if k.endswith("_ms")]
    bar_chart(path + ".png", [
        (f"12 frames -> 224, one thread ({ops['commit']})", "ms", [r["input"] for r in one],
         {m: [r[f"{m}_ms"] for r in one] for m in methods}, True),
        (f"12 frames per video from ({loading['commit']})", "ms per video", [r["source"] for r in loading["rows"]],
         {"sample + preprocess": [r["ms_per_video"] for r in loading["rows"]]}, False)])


if __name__ == "__main__":
    main()
