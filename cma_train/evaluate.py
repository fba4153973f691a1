"""Retrieval evaluation: encode every caption and every video once, similarity, both directions.

Unreadable test videos cannot be ranked: they and their captions are left out, counted and named
in the result ("skipped"), never scored as zeros.

Under torch.distributed (torchrun, and inside `cma train` on several GPUs) every rank encodes a
contiguous share of the captions and of the videos; the embeddings are summed across ranks into
full tables (each row is non-zero on one rank only, so the sum is exact), and every rank computes
the same metrics. A rank that fails while encoding its share stops every rank at once
(distributed.EveryRankOrNone), instead of leaving them waiting for its share in that sum.

Where the GPU runs out of memory, videos are encoded in passes of half as many (down to one), said
in a note: the same embeddings (up to float rounding), in more passes.
"""
import json
import os
import sys

import torch
import torch.distributed as dist
from tqdm import tqdm

from cma_model.data import VideoDataset, batches, tokenize, video_loader
from cma_model.losses import similarity
from cma_model.metrics import multi_caption_metrics
from cma_model.progress import progress_bar
from cma_model.retrieval import encode_frames, encode_text
from cma_train.backbone import autocast_dtype
from cma_train.distributed import EveryRankOrNone


def _rank_world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _share(n, rank, world):
    """This rank's contiguous slice of range(n)."""
    return slice(n * rank // world, n * (rank + 1) // world)


def _sum_over_ranks(*tensors):
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for t in tensors:
            dist.all_reduce(t)


@torch.no_grad()
def evaluate(model, tokenizer, ann, frames, pooling="softmax", temperature=5.0, max_words=32, batch_size=32,
             workers=2, device=None, progress=True, precision="auto"):
    """Metrics of `model` on annotations `ann` with frames from a VideoFrames, the towers under
    autocast to `precision` (backbone.autocast_dtype). Returns {"t2v": {...}, "v2t": {...},
    "num_videos", "num_captions", "skipped": {video id: reason}}, the same on every rank when
    torch.distributed is initialised (call it on all ranks then)."""
    device = device or next(model.parameters()).device
    rank, world = _rank_world()
    was_training = model.training
    model.eval()
    dtype = autocast_dtype(precision, device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
    n_videos, n_captions, dim = len(ann.video_ids), len(ann.captions), model.visual.output_dim
    tokens = tokenize(tokenizer, ann.captions, max_words, model.context_length)
    # every rank encodes its share without a collective: where one fails (out of memory at one video
    # per pass, a loader that dies), every rank stops at once instead of waiting for it in the sum
    with EveryRankOrNone(world):
        text = torch.zeros(n_captions, dim, device=device)
        mine = _share(n_captions, rank, world)
        with autocast:
            for start, t in zip(range(mine.start, mine.stop, batch_size), tokens[mine].split(batch_size)):
                text[start:start + len(t)] = encode_text(model, t.to(device)).float()

        videos = list(range(n_videos))[_share(n_videos, rank, world)]
        loader = video_loader(torch.utils.data.Subset(VideoDataset(ann, frames), videos), frames, batch_size, workers,
                              device, say=rank == 0)
        feats = torch.zeros(n_videos, frames.max_frames, dim, device=device)
        masks = torch.zeros(n_videos, frames.max_frames, dtype=torch.uint8, device=device)
        readable = torch.zeros(n_videos, dtype=torch.uint8, device=device)
        skipped, per_pass = {}, batch_size   # per_pass: videos per encoder pass, halved where memory runs out
        for batch in progress_bar(batches(loader), total=len(loader), desc="eval videos", unit="batch",
                                  disable=not progress or rank != 0):
            for v, reason in zip(batch["skipped_videos"], batch["skipped"]):
                skipped[ann.video_ids[v]] = reason
            if "frames" not in batch:
                continue
            index, mask = batch["video"].to(device), batch["mask"].to(device)
            while True:
                try:
                    for start in range(0, len(index), per_pass):
                        part = slice(start, start + per_pass)
                        with autocast:
                            part_input = frames.to_model_input(batch["frames"][part], device)
                            feats[index[part]] = encode_frames(model, part_input, mask[part]).float()
                    break
                except torch.OutOfMemoryError:
                    per_pass = min(per_pass, len(index))
                    if per_pass == 1:
                        raise
                per_pass //= 2   # here, past the except block, the failed pass's memory is free
                torch.cuda.empty_cache()
                tqdm.write(f"note: out of GPU memory while evaluating; encoding {per_pass} video(s) per pass",
                           file=sys.stderr)
            masks[index], readable[index] = mask.to(torch.uint8), 1
    _sum_over_ranks(text, feats, masks, readable)
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, skipped)
        skipped = {k: v for part in parts for k, v in part.items()}
    model.train(was_training)
    readable, masks = readable.bool(), masks.bool()
    if not readable.any():
        raise ValueError(f"no video of the evaluation split could be read, e.g. {list(skipped.values())[:3]}")

    bad_text, bad_videos = (~text.isfinite().all(1)).sum().item(), (~feats.isfinite().all((1, 2))).sum().item()
    if bad_text or bad_videos:   # NaN would rank first and make R@1 look perfect
        raise ValueError(f"the model gives non-finite embeddings for {bad_text} caption(s) and {bad_videos} video(s) "
                         f"(diverged adapters? see the loss in the run's metrics.jsonl)")
    caption_video = torch.tensor(ann.caption_video, device=device)
    keep = readable[caption_video]
    new_index = torch.cumsum(readable.long(), 0) - 1
    sim = similarity(text[keep], feats[readable], masks[readable], pooling, temperature)
    result = multi_caption_metrics(sim.cpu(), new_index[caption_video[keep]].cpu())
    return {**result, "num_videos": int(readable.sum()), "num_captions": int(keep.sum()), "skipped": skipped}


def format_results(result, title="retrieval"):
    """evaluate()'s result as a table: R@1, R@5, R@10, MdR, MnR of t2v and v2t."""
    lines = [f"{title}: {result['num_captions']} captions, {result['num_videos']} videos"
             + (f", {len(result['skipped'])} unreadable video(s) left out" if result["skipped"] else ""),
             f"{'':>5} {'R@1':>7} {'R@5':>7} {'R@10':>7} {'MdR':>6} {'MnR':>7}"]
    for direction in ("t2v", "v2t"):
        m = result[direction]
        lines.append(f"{direction:>5} {m['R1']:7.1f} {m['R5']:7.1f} {m['R10']:7.1f} {m['MdR']:6.1f} {m['MnR']:7.1f}")
    return "\n".join(lines)


def save_results(result, path):
    """Write a result (evaluate()'s, with whatever the caller adds) as JSON to `path`."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
