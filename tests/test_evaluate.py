"""cma_train.evaluate: what it refuses to score, and running out of memory (its metrics are checked
against a hand-built model in test_train.py and test_cli.py)."""
import open_clip
import pytest
import torch
from conftest import TINY_TRAIN_CLIP

from cma_model import CrossModalAdapter
from cma_model.cache import FrameCache
from cma_model.data import VideoFrames
from cma_model.datasets import load_annotations
from cma_train.evaluate import evaluate
from cma_train.config import TrainConfig
from cma_train.backbone import build_model


@pytest.mark.parametrize("tower", ["visual", "transformer"])
def test_non_finite_embeddings_are_an_error_not_a_perfect_score(video_set, tower):
    jsonl, cache = video_set
    cfg = TrainConfig(model_config=TINY_TRAIN_CLIP, pretrained="none", max_words=12)
    model, tokenizer, size = build_model(cfg, torch.device("cpu"))
    adapter = next(m for name, m in model.named_modules()
                   if name.startswith(tower) and isinstance(m, CrossModalAdapter))
    with torch.no_grad():
        adapter.b_down.fill_(float("nan"))   # diverged adapters in one tower
    with pytest.raises(ValueError, match="non-finite embeddings for"):
        evaluate(model, open_clip.get_tokenizer("ViT-B-32"), load_annotations("jsonl", jsonl),
                 VideoFrames(FrameCache(cache), 12, size), "meanP", max_words=12, workers=0, progress=False)


def test_out_of_gpu_memory_encodes_fewer_videos_per_pass(video_set, monkeypatch, capsys):
    """Encoding more than 2 videos at once runs out of memory (simulated): evaluate() halves its
    videos per pass (8 -> 4 -> 2), says so once per halving, and scores every video as a run with
    room for all 8 (fp32: the same metrics)."""
    import cma_train.evaluate as evaluate_module
    jsonl, cache = video_set
    cfg = TrainConfig(model_config=TINY_TRAIN_CLIP, pretrained="none", max_words=12)
    torch.manual_seed(0)
    model, _, size = build_model(cfg, torch.device("cpu"))
    args = (model, open_clip.get_tokenizer("ViT-B-32"), load_annotations("jsonl", jsonl),
            VideoFrames(FrameCache(cache), 12, size), "softmax")
    kw = dict(max_words=12, batch_size=8, workers=0, progress=False)
    want = evaluate(*args, **kw)
    real_encode, passes = evaluate_module.encode_frames, []

    def two_videos_fit(model, frames, mask):
        passes.append(len(frames))
        if len(frames) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.")
        return real_encode(model, frames, mask)
    monkeypatch.setattr(evaluate_module, "encode_frames", two_videos_fit)
    got = evaluate(*args, **kw)
    assert passes == [8, 4, 2, 2, 2, 2]
    assert got["t2v"] == pytest.approx(want["t2v"]) and got["v2t"] == pytest.approx(want["v2t"])
    assert got["num_videos"] == want["num_videos"] == 8
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("note:")] == [
        "note: out of GPU memory while evaluating; encoding 4 video(s) per pass",
        "note: out of GPU memory while evaluating; encoding 2 video(s) per pass"]


@pytest.mark.parametrize("precision, dtype", [("auto", torch.float32), ("fp16", torch.float16),
                                              ("bf16", torch.bfloat16)])
def test_precision_sets_the_dtype_both_towers_encode_in(video_set, monkeypatch, precision, dtype):
    """evaluate(precision=...) encodes captions and videos under autocast to that dtype (auto on
    the CPU: fp32), and scores all 8 videos with finite similarities either way."""
    import cma_train.evaluate as evaluate_module
    jsonl, cache = video_set
    cfg = TrainConfig(model_config=TINY_TRAIN_CLIP, pretrained="none", max_words=12)
    model, _, size = build_model(cfg, torch.device("cpu"))
    seen = []

    def recording(encode):
        def encode_and_record(*args):
            out = encode(*args)
            seen.append(out.dtype)
            return out
        return encode_and_record
    for name in ("encode_frames", "encode_text"):
        monkeypatch.setattr(evaluate_module, name, recording(getattr(evaluate_module, name)))
    result = evaluate(model, open_clip.get_tokenizer("ViT-B-32"), load_annotations("jsonl", jsonl),
                      VideoFrames(FrameCache(cache), 12, size), "softmax", max_words=12, workers=0, progress=False,
                      precision=precision)
    assert set(seen) == {dtype} and len(seen) >= 2
    assert result["num_videos"] == 8 and 0 <= result["t2v"]["R1"] <= 100


def _out_of_memory_worker(rank, port, jsonl, cache, result_dir):
    """Rank 1 runs out of memory even at one video per pass; rank 0 encodes its share."""
    import os
    from datetime import timedelta

    import torch.distributed as dist

    import cma_train.evaluate as evaluate_module
    from cma_train.distributed import FailedElsewhere
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=60))   # fail, not hang

    def out_of_memory(*_):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB.")
    if rank == 1:
        evaluate_module.encode_frames = out_of_memory
    cfg = TrainConfig(model_config=TINY_TRAIN_CLIP, pretrained="none", max_words=12)
    model, _, size = build_model(cfg, torch.device("cpu"))
    try:
        evaluate(model, open_clip.get_tokenizer("ViT-B-32"), load_annotations("jsonl", jsonl),
                 VideoFrames(FrameCache(cache), 12, size), "meanP", max_words=12, workers=0, progress=False)
        said = None
    except (torch.OutOfMemoryError, FailedElsewhere) as e:
        said = f"{type(e).__name__}: {e}"
    torch.save(said, os.path.join(result_dir, f"said{rank}.pt"))
    dist.destroy_process_group()


def test_a_rank_out_of_memory_at_one_video_per_pass_stops_every_rank_at_once(video_set, tmp_path):
    """torchrun: where one rank cannot encode even one video at a time, the others stop with it
    instead of waiting for its embeddings in the sum over ranks until the group's timeout."""
    import socket

    import torch.multiprocessing as mp
    jsonl, cache = video_set
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_out_of_memory_worker, args=(port, jsonl, cache, str(tmp_path)), nprocs=2, join=True)
    message = "OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 MiB."
    assert torch.load(tmp_path / "said1.pt") == message
    assert torch.load(tmp_path / "said0.pt") == "FailedElsewhere: rank 1 failed: " + message
