"""cma_model.video: paper sampling on real mp4 files and folders of frame images, masks, and unreadable
files."""
import numpy as np
import pytest
from conftest import bar_frame, frame_index, requires_decord, write_video

from cma_model.video import VideoError, candidate_indices, pick_uniform, sample_frames


def expected_indices(num_frames, fps, max_frames=12, sample_fps=1.0):
    """Independent statement of the rule: one frame per 1/sample_fps seconds, then 12 uniformly."""
    cands = [int(k * fps / sample_fps) for k in range(10 ** 6) if int(k * fps / sample_fps) < num_frames]
    if len(cands) <= max_frames:
        return cands
    return [cands[int(j)] for j in np.linspace(0, len(cands) - 1, max_frames)]


@requires_decord
@pytest.mark.parametrize("num_frames,fps", [(200, 10), (45, 10), (121, 6), (5, 25), (150, 30)])
def test_sampled_frames_are_the_right_ones(tmp_path, num_frames, fps):
    path = write_video(tmp_path / "v.mp4", num_frames, fps)
    frames, mask = sample_frames(path)
    want = expected_indices(num_frames, fps)
    assert frames.shape == (12, 64, 96, 3) and frames.dtype == np.uint8
    assert mask.tolist() == [True] * len(want) + [False] * (12 - len(want))
    assert [frame_index(f) for f in frames[:len(want)]] == [i % 256 for i in want]
    assert not frames[len(want):].any()   # padding is zero, and masked out


def test_candidate_rule_helpers():
    assert candidate_indices(45, 10.0).tolist() == [0, 10, 20, 30, 40]
    assert candidate_indices(10, 29.97).tolist() == [0]
    assert candidate_indices(61, 2.0, sample_fps=0.5).tolist() == list(range(0, 61, 4))
    assert pick_uniform(list(range(30)), 12).tolist() == np.linspace(0, 29, 12).astype(int).tolist()


@requires_decord
def test_other_max_frames_and_fps(tmp_path):
    path = write_video(tmp_path / "v.mp4", 100, fps=10)
    frames, mask = sample_frames(path, max_frames=4, sample_fps=2.0)
    want = expected_indices(100, 10, max_frames=4, sample_fps=2.0)
    assert mask.all() and [frame_index(f) for f in frames] == want


@requires_decord
def test_frames_are_read_one_by_one_never_with_get_batch(tmp_path, monkeypatch):
    """decord's get_batch hangs for good, holding the GIL, on some files whose frames vr[i] reads
    (dmlc/decord#375): sample_frames never calls it."""
    import decord
    batch_reads = []
    monkeypatch.setattr(decord.VideoReader, "get_batch", lambda self, indices: batch_reads.append(indices))
    path = write_video(tmp_path / "v.mp4", 121, fps=6)
    frames, mask = sample_frames(path)
    assert batch_reads == []
    assert [frame_index(f) for f in frames[mask]] == expected_indices(121, 6)


@requires_decord
@pytest.mark.parametrize("rotation", [90, -90, 180])
def test_a_video_with_a_display_rotation_is_read_upright(tmp_path, rotation):
    """Phones film portrait as landscape frames plus a rotation in the container (DiDeMo's Flickr
    videos, VATEX's YouTube ones): the frames come out as a player shows them. The reference is
    PyAV: its stored frames turned by its own frame.rotation (counter-clockwise) with np.rot90."""
    import av
    path = write_video(tmp_path / "v.mp4", 45, fps=10, rotation=rotation)
    with av.open(path) as container:
        stored = [f for f in container.decode(video=0)]
    turns = stored[0].rotation // 90
    assert (turns - rotation // 90) % 4 == 0   # PyAV reads back what the file says (180 as -180)
    want = expected_indices(45, 10)
    upright = [np.rot90(stored[i].to_ndarray(format="rgb24"), turns) for i in want]
    frames, mask = sample_frames(path)
    assert mask.sum() == len(want) and frames.shape[1:] == upright[0].shape
    for got, ref in zip(frames[mask], upright):   # two ffmpeg builds' YUV->RGB: within 3 levels on average
        assert np.abs(got.astype(int) - ref.astype(int)).mean() < 3.0
    assert [frame_index(np.rot90(f, -turns)) for f in frames[mask]] == want


@requires_decord
def test_missing_empty_and_corrupt_files_name_the_file(tmp_path):
    with pytest.raises(VideoError, match="nope.mp4: no such file"):
        sample_frames(str(tmp_path / "nope.mp4"))
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(VideoError, match="empty.mp4: empty file"):
        sample_frames(str(tmp_path / "empty.mp4"))
    (tmp_path / "junk.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(VideoError, match="junk.mp4"):
        sample_frames(str(tmp_path / "junk.mp4"))


@requires_decord
def test_ffmpeg_says_nothing_of_a_broken_file_the_error_names(tmp_path, capfd):
    """ffmpeg's own lines ("[mov,mp4,... @ 0x...] moov atom not found"), one per broken file or
    frame from every loader worker, are silenced: the VideoError names the file instead."""
    mp4_header = b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom"   # ffmpeg reads it as mp4: no moov box
    junk = np.random.default_rng().integers(0, 256, 5000, dtype=np.uint8).tobytes()
    (tmp_path / "junk.mp4").write_bytes(mp4_header + junk)
    with pytest.raises(VideoError, match="junk.mp4"):
        sample_frames(str(tmp_path / "junk.mp4"))
    ffmpeg_lines = [line for line in capfd.readouterr().err.splitlines() if line.startswith("[") and " @ 0x" in line]
    assert ffmpeg_lines == []


@requires_decord
def test_truncated_file_keeps_what_decodes_or_fails_clearly(tmp_path):
    path = write_video(tmp_path / "v.mp4", 200, fps=10)
    data = open(path, "rb").read()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 2])
    try:
        frames, mask = sample_frames(str(tmp_path / "cut.mp4"))
    except VideoError as e:
        assert "cut.mp4" in str(e)
    else:   # whatever came back is real frames of the video, in order, never garbage
        got = [frame_index(f) for f in frames[mask]]
        assert got == sorted(got) and set(got) <= set(range(200))


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="max_frames"):
        sample_frames(str(tmp_path / "v.mp4"), max_frames=0)


def test_without_decord_reading_says_how_to_get_it(tmp_path, monkeypatch):
    import sys
    path = write_video(tmp_path / "a.mp4", 20, fps=10)
    monkeypatch.setitem(sys.modules, "decord", None)   # `import decord` raises ImportError
    with pytest.raises(ValueError, match="reading videos needs decord, which is not installed"):
        sample_frames(path)


def write_frame_folder(folder, num_frames, ext="png"):
    """Frame i = bar_frame(i) as frame_{i}.{ext}, numbers unpadded (name order needs their value),
    written in reverse, beside a file that is not an image."""
    from PIL import Image
    folder.mkdir()
    for i in reversed(range(num_frames)):
        Image.fromarray(bar_frame(i)).save(folder / f"frame_{i}.{ext}")
    (folder / "info.txt").write_text("extracted at 1 fps")
    return str(folder)


@pytest.mark.parametrize("num_frames, ext, name", [(30, "png", "video7"), (30, "jpg", "video7.mp4"),
                                                   (5, "jpg", "video7")])
def test_a_folder_of_frame_images_is_a_video_read_without_decord(tmp_path, monkeypatch, num_frames, ext, name):
    """The official code's images/fps_1/<video file name>/ layout (video7.mp4/; video7/ too): the
    images in name order (numbers by value) are the candidates, max_frames of them picked
    uniformly, whatever sample_fps; no decord."""
    import sys
    monkeypatch.setitem(sys.modules, "decord", None)   # `import decord` raises ImportError
    path = write_frame_folder(tmp_path / name, num_frames, ext)
    frames, mask = sample_frames(path, sample_fps=0.25)
    want = [int(j) for j in np.linspace(0, num_frames - 1, 12)] if num_frames > 12 else list(range(num_frames))
    assert frames.shape == (12, 64, 96, 3) and frames.dtype == np.uint8
    assert mask.tolist() == [True] * len(want) + [False] * (12 - len(want))
    assert [frame_index(f) for f in frames[mask]] == want
    assert not frames[~mask].any()


def test_unreadable_frame_folders_name_the_folder_or_the_image(tmp_path):
    from PIL import Image
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no frames here")
    with pytest.raises(VideoError, match="empty: a folder without frame images"):
        sample_frames(str(tmp_path / "empty"))
    path = write_frame_folder(tmp_path / "broken", 3)
    (tmp_path / "broken" / "frame_1.png").write_bytes(b"not a png")
    with pytest.raises(VideoError, match=r"broken/frame_1.png: cannot read frame"):
        sample_frames(path)
    path = write_frame_folder(tmp_path / "sizes", 3)
    Image.fromarray(bar_frame(2, height=32)).save(tmp_path / "sizes" / "frame_2.png")
    with pytest.raises(VideoError, match=r"sizes: frames of different sizes \(height, width: \(32, 96\), \(64, 96\)\)"):
        sample_frames(path)
