"""Frame cache: decode and resize every video of a dataset once into uint8 shards.

A shard is `shard_NNNNN.npy` (uint8 [n, max_frames, size, size, 3], resized and cropped, not
normalised) plus `shard_NNNNN.json` (video ids, frame masks, skipped videos and why). Both are
written to a temporary name and renamed, the JSON last, so a shard with a JSON is complete:
an interrupted `cma prepare` resumes at the first incomplete shard; one `cma prepare` at a time
writes a folder (folder_lock). Training reads shards by memory map, so an epoch costs no
decoding; normalising a cached frame is a table lookup.
"""
import collections
import contextlib
import fcntl
import glob
import json
import multiprocessing as mp
import os
import shutil
import socket
import time

import numpy as np
import torch

from cma_kernels.preprocess import preprocess_frames

from .datasets import check_sources
from .progress import progress_bar
from .video import NO_SUCH_FILE, VideoError, sample_frames

PREPARE_LOCK = "prepare.lock"   # in the cache folder, held by the `cma prepare` writing there (folder_lock)

_begun = None   # in a `prepare_cache` worker: the queue on which it says which video it begins


def _start_worker(begun):
    """Pool initializer: one thread per decoding process (the processes are the parallelism, as in
    DataLoader workers; torch's default, a thread per core in each, oversubscribes the CPUs)."""
    global _begun
    _begun = begun
    torch.set_num_threads(1)


def _died(v, begun, worker_of):
    """Whether the process that began video v is gone (reads the `begun` queue into worker_of:
    video -> pid)."""
    while not begun.empty():
        u, pid = begun.get()
        worker_of[u] = pid
    return worker_of.get(v) not in (None, *(p.pid for p in mp.active_children()))


def _decode_one(v, path, max_frames, size, sample_fps):
    """Worker: (frames uint8 [max_frames, size, size, 3], mask) or (None, reason). Says first that
    it begins video v, so that a decoder crash (this process gone, no answer) is told from a slow
    video at once."""
    _begun.put((v, os.getpid()))
    try:
        frames, mask = sample_frames(path, max_frames, sample_fps)
        out = np.zeros((max_frames, size, size, 3), dtype=np.uint8)
        out[mask] = preprocess_frames(torch.from_numpy(frames[mask]), size=size, dtype=torch.uint8).numpy()
        return out, mask
    except (VideoError, ValueError) as e:
        return None, str(e)


def atomic_write(path, write):
    """write(tmp), then rename tmp to path: a crash mid-write leaves the previous file intact. A
    write that fails (a full disk: OSError from Python, RuntimeError from torch.save) removes its
    partial file and raises OSError naming path and the space left there."""
    tmp = path + ".tmp"
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
        raise OSError(f"{path}: could not be written ({type(e).__name__}: {' '.join(str(e).split())[:200]}); "
                      f"{free / 2**20:,.0f} MiB free there") from None


@contextlib.contextmanager
def folder_lock(folder, name, command):
    """Hold `folder`/`name` (an advisory fcntl lock) while `command` ("cma train", "cma prepare")
    writes in `folder`: a second one into the same folder (a job submitted twice) is refused,
    naming the process that holds it, instead of both writing the same files through the same
    temporary names. The kernel releases the lock when the process ends, however it ends, so a
    crash leaves none behind. A file system without locks (some network mounts) goes unchecked."""
    with open(os.path.join(folder, name), "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise ValueError(f"{folder} is being written by another {command} ({f.read().strip() or 'its process'}): "
                             f"wait for it to end, or choose another --out") from None
        except OSError:   # ENOLCK, ENOSYS: the file system keeps no locks
            pass
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        yield


def _atomic_write_json(path, obj):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f)
    atomic_write(path, write)


def _write_shard(out_dir, index, ids, results, max_frames, size):
    frames = np.zeros((len(ids), max_frames, size, size, 3), dtype=np.uint8)
    masks, skipped = [], {}
    for row, (vid, (data, info)) in enumerate(zip(ids, results)):
        if data is None:
            skipped[vid] = info
            masks.append([False] * max_frames)
        else:
            frames[row] = data
            masks.append(info.tolist())
    stem = os.path.join(out_dir, f"shard_{index:05d}")

    def save_npy(tmp):
        with open(tmp, "wb") as f:
            np.save(f, frames)
    atomic_write(stem + ".npy", save_npy)

    _atomic_write_json(stem + ".json", {"videos": ids, "masks": masks, "skipped": skipped})
    return skipped


def cache_bytes(num_videos, max_frames=12, size=224):
    """Bytes a frame cache of num_videos takes on disk: the uint8 frames, every slot stored, plus
    at most 1 KiB per video for the shard headers and JSON (ids, masks, reasons for skips)."""
    return num_videos * (max_frames * size * size * 3 + 1024)


def _check_space(out_dir, num_videos, max_frames, size):
    """ValueError, before anything is decoded, where the shards still to write cannot fit the free
    space of out_dir's file system: an ActivityNet cache (64 frames) takes 134 GiB, and a full
    disk would stop `cma prepare` hours in. A file system that reports no size (some network
    mounts) is not checked."""
    existing = os.path.abspath(out_dir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    usage, need = shutil.disk_usage(existing), cache_bytes(num_videos, max_frames, size)
    if usage.total > 0 and need > usage.free:
        raise ValueError(f"{out_dir}: the frame cache needs {need / 2**30:,.1f} GiB more ({num_videos} videos of "
                         f"{max_frames} frames, {size} x {size} px), and {usage.free / 2**30:,.1f} GiB are free "
                         f"there: free space or choose another --out")


def _check_meta(meta_path, meta):
    """ValueError where the cache's meta_path (its cache.json) holds other settings than `meta`."""
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            old = json.load(f)
        if old != meta:
            raise ValueError(f"{os.path.dirname(meta_path)} holds a cache made with {old}, not {meta}; use another "
                             f"folder")


def _written_skips(out_dir, index):
    """{video id: reason} of the videos written shard `index` skipped; None where it is not written."""
    shard = os.path.join(out_dir, f"shard_{index:05d}.json")
    if not os.path.exists(shard):
        return None
    with open(shard) as f:
        return json.load(f)["skipped"]


def _shards_to_decode(out_dir, shards, path_of):
    """([each shard's written skips, or None where it is not written], [the shards to decode]): the
    unwritten ones, and those with a video skipped as missing whose file (path_of[video id]) has
    come since, so that videos added to the folder later go in when `cma prepare` runs again."""
    written = [_written_skips(out_dir, s) for s in range(len(shards))]
    todo = [s for s, skips in enumerate(written)
            if skips is None or any(reason.endswith(NO_SUCH_FILE) and os.path.exists(path_of.get(vid, ""))
                                    for vid, reason in skips.items())]
    return written, todo


def prepare_cache(video_ids, video_paths, out_dir, max_frames=12, size=224, sample_fps=1.0, workers=2,
                  shard_size=64, timeout=300.0, progress=True):
    """Decode + resize every video into shards under out_dir; resumable, and run again it adds the
    videos it skipped as missing whose files have come since. Returns {video id: reason} for every
    skipped video (missing, unreadable, a decoder that crashed, or no answer within `timeout`
    seconds: a hung decoder). ValueError before anything is decoded for a bad setting, a cache none
    of whose videos is there, or one the free disk space cannot hold."""
    for name, value in (("max_frames", max_frames), ("size", size), ("workers", workers), ("shard_size", shard_size),
                        ("sample_fps", sample_fps), ("timeout", timeout)):
        if not 0 < value < float("inf"):   # before the folder is made: a bad setting leaves no cache behind
            raise ValueError(f"{name} must be > 0 and finite, got {value}")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"{out_dir} is a file: the cache is a folder")
    check_sources(video_paths, "to cache")   # a wrong --video-dir: no cache of skipped videos, all zeros
    meta = {"max_frames": max_frames, "size": size, "sample_fps": sample_fps, "shard_size": shard_size,
            "num_videos": len(video_ids)}
    meta_path = os.path.join(out_dir, "cache.json")
    _check_meta(meta_path, meta)
    shards = [list(range(i, min(i + shard_size, len(video_ids)))) for i in range(0, len(video_ids), shard_size)]
    path_of = dict(zip(video_ids, video_paths))
    written, todo = _shards_to_decode(out_dir, shards, path_of)
    _check_space(out_dir, sum(len(shards[s]) for s in todo), max_frames, size)
    os.makedirs(out_dir, exist_ok=True)
    with folder_lock(out_dir, PREPARE_LOCK, "cma prepare"):   # two at once would write the same shards
        # again, held: a prepare that has just ended may have made the cache, or written shards
        _check_meta(meta_path, meta)
        written, todo = _shards_to_decode(out_dir, shards, path_of)
        if not os.path.exists(meta_path):
            _atomic_write_json(meta_path, meta)
        skipped = {vid: reason for s, skips in enumerate(written) if s not in todo for vid, reason in skips.items()}
        queue = collections.deque(v for s in todo for v in shards[s])
        args = lambda v: (v, video_paths[v], max_frames, size, sample_fps)  # noqa: E731
        ctx = mp.get_context("spawn")

        def new_pool():   # and a new queue: a worker terminated while it wrote would leave the old one locked
            begun = ctx.SimpleQueue()
            return ctx.Pool(workers, initializer=_start_worker, initargs=(begun,)), begun
        pool, begun = new_pool()
        in_flight = collections.deque()
        done, worker_of = {}, {}   # worker_of: video -> pid of the process decoding it
        bar = progress_bar(total=len(video_ids), initial=len(video_ids) - len(queue), desc="prepare", unit="video",
                           disable=not progress)
        try:
            while queue or in_flight:
                while queue and len(in_flight) < 2 * workers:
                    v = queue.popleft()
                    in_flight.append((v, pool.apply_async(_decode_one, args(v))))
                v, result = in_flight.popleft()
                deadline, crashed = time.monotonic() + timeout, False
                while not result.ready() and not crashed and time.monotonic() < deadline:
                    result.wait(min(1.0, max(0.0, deadline - time.monotonic())))
                    if not result.ready() and _died(v, begun, worker_of):
                        result.wait(1.0)   # an answer sent just before the process died still comes
                        crashed = not result.ready()
                if result.ready():
                    done[v] = result.get()
                elif crashed:   # its process died (a segmentation fault in the decoder): the pool has replaced it
                    done[v] = (None, f"{video_paths[v]}: the decoder crashed (its process died)")
                else:   # a decoder that hangs (decord can): restart the workers
                    done[v] = (None, f"{video_paths[v]}: no answer within {timeout:.0f} s (decoder hang)")
                    pool.terminate()
                    pool, begun = new_pool()
                    worker_of.clear()
                    in_flight = collections.deque((u, pool.apply_async(_decode_one, args(u))) for u, _ in in_flight)
                bar.update(1)
                for s in list(todo):
                    if all(u in done for u in shards[s]):
                        ids = [video_ids[u] for u in shards[s]]
                        results = [done.pop(u) for u in shards[s]]
                        skipped.update(_write_shard(out_dir, s, ids, results, max_frames, size))
                        todo.remove(s)
        finally:
            pool.terminate()
            bar.close()
        return skipped


class FrameCache:
    """Read side of a prepared cache: `cache[video_id]` -> (frames uint8 [T, S, S, 3], mask bool [T]).
    The frames are a copy-on-write view of the memory-mapped shard, not a copy: the loader's collate
    reads them straight into the batch (writing to them never reaches the file)."""

    def __init__(self, out_dir):
        meta_path = os.path.join(out_dir, "cache.json")
        if not os.path.exists(meta_path):
            raise FileNotFoundError(f"{out_dir} is not a frame cache (no cache.json); run `cma prepare` first")
        with open(meta_path) as f:
            self.meta = json.load(f)
        self.out_dir, self.index, self.skipped, self._arrays = out_dir, {}, {}, {}
        for path in sorted(glob.glob(os.path.join(out_dir, "shard_*.json"))):
            with open(path) as f:
                shard = json.load(f)
            for row, (vid, mask) in enumerate(zip(shard["videos"], shard["masks"])):
                self.index[vid] = (path[:-5] + ".npy", row, np.asarray(mask, dtype=bool))
            self.skipped.update(shard["skipped"])
        if len(self.index) < self.meta["num_videos"]:   # `cma prepare` was stopped: training would skip the rest
            raise ValueError(f"{out_dir} is an unfinished frame cache ({len(self.index)} of "
                             f"{self.meta['num_videos']} videos); run the same `cma prepare` again to finish it "
                             f"(it resumes)")

    def covers(self, video_id):
        """True if `cma prepare` handled this video: its frames are here, or why it was skipped."""
        return video_id in self.index

    def __contains__(self, video_id):
        return video_id in self.index and video_id not in self.skipped

    def __getitem__(self, video_id):
        if video_id in self.skipped:
            raise VideoError(self.skipped[video_id])
        if video_id not in self.index:
            raise VideoError(f"video {video_id!r} is not in the frame cache {self.out_dir}")
        path, row, mask = self.index[video_id]
        if path not in self._arrays:   # opened lazily, per process (DataLoader workers each map their own)
            self._arrays[path] = np.load(path, mmap_mode="c")   # copy-on-write: writable views, file untouched
        return self._arrays[path][row], mask
