"""The embedded demo: everything from nothing, on a CPU in minutes.

1. A tiny open_clip CLIP is trained fully on still frames of coloured shapes captioned
   "a red circle": the stand-in for a pretrained backbone. It knows colours and shapes, and has
   never seen a word about motion.
2. Videos are written as real mp4 files: a shape moving to the left, right, up or down, captioned
   "a red circle moves to the left". Train and test sets are JSONL annotations, like a user's own.
3. `cma prepare` caches the frames; the backbone is frozen and only the cross-modal adapters train,
   through the same trainer and data path `cma train` uses.
4. Text-to-video R@1 on the test videos: chance, zero-shot (the backbone alone) and adapter-tuned.
   Telling the four motions of one shape apart needs what only the adapters learned, so zero-shot
   tops out near a quarter and the tuned model should go well past it. Exits 1 if it does not.
"""
import json
import os
import shutil
import time

import numpy as np
import open_clip
import torch
import torch.nn.functional as F

from cma_kernels.preprocess import preprocess_frames
from cma_model import count_trainable_parameters
from cma_model.cache import FrameCache, prepare_cache
from cma_model.data import VideoFrames, tokenize
from cma_model.datasets import load_annotations
from cma_model.progress import progress_bar
from cma_train.evaluate import evaluate, format_results
from cma_train.checkpoint import save_checkpoint
from cma_train.config import TrainConfig
from cma_train.train import train

COLORS = {"red": (220, 50, 40), "green": (40, 190, 70), "blue": (50, 90, 240), "yellow": (235, 215, 40)}
SHAPES = ("circle", "square", "triangle")
MOTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
MOTION_WORDS = {"left": "moves to the left", "right": "moves to the right", "up": "moves up", "down": "moves down"}
FRAME, IMAGE, FPS, SECONDS = 64, 32, 2, 12
TINY_CLIP = {"embed_dim": 64, "quick_gelu": True,
             "vision_cfg": {"image_size": IMAGE, "patch_size": 8, "width": 96, "layers": 3, "head_width": 32},
             "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 3}}


def render(color, shape, cx, cy, rng, radius=9):
    """One uint8 [FRAME, FRAME, 3] frame: a shape on a noisy dark background."""
    img = rng.integers(20, 60, (FRAME, FRAME, 3)).astype(np.uint8)
    yy, xx = np.mgrid[0:FRAME, 0:FRAME]
    if shape == "circle":
        inside = (xx - cx) ** 2 + (yy - cy) ** 2 <= radius ** 2
    elif shape == "square":
        inside = (abs(xx - cx) <= radius * 0.85) & (abs(yy - cy) <= radius * 0.85)
    else:
        inside = (yy >= cy - radius) & (yy <= cy + radius) & (abs(xx - cx) <= (yy - (cy - radius)) / 2)
    img[inside] = COLORS[color]
    return img


def write_clip(path, color, shape, motion, rng):
    """A SECONDS-long mp4: the shape travels from the centre towards one side (so the frames,
    taken as a set, show which way it went)."""
    import av
    dx, dy = MOTIONS[motion]
    start = np.array([FRAME / 2, FRAME / 2]) + rng.uniform(-4, 4, 2)
    with av.open(path, "w") as container:
        stream = container.add_stream("mpeg4", rate=FPS)
        stream.width = stream.height = FRAME
        stream.pix_fmt = "yuv420p"
        stream.options = {"qscale": "3"}
        n = FPS * SECONDS
        for i in range(n):
            cx, cy = start + np.array([dx, dy]) * (i / (n - 1)) * (FRAME * 0.36)
            frame = av.VideoFrame.from_ndarray(render(color, shape, cx, cy, rng), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def make_videos(out, rng):
    """train.jsonl (2 clips per colour x shape x motion) and test.jsonl (1 each, new clips)."""
    os.makedirs(os.path.join(out, "videos"), exist_ok=True)
    combos = [(c, s, m) for c in COLORS for s in SHAPES for m in MOTIONS]
    for split, copies in (("train", 2), ("test", 1)):
        path = os.path.join(out, f"{split}.jsonl")
        if os.path.exists(path):
            continue
        lines = []
        for k in range(copies):
            for c, s, m in progress_bar(combos, desc=f"writing {split} videos ({k + 1}/{copies})", unit="video"):
                name = f"videos/{split}_{c}_{s}_{m}_{k}.mp4"
                write_clip(os.path.join(out, name), c, s, m, rng)
                lines.append(json.dumps({"video": name, "caption": f"a {c} {s} {MOTION_WORDS[m]}"}))
        with open(path + ".tmp", "w") as f:
            f.write("\n".join(lines) + "\n")
        os.replace(path + ".tmp", path)


def pretrain_backbone(path, steps, rng, batch=64):
    """Full training of the tiny CLIP on still frames captioned with colour and shape only."""
    torch.manual_seed(0)
    model = open_clip.model.CLIP(**TINY_CLIP)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    names = [(c, s) for c in COLORS for s in SHAPES]
    for _ in progress_bar(range(steps), desc="pretraining the stand-in backbone", unit="step"):
        n = len(names)
        pick = rng.choice(n, batch, replace=False) if batch <= n else rng.integers(0, n, batch)
        frames = np.stack([render(*names[i], *rng.uniform(14, FRAME - 14, 2), rng) for i in pick])
        images = preprocess_frames(torch.from_numpy(frames), size=IMAGE)
        tokens = tokenize(tokenizer, [f"a {names[i][0]} {names[i][1]}" for i in pick], 16, 16)
        img = F.normalize(model.encode_image(images), dim=-1)
        txt = F.normalize(model.encode_text(tokens), dim=-1)
        same = torch.tensor([[names[i] == names[j] for j in pick] for i in pick], dtype=torch.float)
        logits = model.logit_scale.exp() * img @ txt.T
        target = same / same.sum(1, keepdim=True)   # duplicates in a batch are all positives
        loss = (torch.sum(-target * logits.log_softmax(1)) + torch.sum(-target * logits.T.log_softmax(1))) / (2 * batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    save_checkpoint(path, model.state_dict())   # write, then rename: a stop never leaves half a file
    return model


def run_demo(out="runs/demo", workers=2, quick=False):
    """`cma demo` (README): clips, a pretrained tiny CLIP, its frame cache and adapter training in
    `out`; returns 0 where adapter tuning beats zero-shot R@1, else 1."""
    t0 = time.time()
    rng = np.random.default_rng(42)
    os.makedirs(out, exist_ok=True)
    make_videos(out, rng)
    backbone = os.path.join(out, "backbone_quick.pt" if quick else "backbone.pt")   # --quick pretrains less
    if not os.path.exists(backbone):
        pretrain_backbone(backbone, 60 if quick else 600, rng)
    cache = os.path.join(out, "cache")
    for split in ("train", "test"):
        ann = load_annotations("jsonl", os.path.join(out, f"{split}.jsonl"))
        skipped = prepare_cache(ann.video_ids, ann.video_paths, os.path.join(cache, split), max_frames=12, size=IMAGE,
                                workers=workers, shard_size=32)
        if skipped:
            raise RuntimeError(f"demo videos could not be read: {skipped}")

    cfg = TrainConfig(model="tiny", model_config=TINY_CLIP, pretrained=backbone, dataset="jsonl",
                      root=os.path.join(out, "train.jsonl"), cache=os.path.join(cache, "train"), max_words=16,
                      reduction_dim=8, shared_dim=16, epochs=4 if quick else 30, batch_size=24, lr=1e-2,
                      weight_decay=0.05, pooling="meanP", workers=0, out=os.path.join(out, "run"), seed=42)
    test = load_annotations("jsonl", os.path.join(out, "test.jsonl"))
    test_frames = VideoFrames(FrameCache(os.path.join(cache, "test")), 12, IMAGE)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")

    plain = open_clip.model.CLIP(**TINY_CLIP)
    open_clip.load_checkpoint(plain, backbone)
    zero_shot = evaluate(plain, tokenizer, test, test_frames, "meanP", max_words=16, workers=0, progress=False)
    shutil.rmtree(cfg.out, ignore_errors=True)   # the demo's own run: a rerun trains afresh
    result = train(cfg)
    tuned = evaluate(result["model"], tokenizer, test, test_frames, "meanP", max_words=16, workers=0, progress=False)

    chance = 100.0 / len(test.video_ids)
    print()
    print(format_results(tuned, "adapter-tuned, test set"))
    print()
    print(f"{'text-to-video':<28} {'value':>10}")
    print(f"{'R@1 chance':<28} {chance:>10.1f}")
    print(f"{'R@1 zero-shot':<28} {zero_shot['t2v']['R1']:>10.1f}")
    print(f"{'R@1 adapter-tuned':<28} {tuned['t2v']['R1']:>10.1f}")
    print(f"{'trainable params, adapters':<28} {count_trainable_parameters(result['model']):>10,}")
    print(f"{'trainable params, full FT':<28} {sum(p.numel() for p in plain.parameters()):>10,}")
    print(f"{'minutes':<28} {(time.time() - t0) / 60:>10.1f}")
    with open(os.path.join(out, "demo_results.json"), "w") as f:
        json.dump({"chance_R1": chance, "zero_shot": zero_shot, "adapter_tuned": tuned}, f, indent=1)
    if tuned["t2v"]["R1"] <= zero_shot["t2v"]["R1"]:
        print("FAILED: adapter tuning did not beat zero-shot")
        return 1
    return 0
