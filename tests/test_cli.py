"""cma_train.cli: every subcommand on tiny data, and the errors a user meets."""
import gc
import json
import math
import os
import re
import subprocess
import sys

import open_clip
import pytest
import torch
from conftest import (TINY_TRAIN_CLIP, gpu_check, requires_cuda, requires_decord, write_frame_cache_set,
                      write_openai_style_clip)

from cma_train.cli import main
from cma_train.config import TrainConfig

TINY = ["--model-config", json.dumps(TINY_TRAIN_CLIP), "--pretrained", "none", "--max-words", "12",
        "--workers", "0", "--no-progress"]


def test_help_explains_every_flag(capsys):
    for command in ("train", "eval", "prepare", "demo"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        out = capsys.readouterr().out
        for line in out.splitlines():
            if line.strip().startswith("--") and "  " in line.strip():
                assert len(line.strip().split("  ", 1)[1].strip()) > 5, line
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for flag in ("--batch-size", "--pooling", "--resume", "--cache", "--config", "--shared-dim"):
        assert flag in out


def test_prepare_train_eval_round_trip(video_set, tmp_path, capsys):
    jsonl, _ = video_set
    cache = str(tmp_path / "cache")
    assert main(["prepare", "--dataset", "jsonl", "--root", jsonl, "--out", cache, "--size", "32",
                 "--workers", "1"]) == 0
    assert "8 videos ready, 0 skipped (12 frames of 32 px per video, sampled at 1 fps)" in capsys.readouterr().out
    out = str(tmp_path / "run")
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps({"dataset": "jsonl", "root": os.path.dirname(jsonl), "batch-size": 4, "lr": 1e-3,
                                  "epochs": 1}))
    assert main(["train", "--config", str(config), *TINY, "--cache", cache, "--out", out, "--max-steps", "2",
                 "--batch-size", "8", "--eval-split", "test", "--eval-every", "1",
                 "--reduction-dim", "4", "--shared-dim", "8"]) == 0
    logged = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["step"] for r in logged if "loss" in r] == [1]   # flag beat the file: 8 per batch
    assert [r["eval_split"] for r in logged if "t2v" in r] == ["test"]   # the evaluation after training
    res = json.load(open(os.path.join(out, "results_test.json")))
    assert res["num_videos"] == 8 and set(res["t2v"]) == {"R1", "R5", "R10", "MdR", "MnR"}
    out_text = capsys.readouterr().out
    assert "R@1" in out_text and "best t2v R@1" in out_text and os.path.isfile(os.path.join(out, "adapters_best.pt"))
    assert f"wrote {os.path.join(out, 'adapters.pt')} (for `cma eval --adapters`): 1 step(s) in this run" in out_text
    # eval reads the adapters' shape (r = 4, d_s = 8) from the file, and refuses a flag against it
    assert main(["eval", *TINY, "--dataset", "jsonl", "--root", jsonl, "--cache", cache,
                 "--adapters", os.path.join(out, "adapters.pt"), "--results", str(tmp_path / "r.json")]) == 0
    assert json.load(open(tmp_path / "r.json"))["t2v"] == res["t2v"]   # same adapters, same numbers
    capsys.readouterr()
    assert main(["eval", *TINY, "--dataset", "jsonl", "--root", jsonl, "--cache", cache, "--reduction-dim", "8",
                 "--adapters", os.path.join(out, "adapters.pt")]) == 2
    assert "adapters with reduction_dim=4; leave the flag out" in capsys.readouterr().err
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    torch.save(torch.ones(3), tmp_path / "tensor.pt")
    for junk, message in (("junk.pt", "cannot be read"), ("tensor.pt", "not a cma adapter file")):
        assert main(["eval", *TINY, "--dataset", "jsonl", "--root", jsonl, "--adapters", str(tmp_path / junk)]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    assert main(["eval", *TINY, "--dataset", "jsonl", "--root", jsonl, "--cache", cache,
                 "--adapters", os.path.join(out, "checkpoint_latest.pt"), "--results", str(tmp_path / "r2.json")]) == 0


def test_eval_takes_the_backbone_and_scoring_of_the_adapters_run(video_set, tmp_path, capsys):
    """A run on a custom backbone (--model-config), trained with meanP pooling over 8 frames of 10
    words: `cma eval --adapters` given none of those flags rebuilds that backbone and scores as the
    run did (the same numbers as its own final evaluation), from adapters.pt and from the
    checkpoint; a flag set on purpose wins, and a note says so."""
    jsonl, _ = video_set
    out, root = str(tmp_path / "run"), os.path.dirname(jsonl)
    assert TINY[:2] == ["--model-config", json.dumps(TINY_TRAIN_CLIP)] and TINY[4] == "--max-words"
    bare = TINY[2:4] + TINY[6:]   # TINY without its backbone and its --max-words 12
    run = ["--model-config", json.dumps(TINY_TRAIN_CLIP), "--pooling", "meanP", "--max-frames", "8",
           "--max-words", "10"]
    assert main(["train", *bare, *run, "--dataset", "jsonl", "--root", root, "--out", out, "--batch-size", "4",
                 "--max-steps", "2", "--lr", "1e-2", "--eval-split", "test"]) == 0
    trained = json.load(open(os.path.join(out, "results_test.json")))
    assert trained["scoring"] == {"pooling": "meanP", "temperature": 5.0, "max_words": 10, "max_frames": 8,
                                  "sample_fps": 1.0}
    assert trained["evaluated"] == {"dataset": "jsonl", "split": "test", "adapters": os.path.abspath(out) +
                                    "/adapters.pt", "model": "ViT-B-32", "model_config": TINY_TRAIN_CLIP,
                                    "pretrained": "none"}
    capsys.readouterr()
    for adapters in ("adapters.pt", "checkpoint_latest.pt"):
        results = str(tmp_path / f"{adapters}.json")
        assert main(["eval", *bare, "--dataset", "jsonl", "--root", root, "--adapters", os.path.join(out, adapters),
                     "--results", results]) == 0
        again = json.load(open(results))
        assert again["scoring"] == trained["scoring"] and again["t2v"] == trained["t2v"], adapters
        assert again["evaluated"] == {**trained["evaluated"], "adapters": os.path.abspath(os.path.join(out, adapters))}
        printed = capsys.readouterr()
        assert "note:" not in printed.err
        assert printed.out.startswith(f"evaluating adapters {os.path.join(out, adapters)} (r=8, d_s=16) on the "
                                      f"--model-config model (none): 8 captions, 8 videos of jsonl test; meanP "
                                      f"pooling (temperature 5), 8 frames at 1 fps, 10 words\n")
    assert main(["eval", *bare, "--dataset", "jsonl", "--root", root, "--adapters", os.path.join(out, "adapters.pt"),
                 "--pooling", "softmax", "--results", str(tmp_path / "softmax.json")]) == 0
    assert "note: evaluating with --pooling softmax (trained with meanP)" in capsys.readouterr().err
    assert json.load(open(tmp_path / "softmax.json"))["scoring"]["pooling"] == "softmax"


def test_eval_results_into_a_folder_and_a_bad_path_before_evaluating(video_set, tmp_path, monkeypatch, capsys):
    import cma_train.cli as cli
    jsonl, cache = video_set
    argv = ["eval", *TINY, "--dataset", "jsonl", "--root", jsonl, "--cache", cache]
    (tmp_path / "folder").mkdir()
    assert main(argv + ["--results", str(tmp_path / "folder")]) == 0
    assert json.load(open(tmp_path / "folder" / "results_test.json"))["num_videos"] == 8
    evaluated = []
    monkeypatch.setattr(cli, "_evaluate", lambda *args: evaluated.append(1))
    (tmp_path / "file").write_text("")
    capsys.readouterr()
    assert main(argv + ["--results", str(tmp_path / "file" / "r.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"cma eval: error: cannot write the results to {tmp_path / 'file' / 'r.json'}: cannot make "
                          f"the folder {tmp_path / 'file'}") and not evaluated


@requires_decord
def test_prepare_caches_several_splits_in_one_folder(tmp_path, monkeypatch, capsys):
    """`--split train,test`: one cache for training and evaluation, each video once. The size it
    will take is said first, and one that the disk cannot hold is refused in one line."""
    from conftest import fake_free_space, write_video

    from cma_model.cache import FrameCache
    root = tmp_path / "msrvtt"
    (root / "videos").mkdir(parents=True)
    for i in range(3):
        write_video(root / "videos" / f"video{i}.mp4", 12 + 4 * i)
    (root / "MSRVTT_data.json").write_text(json.dumps({
        "videos": [{"video_id": f"video{i}"} for i in range(3)],
        "sentences": [{"video_id": f"video{i}", "caption": f"clip {i}"} for i in (0, 1, 1, 2)]}))
    (root / "MSRVTT_train.9k.csv").write_text("video_id\nvideo0\nvideo1\n")
    (root / "MSRVTT_JSFUSION_test.csv").write_text("key,vid_key,video_id,sentence\n"
                                                   "ret0,x,video2,clip 2\nret1,x,video1,clip 1\n")
    cache = str(tmp_path / "cache")
    argv = ["prepare", "--dataset", "msrvtt", "--root", str(root), "--out", cache, "--size", "32", "--workers", "1"]
    assert main(argv + ["--split", "train, test"]) == 0   # spaces after the comma are fine
    out = capsys.readouterr().out
    assert f"prepare: 3 videos into {cache}, 0.0 GiB when done (12 frames of 32 px per video)" in out
    assert "3 videos ready, 0 skipped" in out   # video1 is in both splits: cached once
    frames = FrameCache(cache)
    assert all(frames.covers(f"video{i}") and f"video{i}" in frames for i in range(3))
    assert main(argv + ["--split", "train"]) == 2   # another set of videos: not into the same folder
    assert "holds a cache made with" in capsys.readouterr().err
    fake_free_space(monkeypatch, 1 << 40, 1 << 10)
    assert main([str(tmp_path / "full") if a == cache else a for a in argv] + ["--split", "train"]) == 2
    err = capsys.readouterr().err
    assert "the frame cache needs 0.0 GiB more (2 videos of 12 frames, 32 x 32 px), and 0.0 GiB are free" in err
    assert "Traceback" not in err and not (tmp_path / "full").exists()


def test_ctrl_c_in_train_checkpoints_and_says_how_to_resume(video_set, tmp_path, monkeypatch, capsys):
    import signal

    import cma_train.step as step_module
    jsonl, cache = video_set
    real_step, calls = step_module.train_step, []

    def step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(*args, **kwargs)
    monkeypatch.setattr(step_module, "train_step", step)
    out = str(tmp_path / "run")
    argv = ["train", *TINY, "--dataset", "jsonl", "--root", jsonl, "--cache", cache, "--out", out,
            "--batch-size", "2", "--epochs", "1", "--workers", "0"]
    assert main(argv) == 128 + signal.SIGINT
    err = capsys.readouterr().err
    assert "stopped by SIGINT after step 2" in err and "--resume" in err and "Traceback" not in err
    monkeypatch.undo()
    assert main(argv + ["--resume"]) == 0
    assert [json.loads(line)["step"] for line in open(os.path.join(out, "metrics.jsonl"))] == [1, 2, 3, 4]
    printed = capsys.readouterr().out   # without progress bars: what the run does, then a line per epoch
    assert ("(r=8, d_s=16) on 8 captions of 8 videos (jsonl train; 12 frames, 12 words): 4 steps per epoch, steps "
            "3-4 of 4, global batch 2") in printed
    losses = [json.loads(line)["loss"] for line in open(os.path.join(out, "metrics.jsonl"))][2:]
    assert f"epoch 1/1: step 4/4, mean loss {sum(losses) / 2:.4f}," in printed and "2 step(s) in this run" in printed
    assert main(argv + ["--resume"]) == 0   # a finished run: nothing to redo, nothing logged twice
    printed = capsys.readouterr().out
    assert "no step left to run" in printed and "no step was left to run" in printed and "epoch 1/1" not in printed
    assert [json.loads(line)["step"] for line in open(os.path.join(out, "metrics.jsonl"))] == [1, 2, 3, 4]


def test_resume_takes_the_runs_own_settings(video_set, tmp_path, capsys):
    """`cma train --out DIR --resume` alone continues a run made with non-default settings exactly:
    the same losses as the run made in one go. Flags still win, with a note; a flag that would
    change what defines the run is refused."""
    jsonl, cache = video_set
    run = [*TINY, "--dataset", "jsonl", "--root", jsonl, "--cache", cache, "--batch-size", "2", "--epochs", "1",
           "--lr", "1e-3", "--seed", "3", "--reduction-dim", "4", "--shared-dim", "8", "--pooling", "meanP"]
    whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
    assert main(["train", *run, "--out", whole]) == 0
    assert main(["train", *run, "--out", parts, "--max-steps", "2"]) == 0
    assert main(["train", "--out", parts, "--resume", "--workers", "0", "--no-progress"]) == 0
    assert "steps 3-4 of 4" in capsys.readouterr().out   # --max-steps belonged to the first invocation only

    def losses(out):
        return [json.loads(line)["loss"] for line in open(os.path.join(out, "metrics.jsonl"))]
    assert len(losses(whole)) == 4 and losses(parts) == losses(whole)
    assert main(["train", "--out", parts, "--resume", "--lr", "5e-4", "--workers", "0"]) == 0
    assert "note: resuming with --lr 0.0005 (the run had 0.001)" in capsys.readouterr().err
    assert main(["train", "--out", parts, "--resume", "--batch-size", "4", "--workers", "0"]) == 2
    assert "was made with batch_size=2, this run has batch_size=4; resume with the same setting" in \
        capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "nothing"), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "holds no training run to continue" in err and "node" not in err


@pytest.mark.parametrize("command, elsewhere", [("train", "OutOfMemoryElsewhere"), ("train", "FailedElsewhere"),
                                               ("eval", "FailedElsewhere")])
def test_a_process_that_could_go_on_leaves_the_message_to_the_one_that_failed(monkeypatch, capsys, command, elsewhere):
    """torchrun: where one rank ran out of memory in a step, or could not start, the others stop
    (exit 2) without a word: that rank says why."""
    import cma_train.distributed as distributed_module
    import cma_train.step as step_module
    import cma_train.train as train_module
    error = {"OutOfMemoryElsewhere": step_module.OutOfMemoryElsewhere,
             "FailedElsewhere": distributed_module.FailedElsewhere}[elsewhere]

    def fail(*_):
        raise error("rank 1 failed: ValueError: x")
    monkeypatch.setattr(train_module, "train", fail)   # cma train
    monkeypatch.setattr(TrainConfig, "validate", fail)   # cma eval's set-up
    assert main([command, *TINY, "--dataset", "jsonl", "--root", "x.jsonl"]) == 2
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("rank", ["0", "1"])
@pytest.mark.parametrize("error, message", [
    ("FloatingPointError", "loss became nan at step 3; lower --lr"),
    ("NoReadableVideos", "no video could be read in 5 batches in a row (steps 1-5)")])
def test_a_stop_of_every_rank_is_said_once_under_torchrun(monkeypatch, capsys, rank, error, message):
    """A non-finite loss (every rank computes the global batch's) or global batches without a
    readable video stop every rank at the same step: rank 0 says it."""
    import builtins

    import cma_train.train as train_module

    def stop(cfg):
        raise (getattr(train_module, error, None) or getattr(builtins, error))(message)
    monkeypatch.setattr(train_module, "train", stop)
    monkeypatch.setenv("RANK", rank)
    assert main(["train", *TINY, "--dataset", "jsonl", "--root", "x.jsonl"]) == 2
    said = capsys.readouterr().err
    assert said == (f"cma train: error: {message}\n" if rank == "0" else ""), said


@pytest.mark.parametrize("outcome, leaves", [("finished", True), ("stopped by a signal", True),
                                             ("failed on this rank", False)])
def test_a_rank_leaves_the_process_group_only_where_every_rank_stops_with_it(monkeypatch, outcome, leaves):
    """Under torchrun a rank destroys its process group after a command that finished or that a
    signal stopped (every rank after the same step), not after an error of its own: NCCL's destroy
    can block for good while the other ranks wait for this one in a collective."""
    import signal

    import cma_train.cli as cli
    from cma_train.signals import TrainingStopped
    left = []
    monkeypatch.setattr(cli, "_close_process_group", lambda: left.append(1))

    def run(args):
        if outcome == "stopped by a signal":
            raise TrainingStopped(signal.SIGTERM, 3, "checkpoint_latest.pt")
        if outcome == "failed on this rank":
            raise ValueError("no batch from the data-loading workers in 600 s")
        return 0
    monkeypatch.setattr(cli, "cmd_eval", run)
    code = main(["eval", *TINY, "--dataset", "jsonl", "--root", "x.jsonl"])
    assert code == {"finished": 0, "stopped by a signal": 128 + signal.SIGTERM, "failed on this rank": 2}[outcome]
    assert left == ([1] if leaves else [])


def test_out_of_gpu_memory_in_eval_is_one_line(video_set, tmp_path, monkeypatch, capsys):
    """What evaluate() cannot fit even in smaller passes ends `cma eval` with one line."""
    import cma_train.cli as cli
    jsonl, cache = video_set

    def oom(*args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.\nmore detail")
    monkeypatch.setattr(cli, "_evaluate", oom)
    assert main(["eval", *TINY, "--dataset", "jsonl", "--root", jsonl, "--cache", cache,
                 "--results", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    assert "out of GPU memory while evaluating (CUDA out of memory. Tried to allocate 2.00 GiB.)" in err
    assert "--max-frames" in err and "Traceback" not in err


def test_eval_without_adapters_is_the_backbone_alone(video_set, tmp_path, monkeypatch):
    """`cma eval` without --adapters scores plain open_clip (zero-shot): the model it evaluates
    embeds images and captions as the adapter-free backbone does (fp32, 1e-5), and its metrics
    are evaluate()'s on that backbone."""
    import open_clip

    import cma_train.cli as cli
    from cma_model.cache import FrameCache
    from cma_model.data import VideoFrames
    from cma_model.datasets import load_annotations
    from cma_train.evaluate import evaluate
    jsonl, cache = video_set
    evaluated, real_evaluate = [], cli._evaluate
    monkeypatch.setattr(cli, "_evaluate", lambda model, *a: evaluated.append(model) or real_evaluate(model, *a))
    results = tmp_path / "zero_shot.json"
    assert main(["eval", *TINY, "--dataset", "jsonl", "--root", jsonl, "--cache", cache, "--pooling", "softmax",
                 "--results", str(results)]) == 0
    torch.manual_seed(42)   # cma eval's default seed builds the random backbone
    plain = open_clip.model.CLIP(**TINY_TRAIN_CLIP)
    g = torch.Generator().manual_seed(0)
    images, texts = torch.randn(3, 3, 32, 32, generator=g), torch.randint(1, 49000, (3, 16), generator=g)
    with torch.no_grad():
        torch.testing.assert_close(evaluated[0].encode_image(images), plain.encode_image(images), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(evaluated[0].encode_text(texts), plain.encode_text(texts), rtol=1e-5, atol=1e-5)
    want = evaluate(plain, open_clip.get_tokenizer("ViT-B-32"), load_annotations("jsonl", jsonl),
                    VideoFrames(FrameCache(cache), 12, 32, raw=True), "softmax", max_words=12, workers=0,
                    progress=False)
    got = json.load(open(results))
    assert got["t2v"] == pytest.approx(want["t2v"]) and got["v2t"] == pytest.approx(want["v2t"])
    assert got["evaluated"]["adapters"] is None and got["evaluated"]["split"] == "test"   # the backbone alone


def test_out_of_gpu_memory_in_train_says_what_to_turn_down(monkeypatch, capsys):
    import cma_train.train as train_module

    def oom(cfg):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.\nmore detail")
    monkeypatch.setattr(train_module, "train", oom)
    assert main(["train", *TINY, "--dataset", "jsonl", "--root", "x.jsonl"]) == 2
    err = capsys.readouterr().err
    assert "out of GPU memory (CUDA out of memory. Tried to allocate 2.00 GiB.)" in err
    assert "--micro-batch N" in err and "Traceback" not in err


@pytest.mark.parametrize("command", ["train", "eval"])
def test_nccl_without_the_shared_memory_it_needs_is_one_line_saying_what_to_do(command, monkeypatch, capsys):
    """torchrun in a container with docker's 64 MiB /dev/shm: NCCL's first collective fails with
    DistBackendError (the text NCCL 2.21 gives); `cma` says what to change, exit 2, no traceback.
    Any other NCCL error keeps its traceback."""
    import cma_model.datasets
    import cma_train.train as train_module
    failure = [("NCCL error in: NCCLUtils.hpp:268, unhandled system error (run with NCCL_DEBUG=INFO for details), "
                "NCCL version 2.21.5\nncclSystemError: System call (e.g. socket, malloc) or external library call "
                "failed or device error.\nLast error:\nError while creating shared memory segment /dev/shm/nccl-1YsMbG "
                "(size 7340384)")]

    def first_collective(*args, **kwargs):
        raise torch.distributed.DistBackendError(failure[0])
    monkeypatch.setattr(train_module, "train", first_collective)   # what each command runs first
    monkeypatch.setattr(cma_model.datasets, "load_annotations", first_collective)
    argv = [command, *TINY, "--dataset", "jsonl", "--root", "x.jsonl"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"cma {command}: error: NCCL could not create its shared memory in /dev/shm" in err, err
    assert "docker run --shm-size 8g" in err and "NCCL_SHM_DISABLE=1" in err and "Traceback" not in err
    failure[0] = "NCCL error in: ProcessGroupNCCL.cpp:1970, unhandled cuda error, NCCL version 2.21.5"
    with pytest.raises(torch.distributed.DistBackendError):
        main(argv)


def test_a_loader_worker_that_dies_is_one_line_wherever_it_is_noticed(tmp_path, monkeypatch, capsys):
    """The worker loading one of the videos dies (a decoder's segmentation fault). PyTorch raises
    that in the main process wherever it is, waiting for a batch or mid-step, or, where the worker
    died before the main process fetched a batch's shared memory from it, the connection is reset
    (all three happen, at random): each way `cma train` ends with one line saying what to do, exit 2."""
    import signal

    from cma_model.data import CaptionVideoDataset
    jsonl, cache = write_frame_cache_set(tmp_path / "data")
    read = CaptionVideoDataset.__getitem__

    def getitem(self, i):
        if i == 5 and torch.utils.data.get_worker_info() is not None:
            os.kill(os.getpid(), signal.SIGSEGV)
        return read(self, i)
    monkeypatch.setattr(CaptionVideoDataset, "__getitem__", getitem)
    args = ["train", *TINY, "--dataset", "jsonl", "--root", os.path.dirname(jsonl), "--cache", cache,
            "--batch-size", "2", "--epochs", "1", "--workers", "1", "--out", str(tmp_path / "run")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert re.search(r"cma train: error: a data-loading worker died \((DataLoader worker \(pid|\[Errno 104\])",
                     err), err[-2000:]
    assert "`cma prepare` caches the frames" in err and "Traceback" not in err


def test_train_goes_on_when_the_reader_of_its_output_goes_away(tmp_path):
    """`cma train | tee log`, and tee stopped before the first epoch line: the run still trains
    every step, writes its adapters and exits 0, saying once on stderr that its output is discarded
    (without it, the epoch line's BrokenPipeError ended the run)."""
    jsonl, cache = write_frame_cache_set(tmp_path / "data")
    out = tmp_path / "run"
    run = subprocess.Popen([sys.executable, "-m", "cma_train.cli", "train", *TINY, "--dataset", "jsonl", "--root",
                            os.path.dirname(jsonl), "--cache", cache, "--batch-size", "2", "--epochs", "2",
                            "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run.stdout.close()   # the reader is gone before cma writes a line
    err = run.stderr.read()
    assert run.wait(timeout=300) == 0, err[-3000:]
    assert err.count("the reader of cma's standard output went away") == 1, err
    assert "Traceback" not in err and "Exception ignored" not in err, err
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == list(range(1, 9))
    assert (out / "adapters.pt").is_file()


HANG_ON_CLIP3 = """
import time
import cma_model.data
cma_model.data.LOADER_TIMEOUT_S = 3   # before cma_train imports it
decode = cma_model.data.sample_frames
def sample_frames(path, *args):
    if path.endswith("clip3.mp4"):
        time.sleep(3600)   # a decoder stuck in C code: nothing in the process interrupts it
    return decode(path, *args)
cma_model.data.sample_frames = sample_frames
"""


@pytest.mark.parametrize("command", [["train", "--batch-size", "4", "--epochs", "1", "--out", "run"],
                                     ["eval", "--results", "results.json"]])
def test_a_decoder_that_hangs_without_loader_workers_ends_the_run_saying_so(video_set, tmp_path, command):
    """--workers 0 reads videos in the process itself, where no loader timeout watches: a decoder
    that hangs (here on clip3.mp4, the loader's timeout cut to 3 s) ends `cma train` or `cma eval`
    with exit 2 and a line naming the file and saying what to do, not a hang."""
    import time
    jsonl, _ = video_set   # decoded from the files: no --cache
    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "sitecustomize.py").write_text(HANG_ON_CLIP3)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "hook"), os.environ.get("PYTHONPATH", "")])}
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "cma_train.cli", *command, *TINY, "--dataset", "jsonl", "--root",
                           os.path.dirname(jsonl), "--max-frames", "2", "--workers", "0"],
                          capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    assert time.monotonic() - start < 120
    assert "clip3.mp4: no frames after 3 s, its video decoder hangs. `cma prepare` caches the frames" in done.stderr


def test_torchrun_train_then_eval_on_two_processes(video_set, tmp_path):
    """`torchrun --nproc_per_node 2 -m cma_train.cli train/eval` (gloo on the CPU) as a user runs
    it: both exit 0, rank 0 alone writes the results, and `cma eval` spread over the two ranks
    scores the trained adapters as one process does."""
    jsonl, cache = video_set
    out = str(tmp_path / "run")
    data = ["--dataset", "jsonl", "--root", os.path.dirname(jsonl), "--cache", cache]   # train.jsonl, test.jsonl
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "cma_train.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for argv in (["train", *TINY, *data, "--out", out, "--batch-size", "4", "--epochs", "1", "--lr", "1e-3",
                  "--eval-split", "test"],
                 ["eval", *TINY, *data, "--adapters", os.path.join(out, "adapters.pt"),
                  "--results", str(tmp_path / "two.json")]):
        done = subprocess.run(torchrun + argv, capture_output=True, text=True, env=env, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.count(" t2v ") == 1, done.stdout   # one table: rank 0's
    trained = json.load(open(os.path.join(out, "results_test.json")))
    assert main(["eval", *TINY, *data, "--adapters", os.path.join(out, "adapters.pt"),
                 "--results", str(tmp_path / "one.json")]) == 0
    one, two = json.load(open(tmp_path / "one.json")), json.load(open(tmp_path / "two.json"))
    for direction in ("t2v", "v2t"):
        assert two[direction] == pytest.approx(one[direction]) and trained[direction] == pytest.approx(one[direction])


@requires_decord
def test_bench_runs_on_cpu(tmp_path, capsys):
    assert main(["bench", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "need CUDA" in out and "eager_fwd_ms" in out
    assert main(["bench", "--e2e", "--out", str(tmp_path)]) == 0
    assert "needs CUDA" in capsys.readouterr().out
    if not torch.cuda.is_available():
        assert main(["bench", "--quick-gelu", "--out", str(tmp_path)]) == 0
        assert "needs CUDA" in capsys.readouterr().out
        assert main(["bench", "--quick-gelu", "--smoke", "--out", str(tmp_path)]) == 0   # the fused path, interpreted
        rows = json.loads(next(tmp_path.glob("quick_gelu_smoke_*.json")).read_text())["rows"]
        assert all(rows[0][f"{v}_fwdbwd_ms"] > 0 for v in ("fused", "eager", "compile"))
    assert main(["bench", "--preprocess", "--quick", "--threads", "1", "--out", str(tmp_path)]) == 0
    assert "torchvision_v2_ms" in capsys.readouterr().out
    assert sorted(p.suffix for p in tmp_path.glob("preprocess_*")) == [".csv", ".csv", ".json", ".json", ".png"]
    png = next(tmp_path.glob("preprocess_*.png"))
    png.unlink()
    assert main(["bench", "--preprocess", "--replot", str(png.with_suffix(""))]) == 0   # from the JSON files
    assert png.stat().st_size > 0


def test_host_bench_runs_on_cpu_and_puts_the_kernels_back(tmp_path, capsys):
    """`cma bench --host`: on the CPU the kernel launches are stand-ins while it times, and the
    real kernels are in place again afterwards; each case's time is in the results file."""
    import cma_kernels.adapter_op as adapter_op
    kernels = adapter_op._adapter_fwd_kernel, adapter_op._adapter_bwd_kernel
    assert main(["bench", "--host", "--calls", "20", "--out", str(tmp_path)]) == 0
    assert "not launched" in capsys.readouterr().out
    assert (adapter_op._adapter_fwd_kernel, adapter_op._adapter_bwd_kernel) == kernels
    rows = json.loads(next(tmp_path.glob("host_*.json")).read_text())["rows"]
    assert next(tmp_path.glob("host_*.png")).stat().st_size > 0
    assert [r["case"] for r in rows] == ["fused_fwd", "fused_fwdbwd", "autograd_floor"]
    assert all(r["us_per_call"] > 0 for r in rows)
    with pytest.raises(SystemExit):
        main(["bench", "--host", "--calls", "0"])
    assert "--calls must be >= 1" in capsys.readouterr().err


def test_gpu_busy_time_is_the_union_of_kernel_intervals():
    from cma_benchmarks.bench_train_step import union_ms
    # overlapping, nested, touching and disjoint intervals (microseconds), unsorted
    assert union_ms([(50, 60), (0, 10), (5, 20), (6, 8), (20, 25), (100, 100.5)]) == pytest.approx(0.0355)
    assert union_ms([]) == 0.0


def test_step_peak_is_the_highest_rise_of_allocated_memory_on_the_cpu():
    """The profiler's memory events, summed in time order: 4 MB, then 8 MB more (12 MB live, the
    peak), the 4 MB freed, 2 MB more; the bytes a step holds count each storage once."""
    from cma_benchmarks.bench_train_step import held_bytes, step_peak_bytes

    def step():
        first = torch.empty(1_000_000)
        second = torch.empty(2_000_000)
        del first
        third = torch.empty(500_000)
        return second, third
    assert 12_000_000 <= step_peak_bytes(step, torch.device("cpu")) <= 12_000_000 + 64
    model = torch.nn.Linear(10, 10)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(3, 10)).sum().backward()
    optimizer.step()
    batch = torch.randn(7, 10)
    # weight and bias, their two AdamW moments, AdamW's fp32 step count for each; the batch and a view of it once
    assert held_bytes(model, optimizer, batch, batch[2:]) == 3 * 110 * 4 + 2 * 4 + 70 * 4


def test_e2e_memory_only_measures_what_each_variant_keeps(tmp_path, capsys):
    """`--memory-only` on the smoke model (quick_gelu, bf16 autocast on the CPU): the lean frozen
    block keeps less than open_clip's block with the same adapters, the attention adapter's input
    recomputed (the default) less than kept, and recompute of the MLP less again."""
    assert main(["bench", "--e2e", "--smoke", "--memory-only", "--out", str(tmp_path)]) == 0
    rows = json.loads(next(tmp_path.glob("train_memory_smoke_*.json")).read_text())["rows"]
    kept = {r["variant"]: r["saved_GiB"] for r in rows}
    assert list(kept) == ["full", "floor", "floor_lean", "ref_adapters", "fused_adapters", "fused_keep_attn_out",
                          "fused_recompute"]
    assert kept["full"] > kept["ref_adapters"] > kept["fused_keep_attn_out"] > kept["fused_adapters"] > kept[
        "fused_recompute"] > 0
    assert kept["floor"] > kept["floor_lean"]
    peak = {r["variant"]: r["peak_est_GiB"] for r in rows}   # what the step holds, and more: activations, gradients
    assert all(peak[v] > kept[v] for v in kept) and peak["full"] > peak["fused_adapters"] > peak["fused_recompute"]
    assert "saved_vs_full" in capsys.readouterr().out


@pytest.mark.parametrize("extra", [[], ["--variants", "full", "--compile", "default", "--no-curves", "--words", "8"]])
def test_e2e_bench_smoke_runs_every_code_path_on_cpu(tmp_path, capsys, extra):
    """`--smoke`: the GPU benchmark's whole script on a tiny model, so a GPU run never meets a
    broken script (the compiled variant takes about a minute of inductor on 2 cores)."""
    import csv
    assert main(["bench", "--e2e", "--smoke", "--out", str(tmp_path)] + extra) == 0
    out = capsys.readouterr().out
    stem = next(tmp_path.glob("train_step*_smoke_*.json")).with_suffix("")
    results = json.loads(stem.with_suffix(".json").read_text())
    rows, variants = results["rows"], [r["variant"] for r in results["rows"]]
    assert results["complete"] and results["batch_to_device_ms"]["uint8_pinned_normalised"] > 0
    assert results["autocast"] == "bf16"   # --precision auto on the CPU: as on the GPUs that have bf16
    assert results["words"] == (8 if extra else 16)   # the smoke model's context is 16
    assert variants == (["full", "fused_compile-default"] if extra else
                        ["full", "floor", "floor_lean", "ref_adapters", "fused_adapters", "fused_keep_attn_out",
                         "fused_graphs", "fused_recompute", "fused_recompute_graphs", "floor_lean_graphs"])
    assert all(r["step_ms"] > 0 for r in rows) and rows[0]["step_vs_full"] == 1.0
    assert all(r["saved_GiB"] > 0 for r in rows if "compile" not in r["variant"] and "graphs" not in r["variant"])
    fused = [r for r in rows if r["variant"].startswith("fused")]
    assert all(("encode_vs_plain" in r) != r["variant"].endswith("_graphs") for r in fused)   # graphs encode eager
    assert ("loss curves" in out) != bool(extra)
    top_ops = results["top_ops"]   # the default path's ops with their input shapes (on the CPU: their CPU time)
    assert list(top_ops) == ([] if extra else ["smoke/fused_adapters"])
    assert all(o["ms"] > 0 and o["calls"] > 0 for ops in top_ops.values() for o in ops)
    fused_ops = top_ops.get("smoke/fused_adapters", [])
    assert extra or any(o["op"].startswith("aten::") and o["shapes"].startswith("[[") for o in fused_ops)
    if not extra:   # on the CPU the graphed towers run eager: the fused curve again
        assert len(results["loss_curves"]["fused_graphs"]) == 3 and results["loss_curves"]["graphs_max_rel_diff"] < 1e-6
    with open(stem.with_suffix(".csv")) as f:
        assert [r["variant"] for r in csv.DictReader(f)] == variants
    assert stem.with_suffix(".png").exists()


def test_e2e_bench_measures_the_other_variants_when_graphs_fail(tmp_path, monkeypatch, capsys):
    """A *_graphs variant whose recording fails (here the error CUDA gives for a call a capture
    forbids) is said and kept in the results under "failed"; every other variant and the other
    loss curves are measured, and the run completes."""
    from cma_benchmarks import bench_train_step

    def fail(model, forward, setup):
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
    monkeypatch.setattr(bench_train_step, "record_graphs", fail)
    assert main(["bench", "--e2e", "--smoke", "--variants", "full", "fused_adapters", "fused_graphs",
                 "fused_recompute_graphs", "--out", str(tmp_path)]) == 0
    results = json.loads(next(tmp_path.glob("train_step_smoke_*.json")).read_text())
    assert results["complete"] and [r["variant"] for r in results["rows"]] == ["full", "fused_adapters"]
    assert sorted(results["failed"]) == ["smoke/fused_graphs", "smoke/fused_recompute_graphs"]
    assert all("operation not permitted" in e for e in results["failed"].values())
    curves = results["loss_curves"]
    assert "fused_graphs" not in curves and "operation not permitted" in curves["fused_graphs_error"]
    assert 0 <= curves["max_rel_diff"] < 1e-2
    out = capsys.readouterr().out
    assert "smoke fused_graphs: FAILED, RuntimeError: CUDA error" in out and "vs without: FAILED" in out


def test_e2e_bench_in_fp16_scales_the_loss_and_keeps_its_results_apart(tmp_path, monkeypatch):
    """--precision fp16 (what auto picks on a GPU without bf16): every step scales its loss, as `cma
    train` does; the results go to their own file (targets.py reads the bf16 runs); the reference
    and fused loss curves agree within fp16 noise (here both on the PyTorch path on the CPU)."""
    scaled, scale = [], torch.amp.GradScaler.scale
    monkeypatch.setattr(torch.amp.GradScaler, "scale",
                        lambda self, loss: scaled.append(self.is_enabled()) or scale(self, loss))
    assert main(["bench", "--e2e", "--smoke", "--precision", "fp16", "--variants", "full", "fused_adapters",
                 "--out", str(tmp_path)]) == 0
    results = json.loads(next(tmp_path.glob("train_step_smoke_fp16_*.json")).read_text())
    assert results["autocast"] == "fp16" and results["complete"]
    assert len(scaled) > 10 and all(scaled)
    curves = results["loss_curves"]
    assert all(math.isfinite(loss) for loss in curves["reference"] + curves["fused"])
    assert 0 < curves["max_rel_diff"] < 1e-2


@pytest.mark.parametrize("argv", [["bench", "--dtypes", "fp16", "bf16"], ["bench", "--e2e", "--precision", "bf16"]])
def test_benchmarks_refuse_bf16_on_a_gpu_without_it(argv, monkeypatch, capsys):
    """A T4 (compute capability 7.5) as the benchmarks see it: bf16 asked for is refused before
    anything runs, naming the GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    with pytest.raises(SystemExit):
        main(argv)
    err = capsys.readouterr().err
    assert "bf16: the Tesla T4" in err and "fp16" in err.rsplit("bf16", 1)[1]


def test_adapter_bench_smoke_times_the_dtypes_asked_for(tmp_path, capsys):
    """--dtypes fp16 fp32 on the kernels in the interpreter; bf16 there is refused (the interpreter's
    bf16 tl.dot is wrong)."""
    if torch.cuda.is_available():
        pytest.skip("the smoke runs are for machines without a GPU")
    assert main(["bench", "--smoke", "--dtypes", "fp16", "fp32", "--out", str(tmp_path)]) == 0
    rows = json.loads(next(tmp_path.glob("adapter_smoke_*.json")).read_text())["rows"]
    assert [r["dtype"] for r in rows] == ["float16", "float32"] and rows[0]["fused_fwdbwd_ms"] > 0
    with pytest.raises(SystemExit):
        main(["bench", "--smoke", "--dtypes", "bf16"])
    assert "interpreter computes bf16 tl.dot wrongly" in capsys.readouterr().err


def test_adapter_bench_runs_fp32_at_the_matmul_precision_asked_for(tmp_path, monkeypatch):
    """--matmul-precision high: the run (fused launches included) sees it, its results file says so
    and is named apart, and the process's precision is as before afterwards."""
    if torch.cuda.is_available():
        pytest.skip("the smoke runs are for machines without a GPU")
    import cma_kernels.adapter_op as adapter_op
    seen = []
    dot_precision = adapter_op._dot_precision
    monkeypatch.setattr(adapter_op, "_dot_precision", lambda *args: seen.append(dot_precision(*args)) or seen[-1])
    before = torch.get_float32_matmul_precision()
    assert main(["bench", "--smoke", "--dtypes", "fp32", "--matmul-precision", "high", "--out", str(tmp_path)]) == 0
    assert torch.get_float32_matmul_precision() == before
    data = json.loads(next(tmp_path.glob("adapter_fp32-high_smoke_*.json")).read_text())
    assert data["fp32_matmul_precision"] == "high" and set(seen) == {"tf32x3"}


def test_adapter_bench_runs_fp32_through_the_tl_dot_kernels_when_asked(tmp_path, monkeypatch):
    """--fp32-kernels tl-dot: every launch of the run sees FMA_MAX_RANK = 0 (on a GPU, fp32 then
    takes the tl.dot kernels), its results file says so and is named apart, and FMA_MAX_RANK is
    as before afterwards."""
    if torch.cuda.is_available():
        pytest.skip("the smoke runs are for machines without a GPU")
    import cma_kernels.adapter_op as adapter_op
    seen, launch_configs = [], adapter_op.launch_configs
    monkeypatch.setattr(adapter_op, "launch_configs",
                        lambda *args: seen.append(adapter_op.FMA_MAX_RANK) or launch_configs(*args))
    before = adapter_op.FMA_MAX_RANK
    assert main(["bench", "--smoke", "--dtypes", "fp32", "--fp32-kernels", "tl-dot", "--out", str(tmp_path)]) == 0
    assert adapter_op.FMA_MAX_RANK == before > 0 and seen and set(seen) == {0}
    data = json.loads(next(tmp_path.glob("adapter_fp32-tl-dot_smoke_*.json")).read_text())
    assert data["fp32_kernels"] == "tl-dot"


def test_e2e_bench_compiles_each_fused_variant_it_runs(monkeypatch):
    """--compile MODE adds fused_compile-MODE, and its --recompute-mlp twin only where the run has
    fused_recompute; a variant's name sets recompute and the mode, hyphens in the mode included."""
    from cma_benchmarks import bench_train_step
    from cma_benchmarks.bench_train_step import compiled_variants, make_variant
    from cma_model.adapter import AdaptedResidualAttentionBlock
    modes = []
    monkeypatch.setattr(bench_train_step, "compile_towers", lambda model, mode: modes.append(mode))
    base = open_clip.model.CLIP(**TINY_TRAIN_CLIP)
    for name, recompute in [("fused_recompute_compile-max-autotune-no-cudagraphs", True),
                            ("fused_compile-reduce-overhead", False)]:
        model, _, _ = make_variant(base, name)
        assert {b.recompute_mlp for b in model.modules() if isinstance(b, AdaptedResidualAttentionBlock)} == {recompute}
    assert modes == ["max-autotune-no-cudagraphs", "reduce-overhead"]
    assert compiled_variants(["full", "fused_adapters"], ["reduce-overhead"]) == ["fused_compile-reduce-overhead"]
    assert compiled_variants(["full", "fused_recompute"], ["reduce-overhead", "default"]) == [
        "fused_compile-reduce-overhead", "fused_recompute_compile-reduce-overhead",
        "fused_compile-default", "fused_recompute_compile-default"]
    assert compiled_variants(["full"], []) == []


@pytest.mark.parametrize("bad,message", [(["--r", "0"], "--r must be in [1, 64]"), (["--r", "65"], "--r must be in"),
                                         (["--ds", "-1"], "--ds must be in [0, 512]"), (["--ds", "513"], "--ds must")])
def test_adapter_bench_rejects_bad_shapes(bad, message, capsys):
    with pytest.raises(SystemExit):
        main(["bench"] + bad)
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("bad,message", [(["--words", "78"], "--words must be in [2, 77]"),
                                         (["--steps", "0"], "--steps must be >= 1"),
                                         (["--videos", "0"], "--videos and --steps must be >= 1"),
                                         (["--archs", "ViT-B-32", "ViT-B/16"], "--archs ViT-B/16: not an open_clip")])
def test_e2e_bench_rejects_bad_options(bad, message, capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--e2e"] + bad)
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("bad", [["--N", "0"], ["--D", "8"]])
def test_tuner_rejects_bad_shapes(bad, capsys):
    from cma_benchmarks import tune_adapter
    with pytest.raises(SystemExit):
        tune_adapter.main(bad)
    assert "--N must be >= 1 and --D >= 16" in capsys.readouterr().err


def test_e2e_bench_keeps_what_it_measured_when_cut_short(tmp_path, monkeypatch):
    """A time limit that stops the script after the timed variants (here: in the loss curves)
    leaves every measured row on disk, marked incomplete."""
    from cma_benchmarks import bench_train_step

    def stop(*args):
        raise KeyboardInterrupt("time limit")
    monkeypatch.setattr(bench_train_step, "loss_curves", stop)
    assert main(["bench", "--e2e", "--smoke", "--variants", "full", "fused_adapters", "--out", str(tmp_path)]) == 130
    results = json.loads(next(tmp_path.glob("train_step_smoke_*.json")).read_text())
    assert not results["complete"] and [r["variant"] for r in results["rows"]] == ["full", "fused_adapters"]
    assert results["rows"][1]["step_vs_full"] > 0


def test_e2e_bench_times_each_variant_with_no_earlier_one_alive(tmp_path, monkeypatch):
    """Peak memory is per variant: when a variant's steps are timed, no earlier variant's model and
    no loss of an earlier forward (with the activations its graph keeps) are still alive. On an H200
    the loss kept from the activation count inflated the next variants' peaks (27 GiB for fused
    adapters on ViT-B/32, against 9.5 for full fine-tuning)."""
    import weakref

    from cma_benchmarks import bench_train_step
    models, losses, alive_at_timing = [], [], []
    make_variant, saved_bytes, time_steps = (bench_train_step.make_variant, bench_train_step.saved_activation_bytes,
                                             bench_train_step.time_steps)

    def recorded_variant(*args, **kwargs):
        made = make_variant(*args, **kwargs)
        models.append(weakref.ref(made[0]))
        return made

    def recorded_saved_bytes(fn, params=()):
        out, nbytes = saved_bytes(fn, params)
        losses.append(weakref.ref(out))
        return out, nbytes

    def checked_time_steps(*args, **kwargs):
        gc.collect()
        alive_at_timing.append((sum(m() is not None for m in models[:-1]), sum(x() is not None for x in losses)))
        return time_steps(*args, **kwargs)
    monkeypatch.setattr(bench_train_step, "make_variant", recorded_variant)
    monkeypatch.setattr(bench_train_step, "saved_activation_bytes", recorded_saved_bytes)
    monkeypatch.setattr(bench_train_step, "time_steps", checked_time_steps)
    assert main(["bench", "--e2e", "--smoke", "--variants", "full", "floor", "fused_adapters", "--no-curves",
                 "--out", str(tmp_path)]) == 0
    assert len(losses) == 3 and len(alive_at_timing) >= 3 and set(alive_at_timing) == {(0, 0)}


def test_adapter_bench_and_tuner_smoke_run_the_gpu_code_path_on_cpu(tmp_path, capsys, monkeypatch):
    """--smoke: the kernels in Triton's interpreter (conftest sets TRITON_INTERPRET=1 without a GPU);
    the tuner's kernels launch with the configurations it sweeps, not the interpreter's own."""
    import cma_kernels.adapter_op as adapter_op
    from cma_benchmarks import tune_adapter
    if torch.cuda.is_available():
        pytest.skip("the smoke runs are for machines without a GPU")
    assert main(["bench", "--smoke", "--out", str(tmp_path)]) == 0
    rows = json.loads(next(tmp_path.glob("adapter_smoke_*.json")).read_text())["rows"]
    assert all(rows[0][f"{v}_{k}_ms"] > 0 for v in ("fused", "eager", "compile") for k in ("fwd", "fwdbwd"))
    launched, launch_configs = [], adapter_op.launch_configs   # copies: the tuner edits the dicts in place

    def recorded_launch_configs(*args):
        configs = launch_configs(*args)
        launched.append(tuple(dict(config) for config in configs))
        return configs

    monkeypatch.setattr(adapter_op, "launch_configs", recorded_launch_configs)
    out = tune_adapter.main(["--smoke", "--out", str(tmp_path)])
    assert sorted({r["kind"] for r in out}) == ["bwd", "fwd"] and len(out) == 4
    backward_tiles = {(bwd["BLOCK_N"], bwd["BLOCK_D"]) for _, bwd in launched}
    assert backward_tiles == {(r["BLOCK_N"], r["BLOCK_D"]) for r in out if r["kind"] == "bwd"}, backward_tiles
    monkeypatch.undo()
    assert out[0]["ms"] > 0 and next(tmp_path.glob("tune_smoke_*.json")).exists()
    assert tune_adapter.main(["--smoke", "--budget-s", "0", "--out", str(tmp_path)]) == []
    assert "time is up" in capsys.readouterr().out


def test_tuner_sweeps_the_fp32_kernels_in_their_own_space(tmp_path, monkeypatch):
    """--dtype fp32 where fp32 takes the FMA kernels: the sweep starts at their configuration, takes
    the rest from FMA_FWD_SPACE / FMA_BWD_SPACE, launches the FMA kernels with it (in the
    interpreter here, the GPU's tiles handed in) and writes tune_fp32_*."""
    import cma_kernels.adapter_op as adapter_op
    from cma_benchmarks import tune_adapter
    if torch.cuda.is_available():
        pytest.skip("the smoke runs are for machines without a GPU")
    configs = tuple(dict(c) for c in adapter_op.FP32_FMA_CONFIGS[True])   # the tuner edits them in place
    launched = []

    def fma_configs(dtype, r, device):
        launched.append(dict(configs[1]))
        return configs
    monkeypatch.setattr(adapter_op, "launch_configs", fma_configs)
    out = tune_adapter.main(["--smoke", "--dtype", "fp32", "--out", str(tmp_path)])
    fwd = [r for r in out if r["kind"] == "fwd"]
    bwd = [r for r in out if r["kind"] == "bwd"]
    assert len(fwd) == len(bwd) == 2 and next(tmp_path.glob("tune_fp32_smoke_*.json")).exists()
    for rows, space, current in ((fwd, tune_adapter.FMA_FWD_SPACE, configs[0]),
                                 (bwd, tune_adapter.FMA_BWD_SPACE, configs[1])):
        assert {tuple(current[k] for k in space)} < {tuple(r[k] for k in space) for r in rows}
        assert all(r[k] in space[k] for r in rows for k in space)
    assert {(c["BLOCK_N"], c["BLOCK_D"]) for c in launched[1:]} == {(r["BLOCK_N"], r["BLOCK_D"]) for r in bwd}
    assert configs == adapter_op.FP32_FMA_CONFIGS[True]   # put back after the sweep


@requires_cuda
@gpu_check
def test_graph_ms_times_the_recorded_work_without_the_host():
    """The op benchmarks' GPU-only time: the replays run the recorded work (a counter advances at
    each), 200 tiny kernels, which the host launches slower than the GPU runs them, time shorter
    replayed than as called, and a 1 GiB copy, where the GPU is the slower side, the same either way."""
    from cma_benchmarks.common import graph_ms, time_ms
    device = torch.device("cuda")
    counter, x = torch.zeros((), dtype=torch.int64, device=device), torch.randn(1024, device=device)

    def tiny_kernels():
        counter.add_(1)
        for _ in range(200):
            x.mul_(1.0)

    replayed = graph_ms(tiny_kernels, device)
    assert counter.item() >= 3 + 7   # 3 warm-up calls, then at least do_bench's 5 estimates and 2 more replays
    called = time_ms(tiny_kernels, device)
    assert 0 < replayed < 0.8 * called, (replayed, called)
    src, dst = torch.randn(2 ** 28, device=device), torch.empty(2 ** 28, device=device)
    replayed, called = graph_ms(lambda: dst.copy_(src), device), time_ms(lambda: dst.copy_(src), device)
    assert 0.85 < replayed / called < 1.15, (replayed, called)
    assert torch.equal(dst, src)


@pytest.mark.parametrize("bench", ["bench_adapter", "bench_quick_gelu"])
def test_op_benchmarks_compile_each_shape_afresh(bench, tmp_path, monkeypatch):
    """One compiled function over many shapes runs eager, silently, once dynamo's recompile_limit
    is spent (8 graphs: 4 shapes in two grad modes), so the "compile" column would time eager. With
    the limit at 2 (one shape's forward and fwd+bwd) and a hit made an error, two shapes pass only
    if each shape is compiled afresh."""
    import importlib
    if torch.cuda.is_available():
        pytest.skip("the smoke runs are for machines without a GPU")
    module = importlib.import_module(f"cma_benchmarks.{bench}")
    monkeypatch.setattr(module, "SMOKE_SHAPES", [(16, 64), (24, 64)])
    # dynamo's own patch, not monkeypatch: undoing a monkeypatch deletes the option, and a deleted
    # torch config option stays hidden, breaking every later compile in the process
    with torch._dynamo.config.patch(recompile_limit=2, fail_on_recompile_limit_hit=True):
        rows = module.main(["--smoke", "--out", str(tmp_path)])
    assert [r["N"] for r in rows] == [16, 24] and all(r["compile_fwdbwd_ms"] > 0 for r in rows)
    if bench == "bench_adapter":   # a spent time budget: the first shape runs, the rest are named as skipped
        assert [r["N"] for r in module.main(["--smoke", "--budget-s", "0", "--out", str(tmp_path)])] == [16]
        results = json.loads(next(tmp_path.glob("adapter_smoke_*.json")).read_text())
        assert results["skipped"] == ["float32 24x64"] and not results["complete"]
        assert next(tmp_path.glob("adapter_smoke_*.png")).exists()


def test_tuner_tries_the_current_configuration_then_the_candidates_then_the_neighbours():
    from cma_benchmarks.tune_adapter import BWD_FIRST, BWD_SPACE, FWD_SPACE, search_order
    import cma_kernels.adapter_op as fa
    for space, config, first in ((FWD_SPACE, fa.FWD_CONFIG, []), (BWD_SPACE, fa.BWD_CONFIG, BWD_FIRST)):
        current = tuple(config[k] for k in space)
        candidates = [tuple(f[k] for k in space) for f in first]
        assert all(f.keys() == space.keys() for f in first)
        off_grid = [c for c in candidates if not all(v in space[k] for k, v in zip(space, c))]
        order = search_order(space, current, first)
        assert order[:1 + len(candidates)] == [current] + candidates
        assert sorted(order) == sorted(set(order))   # each configuration once
        assert len(order) == math.prod(len(v) for v in space.values()) + len(off_grid)
        distance = [sum(a != b for a, b in zip(values, current)) for values in order[1 + len(candidates):]]
        assert distance[0] == 1 and distance == sorted(distance)   # then the rest, nearest first


@pytest.mark.parametrize("argv,message", [
    (["train", "--dataset", "jsonl", "--root", "/nonexistent/data.jsonl", "--pretrained", "none"],
     "no such annotation file"),
    (["train", "--pooling", "max", "--pretrained", "none"], "pooling must be one of"),
    (["train", "--dataset", "jsonl", "--root", "x"], "--pretrained none"),
    (["train", "--pretrained", "none", "--lr", "0"], "lr must be > 0"),
    (["train", "--config", "/nonexistent.yaml"], "no such file"),
    (["eval", "--pretrained", "none", "--adapters", "/nonexistent.pt"], "--adapters /nonexistent.pt: no such file"),
    (["prepare", "--dataset", "kinetics", "--root", ".", "--out", "x"], "unknown dataset 'kinetics'"),
    (["prepare", "--dataset", "jsonl", "--root", ".", "--split", ", ", "--out", "x"], "--split ', ': name a split"),
    (["train", "--model", "ViT-B32", "--pretrained", "none"], "not an open_clip architecture; did you mean ViT-B-32"),
    (["eval", "--model", "ViT-Q-99", "--pretrained", "none"], "--model 'ViT-Q-99' is not an open_clip architecture"),
    (["train", "--pretrained", "weights.pt"], "--pretrained weights.pt: no such file"),
    (["train", "--pretrained", "openai2"], "neither a file nor an open_clip tag of ViT-B-32 (its tags: openai,"),
    (["eval", "--dataset", "jsonl", "--root", "/nonexistent/data.jsonl", "--pretrained", "none"],
     "no such annotation file"),
] + ([] if torch.cuda.is_available() else [(["train", "--pretrained", "none", "--device", "cuda"], "no CUDA device")]))
def test_errors_say_what_to_do(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_pretrained_tag_that_cannot_be_fetched_is_an_error_not_a_traceback(video_set, monkeypatch, capsys):
    jsonl, _ = video_set

    def offline(*args, **kwargs):
        raise RuntimeError("Failed to download weights for tag 'openai'")
    monkeypatch.setattr(open_clip, "create_model", offline)
    for command in ("train", "eval"):
        assert main([command, "--dataset", "jsonl", "--root", jsonl, "--pretrained", "openai", "--workers", "0"]) == 2
        err = capsys.readouterr().err
        assert "--pretrained openai: could not fetch open_clip's ViT-B-32 weights (RuntimeError: Failed to " \
               "download" in err and "pass the file" in err and "Traceback" not in err


def test_eval_of_a_split_without_video_files_fails_before_the_model(tmp_path, monkeypatch, capsys):
    import cma_train.backbone as backbone
    monkeypatch.setattr(backbone, "build_model", lambda *args: pytest.fail("built the model"))
    (tmp_path / "test.jsonl").write_text('{"video": "videos/nope.mp4", "caption": "a cat"}\n')
    assert main(["eval", *TINY, "--dataset", "jsonl", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert (f"none of the 1 videos of split 'test' is a file or a folder of frames, e.g. "
            f"{tmp_path / 'videos' / 'nope.mp4'}") in err


def test_pretrained_file_of_another_architecture_is_an_error_not_a_traceback(video_set, tmp_path, capsys):
    jsonl, _ = video_set
    other = json.loads(json.dumps(TINY_TRAIN_CLIP))
    other["vision_cfg"]["width"] *= 2
    torch.save(open_clip.model.CLIP(**other).state_dict(), tmp_path / "other.pt")
    write_openai_style_clip(tmp_path / "other_openai.pt", other)
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    for name in ("other.pt", "other_openai.pt", "junk.pt"):
        for command in ("train", "eval"):
            path = tmp_path / name
            assert main([command, "--dataset", "jsonl", "--root", jsonl, "--model-config", json.dumps(TINY_TRAIN_CLIP),
                         "--pretrained", str(path), "--out", str(tmp_path / "run"), "--workers", "0"]) == 2
            err = capsys.readouterr().err
            assert f"--pretrained {path}: cannot be loaded into the --model-config model (" in err, err
            assert err.rstrip().endswith("not an open_clip or OpenAI CLIP checkpoint of that architecture")
            assert "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoint_latest.pt").exists()


def test_an_output_folder_that_cannot_be_made_is_an_error_not_a_traceback(video_set, tmp_path, monkeypatch,
                                                                         capsys):
    import cma_train.train as train_module
    (tmp_path / "file").write_text("")
    assert main(["demo", "--out", str(tmp_path / "file" / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cma demo: error: [Errno 20] Not a directory") and "Traceback" not in err
    built = []
    monkeypatch.setattr(train_module, "build_model", lambda *args: built.append(1))
    jsonl, _ = video_set
    assert main(["train", *TINY, "--dataset", "jsonl", "--root", jsonl, "--out", str(tmp_path / "file" / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cma train: error: [Errno 20] Not a directory") and not built   # before the model


def test_model_config_is_a_file_or_json_and_what_open_clip_cannot_build_is_one_line(video_set, tmp_path, capsys):
    """--model-config takes a JSON file laid out as open_clip's model_configs/*.json, the JSON itself,
    or (in --config) a file name; each gives the same settings. A config that is neither, or that
    open_clip cannot build, is one line naming the flag."""
    from cma_train.cli import build_parser, config_from_args
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(TINY_TRAIN_CLIP, indent=1))
    (tmp_path / "c.yaml").write_text(f"model_config: {path}\n")
    parser = build_parser()
    for argv in (["--model-config", str(path)], ["--model-config", json.dumps(TINY_TRAIN_CLIP)],
                 ["--config", str(tmp_path / "c.yaml")]):
        assert config_from_args(parser.parse_args(["train", *argv])).model_config == TINY_TRAIN_CLIP
    (tmp_path / "bad.json").write_text('{"embed_dim": 32,\n "vision_cfg": {}, x}')
    hf = json.dumps({**TINY_TRAIN_CLIP, "text_cfg": {"hf_tokenizer_name": "bert-base-uncased"}})
    for config, message in [
        ('{"foo": 1}', "--model-config: open_clip cannot build a model from it (TypeError: "),
        (json.dumps({**TINY_TRAIN_CLIP, "vision_cfg": {"widht": 64}}),
         "--model-config: open_clip cannot build a model from it (TypeError: CLIPVisionCfg"),
        ("[1, 2]", "--model-config: expected a JSON object with embed_dim, vision_cfg and text_cfg"),
        ("tiny.jsn", "--model-config 'tiny.jsn': neither a file nor JSON"),
        (str(tmp_path / "bad.json"), f"--model-config {tmp_path / 'bad.json'}:2: invalid JSON"),
        (hf, "--model-config: a text tower with hf_tokenizer_name 'bert-base-uncased' is not supported"),
    ]:
        assert main(["train", "--model-config", config, "--pretrained", "none", "--dataset", "jsonl", "--root",
                     video_set[0], "--workers", "0", "--out", str(tmp_path / "run")]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"cma train: error: {message}") and "Traceback" not in err, err


def test_a_diverging_run_is_one_line_saying_to_lower_the_lr(video_set, tmp_path, monkeypatch, capsys):
    import cma_train.step as step_module
    jsonl, _ = video_set
    real_loss = step_module._global_loss
    monkeypatch.setattr(step_module, "_global_loss", lambda *args: real_loss(*args) * float("nan"))
    assert main(["train", *TINY, "--dataset", "jsonl", "--root", jsonl, "--batch-size", "4",
                 "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cma train: error: loss became nan at step 1; lower --lr") and "Traceback" not in err


def test_unknown_config_key_and_bad_flag_value(tmp_path, capsys):
    bad = tmp_path / "c.yaml"
    bad.write_text("batch_size: 8\nlearning_rate: 0.1\n")
    assert main(["train", "--config", str(bad)]) == 2
    assert "unknown setting 'learning_rate'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--batch-size", "many"])
    assert "invalid int value: 'many'" in capsys.readouterr().err


def test_config_file_values_take_the_settings_types(tmp_path, capsys):
    from cma_train.cli import build_parser, config_from_args
    good = tmp_path / "c.yaml"   # YAML reads 1e-5 (no dot) as the string '1e-5'
    good.write_text("lr: 1e-5\nepochs: 2.0\nbetas: [0.8, '0.9']\neval_split: null\nprogress: false\n")
    cfg = config_from_args(build_parser().parse_args(["train", "--config", str(good)]))
    assert (cfg.lr, cfg.epochs, cfg.betas, cfg.eval_split, cfg.progress) == (1e-5, 2, (0.8, 0.9), None, False)
    assert type(cfg.lr) is float and type(cfg.epochs) is int
    for text, message in (("epochs: 1.5", "epochs must be int, got 1.5"), ("lr: fast", "lr must be float, got 'fast'"),
                          ("progress: 1", "progress must be bool, got 1"), ("betas: 0.9", "betas must be two numbers"),
                          ("epochs: .inf", "epochs must be int, got inf")):
        bad = tmp_path / "bad.yaml"
        bad.write_text(text + "\n")
        assert main(["train", "--config", str(bad)]) == 2
        err = capsys.readouterr().err
        assert f"--config {bad}: {message}" in err and "Traceback" not in err


def test_dataset_recipe_under_config_file_under_flags(tmp_path):
    from cma_train.cli import build_parser, config_from_args
    config = tmp_path / "c.yaml"
    config.write_text("dataset: activitynet\nmax_words: 32\n")
    args = build_parser().parse_args(["train", "--config", str(config), "--epochs", "3"])
    cfg = config_from_args(args)   # the paper's activitynet values, then the file's, then the flag's
    assert (cfg.reduction_dim, cfg.shared_dim, cfg.max_frames, cfg.max_words, cfg.epochs) == (16, 512, 64, 32, 3)


def test_prepare_caches_the_frames_train_will_ask_for(tmp_path, monkeypatch, capsys):
    import cma_model.cache
    (tmp_path / "train_data.json").write_text(json.dumps([{"video": "v1.mp4", "description": "a cat"}]))
    asked = []
    monkeypatch.setattr(cma_model.cache, "prepare_cache",
                        lambda ids, paths, out, frames, *rest: asked.append(frames) or {})
    for extra in ([], ["--max-frames", "12"]):
        assert main(["prepare", "--dataset", "didemo", "--root", str(tmp_path), "--out", str(tmp_path / "c"),
                     *extra]) == 0
    assert asked == [64, 12]   # didemo trains on 64 frames (the paper's), unless told otherwise


@pytest.mark.parametrize("name, content, message", [
    ("c.yaml", b"lr: [1e-5\nepochs: 2\n", ":2: invalid YAML (expected ',' or ']', but got ':')"),
    ("c.yml", b"lr: epochs: 2\n", ":1: invalid YAML (mapping values are not allowed here)"),
    ("c.json", b'{"lr": 1e-5,}', ":1: invalid JSON"),
    ("c.yaml", b"\xff\xfe\x00", ": not a text file (UTF-8)"),
])
def test_unreadable_config_file_is_one_line_naming_it(tmp_path, capsys, name, content, message):
    bad = tmp_path / name
    bad.write_bytes(content)
    assert main(["train", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"cma train: error: --config {bad}{message}") and "Traceback" not in err


def test_the_command_starts_without_torch():
    """`cma --help`, `--version` and argument errors answer at once: torch (seconds to import) and
    open_clip load only when a command runs."""
    import subprocess
    import sys
    code = "import sys, cma_train.cli; print(sorted(m for m in ('torch', 'open_clip', 'triton') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"


def test_version_names_cma_and_what_it_runs_on(capsys):
    from importlib.metadata import version
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == (f"cma {version('cma')} (torch {version('torch')}, triton "
                                               f"{version('triton')}, open_clip {version('open_clip_torch')})")


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "cma_train.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "train" in out.stdout and "demo" in out.stdout


@requires_decord
def test_demo_quick_smoke(tmp_path, capsys):
    """The embedded demo end to end with few steps (the full run is README command one)."""
    code = main(["demo", "--out", str(tmp_path), "--quick", "--workers", "1"])
    out = capsys.readouterr().out
    for row in ("R@1 chance", "R@1 zero-shot", "R@1 adapter-tuned", "trainable params, adapters"):
        assert row in out
    result = json.load(open(tmp_path / "demo_results.json"))
    assert result["chance_R1"] == pytest.approx(100 / 48)
    assert code == (0 if result["adapter_tuned"]["t2v"]["R1"] > result["zero_shot"]["t2v"]["R1"] else 1)
