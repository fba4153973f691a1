"""Shared fixtures. Without CUDA the Triton kernels run in the CPU interpreter: TRITON_INTERPRET must
be set before triton decorates them, so it is set here, before anything imports cma_kernels."""
import os
import subprocess
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import open_clip  # noqa: E402
import pytest  # noqa: E402
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg  # noqa: E402

from cma_benchmarks.bench_train_step import SMOKE_CLIP  # noqa: E402

CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def _decord_imports():
    try:
        import decord  # noqa: F401
    except ImportError:
        return False
    return True


DECORD = _decord_imports()   # PyPI has decord wheels for x86-64 only: an ARM machine may lack it
DECORD_MISSING = "reads videos with decord, which is not installed here"
requires_decord = pytest.mark.skipif(not DECORD, reason=DECORD_MISSING)
gpu_check = pytest.mark.gpu_check   # benchmarks/gpu_check.sh runs these (`-m gpu_check`) on a GPU


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu_check: run by benchmarks/gpu_check.sh on a GPU (no video files there)")


VIDEO_FIXTURES = {"video_set", "videos", "annotations"}   # write mp4 files: PyAV, which the GPU machine lacks


def pytest_collection_modifyitems(config, items):
    """A gpu_check test must run on a GPU machine that may have no video writer (PyAV): fail at
    collection, here on the CPU, rather than spend GPU time on a fixture error."""
    for item in items:
        if item.get_closest_marker("gpu_check") and VIDEO_FIXTURES & set(getattr(item, "fixturenames", ())):
            raise pytest.UsageError(f"{item.nodeid} is marked gpu_check but uses a fixture that writes videos "
                                    f"({', '.join(VIDEO_FIXTURES & set(item.fixturenames))}); use "
                                    f"write_frame_cache_set instead")


def small_clip(vision_layers=2, text_layers=2, vision_width=64, text_width=48, seed=0, custom_text=False, patch_size=8):
    """A tiny open_clip CLIP (32x32 images, 8x8 patches, 16-token context) with random weights."""
    torch.manual_seed(seed)
    vision = CLIPVisionCfg(layers=vision_layers, width=vision_width, head_width=32, patch_size=patch_size,
                           image_size=32)
    text = CLIPTextCfg(context_length=16, vocab_size=100, width=text_width, heads=4, layers=text_layers)
    if custom_text:
        return open_clip.model.CustomTextCLIP(embed_dim=32, vision_cfg=vision, text_cfg=text, quick_gelu=True).eval()
    return CLIP(embed_dim=32, vision_cfg=vision, text_cfg=text, quick_gelu=True).eval()


def clip_inputs(batch=2, seed=1, image_size=32, context=16, vocab=100):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, image_size, image_size, generator=g)
    return images, torch.randint(1, vocab, (batch, context), generator=g)


@pytest.fixture(scope="session")
def vit_b32():
    """An open_clip ViT-B-32 with random weights; copy it before changing it."""
    return open_clip.create_model("ViT-B-32").eval()


BARS = 8   # frame index encoded in BARS vertical black/white bars (robust to compression)


def bar_frame(i, height=64, width=96):
    """uint8 [height, width, 3]: the bits of i as vertical bars (white = 1); frame_index reads it."""
    import numpy as np
    frame = np.zeros((height, width, 3), np.uint8)
    for b in range(BARS):
        if (i >> b) & 1:
            frame[:, b * width // BARS:(b + 1) * width // BARS] = 255
    return frame


def write_video(path, num_frames, fps=10, height=64, width=96, codec="mpeg4", rotation=0):
    """A real video file whose frame i is bar_frame(i); rotation (degrees counter-clockwise, a
    multiple of 90) goes into the container's display matrix, as a phone filming upright writes it."""
    import av
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if rotation:
            stream.set_display_rotation(rotation)
        stream.options = {"qscale": "2"}
        for i in range(num_frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(bar_frame(i, height, width), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


def frame_index(frame):
    """Read back the index write_video drew into an [H, W, 3] uint8 frame."""
    width = frame.shape[1]
    bars = [frame[:, b * width // BARS + 2:(b + 1) * width // BARS - 2].mean() > 127 for b in range(BARS)]
    return sum(int(bit) << b for b, bit in enumerate(bars))


TINY_TRAIN_CLIP = SMOKE_CLIP   # the e2e benchmark's smoke model: 32x32 images, the real tokenizer's vocabulary



def tiny_train_model(device="cpu", **config):
    """TINY_TRAIN_CLIP built as `cma train` builds it (random weights, adapters in both towers),
    the adapters drawn from N(0, 0.1) so that no gradient is degenerate: (model, its TrainConfig
    with `config` on top of the defaults)."""
    from cma_train.backbone import build_model
    from cma_train.config import TrainConfig
    cfg = TrainConfig(model="tiny", model_config=TINY_TRAIN_CLIP, pretrained="none", **config)
    torch.manual_seed(0)
    model, _, _ = build_model(cfg, torch.device(device))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    return model, cfg

def fake_free_space(monkeypatch, total, free):
    """Every file system as shutil.disk_usage reports it (/dev/shm for loader_workers, a cache's
    folder for prepare_cache): `total` and `free` bytes. loader_workers' once-only notes are
    forgotten, so the test sees them said."""
    import collections
    import shutil

    from cma_model import data
    usage = collections.namedtuple("Usage", "total used free")(total, total - free, free)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage)
    monkeypatch.setattr(data, "_said", set())


# GPUs as the code sees them through torch.cuda: (name, compute capability); the fused kernels
# serve 8.0+ by default, Triton compiles from 7.0
GPUS = {"H200": ("NVIDIA H200", (9, 0)), "A100": ("NVIDIA A100-SXM4-80GB", (8, 0)), "T4": ("Tesla T4", (7, 5)),
        "V100": ("Tesla V100-SXM2-16GB", (7, 0)), "P100": ("Tesla P100-PCIE-16GB", (6, 0))}


def fake_gpu(monkeypatch, gpu):
    """torch.cuda's device queries answer as for the GPUS entry `gpu` on every device."""
    import types
    name, (major, minor) = GPUS[gpu]
    props = types.SimpleNamespace(name=name, major=major, minor=minor)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, minor))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)


def hold_folder_lock(folder, name):
    """A process (a stand-in for another `cma train` or `cma prepare`) that holds
    cache.folder_lock(folder, name) until it is killed."""
    code = ("import sys, time\nfrom cma_model.cache import folder_lock\n"
            "with folder_lock(sys.argv[1], sys.argv[2], 'cma'):\n    print('held', flush=True)\n    time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(folder), name], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def write_openai_style_clip(path, clip_config, seed=0):
    """A QuickGELU CLIP of `clip_config` saved as OpenAI ships CLIP (ViT-B-32.pt): a TorchScript
    archive whose state dict holds the weights under open_clip's names plus three metadata entries,
    the attention mask not among them. Returns the open_clip model it was made from."""
    import warnings
    torch.manual_seed(seed)
    model = CLIP(**{**clip_config, "quick_gelu": True}).eval()
    mask = model.attn_mask
    del model._buffers["attn_mask"]   # OpenAI's model keeps the mask as a plain attribute
    model.attn_mask = mask
    metadata = {key: model.__dict__.pop(key, None) for key in ("input_resolution", "context_length", "vocab_size")}
    for key in metadata:   # OpenAI's state dict holds them as tensors
        model.register_buffer(key, torch.tensor(7))
    size, words = clip_config["vision_cfg"]["image_size"], clip_config["text_cfg"]["context_length"]
    with warnings.catch_warnings():   # tracer warnings about data-dependent Python values
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, (torch.randn(1, 3, size, size), torch.randint(1, 100, (1, words))),
                                 strict=False, check_trace=False)
    traced.save(str(path))
    for key, value in metadata.items():   # the open_clip model as it was
        del model._buffers[key]
        if value is not None:
            setattr(model, key, value)
    return model


def write_splits(folder, lines):
    """The JSONL lines as data.jsonl, and again as train.jsonl and test.jsonl: a folder `--root` whose
    runs evaluate on the clips they trained on (tests of the mechanics, not of generalisation)."""
    for name in ("data", "train", "test"):
        (folder / f"{name}.jsonl").write_text("\n".join(lines) + "\n")


def write_video_set(folder, combos, seed=0):
    """Real mp4 clips of coloured moving shapes (the demo's renderer) and a JSONL listing them."""
    import json

    import numpy as np

    from cma_train.demo import MOTION_WORDS, write_clip
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i, (color, shape, motion) in enumerate(combos):
        name = f"clip{i}.mp4"
        write_clip(str(folder / name), color, shape, motion, rng)
        lines.append(json.dumps({"video": name, "caption": f"a {color} {shape} {MOTION_WORDS[motion]}"}))
    write_splits(folder, lines)
    return str(folder / "data.jsonl")


@pytest.fixture(scope="session")
def video_set(tmp_path_factory):
    """8 distinct clips, their JSONL and a prepared 32-pixel frame cache: (jsonl path, cache dir)."""
    if not DECORD:
        pytest.skip(DECORD_MISSING)
    from cma_model.cache import prepare_cache
    from cma_model.datasets import load_annotations
    folder = tmp_path_factory.mktemp("videoset")
    combos = [(c, s, m) for c, s in [("red", "circle"), ("blue", "square"), ("green", "triangle"),
                                      ("yellow", "circle")] for m in ("left", "up")]
    jsonl = write_video_set(folder, combos)
    ann = load_annotations("jsonl", jsonl)
    prepare_cache(ann.video_ids, ann.video_paths, str(folder / "cache"), size=32, workers=1, progress=False)
    return jsonl, str(folder / "cache")


def write_frame_cache_set(folder, num_videos=8, max_frames=12, size=32, seed=0):
    """A JSONL of shape clips and their frame cache, made without any video file or decoder (the
    GPU machine has no video writer): (jsonl path, cache dir). Clip i: one coloured shape moving."""
    import json

    import numpy as np

    from cma_kernels.preprocess import preprocess_frames
    from cma_model.cache import _atomic_write_json, _write_shard
    from cma_train.demo import COLORS, FRAME, MOTION_WORDS, MOTIONS, SHAPES, render
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    combos = [(c, s, m) for c in COLORS for s in SHAPES for m in MOTIONS][:: 48 // num_videos][:num_videos]
    ids, results, lines = [], [], []
    for i, (color, shape, motion) in enumerate(combos):
        (dx, dy), steps = MOTIONS[motion], np.linspace(0, FRAME * 0.36, max_frames)
        frames = np.stack([render(color, shape, FRAME / 2 + dx * t, FRAME / 2 + dy * t, rng) for t in steps])
        small = preprocess_frames(torch.from_numpy(frames), size=size, dtype=torch.uint8).numpy()
        ids.append(f"clip{i}")
        results.append((small, np.ones(max_frames, dtype=bool)))
        lines.append(json.dumps({"video": f"clip{i}.mp4", "caption": f"a {color} {shape} {MOTION_WORDS[motion]}"}))
    write_splits(folder, lines)
    cache = folder / "cache"
    cache.mkdir()
    _atomic_write_json(str(cache / "cache.json"), {"max_frames": max_frames, "size": size, "sample_fps": 1.0,
                                                   "shard_size": 64, "num_videos": num_videos})
    _write_shard(str(cache), 0, ids, results, max_frames, size)
    return str(folder / "data.jsonl"), str(cache)
