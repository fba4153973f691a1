"""cma_train.train: learning, exact resume, checkpoints, evaluation during training, unreadable
videos, out-of-memory retries, and torchrun runs (gloo, 2 processes) against one process."""
import errno
import json
import os
import signal
import shutil
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import (TINY_TRAIN_CLIP, fake_free_space, fake_gpu, gpu_check, hold_folder_lock, requires_cuda,
                      write_frame_cache_set, write_splits)

from cma_model.data import CaptionVideoDataset
from cma_model.datasets import load_annotations
from cma_model.retrieval import RetrievalForward
from cma_train.signals import STOP_SIGNALS, TrainingStopped
from cma_train.checkpoint import RUN_LOCK, CheckpointError, load_checkpoint, save_checkpoint
from cma_train.config import TrainConfig
from cma_train.distributed import FailedElsewhere
from cma_train.backbone import build_model
from cma_train.step import train_step
from cma_train.train import NoReadableVideos, epoch_order, train, unused_gpus_note

WORLD = 2   # processes of the torchrun tests


def tiny_config(jsonl, cache, out, **kw):
    """A tiny run on the folder of `jsonl` (its train.jsonl, and test.jsonl for eval_split="test")."""
    base = dict(model="tiny", model_config=TINY_TRAIN_CLIP, pretrained="none", dataset="jsonl",
                root=os.path.dirname(jsonl),
                cache=cache, max_words=12, batch_size=8, epochs=30, lr=1e-2, weight_decay=0.0, warmup=0.05,
                pooling="meanP", workers=0, out=str(out), progress=False, reduction_dim=8, shared_dim=8)
    base.update(kw)
    return TrainConfig(**base)


def test_loss_falls_and_r1_rises_above_chance(video_set, tmp_path):
    from cma_model.cache import FrameCache
    from cma_model.data import VideoFrames
    from cma_model.datasets import load_annotations
    from cma_train.evaluate import evaluate
    jsonl, cache = video_set
    result = train(tiny_config(jsonl, cache, tmp_path, epochs=40))
    losses = result["losses"]
    assert len(losses) == 40
    # ln 8 = 2.08 at the start; how far it falls depends on the adapters' random init (last/first
    # 0.68 with this seed, 0.44-0.73 with seeds 0-3, torch 2.11 and 2.14 alike); not learning: ~1.0
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses
    ann = load_annotations("jsonl", jsonl)
    import open_clip
    res = evaluate(result["model"], open_clip.get_tokenizer("ViT-B-32"), ann, VideoFrames(FrameCache(cache), 12, 32),
                   "meanP", max_words=16, workers=0, progress=False)
    # chance: R@1 12.5 %, mean rank 4.5; a random backbone leaves same-shape clips hard to tell apart
    assert res["t2v"]["R1"] >= 25 and res["t2v"]["MnR"] < 3, res["t2v"]


def test_resume_reproduces_the_uninterrupted_run(video_set, tmp_path):
    jsonl, cache = video_set
    full = train(tiny_config(jsonl, cache, tmp_path / "full", batch_size=4, epochs=3, max_steps=5))["losses"]
    first = train(tiny_config(jsonl, cache, tmp_path / "cut", batch_size=4, epochs=3, max_steps=3))["losses"]
    rest = train(tiny_config(jsonl, cache, tmp_path / "cut", batch_size=4, epochs=3, max_steps=5,
                             resume=True))["losses"]
    assert len(first) == 3 and len(rest) == 2
    assert first + rest == pytest.approx(full, rel=1e-6, abs=1e-7)   # mid-epoch (2 steps per epoch) and across epochs
    ckpt = load_checkpoint(str(tmp_path / "cut" / "checkpoint_latest.pt"))
    assert ckpt["step"] == 5 and ckpt["config"]["batch_size"] == 4


@pytest.mark.parametrize("gpus, device, world, noted", [(4, "cuda:1", 1, True), (2, "cuda:0", 1, True),
                                                         (4, "cuda:0", 4, False), (1, "cuda:0", 1, False),
                                                         (4, "cpu", 1, False)])
def test_one_process_on_one_of_several_gpus_is_told_of_torchrun(monkeypatch, gpus, device, world, noted):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    note = unused_gpus_note(torch.device(device), world)
    if noted:
        assert note == (f"note: {gpus} GPUs are visible and this run uses one ({device}): `torchrun --nproc_per_node "
                        f"{gpus} -m cma_train.cli train ...` trains on all of them (CUDA_VISIBLE_DEVICES picks which)")
    else:
        assert note is None


def test_compile_on_a_gpu_triton_cannot_compile_for_is_refused_before_the_model_is_built(tmp_path, monkeypatch):
    import cma_train.train as train_module
    fake_gpu(monkeypatch, "P100")
    monkeypatch.setattr(train_module, "rank_device", lambda device, rank: torch.device("cuda", 0))
    monkeypatch.setattr(train_module, "build_model", lambda *_: pytest.fail("the model was built"))
    with pytest.raises(ValueError, match=r"^--compile needs a GPU of compute capability 7\.0\+ \(torch\.compile writes "
                                         r"Triton kernels\), got cuda:0 \(Tesla P100-PCIE-16GB, compute capability "
                                         r"6\.0\); leave out --compile$"):
        train(tiny_config(str(tmp_path / "data.jsonl"), None, tmp_path / "run", compile="default"))
    assert not (tmp_path / "run").exists()


def test_fp16_trains_like_fp32_and_resumes_exactly(video_set, tmp_path, capsys):
    """--precision fp16 (autocast to fp16 and a loss scale; here on the CPU, as on a V100 or T4): the
    losses of fp32 within fp16 noise (1e-2 relative), the loss scale logged per step, and a run cut
    after 3 steps and resumed gives the uninterrupted run's losses."""
    jsonl, cache = video_set
    kw = dict(batch_size=4, epochs=3, max_steps=5)
    fp32 = train(tiny_config(jsonl, cache, tmp_path / "fp32", **kw))["losses"]
    assert "over 1 process(es) on cpu in fp32; writing to" in capsys.readouterr().out
    fp16 = train(tiny_config(jsonl, cache, tmp_path / "full", precision="fp16", **kw))["losses"]
    assert "over 1 process(es) on cpu in fp16 with loss scaling; writing to" in capsys.readouterr().out
    first = train(tiny_config(jsonl, cache, tmp_path / "cut", precision="fp16", **dict(kw, max_steps=3)))["losses"]
    rest = train(tiny_config(jsonl, cache, tmp_path / "cut", precision="fp16", resume=True, **kw))["losses"]
    assert fp16 == pytest.approx(fp32, rel=1e-2) and fp16 != pytest.approx(fp32, rel=1e-6)   # fp16 did run
    assert first + rest == pytest.approx(fp16, rel=1e-6, abs=1e-7)
    logged = [json.loads(line) for line in open(tmp_path / "full" / "metrics.jsonl")]
    assert [r["loss_scale"] for r in logged] == [2.0 ** 16] * 5
    assert "loss_scale" not in json.loads(open(tmp_path / "fp32" / "metrics.jsonl").readline())


def test_fp16_overflows_lower_the_loss_scale_across_a_resume_and_stop_a_run_that_learns_nothing(video_set, tmp_path,
                                                                                                  monkeypatch, recwarn):
    """A loss scale of 2^60 makes every fp16 gradient overflow: each step updates nothing and halves
    the scale, the checkpoint keeps the scale reached and a resumed run goes on from it, and
    FP16_OVERFLOWS_STOP such steps in a row stop the run with a checkpoint and what to do: resume
    in fp32."""
    import cma_train.train as train_module
    jsonl, cache = video_set
    monkeypatch.setattr(train_module, "FP16_INIT_SCALE", 2.0 ** 60)
    monkeypatch.setattr(train_module, "FP16_OVERFLOWS_STOP", 4)
    kw = dict(batch_size=4, epochs=3, precision="fp16")
    before = train(tiny_config(jsonl, cache, tmp_path / "cut", max_steps=2, **kw))["model"]
    before = {k: v.clone() for k, v in before.state_dict().items() if "adapter" in k}
    assert load_checkpoint(str(tmp_path / "cut" / "checkpoint_latest.pt"))["scaler"]["scale"] == 2.0 ** 58
    after = train(tiny_config(jsonl, cache, tmp_path / "cut", max_steps=3, resume=True, **kw))["model"].state_dict()
    logged = [json.loads(line) for line in open(tmp_path / "cut" / "metrics.jsonl")]
    assert [r["loss_scale"] for r in logged] == [2.0 ** 60, 2.0 ** 59, 2.0 ** 58]
    assert before and all(torch.equal(v, after[k]) for k, v in before.items())   # step 3 updated nothing either
    assert not [w for w in recwarn if "lr_scheduler.step()" in str(w.message)]   # no optimizer step: on purpose
    with pytest.raises(FloatingPointError, match=r"the fp16 gradients overflowed in 4 steps in a row \(steps 1-4; loss "
                                                 r"scale now 7\.2\d*e\+16\), which updated nothing: train with "
                                                 r"--precision fp32"):
        train(tiny_config(jsonl, cache, tmp_path / "stop", **kw))
    assert load_checkpoint(str(tmp_path / "stop" / "checkpoint_latest.pt"))["step"] == 4   # `--resume` goes on from it
    kw["precision"] = "fp32"
    resumed = train(tiny_config(jsonl, cache, tmp_path / "stop", resume=True, max_steps=5, **kw))
    assert resumed["steps"] == 1 and len(resumed["losses"]) == 1


def test_a_crashed_run_is_neither_overwritten_nor_logged_twice(video_set, tmp_path, monkeypatch):
    """A crash after step 3 (checkpoint at step 2, a torn line at the end of metrics.jsonl): a new
    run into the same folder is refused before it writes anything; --resume redoes step 3 and logs
    every step once."""
    import cma_train.step as step_module
    jsonl, cache = video_set
    kw = dict(batch_size=4, epochs=3, max_steps=4, save_every=2)
    real_step, calls = step_module.train_step, []

    def crashing_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("simulated crash")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(step_module, "train_step", crashing_step)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(tiny_config(jsonl, cache, tmp_path, **kw))
    monkeypatch.undo()
    log = tmp_path / "metrics.jsonl"
    with open(log, "a") as f:
        f.write('{"step": 4, "loss"')   # torn by the crash
    crashed = [json.loads(line) for line in log.read_text().splitlines()[:3]]
    checkpoint, log_text = (tmp_path / "checkpoint_latest.pt").read_bytes(), log.read_text()
    with pytest.raises(ValueError, match="already holds a training run .* continue it with --resume"):
        train(tiny_config(jsonl, cache, tmp_path, **kw))
    assert (tmp_path / "checkpoint_latest.pt").read_bytes() == checkpoint and log.read_text() == log_text
    train(tiny_config(jsonl, cache, tmp_path, resume=True, **kw))
    resumed = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert resumed[2]["loss"] == pytest.approx(crashed[2]["loss"], rel=1e-6)   # step 3 redone from step 2's state


@pytest.mark.parametrize("minutes, saved", [(1e-9, [1, 2, 3, 4, 5, 6]), (0, [4, 6])])
def test_save_every_min_checkpoints_once_that_time_has_passed(video_set, tmp_path, monkeypatch, minutes, saved):
    """--save-every-min: a checkpoint after each step that ends that long after the last one (here
    every step), besides the epoch's; 0: the epoch's (and the run's last step) only."""
    import cma_train.train as train_module
    jsonl, cache = video_set
    steps = []
    monkeypatch.setattr(train_module, "save_checkpoint",
                        lambda path, payload: (steps.append(payload.get("step")), save_checkpoint(path, payload)))
    train(tiny_config(jsonl, cache, tmp_path, batch_size=2, epochs=2, max_steps=6, save_every_min=minutes))
    assert [s for s in steps if s is not None] == saved   # adapters.pt holds no step


def _metrics_disk_full_after(lines):
    """An open() for cma_train.train whose metrics.jsonl takes `lines` lines, then fails as a full
    disk does."""
    def open_(path, *args, **kwargs):
        f = open(path, *args, **kwargs)
        if os.path.basename(path) == "metrics.jsonl":
            real_write, taken = f.write, []

            def write(text):
                if len(taken) == lines:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                taken.append(text)
                return real_write(text)
            f.write = write
        return f
    return open_


def test_a_metrics_line_that_cannot_be_written_stops_the_run_and_resume_logs_every_step_once(video_set, tmp_path,
                                                                                             monkeypatch):
    """A full disk under metrics.jsonl at step 3: the run stops there naming the file, before the
    step's checkpoint; --resume from step 2 logs every step once."""
    import cma_train.train as train_module
    jsonl, cache = video_set
    kw = dict(batch_size=4, epochs=3, max_steps=4, save_every=2)
    monkeypatch.setattr(train_module, "open", _metrics_disk_full_after(2), raising=False)
    log = tmp_path / "metrics.jsonl"
    with pytest.raises(OSError) as failed:
        train(tiny_config(jsonl, cache, tmp_path, **kw))
    assert str(failed.value) == (f"cannot write {log}: No space left on device (--resume continues from the last "
                                 f"checkpoint)")
    assert load_checkpoint(str(tmp_path / "checkpoint_latest.pt"))["step"] == 2
    monkeypatch.undo()
    train(tiny_config(jsonl, cache, tmp_path, resume=True, **kw))
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3, 4]


def test_a_cache_of_part_of_the_videos_serves_an_evaluation_of_all(video_set, tmp_path, capsys):
    """`cma prepare --split train` then `cma train --cache ... --eval-split test` (the README's
    commands): the test videos the cache lacks are decoded from their files, not skipped."""
    from cma_model.cache import prepare_cache
    jsonl, _ = video_set
    ann = load_annotations("jsonl", jsonl)
    cache = str(tmp_path / "half_cache")
    prepare_cache(ann.video_ids[:4], ann.video_paths[:4], cache, size=32, workers=1, progress=False)
    result = train(tiny_config(jsonl, cache, tmp_path / "run", batch_size=4, max_steps=1, eval_split="test"))
    assert "note: 4 of the 8 videos of split 'test' are not in the frame cache" in capsys.readouterr().out
    assert result["eval"]["num_videos"] == 8 and not result["eval"]["skipped"]


def test_a_split_without_video_files_is_refused_unless_the_cache_holds_it(video_set, tmp_path, monkeypatch):
    """A wrong --root or --video-dir (no video file at all) fails before the model is built, rather
    than at the first batch; videos the frame cache holds need no file."""
    import shutil

    import cma_train.train as train_module
    jsonl, cache = video_set
    folder = tmp_path / "annotations_only"
    folder.mkdir()
    for name in ("train.jsonl", "test.jsonl"):
        shutil.copy(os.path.join(os.path.dirname(jsonl), name), folder)
    build_model = train_module.build_model
    monkeypatch.setattr(train_module, "build_model", lambda *args: pytest.fail("built the model"))
    with pytest.raises(ValueError, match=r"none of the 8 videos of split 'train' is a file or a folder of frames, "
                                         r"e.g. .*clip0.mp4: check --root and --video-dir \(default ROOT/videos; "
                                         r"videos are looked for up to 3 folders below it\)"):
        train(tiny_config(str(folder / "train.jsonl"), None, tmp_path / "run", batch_size=4, max_steps=1))
    monkeypatch.setattr(train_module, "build_model", build_model)
    result = train(tiny_config(str(folder / "train.jsonl"), cache, tmp_path / "cached", batch_size=4, max_steps=1,
                               eval_split="test"))   # every video in the cache: no file needed
    assert len(result["losses"]) == 1 and result["eval"]["num_videos"] == 8


def test_without_decord_a_frame_cache_still_trains_and_evaluates(video_set, tmp_path, monkeypatch):
    """Without decord (PyPI has no ARM wheel: cma installs without it there) a run whose videos are
    all in the frame cache trains and evaluates; one that would decode video files is refused,
    saying how to get decord, before the model is built."""
    import cma_train.train as train_module
    jsonl, cache = video_set
    monkeypatch.setitem(sys.modules, "decord", None)   # `import decord` raises ImportError
    result = train(tiny_config(jsonl, cache, tmp_path / "cached", batch_size=4, max_steps=1, eval_split="test"))
    assert len(result["losses"]) == 1 and result["eval"]["num_videos"] == 8 and not result["eval"]["skipped"]
    monkeypatch.setattr(train_module, "build_model", lambda *args: pytest.fail("built the model"))
    with pytest.raises(ValueError, match=r"reading videos needs decord, which is not installed: `pip install decord`"):
        train(tiny_config(jsonl, None, tmp_path / "decoding", batch_size=4, max_steps=1))



def test_folders_of_frame_images_train_without_decord_as_their_frame_cache_does(tmp_path, monkeypatch):
    """Videos given as folders of frame images (the official code's images/fps_1/<video>/) train
    and evaluate without decord, and `cma prepare`'s code caches them without it: the run from the
    folders and the run from their cache take the same frames, so the same losses and metrics."""
    import numpy as np
    from PIL import Image

    from cma_model.cache import prepare_cache
    from cma_train.demo import FRAME, MOTION_WORDS, MOTIONS, render
    rng, lines = np.random.default_rng(0), []
    combos = [(c, s, m) for c, s in [("red", "circle"), ("blue", "square"), ("green", "triangle"),
                                      ("yellow", "circle")] for m in ("left", "up")]
    for i, (color, shape, motion) in enumerate(combos):
        (tmp_path / f"clip{i}").mkdir()
        (dx, dy) = MOTIONS[motion]
        for t, shift in enumerate(np.linspace(0, FRAME * 0.36, 14)):   # 14 frames: 12 are picked
            frame = render(color, shape, FRAME / 2 + dx * shift, FRAME / 2 + dy * shift, rng)
            Image.fromarray(frame).save(tmp_path / f"clip{i}" / f"{t:05d}.jpg")
        lines.append(json.dumps({"video": f"clip{i}", "caption": f"a {color} {shape} {MOTION_WORDS[motion]}"}))
    write_splits(tmp_path, lines)
    monkeypatch.setitem(sys.modules, "decord", None)   # `import decord` raises ImportError
    ann = load_annotations("jsonl", str(tmp_path / "data.jsonl"))
    skipped = prepare_cache(ann.video_ids, ann.video_paths, str(tmp_path / "cache"), size=32, workers=1,
                            progress=False)
    assert skipped == {}
    runs = [train(tiny_config(str(tmp_path / "data.jsonl"), cache, tmp_path / name, batch_size=4, max_steps=3,
                              eval_split="test"))
            for name, cache in (("folders", None), ("cached", str(tmp_path / "cache")))]
    assert runs[0]["losses"] == pytest.approx(runs[1]["losses"], rel=1e-6) and len(runs[0]["losses"]) == 3
    assert runs[0]["eval"]["t2v"] == runs[1]["eval"]["t2v"] and runs[0]["eval"]["num_videos"] == 8
    assert not runs[0]["eval"]["skipped"] and not runs[0]["skipped"]

@pytest.mark.parametrize("setting, value, message", [
    ("batch_size", 4, "batch_size=8, this run has batch_size=4"),
    ("temperature", 2.0, "temperature=5.0, this run has temperature=2.0"),   # another loss
    ("epochs", 31, "epochs=30, this run has epochs=31"),                     # another learning-rate schedule
])
def test_resume_refuses_a_changed_setting(video_set, tmp_path, setting, value, message):
    jsonl, cache = video_set
    train(tiny_config(jsonl, cache, tmp_path, max_steps=1))
    with pytest.raises(CheckpointError, match=message):
        train(tiny_config(jsonl, cache, tmp_path, max_steps=2, resume=True, **{setting: value}))


def test_truncated_or_foreign_checkpoint_is_refused(video_set, tmp_path):
    jsonl, cache = video_set
    train(tiny_config(jsonl, cache, tmp_path, max_steps=1))
    path = tmp_path / "checkpoint_latest.pt"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        train(tiny_config(jsonl, cache, tmp_path, max_steps=2, resume=True))
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="not a cma training checkpoint"):
        load_checkpoint(str(path))
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(str(tmp_path / "missing.pt"))
    assert not (tmp_path / "checkpoint_latest.pt.tmp").exists()


def test_a_diverged_run_resumes_on_new_optimizer_settings(video_set, tmp_path, monkeypatch):
    """A non-finite loss stops the run before the bad step is checkpointed; --resume with a lower
    --lr (and other AdamW settings) continues from the last checkpoint on the new settings: the
    learning rates and optimizer settings of a run started with them."""
    import cma_train.step as step_module
    jsonl, cache = video_set
    kw = dict(batch_size=4, epochs=3, max_steps=4, save_every=1)
    real_loss, calls = step_module._global_loss, []

    def diverging_loss(*args):
        calls.append(1)
        return real_loss(*args) * (float("nan") if len(calls) == 3 else 1.0)

    monkeypatch.setattr(step_module, "_global_loss", diverging_loss)
    with pytest.raises(FloatingPointError, match=r"nan at step 3; lower --lr \(--resume then continues"):
        train(tiny_config(jsonl, cache, tmp_path / "cut", **kw))
    assert load_checkpoint(str(tmp_path / "cut" / "checkpoint_latest.pt"))["step"] == 2
    monkeypatch.undo()
    new = dict(lr=3e-3, weight_decay=0.1, betas=(0.8, 0.95), eps=1e-5)
    assert len(train(tiny_config(jsonl, cache, tmp_path / "cut", resume=True, **kw, **new))["losses"]) == 2
    train(tiny_config(jsonl, cache, tmp_path / "fresh", **kw, **new))

    def logged_lrs(out):
        return [r["lr"] for r in map(json.loads, (tmp_path / out / "metrics.jsonl").read_text().splitlines())]

    def group_settings(out):
        groups = load_checkpoint(str(tmp_path / out / "checkpoint_latest.pt"))["optimizer"]["param_groups"]
        return [(g["lr"], g["initial_lr"], tuple(g["betas"]), g["eps"], g["weight_decay"]) for g in groups]

    assert logged_lrs("cut")[2:] == logged_lrs("fresh")[2:]   # steps 3 and 4; 1 and 2 ran at lr 1e-2
    assert logged_lrs("cut")[0] != logged_lrs("fresh")[0]
    assert group_settings("cut") == group_settings("fresh")
    assert group_settings("fresh")[0][2:] == ((0.8, 0.95), 1e-5, 0.1)


def _evals(out):
    return [r for r in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if "t2v" in r]


def test_eval_every_logs_each_epoch_and_keeps_the_best_adapters(video_set, tmp_path):
    """--eval-every 2: an evaluation every other epoch, the last one after training, in metrics.jsonl; the
    best t2v R@1 (the first of equals) is what adapters_best.pt scores when evaluated afresh."""
    from cma_model import load_adapter_state_dict
    from cma_train.cli import _evaluate
    jsonl, cache = video_set
    cfg = tiny_config(jsonl, cache, tmp_path, batch_size=4, epochs=16, lr=3e-2, eval_split="test", eval_every=2)
    result = train(cfg)
    evals = _evals(tmp_path)
    assert [r["step"] for r in evals] == list(range(4, 33, 4))   # 2 steps per epoch; the last is the final one
    assert result["eval"]["t2v"] == evals[-1]["t2v"]
    r1 = [r["t2v"]["R1"] for r in evals]
    assert r1[0] < max(r1), r1   # the best moved at least once (seed 42 at this lr: 12.5, then 25, with
    # torch 2.11 and 2.14 alike; at lr 1e-2 it stays 25 from the first evaluation)
    first_best = evals[r1.index(max(r1))]
    assert result["best"]["step"] == first_best["step"] and result["best"]["t2v"] == first_best["t2v"]
    torch.manual_seed(cfg.seed)
    fresh, _, _ = build_model(cfg, torch.device("cpu"))
    load_adapter_state_dict(fresh, torch.load(tmp_path / "adapters_best.pt"))
    test_ann = load_annotations("jsonl", cfg.root, "test")
    assert _evaluate(fresh, cfg, test_ann, torch.device("cpu"))["t2v"] == result["best"]["t2v"]


def test_a_run_stopped_during_an_evaluation_evaluates_first_on_resume(video_set, tmp_path, monkeypatch):
    """The checkpoint is written before each evaluation: a crash there loses no training, and the
    resumed run does the missed evaluation first, then logs what the uninterrupted run logs."""
    import cma_train.train as train_module
    jsonl, cache = video_set
    kw = dict(batch_size=4, epochs=3, eval_split="test", eval_every=1)
    whole = train(tiny_config(jsonl, cache, tmp_path / "whole", **kw))
    evaluate = train_module.evaluate

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("stopped during the evaluation")
    monkeypatch.setattr(train_module, "evaluate", crash)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(jsonl, cache, tmp_path / "cut", **kw))
    assert load_checkpoint(str(tmp_path / "cut" / "checkpoint_latest.pt"))["step"] == 2
    monkeypatch.setattr(train_module, "evaluate", evaluate)
    resumed = train(tiny_config(jsonl, cache, tmp_path / "cut", resume=True, **kw))
    assert resumed["losses"] == pytest.approx(whole["losses"][2:], rel=1e-6)
    assert [(r["step"], r["t2v"]) for r in _evals(tmp_path / "cut")] == [(r["step"], r["t2v"]) for r in
                                                                       _evals(tmp_path / "whole")]
    assert resumed["best"] == whole["best"]


def test_a_signal_during_an_evaluation_stops_after_it_and_resume_goes_on_from_there(video_set, tmp_path,
                                                                                     monkeypatch):
    """SIGTERM during the evaluation after epoch 1: the evaluation finishes, is logged and
    checkpointed, and the run stops there; --resume trains on without evaluating again."""
    import cma_train.train as train_module
    jsonl, cache = video_set
    kw = dict(batch_size=4, epochs=3, eval_split="test", eval_every=1)
    whole = train(tiny_config(jsonl, cache, tmp_path / "whole", **kw))
    evaluate = train_module.evaluate

    def signal_then_evaluate(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return evaluate(*args, **kwargs)
    monkeypatch.setattr(train_module, "evaluate", signal_then_evaluate)
    with pytest.raises(TrainingStopped) as stopped:
        train(tiny_config(jsonl, cache, tmp_path / "cut", **kw))
    assert (stopped.value.signum, stopped.value.step) == (signal.SIGTERM, 2)
    checkpoint = load_checkpoint(str(tmp_path / "cut" / "checkpoint_latest.pt"))
    assert (checkpoint["step"], checkpoint["evaluated_step"]) == (2, 2)
    monkeypatch.undo()
    resumed = train(tiny_config(jsonl, cache, tmp_path / "cut", resume=True, **kw))
    assert resumed["losses"] == pytest.approx(whole["losses"][2:], rel=1e-6)
    assert [(r["step"], r["t2v"]) for r in _evals(tmp_path / "cut")] == [(r["step"], r["t2v"]) for r in
                                                                       _evals(tmp_path / "whole")]


def _signal_at_step(monkeypatch, at, *signums):
    """Make the trainer's train_step send this process the given signals during step `at` (1-based)."""
    import cma_train.step as step_module
    calls = []

    def step_then_signal(*args, **kwargs):
        calls.append(1)
        if len(calls) == at:
            for signum in signums:
                os.kill(os.getpid(), signum)
        return train_step(*args, **kwargs)
    monkeypatch.setattr(step_module, "train_step", step_then_signal)


@pytest.mark.parametrize("name, at", [("SIGINT", 3), ("SIGTERM", 4), ("SIGHUP", 3)])
def test_a_signal_stops_after_the_step_with_a_checkpoint_and_resume_is_exact(video_set, tmp_path, monkeypatch,
                                                                             name, at):
    """Ctrl-C, a scheduler's SIGTERM or a hung-up terminal's SIGHUP mid-epoch (step 3) or on the
    epoch's last step (4, which writes its checkpoint anyway): the step finishes, its checkpoint is
    written once, the handlers are restored, and --resume gives the uninterrupted losses."""
    import cma_train.train as train_module
    jsonl, cache = video_set
    kw = dict(batch_size=2, epochs=2, max_steps=6)   # 4 steps per epoch
    whole = train(tiny_config(jsonl, cache, tmp_path / "whole", **kw))["losses"]
    _signal_at_step(monkeypatch, at, getattr(signal, name))
    written = []
    monkeypatch.setattr(train_module, "save_checkpoint",
                        lambda path, payload: (written.append(payload["step"]), save_checkpoint(path, payload)))
    before = [signal.getsignal(signum) for signum in STOP_SIGNALS]
    with pytest.raises(TrainingStopped) as stopped:
        train(tiny_config(jsonl, cache, tmp_path / "cut", **kw))
    assert stopped.value.step == at and stopped.value.signum == getattr(signal, name)
    assert [signal.getsignal(signum) for signum in STOP_SIGNALS] == before
    assert load_checkpoint(str(tmp_path / "cut" / "checkpoint_latest.pt"))["step"] == at
    assert written == [at]
    monkeypatch.undo()
    resumed = train(tiny_config(jsonl, cache, tmp_path / "cut", resume=True, **kw))["losses"]
    assert resumed == pytest.approx(whole[at:], rel=1e-6, abs=1e-7)


def test_a_second_ctrl_c_stops_at_once_keeping_the_last_checkpoint(video_set, tmp_path, monkeypatch):
    jsonl, cache = video_set
    _signal_at_step(monkeypatch, 3, signal.SIGINT, signal.SIGINT)
    before = signal.getsignal(signal.SIGINT)   # default_int_handler, or SIG_IGN where pytest runs in the background
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(jsonl, cache, tmp_path, batch_size=2, epochs=2, max_steps=6, save_every=2))
    assert signal.getsignal(signal.SIGINT) is before
    assert load_checkpoint(str(tmp_path / "checkpoint_latest.pt"))["step"] == 2   # step 3 never finished


def test_unreadable_videos_are_skipped_named_and_left_out_of_the_evaluation(video_set, tmp_path, capsys):
    """One clip replaced by garbage: training skips it and names it at the end; an evaluation
    ranks the 7 readable videos and counts the eighth as skipped."""
    import shutil

    from cma_train.cli import _evaluate
    jsonl, _ = video_set
    folder = tmp_path / "videos"
    shutil.copytree(os.path.dirname(jsonl), folder, ignore=shutil.ignore_patterns("cache"))
    (folder / "clip3.mp4").write_bytes(b"not a video" * 100)
    cfg = tiny_config(str(folder / "data.jsonl"), None, tmp_path / "run", max_frames=2, batch_size=4, epochs=1)
    result = train(cfg)
    assert len(result["skipped"]) == 1 and "clip3.mp4" in next(iter(result["skipped"].values()))
    out = capsys.readouterr().out
    assert "skipped 1 unreadable video(s):" in out and "clip3.mp4" in out
    test_ann = load_annotations("jsonl", cfg.root, "test")
    res = _evaluate(result["model"], cfg, test_ann, torch.device("cpu"))
    assert res["num_videos"] == 7 and res["num_captions"] == 7 and list(res["skipped"]) == ["clip3"]
    for clip in folder.glob("clip*.mp4"):   # none readable: an error that says so (cma prints it, no traceback)
        clip.write_bytes(b"not a video")
    with pytest.raises(ValueError, match="no video of the evaluation split could be read, e.g. .*clip"):
        _evaluate(result["model"], cfg, test_ann, torch.device("cpu"))


def test_the_time_spent_waiting_for_data_is_measured_and_said(tmp_path, monkeypatch, capsys):
    """Loading that takes 0.2 s a video (4 per step, in this process) is logged as each step's
    data_wait_s and counted in its videos/s; the epoch line's videos/s and share of the time spent
    waiting for data are those of the logged steps (to its rounding)."""
    import re
    import time
    jsonl, cache = write_frame_cache_set(tmp_path / "data")
    read = CaptionVideoDataset.__getitem__
    monkeypatch.setattr(CaptionVideoDataset, "__getitem__", lambda self, i: time.sleep(0.2) or read(self, i))
    train(tiny_config(jsonl, cache, tmp_path / "run", batch_size=4, epochs=1))
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert len(records) == 2
    for r in records:
        assert r["data_wait_s"] >= 0.8, r
        assert r["videos_per_s"] <= 4 / r["data_wait_s"], r   # the wait is part of the step's time
    seconds = sum(4 / r["videos_per_s"] for r in records)
    waited = sum(r["data_wait_s"] for r in records)
    said = re.search(r"epoch 1/1: step 2/2, mean loss [0-9.]+, ([0-9.]+) videos/s \(([0-9]+)% of the time waiting "
                     r"for data\)", capsys.readouterr().out)
    assert said, "no epoch line"
    assert float(said[1]) == pytest.approx(8 / seconds, abs=0.051)
    assert abs(int(said[2]) - 100 * waited / seconds) <= 0.51



def test_off_a_terminal_progress_is_said_in_lines_not_a_bar(tmp_path, monkeypatch, capsys):
    """A log file (a cluster job's) gets plain lines: the bar's, at most one every LOG_INTERVAL_S (0
    here: one a step), an epoch line, and a line per periodic evaluation, after its epoch's; no
    carriage return, which would make the log one long line."""
    import re

    from cma_model import progress
    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0)
    jsonl, cache = write_frame_cache_set(tmp_path / "data")
    train(tiny_config(jsonl, cache, tmp_path / "run", batch_size=2, epochs=2, progress=True, eval_split="test",
                      eval_every=1))
    said = capsys.readouterr()
    assert "\r" not in said.out + said.err
    assert all(re.fullmatch(r"(train|eval videos): +[0-9]+%\|[#0-9 ]{10}\| [0-9]+/[0-9]+ \[.*\]", line)
               for line in said.err.splitlines() if not line.startswith("note:")), said.err
    steps = re.findall(r"^train: +[0-9]+%\|[#0-9 ]{10}\| ([0-9])/8 \[.*, loss=[0-9.]+, lr=[0-9.e+-]+, "
                       r"vid_s=[0-9.]+\]$", said.err, re.M)
    assert sorted(set(map(int, steps))) == list(range(1, 9)), said.err
    number = r"[0-9]+\.[0-9]"
    epochs = [rf"epoch {e}/2: step {4 * e}/8, mean loss [0-9.]+, {number} videos/s \([0-9]+% of the time waiting "
              rf"for data\)" for e in (1, 2)]
    evaluation = (rf"evaluation at step 4 \(epoch 1\) on test: t2v R@1 {number}, R@5 {number}, R@10 {number}; v2t "
                  rf"R@1 {number} \(best so far\)")
    lines = [line for line in said.out.splitlines() if line.startswith(("epoch ", "evaluation "))]
    assert len(lines) == 3 and all(re.fullmatch(p, line) for p, line in zip([epochs[0], evaluation, epochs[1]], lines))


def test_loader_workers_that_shared_memory_cannot_hold_are_left_out_saying_so(tmp_path, monkeypatch, capsys):
    """With 256 KiB free in /dev/shm (a container's is 64 MiB), `--workers 2` trains and evaluates
    with the batches made in the training process, and says so, where PyTorch's workers would fail
    at their first batch."""
    jsonl, cache = write_frame_cache_set(tmp_path / "data")
    fake_free_space(monkeypatch, 1 << 20, 256 << 10)
    workers, make_loader = [], torch.utils.data.DataLoader.__init__
    monkeypatch.setattr(torch.utils.data.DataLoader, "__init__",
                        lambda self, *a, **kw: workers.append(kw["num_workers"]) or make_loader(self, *a, **kw))
    result = train(tiny_config(jsonl, cache, tmp_path / "run", batch_size=4, epochs=1, workers=2, eval_split="test"))
    assert workers == [0, 0] and len(result["losses"]) == 2   # the epoch's loader, the evaluation's
    said = capsys.readouterr().err
    assert said.count("(6 at a time with 2 loader workers): 0 worker(s) instead (batches made in this process)") == 2

def test_tensorboard_gets_what_metrics_jsonl_logs(tmp_path):
    """--tensorboard: each step's loss, videos/s and wait for data, as metrics.jsonl has them (float32
    in the event file). Runs where tensorboard is installed (not a test dependency)."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    jsonl, cache = write_frame_cache_set(tmp_path / "data")
    train(tiny_config(jsonl, cache, tmp_path / "run", batch_size=4, epochs=1, tensorboard=True))
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    for name in ("loss", "videos_per_s", "data_wait_s"):
        logged = [(e.step, e.value) for e in events.Scalars(f"train/{name}")]
        assert logged == [(r["step"], pytest.approx(r[name], rel=1e-6, abs=1e-7)) for r in records], name


def _unreadable(captions):
    """A CaptionVideoDataset.__getitem__ for which the videos of these caption indices cannot be
    read: their items come back as a broken file's do (loader workers=0: in this process)."""
    read = CaptionVideoDataset.__getitem__

    def getitem(self, i):
        if i in captions:
            return {"skipped": f"{self.ann.video_paths[self.ann.caption_video[i]]}: cannot open video (simulated)"}
        return read(self, i)
    return getitem


def test_a_batch_without_a_readable_video_is_a_step_without_an_update(tmp_path, monkeypatch, capsys):
    """Batches of 4 of 8 clips, the second batch's 4 unreadable: step 2 counts (logged as such, with
    a note) and leaves every adapter weight as step 1 left it, bit for bit. Five such batches in a
    row (every video unreadable: a broken dataset or decoder) stop the run, naming a file, with a
    checkpoint."""
    jsonl, cache = write_frame_cache_set(tmp_path / "data")
    monkeypatch.setattr(CaptionVideoDataset, "__getitem__", _unreadable(set(epoch_order(8, 42, 0)[4:8])))
    result = train(tiny_config(jsonl, cache, tmp_path / "two", batch_size=4, epochs=1))
    assert result["steps"] == 2 and len(result["losses"]) == 1
    assert "note: step 2: no video of its batch could be read (e.g. " in capsys.readouterr().err
    logged = [json.loads(line) for line in open(tmp_path / "two" / "metrics.jsonl")]
    assert [(r["step"], "loss" in r, r.get("no_readable_video")) for r in logged] == [(1, True, None), (2, False, True)]
    one = train(tiny_config(jsonl, cache, tmp_path / "one", batch_size=4, epochs=1, max_steps=1))
    assert one["losses"] == result["losses"]
    after_one, after_two = (torch.load(tmp_path / run / "adapters.pt")["state_dict"] for run in ("one", "two"))
    assert all(torch.equal(after_one[k], after_two[k]) for k in after_one)
    monkeypatch.setattr(CaptionVideoDataset, "__getitem__", _unreadable(set(range(8))))
    with pytest.raises(NoReadableVideos, match=r"in 5 batches in a row \(steps 1-5\) \(e\.g\. .*clip\d\.mp4: cannot"):
        train(tiny_config(jsonl, cache, tmp_path / "none", batch_size=4, epochs=3))
    assert load_checkpoint(str(tmp_path / "none" / "checkpoint_latest.pt"))["step"] == 5   # --resume goes on from there


def _unreadable_of_16():
    """Of 16 clips in batches of 8 over 2 ranks: rank 1's share of step 2 and all of step 3."""
    return set(epoch_order(16, 42, 0)[1::2][4:8]) | set(epoch_order(16, 42, 1)[:8])


def _unreadable_worker(rank, port, jsonl, cache, out, result_dir):
    from datetime import timedelta
    _as_torchrun_rank(rank, port)
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))   # a rank left waiting fails, not hangs
    CaptionVideoDataset.__getitem__ = _unreadable(_unreadable_of_16())
    result = train(tiny_config(jsonl, cache, out, batch_size=8, epochs=2, lr=3e-3))
    torch.save({"losses": result["losses"], "steps": result["steps"]}, os.path.join(result_dir, f"unread{rank}.pt"))
    dist.destroy_process_group()


def test_a_rank_without_a_readable_video_takes_part_with_none(tmp_path, monkeypatch):
    """2 gloo ranks, 16 clips, 4 per rank per step, 11 unreadable: rank 0 has no readable video at
    step 1, rank 1 none at step 2, neither at step 3. Both ranks train on (no rank waits for
    another) with the losses of one process on the same global batches (fp32, 1e-5), step 3
    updating nothing; rank 0's checkpoint names the unreadable videos of both ranks."""
    jsonl, cache = write_frame_cache_set(tmp_path / "data", num_videos=16)
    unreadable = _unreadable_of_16()
    assert set(epoch_order(16, 42, 0)[0::2][:4]) <= unreadable   # rank 0's share of step 1
    _spawn_ranks(_unreadable_worker, jsonl, cache, tmp_path)
    monkeypatch.setattr(CaptionVideoDataset, "__getitem__", _unreadable(unreadable))
    single = train(tiny_config(jsonl, cache, tmp_path / "one", batch_size=8, epochs=2, lr=3e-3))
    assert single["steps"] == 4 and len(single["losses"]) == 3 and single["losses"][-1] != single["losses"][0]
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"unread{rank}.pt")
        assert got["steps"] == 4 and got["losses"] == pytest.approx(single["losses"], rel=1e-5), rank
    logged = [json.loads(line) for line in open(tmp_path / "ddp" / "metrics.jsonl")]
    assert [r["step"] for r in logged if r.get("no_readable_video")] == [3]
    named = load_checkpoint(str(tmp_path / "ddp" / "checkpoint_latest.pt"))["skipped"]
    assert len(named) == len(unreadable) and named.keys() == single["skipped"].keys()


@requires_cuda
@pytest.mark.parametrize("precision", [pytest.param("auto", marks=gpu_check), "fp16"])
def test_training_on_cuda_takes_the_fast_path(tmp_path, monkeypatch, precision):
    """`cma train` on the GPU as users get it (fused adapters, lean frozen blocks with bf16 frozen
    linears, bf16 autocast, fused AdamW, evaluation on the device) against --backend reference on
    the same data: the fused kernels ran, and the losses agree within bf16 noise (5e-2 relative).
    Also with fp16 and its loss scale, as on a V100 or T4 (compiles the kernels for fp16: not in the
    quick GPU check)."""
    import cma_kernels.adapter_op as adapter_op
    jsonl, cache = write_frame_cache_set(tmp_path / "data")
    calls, forward = [], adapter_op.adapter_forward
    monkeypatch.setattr(adapter_op, "adapter_forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    kw = dict(batch_size=4, epochs=3, lr=3e-3, eval_split="test", eval_every=1, device="cuda", precision=precision)
    fused = train(tiny_config(jsonl, cache, tmp_path / "fused", **kw))
    fused_calls = len(calls)
    reference = train(tiny_config(jsonl, cache, tmp_path / "reference", backend="reference", **kw))
    assert fused_calls > 0 and len(calls) == fused_calls   # the reference backend launched none
    assert len(fused["losses"]) == len(reference["losses"]) == 6
    for step, (a, b) in enumerate(zip(reference["losses"], fused["losses"])):
        assert abs(a - b) <= 5e-2 * abs(a), (step, a, b)
    assert fused["eval"]["num_videos"] == 8 and [r["step"] for r in _evals(tmp_path / "fused")] == [2, 4, 6]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's refusal")
def test_cuda_graphs_on_the_cpu_are_refused_before_anything_is_built(tmp_path):
    jsonl, cache = write_frame_cache_set(tmp_path / "data", num_videos=4)
    with pytest.raises(ValueError, match="--cuda-graphs needs a CUDA GPU, this run is on cpu; leave it out"):
        train(tiny_config(jsonl, cache, tmp_path / "run", cuda_graphs=True))
    assert not (tmp_path / "run").exists()


@gpu_check
@requires_cuda
def test_training_with_cuda_graphs_follows_eager_training(tmp_path, monkeypatch, capsys):
    """`cma train --cuda-graphs`: the graphs are recorded before the loader starts, then every step
    replays them while the loader's worker and pin-memory thread run, with an evaluation (eager,
    in eval mode) after each epoch. Against the same run without graphs: each of the 4 steps
    replayed both towers (plus the recording's own call), none ran eager, and the losses agree
    within bf16 noise (2e-2 relative: the same kernels run)."""
    import cma_model.cuda_graphs as cuda_graphs
    jsonl, cache = write_frame_cache_set(tmp_path / "data")
    replays, replay = [], cuda_graphs._Recorded.__call__
    monkeypatch.setattr(cuda_graphs._Recorded, "__call__", lambda self, *a: replays.append(1) or replay(self, *a))
    kw = dict(batch_size=4, epochs=2, lr=3e-3, eval_split="test", eval_every=1, device="cuda", workers=1)
    graphs = train(tiny_config(jsonl, cache, tmp_path / "graphs", cuda_graphs=True, **kw))
    assert len(replays) == 2 * (1 + 4)
    said = capsys.readouterr()
    assert "note: CUDA graphs" not in said.err and "recorded the towers' CUDA graphs for 4 videos per pass" in said.out
    eager = train(tiny_config(jsonl, cache, tmp_path / "eager", **kw))
    assert len(graphs["losses"]) == len(eager["losses"]) == 4
    for step, (a, b) in enumerate(zip(eager["losses"], graphs["losses"])):
        assert abs(a - b) <= 2e-2 * abs(a), (step, a, b)
    assert graphs["eval"]["num_videos"] == 8


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU fp32 check; the GPU comparison runs in bench_train_step.py")
def test_fused_training_matches_reference_over_50_steps(video_set, tmp_path):
    """The fast path (fused adapters, here through the Triton interpreter) against the reference
    path: the same loss curve within 1e-4 relative, fp32, 50 steps on demo clips."""
    jsonl, _ = video_set
    cache = None   # decoded from the mp4 files: 2 frames a clip
    common = dict(max_frames=2, batch_size=4, epochs=25, max_steps=50, lr=3e-3)
    ref = train(tiny_config(jsonl, cache, tmp_path / "ref", backend="reference", **common))["losses"]
    fused = train(tiny_config(jsonl, cache, tmp_path / "fused", backend="triton", **common))["losses"]
    assert len(ref) == len(fused) == 50
    assert ref[-1] < ref[0]   # it trains
    for step, (a, b) in enumerate(zip(ref, fused)):
        assert abs(a - b) <= 1e-4 * abs(a), (step, a, b)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU check; GPU: test_training_on_cuda_takes_the_fast_path")
def test_fused_training_in_fp16_matches_reference(tmp_path):
    """--precision fp16 through the fused kernels (Triton's interpreter: fp16 activations, fp32
    weights, the loss scaled) against the reference path in fp16: the same losses within 1e-3
    relative over 4 steps (1.2e-4 measured: two fp16 summation orders)."""
    jsonl, cache = write_frame_cache_set(tmp_path / "data")
    kw = dict(precision="fp16", batch_size=4, epochs=2, lr=3e-3)
    ref = train(tiny_config(jsonl, cache, tmp_path / "ref", backend="reference", **kw))["losses"]
    fused = train(tiny_config(jsonl, cache, tmp_path / "fused", backend="triton", **kw))["losses"]
    assert len(ref) == len(fused) == 4
    for step, (a, b) in enumerate(zip(ref, fused)):
        assert abs(a - b) <= 1e-3 * abs(a), (step, a, b)


def test_recompute_options_train_like_keeping_activations(video_set, tmp_path, monkeypatch):
    """--recompute-mlp and --no-recompute-out-proj change what backward keeps, not the math: the
    same losses within 1e-5 relative over 6 fp32 steps. By default each block but a tower's first
    recomputes its attention adapter's input (2 of the 4 blocks x 6 steps), and with
    --recompute-mlp every block its MLP (4 x 6); with --no-recompute-out-proj none recomputes."""
    from cma_model import frozen_block
    calls = {"mlp": 0, "out_proj": 0}
    checkpoint, apply = frozen_block.checkpoint, frozen_block._OutProjAdapter.apply

    def counting(name, fn):
        def counted(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return counted
    monkeypatch.setattr(frozen_block, "checkpoint", counting("mlp", checkpoint))
    monkeypatch.setattr(frozen_block._OutProjAdapter, "apply", counting("out_proj", apply))
    jsonl, cache = video_set
    common = dict(batch_size=4, epochs=3, max_steps=6, lr=3e-3)
    losses = {}
    for name, options, want in [("default", {}, {"mlp": 0, "out_proj": 2 * 6}),
                                ("recompute_mlp", {"recompute_mlp": True}, {"mlp": 4 * 6, "out_proj": 2 * 6}),
                                ("keep_h", {"recompute_out_proj": False}, {"mlp": 0, "out_proj": 0})]:
        calls.update(mlp=0, out_proj=0)
        losses[name] = train(tiny_config(jsonl, cache, tmp_path / name, **options, **common))["losses"]
        assert calls == want, name
    kept = losses["default"]
    assert len(kept) == 6 and kept[-1] != kept[0]
    for name in ("recompute_mlp", "keep_h"):
        assert len(losses[name]) == 6
        for step, (a, b) in enumerate(zip(kept, losses[name])):
            assert abs(a - b) <= 1e-5 * abs(a), (name, step, a, b)


def test_out_of_gpu_memory_retries_the_step_with_half_the_videos_per_pass(video_set, tmp_path, monkeypatch, capsys):
    """A process that runs out of memory halves its videos per pass (--micro-batch) and redoes the
    step, dropping what the failed attempt left in .grad (here random gradients): the run is, loss
    for loss, the one started with the --micro-batch that fits, and its checkpoint keeps that."""
    import cma_train.step as step_module
    jsonl, cache = video_set
    real_step = step_module.train_step

    def two_videos_fit(forward, logit_scale, batch, cfg, *args):
        if (cfg.micro_batch or len(batch["tokens"])) > 2:
            for p in forward.parameters():
                if p.requires_grad:
                    p.grad = torch.randn_like(p)   # a backward that ran part way
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.")
        return real_step(forward, logit_scale, batch, cfg, *args)

    monkeypatch.setattr(step_module, "train_step", two_videos_fit)
    kw = dict(batch_size=8, epochs=3)   # 3 steps
    auto = train(tiny_config(jsonl, cache, tmp_path / "auto", **kw))["losses"]
    err = capsys.readouterr().err
    assert "note: out of GPU memory with 8 videos per pass; retrying the step with --micro-batch 4" in err
    assert "note: out of GPU memory with 4 videos per pass; retrying the step with --micro-batch 2" in err
    assert load_checkpoint(str(tmp_path / "auto" / "checkpoint_latest.pt"))["config"]["micro_batch"] == 2
    monkeypatch.undo()
    assert auto == train(tiny_config(jsonl, cache, tmp_path / "fixed", micro_batch=2, **kw))["losses"]
    monkeypatch.setattr(step_module, "train_step", two_videos_fit)
    with pytest.raises(torch.OutOfMemoryError):   # dropout: a second forward would draw new masks
        train(tiny_config(jsonl, cache, tmp_path / "dropout", dropout=0.1, **kw))


def _as_torchrun_rank(rank, port):
    """The environment torchrun gives a rank (train() opens the gloo group from it)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)


def _spawn_ranks(worker, jsonl, cache, tmp_path):
    """worker(rank, port, jsonl, cache, out, result_dir) in WORLD processes, rendezvous on a free
    local port; out = tmp_path / "ddp", result_dir = tmp_path."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(port, jsonl, cache, str(tmp_path / "ddp"), str(tmp_path)), nprocs=WORLD, join=True)


def _out_of_memory_worker(rank, port, jsonl, cache, out, result_dir):
    """Rank 1 alone runs out of memory with more than 2 videos per pass: in its forward in the
    first run, in its backward (after part of its adapter gradients came) in the second, and in
    its forward with dropout (no retry) in the third."""
    import io
    from datetime import timedelta
    _as_torchrun_rank(rank, port)
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))   # ranks out of step fail, not hang
    real_forward = RetrievalForward.forward

    def out_of_memory(*_):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.")

    results = {}
    for phase in ("forward", "backward", "dropout"):
        def forward(self, frames, mask, tokens):
            too_many = rank == 1 and len(tokens) > 2
            if too_many and phase != "backward":
                out_of_memory()
            frame_feats, text_feats = real_forward(self, frames, mask, tokens)
            if too_many and text_feats.requires_grad:
                text_feats.register_hook(out_of_memory)
            return frame_feats, text_feats
        RetrievalForward.forward = forward
        sys.stderr, stderr = io.StringIO(), sys.stderr
        try:
            if phase == "dropout":
                try:
                    train(tiny_config(jsonl, cache, os.path.join(out, phase), epochs=3, lr=3e-3, dropout=0.1))
                except torch.OutOfMemoryError as e:   # both ranks stop, none waits: each says how
                    results[phase] = type(e).__name__
                continue
            losses = train(tiny_config(jsonl, cache, os.path.join(out, phase), epochs=3, lr=3e-3))["losses"]
        finally:
            sys.stderr, said = stderr, sys.stderr.getvalue()
        micro = load_checkpoint(os.path.join(out, phase, "checkpoint_latest.pt"))["config"]["micro_batch"]
        results[phase] = (losses, said, micro)
    torch.save(results, os.path.join(result_dir, f"oom{rank}.pt"))
    dist.destroy_process_group()


def test_out_of_memory_on_one_rank_makes_every_rank_retry_with_half_the_videos(video_set, tmp_path):
    """2 gloo ranks, 4 videos each per step; rank 1 runs out of memory above 2 videos per pass,
    in its forward or in its backward. Both ranks redo the step with --micro-batch 2 (rank 0 says
    so, once) and the run is, loss for loss, one process's at --micro-batch 2 (fp32, 1e-5). With
    dropout (no retry) both stop: rank 1 with its own error, rank 0 with OutOfMemoryElsewhere."""
    jsonl, cache = video_set
    _spawn_ranks(_out_of_memory_worker, jsonl, cache, tmp_path)
    want = train(tiny_config(jsonl, cache, tmp_path / "one", epochs=3, lr=3e-3, micro_batch=2))["losses"]
    assert len(want) == 3 and want[-1] != want[0]
    note = "note: out of GPU memory in one of the processes with 4 videos per pass; retrying the step with " \
           "--micro-batch 2"
    for rank in range(WORLD):
        results = torch.load(tmp_path / f"oom{rank}.pt")
        assert results.pop("dropout") == ("OutOfMemoryElsewhere" if rank == 0 else "OutOfMemoryError"), rank
        for phase, (losses, said, micro) in results.items():
            assert losses == pytest.approx(want, rel=1e-5), (rank, phase)
            assert micro == 2, (rank, phase)
            assert said.count(note) == (1 if rank == 0 else 0), (rank, phase, said)


@gpu_check
@requires_cuda
def test_a_real_out_of_memory_on_the_gpu_is_survived_by_smaller_passes(tmp_path):
    """The same, with the GPU's own out-of-memory error: this process may allocate only about halfway
    between what a step with 2 videos per pass and one with all 16 at once need (each measured
    first), so the whole batch cannot fit; the run halves its passes until one fits and trains on,
    like a run started at that --micro-batch (bf16 noise: 5e-2 relative)."""
    # the tiny model's widths (kernels already compiled for them), on 128-pixel frames: 257 tokens each
    config = {**TINY_TRAIN_CLIP, "vision_cfg": {**TINY_TRAIN_CLIP["vision_cfg"], "image_size": 128}}
    jsonl, cache = write_frame_cache_set(tmp_path / "data", num_videos=16, size=128)
    kw = dict(model_config=config, batch_size=16, epochs=2, lr=3e-3, device="cuda")

    def peak(out, **more):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        losses = train(tiny_config(jsonl, cache, tmp_path / out, **kw, **more))["losses"]
        return torch.cuda.max_memory_allocated(), losses
    whole, _ = peak("whole")
    two, _ = peak("two", micro_batch=2)
    assert whole > 2 * two, (whole, two)   # the activations dominate: a limit between them is clear
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_reserved() + (whole + two) / 2) / total)
    try:
        auto = train(tiny_config(jsonl, cache, tmp_path / "auto", **kw))["losses"]
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    fits = load_checkpoint(str(tmp_path / "auto" / "checkpoint_latest.pt"))["config"]["micro_batch"]
    assert 2 <= fits < 16
    _, fixed = peak("fixed", micro_batch=fits)
    assert len(auto) == len(fixed) == 2
    for step, (a, b) in enumerate(zip(fixed, auto)):
        assert abs(a - b) <= 5e-2 * abs(a), (step, a, b)


def test_micro_batch_trains_like_the_whole_batch(video_set, tmp_path):
    """--micro-batch 3 on batches of 8 (chunks 3, 3, 2): the losses of whole batches within 1e-5
    relative over 4 fp32 steps."""
    jsonl, cache = video_set
    common = dict(epochs=4, max_steps=4, lr=3e-3)
    whole = train(tiny_config(jsonl, cache, tmp_path / "whole", **common))["losses"]
    chunked = train(tiny_config(jsonl, cache, tmp_path / "chunked", micro_batch=3, **common))["losses"]
    assert len(whole) == len(chunked) == 4 and whole[-1] != whole[0]
    for step, (a, b) in enumerate(zip(whole, chunked)):
        assert abs(a - b) <= 1e-5 * abs(a), (step, a, b)


def test_compiled_towers_train_like_eager(video_set, tmp_path):
    """--compile (inductor on the CPU here), alone and with --recompute-mlp (its checkpointed MLP
    traced by dynamo): the same losses as plain eager (trained once) within 1e-4 relative, fp32,
    and adapter checkpoints keep their names. Compiling takes about a minute on 2 cores."""
    jsonl, cache = video_set
    common = dict(batch_size=4, epochs=2, max_steps=4, lr=3e-3)
    from torch._dynamo.utils import counters
    eager = train(tiny_config(jsonl, cache, tmp_path / "eager", **common))
    for recompute_mlp in (False, True):
        out = tmp_path / f"compiled_recompute{recompute_mlp}"
        counters.clear()
        compiled = train(tiny_config(jsonl, cache, out, compile="default", recompute_mlp=recompute_mlp, **common))
        assert counters["stats"]["unique_graphs"] >= 2, recompute_mlp   # both towers went through dynamo
        for step, (a, b) in enumerate(zip(eager["losses"], compiled["losses"])):
            assert abs(a - b) <= 1e-4 * abs(a), (recompute_mlp, step, a, b)
        assert torch.load(out / "adapters.pt")["state_dict"].keys() == \
            torch.load(tmp_path / "eager" / "adapters.pt")["state_dict"].keys()


def _train_worker(rank, port, jsonl, cache, out, result_dir):
    _as_torchrun_rank(rank, port)
    result = train(tiny_config(jsonl, cache, out, batch_size=4, epochs=2, max_steps=3, lr=3e-3, eval_split="test"))
    torch.save({"losses": result["losses"], "eval": result["eval"]}, os.path.join(result_dir, f"result{rank}.pt"))
    dist.destroy_process_group()


def test_two_process_training_run_matches_one_process(video_set, tmp_path):
    """train() under 2 gloo ranks (as torchrun starts it) gives the losses of one process on the
    same global batches, and the evaluation after training, each rank encoding its half of the
    captions and videos, its metrics; only rank 0 writes the run folder."""
    jsonl, cache = video_set
    _spawn_ranks(_train_worker, jsonl, cache, tmp_path)
    single = train(tiny_config(jsonl, cache, tmp_path / "one", batch_size=4, epochs=2, max_steps=3, lr=3e-3,
                               eval_split="test"))
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"result{rank}.pt")
        assert got["losses"] == pytest.approx(single["losses"], rel=1e-5)
        assert got["eval"]["t2v"] == pytest.approx(single["eval"]["t2v"]), rank   # each rank encoded half
        assert got["eval"]["v2t"] == pytest.approx(single["eval"]["v2t"]), rank
        assert got["eval"]["num_videos"] == 8
    assert len((tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()) == 3 + 1   # steps, evaluation


def test_a_second_run_into_a_folder_being_written_is_refused(video_set, tmp_path):
    """A job started twice: train() into a folder another process is writing (no checkpoint there
    yet) is refused before anything is built; once that process has ended, even killed, the folder
    trains as usual."""
    jsonl, cache = video_set
    (tmp_path / "run").mkdir()
    holder = hold_folder_lock(tmp_path / "run", RUN_LOCK)
    try:
        with pytest.raises(ValueError, match=f"run is being written by another cma train \\(pid {holder.pid} "):
            train(tiny_config(jsonl, cache, tmp_path / "run", max_steps=1))
    finally:
        holder.kill()
        holder.wait()
    assert train(tiny_config(jsonl, cache, tmp_path / "run", max_steps=1))["steps"] == 1


def _resuming_worker(rank, port, jsonl, cache, out, result_dir):
    """Each rank resumes from its own copy of the run's folder (out + rank), as nodes without a
    shared filesystem would: first from two copies of the same checkpoint, then again, when only
    rank 0 has written the step since."""
    from datetime import timedelta
    _as_torchrun_rank(rank, port)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))   # ranks out of step fail, not hang
    kw = dict(batch_size=4, epochs=2, lr=3e-3)
    first = train(tiny_config(jsonl, cache, f"{out}{rank}", max_steps=3, resume=True, **kw))["losses"]
    later = []
    os.environ["LOCAL_WORLD_SIZE"] = "1"   # one process per node, as on two nodes
    for nothing_on_rank_1 in (False, True):   # then as on a node without the run's folder
        if nothing_on_rank_1 and rank == 1:
            shutil.rmtree(f"{out}{rank}")
        try:
            train(tiny_config(jsonl, cache, f"{out}{rank}", max_steps=4, resume=True, **kw))
            later.append(None)
        except (ValueError, FailedElsewhere) as e:
            later.append(f"{type(e).__name__}: {e}")
    torch.save((first, *later), os.path.join(result_dir, f"resumed{rank}.pt"))
    dist.destroy_process_group()


def test_ranks_resuming_from_different_checkpoints_all_stop_saying_why(video_set, tmp_path):
    """Resuming under torchrun, the ranks compare the step and adapters they read: the same
    checkpoint resumes as one process does; a stale copy (rank 1's, which no rank updates) stops
    every rank with the cause, instead of training diverging adapters on each; so does a rank that
    finds no checkpoint (rank 0 does not wait for it in the first collective until the timeout)."""
    jsonl, cache = video_set
    kw = dict(batch_size=4, epochs=2, lr=3e-3)
    train(tiny_config(jsonl, cache, tmp_path / "base", max_steps=2, **kw))
    for copy in ("ddp0", "ddp1", "one"):
        shutil.copytree(tmp_path / "base", tmp_path / copy)
    _spawn_ranks(_resuming_worker, jsonl, cache, tmp_path)
    single = train(tiny_config(jsonl, cache, tmp_path / "one", max_steps=3, resume=True, **kw))["losses"]
    results = [torch.load(tmp_path / f"resumed{rank}.pt") for rank in range(WORLD)]
    for rank, (first, stale, missing) in enumerate(results):
        assert first == pytest.approx(single, rel=1e-5), rank
        assert stale.startswith("ValueError: the ranks" if rank == 0 else "FailedElsewhere: rank 0: the ranks"), rank
        assert "resumed from different checkpoints at" in stale and "(rank 0 at step 3, rank 1 at step 2): across " \
            "nodes, --out must be one folder every node sees" in stale, rank
    no_run = (f"ValueError: --resume: {tmp_path / 'ddp1'} holds no training run to continue (no "
              f"{tmp_path / 'ddp1' / 'checkpoint_latest.pt'}); leave out --resume to start one (rank 1 sees none: "
              f"across nodes, --out must be one folder every node sees, on a shared filesystem)")
    assert results[1][2] == no_run
    assert results[0][2] == "FailedElsewhere: rank 1 failed: " + no_run


def _how_one_epoch_ends(rank, port, jsonl, cache, out, result_dir):
    """Train one epoch as rank `rank` of 2; save how it ended there: None, or the error's type and
    message (in said<rank>.pt)."""
    from datetime import timedelta
    _as_torchrun_rank(rank, port)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))   # a rank left waiting fails, not hangs
    try:
        train(tiny_config(jsonl, cache, out, batch_size=4, epochs=1))
        said = None
    except (ValueError, OSError, FailedElsewhere) as e:
        said = f"{type(e).__name__}: {e}"
    torch.save(said, os.path.join(result_dir, f"said{rank}.pt"))
    dist.destroy_process_group()


def _full_disk_worker(rank, port, jsonl, cache, out, result_dir):
    """Rank 0 cannot write its first checkpoint (a full disk, say)."""
    import cma_train.train as train_module

    def full_disk(path, _):
        raise ValueError(f"cannot write {path}: 1.2 MB left on its disk")
    if rank == 0:
        train_module.save_checkpoint = full_disk
    _how_one_epoch_ends(rank, port, jsonl, cache, out, result_dir)


def test_a_checkpoint_rank_0_cannot_write_stops_every_rank_at_once(video_set, tmp_path):
    """Rank 0 alone writes files; where it fails (and stops), the others stop with it instead of
    waiting for it in the next collective until the process group's timeout (across nodes,
    torchrun would leave them waiting)."""
    jsonl, cache = video_set
    _spawn_ranks(_full_disk_worker, jsonl, cache, tmp_path)
    message = f"ValueError: cannot write {tmp_path / 'ddp' / 'checkpoint_latest.pt'}: 1.2 MB left on its disk"
    assert torch.load(tmp_path / "said0.pt") == message
    assert torch.load(tmp_path / "said1.pt") == "FailedElsewhere: rank 0 failed: " + message


def _full_metrics_disk_worker(rank, port, jsonl, cache, out, result_dir):
    """Rank 0 cannot write the first step's line of metrics.jsonl (a full disk, say)."""
    import cma_train.train as train_module
    if rank == 0:
        train_module.open = _metrics_disk_full_after(0)
    _how_one_epoch_ends(rank, port, jsonl, cache, out, result_dir)


def test_a_metrics_line_rank_0_cannot_write_stops_every_rank_after_that_step(video_set, tmp_path):
    """The step's agreement on stopping carries rank 0's failure to log it: the others stop there
    instead of waiting for rank 0 in the next collective."""
    jsonl, cache = video_set
    _spawn_ranks(_full_metrics_disk_worker, jsonl, cache, tmp_path)
    log = tmp_path / "ddp" / "metrics.jsonl"
    assert torch.load(tmp_path / "said0.pt") == f"OSError: cannot write {log}: No space left on device"
    assert torch.load(tmp_path / "said1.pt") == ("FailedElsewhere: another process failed after this step (its own "
                                                 "error says why)")


def _timed_saving_worker(rank, port, jsonl, cache, out, result_dir):
    """Rank 0's clock calls for a checkpoint after every step, rank 1's never: every rank must
    checkpoint (a collective) at the same steps."""
    from datetime import timedelta

    import cma_train.train as train_module
    _as_torchrun_rank(rank, port)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))   # ranks out of step fail, not hang
    steps = []
    train_module.save_checkpoint = lambda path, payload: (steps.append(payload.get("step")),
                                                          save_checkpoint(path, payload))
    train(tiny_config(jsonl, cache, out, batch_size=4, epochs=2, save_every_min=1e-9 if rank == 0 else 0))
    torch.save(steps, os.path.join(result_dir, f"saved{rank}.pt"))
    dist.destroy_process_group()


def test_a_checkpoint_rank_0_times_is_written_by_every_rank_at_the_same_step(video_set, tmp_path):
    jsonl, cache = video_set
    _spawn_ranks(_timed_saving_worker, jsonl, cache, tmp_path)
    assert [s for s in torch.load(tmp_path / "saved0.pt") if s is not None] == [1, 2, 3, 4]
    assert torch.load(tmp_path / "saved1.pt") == []   # rank 0 writes


def _dead_loader_worker(rank, port, jsonl, cache, out, result_dir):
    """Rank 1's loader fails after its first batch (a worker killed for memory, say)."""
    import cma_train.train as train_module
    real_batches = train_module.batches

    def one_batch_then_dead(loader):
        yield next(iter(real_batches(loader)))
        raise ValueError("a data-loading worker died (killed by signal 9)")
    if rank == 1:
        train_module.batches = one_batch_then_dead
    _how_one_epoch_ends(rank, port, jsonl, cache, out, result_dir)


def test_a_rank_whose_loader_fails_stops_every_rank_at_the_next_step(video_set, tmp_path):
    """A rank that cannot get its next batch says so in the next step's first agreement: the
    others stop there instead of waiting for it in that step until the group's timeout."""
    jsonl, cache = video_set
    _spawn_ranks(_dead_loader_worker, jsonl, cache, tmp_path)
    assert torch.load(tmp_path / "said1.pt") == "ValueError: a data-loading worker died (killed by signal 9)"
    assert torch.load(tmp_path / "said0.pt") == ("FailedElsewhere: another process stopped before this step (its "
                                                 "own error says why)")


def _stopping_worker(rank, port, jsonl, cache, out, result_dir):
    """Rank 1 alone gets SIGTERM during step 2; both ranks must stop after that same step."""
    import cma_train.step as step_module
    _as_torchrun_rank(rank, port)
    calls = []

    def step(*args, **kwargs):
        calls.append(1)
        if rank == 1 and len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return train_step(*args, **kwargs)
    step_module.train_step = step
    try:
        train(tiny_config(jsonl, cache, out, batch_size=4, epochs=2, max_steps=4, lr=3e-3))
        stopped = None
    except TrainingStopped as e:
        stopped = (e.signum, e.step)
    torch.save(stopped, os.path.join(result_dir, f"stopped{rank}.pt"))
    dist.destroy_process_group()


def test_a_signal_to_one_rank_stops_every_rank_after_the_same_step(video_set, tmp_path):
    jsonl, cache = video_set
    _spawn_ranks(_stopping_worker, jsonl, cache, tmp_path)
    for rank in range(WORLD):
        assert torch.load(tmp_path / f"stopped{rank}.pt") == (signal.SIGTERM, 2), rank
    assert load_checkpoint(str(tmp_path / "ddp" / "checkpoint_latest.pt"))["step"] == 2
