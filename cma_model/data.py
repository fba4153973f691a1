"""Training and evaluation data: captions with their videos' frames, from video files or a frame cache.

A video that cannot be read is never fed to the model as zeros or NaN: its item comes back as
None, `collate` drops it and lists it under "skipped", and the trainer counts and reports them.
"""
import contextlib
import os
import shutil
import signal
import sys
import threading

import torch

from cma_kernels.preprocess import CLIP_MEAN, CLIP_STD, normalize_frames, preprocess_frames

from .video import VideoError, sample_frames


def tokenize(tokenizer, captions, max_words=32, context_length=77):
    """open_clip tokens truncated to max_words (start and end tokens included), zero-padded to
    max_words, not to the text tower's context_length (checked against it): LongTensor
    [len(captions), max_words]. cma_model.retrieval.encode_text encodes them at that length."""
    if not 2 <= max_words <= context_length:
        raise ValueError(f"max_words must be in [2, {context_length}], got {max_words}")
    return tokenizer(list(captions), context_length=max_words)


class VideoFrames:
    """Frames of one video as model input: (float [T, 3, S, S] normalised, mask bool [T]); with
    raw=True (uint8 [T, S, S, 3] resized and cropped, mask), left for the GPU to normalise
    (`normalize_frames`), so a loader ships a quarter of the bytes. Padded slots hold zeros (raw:
    zero pixels). From `cache` (a FrameCache) for the videos it covers, else decoded from the file
    (a cache made for the training split still serves an evaluation on another split).

    hang_exit_s: a decode that has not returned after this many seconds ends the process (exit 2,
    naming the file), where it runs in the calling process (a loader without workers): nothing in
    the process can interrupt a decoder stuck in C. In a DataLoader worker the loader's timeout
    watches instead. None: no watch."""

    def __init__(self, cache=None, max_frames=12, size=224, sample_fps=1.0, mean=CLIP_MEAN, std=CLIP_STD,
                 raw=False, hang_exit_s=None):
        if cache is not None:
            made = {k: cache.meta[k] for k in ("max_frames", "size", "sample_fps")}
            wanted = {"max_frames": max_frames, "size": size, "sample_fps": sample_fps}
            if made != wanted:
                raise ValueError(f"the frame cache {cache.out_dir} was made with {made}, this run needs {wanted}; "
                                 f"run `cma prepare` with those settings into another folder")
        self.cache, self.max_frames, self.size, self.sample_fps = cache, max_frames, size, sample_fps
        self.mean, self.std, self.raw, self.hang_exit_s = mean, std, raw, hang_exit_s

    def __call__(self, video_id, path):
        if self.cache is not None and self.cache.covers(video_id):
            frames, mask = self.cache[video_id]   # VideoError where `cma prepare` skipped it
            if self.raw:   # the cache holds exactly the resized, cropped uint8 frames
                return torch.from_numpy(frames), torch.from_numpy(mask)
        else:
            with _exit_if_hung(path, self.hang_exit_s):
                frames, mask = sample_frames(path, self.max_frames, self.sample_fps)
        dtype = torch.uint8 if self.raw else torch.float32
        if mask.all():   # the common case: no masked gather and scatter
            return self._preprocess(frames, dtype), torch.from_numpy(mask)
        shape = (self.max_frames, self.size, self.size, 3) if self.raw else (self.max_frames, 3, self.size, self.size)
        out = torch.zeros(shape, dtype=dtype)
        out[torch.from_numpy(mask)] = self._preprocess(frames[mask], dtype)
        return out, torch.from_numpy(mask)

    def example_batch(self, n):
        """A batch of n videos as a loader stacks this object's frames, every frame blank: (frames
        uint8 [n, T, S, S, 3] if raw else float [n, T, 3, S, S], mask bool [n, T] all True)."""
        shape = (self.max_frames, self.size, self.size, 3) if self.raw else (self.max_frames, 3, self.size, self.size)
        frames = torch.zeros(n, *shape, dtype=torch.uint8 if self.raw else torch.float32)
        return frames, torch.ones(n, self.max_frames, dtype=torch.bool)

    def video_bytes(self):
        """Bytes of one video's frames as this object returns them (uint8 raw, else fp32)."""
        return self.max_frames * 3 * self.size ** 2 * (1 if self.raw else 4)

    def _preprocess(self, frames, dtype):
        return preprocess_frames(torch.from_numpy(frames), self.size, self.mean, self.std, dtype)

    def to_model_input(self, frames, device):
        """A batch of this object's frames [..., T, ...] -> normalised float [..., T, 3, S, S] on
        `device` (raw uint8 frames are normalised there; float frames pass through)."""
        frames = frames.to(device, non_blocking=True)
        return normalize_frames(frames, self.mean, self.std) if frames.dtype == torch.uint8 else frames


class CaptionVideoDataset(torch.utils.data.Dataset):
    """Item i: caption i with its video. {"frames", "mask", "tokens", "video", "caption_index"}, or
    None (with the reason kept in "skipped" by collate) when the video cannot be read."""

    def __init__(self, annotations, tokenizer, frames: VideoFrames, max_words=32, context_length=77):
        self.ann, self.frames = annotations, frames
        self.tokens = tokenize(tokenizer, annotations.captions, max_words, context_length)

    def __len__(self):
        return len(self.ann.captions)

    def __getitem__(self, i):
        v = self.ann.caption_video[i]
        try:
            frames, mask = self.frames(self.ann.video_ids[v], self.ann.video_paths[v])
        except VideoError as e:
            return {"skipped": str(e)}
        return {"frames": frames, "mask": mask, "tokens": self.tokens[i], "video": v, "caption_index": i}


class VideoDataset(torch.utils.data.Dataset):
    """Item v: the frames of video v (for evaluation, which encodes each video once)."""

    def __init__(self, annotations, frames: VideoFrames):
        self.ann, self.frames = annotations, frames

    def __len__(self):
        return len(self.ann.video_ids)

    def __getitem__(self, v):
        try:
            frames, mask = self.frames(self.ann.video_ids[v], self.ann.video_paths[v])
        except VideoError as e:
            return {"skipped": str(e), "video": v}
        return {"frames": frames, "mask": mask, "video": v}


LOADER_TIMEOUT_S = 600   # a loader worker silent this long is hung (decord can hang on a broken file)
RESUMES = "a training run continues from its last checkpoint with --resume"
WHAT_TO_DO = f"`cma prepare` caches the frames and skips such videos (then pass --cache); {RESUMES}"


@contextlib.contextmanager
def _exit_if_hung(path, seconds):
    """VideoFrames.hang_exit_s: end the process, saying why, if the block has not finished reading
    `path` in `seconds`; no watch where seconds is None or in a DataLoader worker."""
    if seconds is None or torch.utils.data.get_worker_info() is not None:
        yield
        return
    timer = threading.Timer(seconds, _hung, (path, seconds))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def _hung(path, seconds):
    print(f"\nerror: {path}: no frames after {seconds:g} s, its video decoder hangs. {WHAT_TO_DO}",   # past a bar
          file=sys.stderr, flush=True)
    os._exit(2)   # the main thread is stuck in the decoder: no exception can reach it


SHARED_MEMORY = "/dev/shm"   # where a loader worker's batches go (torch's shm_open) until the main process frees them
PREFETCH = 2   # DataLoader's default prefetch_factor: batches each worker makes ahead
_said = set()   # shared-memory notes already printed in this process


def loader_workers(workers, batch_bytes, say=True):
    """The DataLoader workers (at most `workers`) whose batches of `batch_bytes` fit in SHARED_MEMORY.
    A worker stacks each batch there, PREFETCH batches ahead, and it stays until the main process
    is done with it: up to 2 * workers + 2 batches at a time, times the processes on this machine
    (torchrun's LOCAL_WORLD_SIZE). A container's /dev/shm is 64 MiB unless raised, and PyTorch's
    workers fail there ("unable to allocate shared memory", or a bus error) at the first batches:
    fewer workers instead, 0 (batches made in this process) if even one does not fit, with a note
    saying so where `say`."""
    if workers == 0 or not os.path.isdir(SHARED_MEMORY) or batch_bytes <= 0:
        return workers
    share = shutil.disk_usage(SHARED_MEMORY).free // int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    fit = max(0, min(workers, (share // batch_bytes - 2) // PREFETCH))
    if fit < workers and say and (workers, fit, batch_bytes) not in _said:
        _said.add((workers, fit, batch_bytes))
        print(f"note: {SHARED_MEMORY} has {share / 2**20:,.0f} MiB free for this process and a batch takes "
              f"{batch_bytes / 2**20:,.0f} MiB there ({PREFETCH * workers + 2} at a time with {workers} loader "
              f"workers): {fit} worker(s) instead{' (batches made in this process)' if fit == 0 else ''}; raise "
              f"it for more (a container: docker run --shm-size 8g)", file=sys.stderr)
    return fit


def video_loader(dataset, frames, batch_size, workers, device, sampler=None, say=True):
    """The DataLoader `cma train` and `cma eval` read: items of `dataset` (frames from the VideoFrames
    `frames`) in batches of `batch_size` through `collate`, by the loader_workers(workers, ...) that
    fit shared memory, with a timeout for a hung decoder and stop signals ignored in the workers;
    pinned for a CUDA `device`. Iterate it with batches()."""
    items = len(dataset) if sampler is None else len(sampler)
    workers = loader_workers(workers, min(batch_size, items) * frames.video_bytes(), say)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                                       collate_fn=collate, timeout=LOADER_TIMEOUT_S if workers else 0,
                                       pin_memory=device.type == "cuda", worker_init_fn=ignore_stop_signals)


def loader_error(error, timeout=LOADER_TIMEOUT_S):
    """The ValueError saying what to do for a DataLoader's RuntimeError `error` where a worker was
    silent for `timeout` seconds (a hung decoder), died (a decoder's segmentation fault; PyTorch
    raises that one wherever the main process is, through its SIGCHLD handler, often mid-step; or,
    where it died while the main process fetched a batch's shared memory from it, a
    ConnectionError) or ran out of shared memory; None for any other error."""
    # a worker's "unable to allocate shared memory(shm) for file", or a bus error's "... is killed by
    # signal: Bus error. It is possible that dataloader's workers are out of shared memory."
    if "unable to allocate shared memory" in str(error) or "out of shared memory" in str(error):
        size = shutil.disk_usage(SHARED_MEMORY).total / 2**20 if os.path.isdir(SHARED_MEMORY) else 0
        return ValueError(f"the data-loading workers ran out of shared memory ({SHARED_MEMORY} holds {size:,.0f} "
                          f"MiB): raise it (a container: docker run --shm-size 8g) or lower --workers (0: batches "
                          f"made in the training process); {RESUMES}")
    if "DataLoader timed out" in str(error):
        what = f"no batch from the data-loading workers in {timeout:g} s: a video decoder that hangs?"
    elif str(error).startswith("DataLoader worker (pid") or isinstance(error, ConnectionError):
        # "DataLoader worker (pid N) exited unexpectedly", "... is killed by signal"; "[Errno 104] Connection reset"
        what = (f"a data-loading worker died ({str(error).rstrip('.')}): a video decoder that crashed on a broken "
                f"file, or the machine out of memory?")
    else:
        return None
    return ValueError(f"{what} {WHAT_TO_DO}")


def batches(loader):
    """The batches of `loader` (a DataLoader with timeout=LOADER_TIMEOUT_S). A worker silent that
    long, or one that died, ends it with loader_error's ValueError saying what to do, instead of
    PyTorch's bare RuntimeError."""
    try:
        yield from loader
    except (RuntimeError, ConnectionError) as e:   # ConnectionError: a worker died handing a batch over
        error = loader_error(e, loader.timeout) if loader.num_workers else None
        if error is None:
            raise
        raise error from None


def ignore_stop_signals(worker_id=None):
    """DataLoader worker_init_fn: workers ignore SIGINT, SIGTERM and SIGHUP (the trainer's stop
    signals), which a terminal's Ctrl-C, a job scheduler or a terminal that hung up sends to every
    process. The main process decides when to stop (the trainer finishes its step and checkpoints)
    and shuts its loaders down; a worker killed by the signal would instead fail the batch the main
    process is waiting for. Workers still exit when the main process is gone (PyTorch's worker
    watchdog)."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)


def collate(items):
    """Stack the readable items; list the unreadable ones under "skipped" (messages naming the file)."""
    good = [it for it in items if "frames" in it]
    batch = {"skipped": [it["skipped"] for it in items if "frames" not in it],
             "skipped_videos": [it["video"] for it in items if "frames" not in it and "video" in it]}
    if good:   # default_collate stacks straight into shared memory in a loader worker: no copy to send it
        batch.update(torch.utils.data.default_collate(good))
    return batch
