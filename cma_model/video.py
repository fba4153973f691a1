"""Video reading (files with decord, folders of frame images with PIL), sampled as the paper does
(REFERENCE.md section 5).

Candidates at `sample_fps` (frame floor(k * fps / sample_fps) for k = 0, 1, ...), then
`max_frames` of them picked uniformly (np.linspace(0, n - 1, max_frames) rounded down); a shorter
video keeps every candidate and pads with zero frames, mask False.

decord traps handled here: frames are read one at a time (`vr[i]`), never with `get_batch`, which
hangs for good on some files whose frames `vr[i]` returns (dmlc/decord#375; one at a time is as
fast, measured on 240p and 720p H.264 at 1 fps); indices are clamped to the reported frame count;
a truncated file keeps the frames before the first one that does not decode; the reader is dropped
after each video (decord's memory grows on long videos otherwise). Unreadable, empty or truncated
files raise VideoError naming the file. A read that hangs anyway cannot be interrupted: the training
loader's workers have a timeout, `cma prepare` a per-video one, and a read in the calling process
can end that process (`data.VideoFrames`' hang_exit_s). Frames come out as a player shows them:
decord applies the container's display rotation (phones film portrait that way); tested.

A folder of frame images is a video too (the official code's `images/fps_1/video0.mp4/`: frames
extracted beforehand at some rate): its images in name order, numbers by value, are the
candidates, whatever sample_fps; max_frames of them are picked uniformly, as above. No decord.
"""
import os
import re

import numpy as np


class VideoError(RuntimeError):
    """A video that cannot be read; the message names the file."""


NO_SUCH_FILE = "no such file"   # the end of a missing video's VideoError message


def candidate_indices(num_frames: int, fps: float, sample_fps: float = 1.0):
    """Frame indices at sample_fps: floor(k * fps / sample_fps) for k = 0, 1, ... below num_frames."""
    step = fps / sample_fps if fps > 0 else 1.0
    count = int(np.ceil(num_frames / step)) if num_frames > 0 else 0
    idx = np.floor(np.arange(count) * step).astype(np.int64)
    return idx[idx < num_frames]


def pick_uniform(candidates, max_frames: int):
    """max_frames of the candidates, uniformly (linspace rounded down); all of them if fewer."""
    if len(candidates) <= max_frames:
        return np.asarray(candidates)
    return np.asarray(candidates)[np.linspace(0, len(candidates) - 1, max_frames).astype(np.int64)]


_ffmpeg_quiet = False   # require_decord silences ffmpeg's messages once


def require_decord():
    """decord, or ValueError saying how to get it (PyPI has decord wheels for x86-64 only, so an
    ARM machine such as a Grace Hopper node installs cma without it: a frame cache made elsewhere
    trains and evaluates there; reading videos does not)."""
    try:
        import decord
    except ImportError:
        raise ValueError("reading videos needs decord, which is not installed: `pip install decord` (wheels for "
                         "x86-64 only; elsewhere build it from source, github.com/dmlc/decord), or make the frame "
                         "cache with `cma prepare` on a machine that has it and train from that (--cache)") from None
    global _ffmpeg_quiet
    if not _ffmpeg_quiet:   # once, so that a caller may turn the messages back on
        # ffmpeg's own messages ("moov atom not found", h264 "error while decoding MB"), a line each
        # per broken file or frame, from every loader worker: a video that cannot be read raises
        # VideoError naming it instead, and frames that do not decode are dropped (see above)
        decord.logging.set_level(decord.logging.QUIET)
        _ffmpeg_quiet = True
    return decord


def _open(path):
    if not os.path.isfile(path):   # before decord: a missing file is a skipped video wherever it is missing
        raise VideoError(f"{path}: {NO_SUCH_FILE}")
    if os.path.getsize(path) == 0:
        raise VideoError(f"{path}: empty file")
    decord = require_decord()
    try:
        return decord.VideoReader(path, num_threads=1)
    except Exception as e:   # decord raises its own DECORDError / RuntimeError types
        raise VideoError(f"{path}: cannot open video ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None


def _decode(vr, path, indices):
    """Decode frame indices from an open reader, one by one: uint8 [n_kept, H, W, 3]."""
    frames = []
    for i in np.clip(np.asarray(indices, dtype=np.int64), 0, len(vr) - 1):
        try:
            frames.append(vr[int(i)].asnumpy())
        except Exception:   # decord raises its own DECORDError / RuntimeError types
            break   # frames after a failed one are past the end of a truncated file
    if not frames:
        raise VideoError(f"{path}: no frame decodes (truncated or corrupt)")
    return np.stack(frames)


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def _name_order(name):
    """Sort key: digit runs by value, so that frame_2.jpg comes before frame_10.jpg."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name)]


def _read_frame_folder(path, max_frames):
    """max_frames of a frame folder's images, picked uniformly in name order: uint8 [n, H, W, 3]."""
    from PIL import Image
    names = sorted((n for n in os.listdir(path) if n.lower().endswith(IMAGE_EXTENSIONS)), key=_name_order)
    if not names:
        raise VideoError(f"{path}: a folder without frame images ({' '.join(IMAGE_EXTENSIONS)})")
    frames = []
    for i in pick_uniform(np.arange(len(names)), max_frames):
        image = os.path.join(path, names[i])
        try:
            with Image.open(image) as im:
                frames.append(np.asarray(im.convert("RGB")))
        except (OSError, ValueError) as e:   # PIL's UnidentifiedImageError and truncated files are OSErrors
            raise VideoError(f"{image}: cannot read frame ({type(e).__name__}: {str(e)[:120]})") from None
    sizes = sorted({f.shape[:2] for f in frames})
    if len(sizes) > 1:
        raise VideoError(f"{path}: frames of different sizes (height, width: {', '.join(map(str, sizes))})")
    return np.stack(frames)


def sample_frames(path, max_frames: int = 12, sample_fps: float = 1.0):
    """Paper sampling of one video, a file or a folder of frame images: (frames uint8 [max_frames,
    H, W, 3], mask bool [max_frames]). Padded slots are zero with mask False. Raises VideoError
    naming the file if it cannot be read."""
    if max_frames < 1 or sample_fps <= 0:
        raise ValueError(f"max_frames must be >= 1 and sample_fps > 0, got {max_frames}, {sample_fps}")
    if os.path.isdir(path):
        frames = _read_frame_folder(path, max_frames)
    else:
        vr = _open(path)
        try:
            try:
                n, fps = len(vr), float(vr.get_avg_fps() or 0.0)
            except Exception as e:
                raise VideoError(f"{path}: cannot read stream info ({type(e).__name__})") from None
            if n <= 0:
                raise VideoError(f"{path}: no frames")
            frames = _decode(vr, path, pick_uniform(candidate_indices(n, fps, sample_fps), max_frames))
        finally:
            del vr   # decord's memory grows on long videos unless the reader goes
    out = np.zeros((max_frames, *frames.shape[1:]), dtype=np.uint8)
    out[:len(frames)] = frames
    mask = np.zeros(max_frames, dtype=bool)
    mask[:len(frames)] = True
    return out, mask
