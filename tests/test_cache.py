"""cma_model.cache: shards round-trip to direct decoding, resume, skipped videos, timeouts, one
writer per folder."""
import os
import re
import shutil
import socket

import numpy as np
import pytest
import torch
from conftest import fake_free_space, hold_folder_lock, requires_decord, write_frame_cache_set, write_video

from cma_kernels.preprocess import preprocess_frames
from cma_model.cache import PREPARE_LOCK, FrameCache, _start_worker, cache_bytes, folder_lock, prepare_cache
from cma_model.video import VideoError, sample_frames


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("videos")
    paths = [write_video(d / "a.mp4", 150, fps=10), write_video(d / "b.mp4", 30, fps=10, height=80, width=120),
             str(d / "broken.mp4"), write_video(d / "c.mp4", 60, fps=5)]
    (d / "broken.mp4").write_bytes(b"not a video at all")
    return ["a", "b", "broken", "c"], paths


@requires_decord
def test_cache_round_trip_equals_direct_decoding(tmp_path, videos):
    ids, paths = videos
    skipped = prepare_cache(ids, paths, str(tmp_path), max_frames=12, size=32, workers=2, shard_size=3, progress=False)
    assert list(skipped) == ["broken"] and "broken.mp4" in skipped["broken"]
    cache = FrameCache(str(tmp_path))
    for vid, path in zip(ids, paths):
        if vid == "broken":
            assert vid not in cache
            with pytest.raises(VideoError, match="broken.mp4"):
                cache[vid]
            continue
        frames, mask = cache[vid]
        direct, direct_mask = sample_frames(path)
        assert np.array_equal(mask, direct_mask)
        want = preprocess_frames(torch.from_numpy(direct[direct_mask]), size=32, dtype=torch.uint8).numpy()
        assert np.array_equal(frames[mask], want) and not frames[~mask].any()


@requires_decord
def test_resume_redoes_only_unfinished_shards(tmp_path, videos):
    ids, paths = videos
    prepare_cache(ids, paths, str(tmp_path), size=32, shard_size=2, progress=False)
    first = tmp_path / "shard_00000.npy"
    stamp = os.stat(first).st_mtime_ns
    os.remove(tmp_path / "shard_00001.json")          # as if interrupted while writing shard 1
    with pytest.raises(ValueError, match=r"unfinished frame cache \(2 of 4 videos\); run the same `cma prepare`"):
        FrameCache(str(tmp_path))                     # training on it would silently skip half the videos
    skipped = prepare_cache(ids, paths, str(tmp_path), size=32, shard_size=2, progress=False)
    assert os.stat(first).st_mtime_ns == stamp        # shard 0 untouched
    assert (tmp_path / "shard_00001.json").exists() and list(skipped) == ["broken"]
    assert FrameCache(str(tmp_path))["c"][1].sum() == 12


@requires_decord
def test_shards_another_prepare_wrote_before_the_lock_was_taken_are_not_decoded_again(tmp_path, videos,
                                                                                     monkeypatch):
    """A prepare into the same folder that ends between this one's look at the shards and its
    taking the lock: what it wrote is read again under the lock, not decoded anew."""
    import contextlib

    import cma_model.cache as cache_module
    ids, paths = videos
    take_lock = cache_module.folder_lock

    @contextlib.contextmanager
    def the_other_prepare_ends_first(*args):
        monkeypatch.setattr(cache_module, "folder_lock", take_lock)
        prepare_cache(ids, paths, str(tmp_path), size=32, shard_size=2, progress=False)   # the other one
        stamps.extend(os.stat(tmp_path / f"shard_0000{s}.npy").st_mtime_ns for s in (0, 1))
        with take_lock(*args):
            yield
    stamps = []
    monkeypatch.setattr(cache_module, "folder_lock", the_other_prepare_ends_first)
    skipped = prepare_cache(ids, paths, str(tmp_path), size=32, shard_size=2, progress=False)
    assert [os.stat(tmp_path / f"shard_0000{s}.npy").st_mtime_ns for s in (0, 1)] == stamps
    assert list(skipped) == ["broken"] and FrameCache(str(tmp_path))["c"][1].sum() == 12


@requires_decord
def test_a_cache_that_cannot_fit_the_disk_is_refused_before_decoding(tmp_path, videos, monkeypatch):
    """cache_bytes bounds what the shards take on disk; prepare_cache refuses, before it makes the
    folder or decodes a video, where the shards still to write exceed the free space."""
    ids, paths = videos
    frames_only = len(ids) * 12 * 32 * 32 * 3
    prepare_cache(ids, paths, str(tmp_path / "made"), size=32, shard_size=2, progress=False)
    on_disk = sum(f.stat().st_size for f in (tmp_path / "made").iterdir())
    assert frames_only < on_disk <= cache_bytes(len(ids), 12, 32)

    fake_free_space(monkeypatch, 1 << 40, cache_bytes(len(ids), 12, 32) - 1)
    with pytest.raises(ValueError, match=r"the frame cache needs 0\.0 GiB more \(4 videos of 12 frames, 32 x 32 px\), "
                                         r"and 0\.0 GiB are free there: free space or choose another --out"):
        prepare_cache(ids, paths, str(tmp_path / "new" / "cache"), size=32, shard_size=2, progress=False)
    assert not (tmp_path / "new").exists()
    os.remove(tmp_path / "made" / "shard_00001.json")   # resumed: only the shard still to write must fit
    fake_free_space(monkeypatch, 1 << 40, cache_bytes(2, 12, 32))
    assert list(prepare_cache(ids, paths, str(tmp_path / "made"), size=32, shard_size=2, progress=False)) == ["broken"]
    fake_free_space(monkeypatch, 0, 0)   # a network mount that reports no size: not checked
    prepare_cache(ids, paths, str(tmp_path / "unsized"), size=32, shard_size=2, progress=False)


@requires_decord
def test_a_cache_of_videos_none_of_which_is_there_is_refused(tmp_path, videos):
    """A wrong --video-dir would make a full-size cache of zeros in which every video is skipped, and
    that cache would then keep skipping them once the folder is right (it covers them): refused,
    no folder made. One video there is enough to go on (the others are skipped, named)."""
    ids, paths = videos
    missing = [str(tmp_path / "elsewhere" / f"{vid}.mp4") for vid in ids]
    with pytest.raises(ValueError, match=r"none of the 4 videos to cache is a file or a folder of frames, e\.g\. "
                                         r".*elsewhere/a.mp4: check --root and --video-dir"):
        prepare_cache(ids, missing, str(tmp_path / "cache"), size=32, progress=False)
    assert not (tmp_path / "cache").exists()
    skipped = prepare_cache(ids, missing[:3] + paths[3:], str(tmp_path / "cache"), size=32, shard_size=2,
                            progress=False)
    assert sorted(skipped) == ["a", "b", "broken"] and "elsewhere/a.mp4: no such file" in skipped["a"]


@requires_decord
def test_videos_that_were_missing_go_in_when_prepare_runs_again(tmp_path, videos):
    """A video skipped because its file was missing (ActivityNet lacks some) goes into the cache once
    the file is there and `cma prepare` runs again: its shard is decoded anew, the others are left
    alone, and a video skipped for another reason (unreadable) stays skipped."""
    ids, paths = videos
    later = tmp_path / "later" / "a.mp4"
    cache = str(tmp_path / "cache")
    assert sorted(prepare_cache(ids, [str(later)] + paths[1:], cache, size=32, shard_size=2, progress=False)) == \
        ["a", "broken"]
    stamp = os.stat(os.path.join(cache, "shard_00001.npy")).st_mtime_ns
    later.parent.mkdir()
    shutil.copy(paths[0], later)
    assert list(prepare_cache(ids, [str(later)] + paths[1:], cache, size=32, shard_size=2, progress=False)) == \
        ["broken"]
    assert os.stat(os.path.join(cache, "shard_00001.npy")).st_mtime_ns == stamp   # "broken" is not retried
    frames, mask = FrameCache(cache)["a"]
    direct, direct_mask = sample_frames(paths[0])
    assert np.array_equal(mask, direct_mask)
    assert np.array_equal(frames[mask], preprocess_frames(torch.from_numpy(direct[direct_mask]), size=32,
                                                          dtype=torch.uint8).numpy())


def test_decoding_processes_run_one_thread_each():
    """prepare_cache's processes are its parallelism: each resizes with one thread, not one per core
    (63 processes of 64 threads each on a 64-core machine)."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        _start_worker(None)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@requires_decord
def test_cache_settings_must_match(tmp_path, videos):
    ids, paths = videos
    prepare_cache(ids[:1], paths[:1], str(tmp_path), size=32, progress=False)
    with pytest.raises(ValueError, match="holds a cache made with"):
        prepare_cache(ids[:1], paths[:1], str(tmp_path), size=64, progress=False)
    with pytest.raises(FileNotFoundError, match="run `cma prepare` first"):
        FrameCache(str(tmp_path / "nothing"))
    for setting in ({"size": 0}, {"workers": 0}, {"shard_size": 0}, {"max_frames": 0}, {"sample_fps": float("nan")},
                    {"sample_fps": float("inf")}, {"timeout": float("inf")}):
        with pytest.raises(ValueError, match=f"{next(iter(setting))} must be > 0 and finite"):
            prepare_cache(ids[:1], paths[:1], str(tmp_path / "bad"), progress=False, **setting)
    assert not (tmp_path / "bad").exists()   # nothing written that would pin the bad setting
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ValueError, match="a_file is a file: the cache is a folder"):
        prepare_cache(ids[:1], paths[:1], str(tmp_path / "a_file"), progress=False)


@requires_decord
def test_a_video_without_answer_in_time_is_skipped_not_hung(tmp_path, videos):
    ids, paths = videos
    skipped = prepare_cache(ids[:2], paths[:2], str(tmp_path), size=32, workers=1, timeout=0.001, progress=False)
    assert set(skipped) == {"a", "b"} and all("no answer within" in r for r in skipped.values())


# loaded at start-up by the processes prepare_cache spawns (PYTHONPATH): decoding b.mp4 kills the
# process, as decord's segmentation faults on some files do
CRASH_ON_B = """
import os, signal
import cma_model.cache
decode = cma_model.cache.sample_frames
def sample_frames(path, *args):
    if path.endswith("b.mp4"):
        os.kill(os.getpid(), signal.SIGSEGV)
    return decode(path, *args)
cma_model.cache.sample_frames = sample_frames
"""


@requires_decord
def test_a_decoder_that_crashes_costs_its_video_not_the_timeout(tmp_path, videos, monkeypatch):
    """The worker decoding b.mp4 dies: that video is skipped as crashed as soon as the process is
    gone, not after `timeout` (120 s; a crash cost that much per video before), and the other
    workers' videos are cached."""
    import time
    ids, paths = videos
    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "sitecustomize.py").write_text(CRASH_ON_B)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path / "hook"), os.environ.get("PYTHONPATH", "")]))
    start = time.monotonic()
    skipped = prepare_cache(ids, paths, str(tmp_path / "cache"), size=32, workers=2, timeout=120, progress=False)
    assert time.monotonic() - start < 60
    assert set(skipped) == {"b", "broken"}, skipped
    assert skipped["b"] == f"{paths[1]}: the decoder crashed (its process died)"
    cache = FrameCache(str(tmp_path / "cache"))
    assert "a" in cache and "c" in cache and "b" not in cache


def test_without_decord_prepare_says_how_to_get_it_and_makes_no_folder(tmp_path, videos, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "decord", None)   # `import decord` raises ImportError
    with pytest.raises(ValueError, match="reading videos needs decord, which is not installed"):
        prepare_cache(*videos, str(tmp_path / "cache"), size=32, workers=1, progress=False)
    assert not (tmp_path / "cache").exists()


def test_cached_frames_are_views_that_never_write_the_file(tmp_path):
    """FrameCache hands out copy-on-write views of the shard (no copy per read): writing to one
    changes neither the file nor what a fresh reader sees."""
    _, cache_dir = write_frame_cache_set(tmp_path, num_videos=4)
    shard = next(p for p in os.listdir(cache_dir) if p.endswith(".npy"))
    on_disk = np.load(os.path.join(cache_dir, shard))
    frames, mask = FrameCache(str(cache_dir))["clip2"]
    assert np.array_equal(frames, on_disk[2]) and mask.all() and frames.any()
    frames[:] = 0
    assert np.array_equal(np.load(os.path.join(cache_dir, shard)), on_disk)
    assert np.array_equal(FrameCache(str(cache_dir))["clip2"][0], on_disk[2])


def test_a_folder_is_written_by_one_process_at_a_time(tmp_path):
    """While one process holds a folder's lock, another is refused, naming the holder; one that
    ends, even killed, leaves the folder free. The same process may take it again once it let go."""
    holder = hold_folder_lock(tmp_path, "some.lock")
    try:
        with pytest.raises(ValueError, match=f"is being written by another cma prepare \\(pid {holder.pid} on "
                                             f"{re.escape(socket.gethostname())}\\): wait for it to end"):
            with folder_lock(str(tmp_path), "some.lock", "cma prepare"):
                pass
    finally:
        holder.kill()
        holder.wait()
    for _ in range(2):
        with folder_lock(str(tmp_path), "some.lock", "cma prepare"):
            assert (tmp_path / "some.lock").read_text() == f"pid {os.getpid()} on {socket.gethostname()}\n"


@requires_decord
def test_a_cache_being_prepared_is_refused_to_a_second_prepare(tmp_path, videos):
    """Two `cma prepare` into one folder (a job started twice) would write the same shards through
    the same temporary names: the second is refused while the first runs, and runs once it ended."""
    ids, paths = videos
    (tmp_path / "cache").mkdir()
    holder = hold_folder_lock(tmp_path / "cache", PREPARE_LOCK)
    try:
        with pytest.raises(ValueError, match="cache is being written by another cma prepare"):
            prepare_cache(ids, paths, str(tmp_path / "cache"), max_frames=4, size=32, workers=1, progress=False)
    finally:
        holder.kill()
        holder.wait()
    assert not (tmp_path / "cache" / "cache.json").exists()
    skipped = prepare_cache(ids, paths, str(tmp_path / "cache"), max_frames=4, size=32, workers=1, progress=False)
    assert list(skipped) == ["broken"] and FrameCache(str(tmp_path / "cache")).meta["num_videos"] == 4   # complete
