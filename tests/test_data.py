"""cma_model.data: dataset items from files and from the cache agree; unreadable videos are skipped."""
import os
import shutil
import signal
import subprocess
import sys

import open_clip
import pytest
import torch
from conftest import fake_free_space, requires_decord, write_video

from cma_model.cache import FrameCache, prepare_cache
from cma_model.data import (CaptionVideoDataset, VideoFrames, batches, collate, ignore_stop_signals, loader_workers,
                            tokenize)
from cma_model.datasets import Annotations
from cma_train.signals import STOP_SIGNALS


@pytest.fixture(scope="module")
def annotations(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    ann = Annotations()
    ann.add("a", write_video(d / "a.mp4", 50, fps=10), ["zero one", "another caption"])
    ann.add("bad", str(d / "bad.mp4"), ["never seen"])
    ann.add("b", write_video(d / "b.mp4", 200, fps=10), ["two"])
    (d / "bad.mp4").write_bytes(b"garbage")
    return ann


def test_tokenize_truncates_and_pads_to_max_words():
    tok = open_clip.get_tokenizer("ViT-B-32")
    long = " ".join(["word"] * 60)
    t = tokenize(tok, ["a cat", long], max_words=32)
    assert t.shape == (2, 32) and t.dtype == torch.long
    full = tok([long])[0]
    assert torch.equal(t[1, :31], full[:31]) and t[1, 31] == tok.eot_token_id
    assert torch.equal(t[0], tok(["a cat"])[0, :32]) and not tok(["a cat"])[0, 32:].any()
    with pytest.raises(ValueError, match="max_words"):
        tokenize(tok, ["x"], max_words=100)


@requires_decord
def test_items_from_files_and_cache_agree_and_bad_videos_are_skipped(annotations, tmp_path):
    tok = open_clip.get_tokenizer("ViT-B-32")
    prepare_cache(annotations.video_ids, annotations.video_paths, str(tmp_path), size=32, progress=False)
    from_files = CaptionVideoDataset(annotations, tok, VideoFrames(size=32))
    from_cache = CaptionVideoDataset(annotations, tok, VideoFrames(cache=FrameCache(str(tmp_path)), size=32))
    batch_files = collate([from_files[i] for i in range(len(from_files))])
    batch_cache = collate([from_cache[i] for i in range(len(from_cache))])
    for batch in (batch_files, batch_cache):
        assert batch["caption_index"].tolist() == [0, 1, 3] and batch["video"].tolist() == [0, 0, 2]
        assert len(batch["skipped"]) == 1 and "bad.mp4" in batch["skipped"][0]
        assert torch.isfinite(batch["frames"]).all()
    assert torch.equal(batch_files["frames"], batch_cache["frames"])
    assert torch.equal(batch_files["mask"], batch_cache["mask"])
    assert batch_files["mask"][0].sum() == 5 and batch_files["mask"][2].sum() == 12
    assert batch_files["frames"][0, 5:].abs().sum() == 0 and batch_files["frames"][0, :5].abs().sum() > 0


@requires_decord
@pytest.mark.parametrize("raw", [False, True])
def test_videos_the_cache_does_not_cover_are_decoded_from_their_files(annotations, tmp_path, raw):
    """A cache made for some videos (the training split) still serves others (an evaluation split):
    those are decoded from their files, bit-equal to no cache; a video the cache skipped stays
    skipped rather than being decoded again."""
    from cma_model.video import VideoError
    ids, paths = annotations.video_ids, annotations.video_paths   # a, bad, b
    prepare_cache(ids[:2], paths[:2], str(tmp_path), size=32, progress=False)
    cached, direct = VideoFrames(cache=FrameCache(str(tmp_path)), size=32, raw=raw), VideoFrames(size=32, raw=raw)
    assert [cached.cache.covers(v) for v in ids] == [True, True, False]
    for got, want in zip(cached("b", paths[2]), direct("b", paths[2])):
        assert torch.equal(got, want)
    assert torch.equal(cached("a", paths[0])[1], direct("a", paths[0])[1])
    with pytest.raises(VideoError, match="bad.mp4"):
        cached("bad", paths[1])


@requires_decord
def test_raw_frames_normalised_on_the_device_are_the_normalised_frames(annotations, tmp_path):
    """raw=True ships uint8 [T, S, S, 3] (from files and from the cache alike); to_model_input
    normalises them to exactly the float frames of raw=False in every unpadded slot."""
    prepare_cache(annotations.video_ids, annotations.video_paths, str(tmp_path), size=32, progress=False)
    cache = FrameCache(str(tmp_path))
    normal = VideoFrames(size=32)
    for raw in (VideoFrames(size=32, raw=True), VideoFrames(cache=cache, size=32, raw=True)):
        for video_id, path in [("a", annotations.video_paths[0]), ("b", annotations.video_paths[2])]:
            frames, mask = raw(video_id, path)
            want, want_mask = normal(video_id, path)
            assert frames.dtype == torch.uint8 and frames.shape == (12, 32, 32, 3) and torch.equal(mask, want_mask)
            got = raw.to_model_input(frames.unsqueeze(0), torch.device("cpu"))[0]
            assert torch.equal(got[mask], want[mask]) and not frames[~mask].any()
    assert normal.to_model_input(want, torch.device("cpu")) is want   # float frames pass through


@requires_decord
def test_loader_with_workers(annotations):
    tok = open_clip.get_tokenizer("ViT-B-32")
    ds = CaptionVideoDataset(annotations, tok, VideoFrames(size=32))
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate, timeout=60)
    batches = list(loader)
    assert sum(len(b["skipped"]) for b in batches) == 1
    assert sum(len(b.get("caption_index", [])) for b in batches) == 3


@requires_decord
def test_a_cache_made_with_other_settings_is_refused(annotations, tmp_path):
    prepare_cache(annotations.video_ids, annotations.video_paths, str(tmp_path), size=32, progress=False)
    with pytest.raises(ValueError, match="was made with .*'max_frames': 12.*needs .*'max_frames': 4"):
        VideoFrames(cache=FrameCache(str(tmp_path)), max_frames=4, size=32)


class _SignalsItself(torch.utils.data.Dataset):
    """Item i: i, after the worker that loads it sends itself each of the trainer's stop signals."""

    def __len__(self):
        return 4

    def __getitem__(self, i):
        for signum in STOP_SIGNALS:
            os.kill(os.getpid(), signum)
        return i


def test_loader_workers_ignore_stop_signals():
    """A Ctrl-C, SIGTERM or SIGHUP reaches the loader workers too; with ignore_stop_signals they keep
    loading (the trainer stops between steps), where a default worker dies and fails the batch."""
    loader = torch.utils.data.DataLoader(_SignalsItself(), batch_size=2, num_workers=1, timeout=60,
                                         worker_init_fn=ignore_stop_signals)
    assert [b.tolist() for b in loader] == [[0, 1], [2, 3]]


class _HangsAtTwo(torch.utils.data.Dataset):
    """Item i: i, except that item 2 never comes (a decoder hung on a broken file)."""

    def __len__(self):
        return 4

    def __getitem__(self, i):
        if i == 2:
            import time
            time.sleep(60)
        return i


class _CrashesAtTwo(torch.utils.data.Dataset):
    """Item i: i, except that item 2 kills its process (a decoder's segmentation fault)."""

    def __len__(self):
        return 4

    def __getitem__(self, i):
        if i == 2:
            os.kill(os.getpid(), signal.SIGSEGV)
        return i


@pytest.mark.parametrize("dataset, message", [
    (_HangsAtTwo, r"no batch from the data-loading workers in 2 s: a video decoder that hangs\?"),
    (_CrashesAtTwo, r"a data-loading worker died \(DataLoader worker \(pid.*\): a video decoder that crashed")])
def test_a_hung_or_dead_loader_worker_ends_with_what_to_do(dataset, message):
    loader = torch.utils.data.DataLoader(dataset(), batch_size=2, num_workers=1, timeout=2)
    got = []
    with pytest.raises(ValueError, match=message + ".* `cma prepare`.*--resume"):
        for batch in batches(loader):
            got.append(batch.tolist())
    assert got in ([[0, 1]], [] if dataset is _CrashesAtTwo else None)   # a death can be noticed before batch 0


class _DiesHandingOverBatchOne:
    """What the main process meets where a worker dies after queueing a batch, before the main
    process has fetched the batch's shared memory from it: a ConnectionError, not a RuntimeError
    (seen in test_cli's worker-death test, at random)."""
    timeout, num_workers = 2, 1

    def __iter__(self):
        yield torch.zeros(2)
        raise ConnectionResetError(104, "Connection reset by peer")


def test_a_worker_that_dies_handing_a_batch_over_ends_with_what_to_do():
    got = []
    with pytest.raises(ValueError, match=r"a data-loading worker died \(\[Errno 104\] Connection reset by peer\): "
                                         r"a video decoder that crashed.* `cma prepare`.*--resume"):
        for batch in batches(_DiesHandingOverBatchOne()):
            got.append(batch)
    assert len(got) == 1
    loader = _DiesHandingOverBatchOne()
    loader.num_workers = 0   # no worker to have died: the error is someone else's, and stays as it was
    with pytest.raises(ConnectionResetError):
        list(batches(loader))


@pytest.mark.parametrize("free_mib, local_processes, fit", [(1024, 1, 4), (64, 1, 2), (35, 1, 0), (64, 2, 0),
                                                            (100, 2, 1)])
def test_loader_workers_fit_shared_memory(monkeypatch, capsys, free_mib, local_processes, fit):
    """(2 * workers + 2) batches of 10 MiB per process must fit /dev/shm's free space, shared by the
    processes on the machine; fewer workers where they do not, said once."""
    fake_free_space(monkeypatch, 2 * free_mib << 20, free_mib << 20)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_processes))
    assert loader_workers(4, 10 << 20) == fit
    said = capsys.readouterr().err
    if fit == 4:
        assert said == ""
    else:
        assert f"a batch takes 10 MiB there (10 at a time with 4 loader workers): {fit} worker(s) instead" in said
        loader_workers(4, 10 << 20)
        assert capsys.readouterr().err == ""   # once per process
    assert loader_workers(0, 10 << 20) == 0


_SMALL_SHM = "mount -t tmpfs -o size=16m tmpfs /dev/shm"
_LOADS_TOO_MUCH = """
import torch
from cma_model.data import batches, loader_workers
class Items(torch.utils.data.Dataset):   # 7 MiB items: a batch of 2 takes 14 MiB of the 16
    def __len__(self):
        return 8
    def __getitem__(self, i):
        return torch.full((7, 2**20), i, dtype=torch.uint8)
print("workers that fit:", loader_workers(2, 14 << 20, say=False))
loader = torch.utils.data.DataLoader(Items(), batch_size=2, num_workers=2, timeout=60)
try:
    for batch in batches(loader):
        pass
except ValueError as e:
    print("error:", e)
"""


def test_a_loader_out_of_shared_memory_is_foreseen_and_else_said(tmp_path):
    """In a mount namespace with a 16 MiB /dev/shm (a container's is 64 MiB): loader_workers says no
    worker fits, and a loader that has workers anyway fails with PyTorch's shared-memory error,
    which batches() turns into what to do. Needs root and util-linux's unshare (skips elsewhere)."""
    if shutil.which("unshare") is None or subprocess.run(
            ["unshare", "-m", "--propagation", "private", "sh", "-c", _SMALL_SHM], capture_output=True).returncode:
        pytest.skip("no private mount namespace here (needs root and unshare)")
    run = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                          f'{_SMALL_SHM} && exec "{sys.executable}" -c "$0"', _LOADS_TOO_MUCH],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.stdout.splitlines()[0] == "workers that fit: 0", run.stderr
    assert run.stdout.splitlines()[1].startswith("error: the data-loading workers ran out of shared memory "
                                                 "(/dev/shm holds 16 MiB): raise it"), run.stdout + run.stderr
