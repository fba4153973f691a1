"""Retrieval evaluation: encode every caption and every video once, similarity, both directions.

Unreadable test videos cannot be ranked: they and their captions are left out, counted and named
in the result ("skipped"), never scored as zeros.
"""
import json
import os

import torch
from tqdm import tqdm

from cma_model.data import VideoDataset, collate, tokenize
from cma_model.losses import similarity
from cma_model.metrics import multi_caption_metrics
from cma_model.retrieval import encode_frames


@torch.no_grad()
def evaluate(model, tokenizer, ann, frames, pooling="softmax", temperature=5.0, max_words=32, batch_size=32,
             workers=2, device=None, progress=True):
    """Metrics of `model` on annotations `ann` with frames from a VideoFrames. Returns
    {"t2v": {...}, "v2t": {...}, "num_videos", "num_captions", "skipped": {video id: reason}}."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    tokens = tokenize(tokenizer, ann.captions, max_words, model.context_length)
    with autocast:
        text = torch.cat([model.encode_text(t.to(device)).float() for t in tokens.split(batch_size)])

    loader = torch.utils.data.DataLoader(VideoDataset(ann, frames), batch_size=batch_size, num_workers=workers,
                                         collate_fn=collate, timeout=600 if workers else 0)
    n_videos = len(ann.video_ids)
    feats, masks, readable, skipped = None, torch.zeros(n_videos, frames.max_frames, dtype=torch.bool), \
        torch.zeros(n_videos, dtype=torch.bool), {}
    for batch in tqdm(loader, desc="eval videos", unit="batch", disable=not progress):
        for v, reason in zip(batch["skipped_videos"], batch["skipped"]):
            skipped[ann.video_ids[v]] = reason
        if "frames" not in batch:
            continue
        with autocast:
            f = encode_frames(model, batch["frames"].to(device), batch["mask"].to(device)).float().cpu()
        if feats is None:
            feats = torch.zeros(n_videos, frames.max_frames, f.shape[-1])
        feats[batch["video"]], masks[batch["video"]], readable[batch["video"]] = f, batch["mask"], True
    if feats is None:
        raise RuntimeError(f"no test video could be read, e.g. {list(skipped.values())[:3]}")

    caption_video = torch.tensor(ann.caption_video)
    keep = readable[caption_video]
    new_index = torch.cumsum(readable.long(), 0) - 1
    sim = similarity(text[keep.to(text.device)].cpu(), feats[readable], masks[readable], pooling, temperature)
    result = multi_caption_metrics(sim, new_index[caption_video[keep]])
    model.train(was_training)
    return {**result, "num_videos": int(readable.sum()), "num_captions": int(keep.sum()), "skipped": skipped}


def format_results(result, title="retrieval"):
    lines = [f"{title}: {result['num_captions']} captions, {result['num_videos']} videos"
             + (f", {len(result['skipped'])} unreadable video(s) left out" if result["skipped"] else ""),
             f"{'':>5} {'R@1':>7} {'R@5':>7} {'R@10':>7} {'MdR':>6} {'MnR':>7}"]
    for direction in ("t2v", "v2t"):
        m = result[direction]
        lines.append(f"{direction:>5} {m['R1']:7.1f} {m['R5']:7.1f} {m['R10']:7.1f} {m['MdR']:6.1f} {m['MnR']:7.1f}")
    return "\n".join(lines)


def save_results(result, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
