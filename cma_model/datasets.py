"""Text-video datasets in the file layouts CLIP4Clip users already have (REFERENCE.md section 6).

Every loader returns an `Annotations`: video ids and paths, captions, and which video each caption
belongs to. Paragraph datasets (ActivityNet, DiDeMo) join a video's sentences into one caption.
Malformed files raise AnnotationError naming the file and the line or key at fault.

Layouts (`root` holds the annotation files, `video_dir` the videos: files, or folders of frame
images named by the video id or file name, as the official code's images/fps_1/video0.mp4/; files
may also sit up to 3 folders below video_dir, as CLIP4Clip finds them, see VideoFinder):
- msrvtt: MSRVTT_data.json (`sentences`: video_id, caption), MSRVTT_train.9k.csv or
  MSRVTT_train.7k.csv (column video_id), MSRVTT_JSFUSION_test.csv (video_id, sentence); videoN.mp4.
- msvd: {train,val,test}_list.txt (a video id per line), raw-captions.pkl ({id: [[tokens]]}); id.avi.
- didemo: {train,val,test}_data.json ([{"video": file, "description": text}, ...]), {split}_list.txt
  optional filter (file names, as CLIP4Clip's); paragraph per video; the file named by "video", as
  CLIP4Clip opens it, else the id with an extension of VIDEO_EXTENSIONS (a re-encoded copy).
- activitynet: {train,val_1}.json ({id: {"sentences": [...]}}), {train,val}_ids.json optional
  filter; paragraph per video; id.mp4, or without the id's v_ as CLIP4Clip names them.
- vatex: {train,test}_list.txt and ref_captions.json ({id: [captions]}); id.mp4.
- jsonl: one {"video": path, "caption": text} per line, in one file or one {split}.jsonl per split
  in a folder; relative paths against the file's folder;
  the video id is the path as written, without its extension.
"""
import csv
import json
import os
import pickle
from dataclasses import dataclass, field

from .video import IMAGE_EXTENSIONS, require_decord

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg", ".3gp", ".wmv", ".flv")


class AnnotationError(ValueError):
    """A malformed annotation file; the message names the file and the line or key."""


@dataclass
class Annotations:
    """One split: parallel lists of video ids and paths, and captions with the index of their video."""
    video_ids: list = field(default_factory=list)
    video_paths: list = field(default_factory=list)
    captions: list = field(default_factory=list)
    caption_video: list = field(default_factory=list)   # caption i belongs to video caption_video[i]

    def add(self, video_id, path, captions):
        self.video_ids.append(video_id)
        self.video_paths.append(path)
        for c in captions:
            self.captions.append(c)
            self.caption_video.append(len(self.video_ids) - 1)

    def __len__(self):
        return len(self.captions)


WALK_DEPTH = 3   # CLIP4Clip's layouts nest videos up to 2 folders deep (ActivityNet's v1-2/train/)


class VideoFinder:
    """video id -> its video under video_dir: a file named by the id, as is or with an extension of
    VIDEO_EXTENSIONS, or a folder of its frame images named so, at the top of video_dir; else a file
    up to WALK_DEPTH folders below it, as CLIP4Clip's loaders find videos (they walk the tree:
    ActivityNet's downloads come in v1-2/train, v1-2/val, ...). The tree is walked once, at the
    first video not at the top, and where names repeat the first in sorted order is taken. `names`
    after the id are other names of the same video (ActivityNet's v_<id> is <id>.mp4 on CLIP4Clip's
    disks)."""

    def __init__(self, video_dir):
        self.video_dir, self._below = video_dir, None

    def __call__(self, video_id, *names):
        names = (video_id, *names)
        for name in names:   # a file first, then a folder: the official code's is named <id>.mp4
            at_top = [os.path.join(self.video_dir, name + ext) for ext in ("",) + VIDEO_EXTENSIONS]
            found = next((p for p in at_top if os.path.isfile(p)), None) or next(filter(os.path.isdir, at_top), None)
            if found:
                return found
        if self._below is None:
            self._below = self._walk()
        found = next((self._below[name] for name in names if name in self._below), None)
        if found:
            return found
        named = os.path.splitext(video_id)[1].lower() in VIDEO_EXTENSIONS   # DiDeMo's ids are file names
        return os.path.join(self.video_dir, video_id if named else video_id + ".mp4")   # reported when read

    def _walk(self):
        """{file name, and file name without a video extension: path} for every file up to WALK_DEPTH
        folders below video_dir but frame images (a tree of frame folders holds many). The depth
        bounds the walk of a mistaken --video-dir such as a home folder."""
        below = {}
        for folder, subfolders, files in os.walk(self.video_dir):
            below_top = os.path.relpath(folder, self.video_dir)
            depth = 0 if below_top == os.curdir else below_top.count(os.sep) + 1
            subfolders[:] = sorted(subfolders) if depth < WALK_DEPTH else []
            for name in sorted(files):
                stem, ext = os.path.splitext(name)
                if ext.lower() in IMAGE_EXTENSIONS:
                    continue
                path = os.path.join(folder, name)
                below.setdefault(name, path)
                if ext.lower() in VIDEO_EXTENSIONS:
                    below.setdefault(stem, path)
        return below


def check_sources(paths, what):
    """Refuses (ValueError) video `paths` (`what` they are, e.g. "of split 'train'") none of which is
    a file or a folder of frames, which a wrong --root or --video-dir gives, and video files to
    decode without decord (folders of frame images need none). Each scan stops at its first find."""
    if paths and not any(os.path.exists(p) for p in paths):
        raise ValueError(f"none of the {len(paths)} videos {what} is a file or a folder of frames, e.g. "
                         f"{paths[0]}: check --root and --video-dir (default ROOT/videos; videos are looked for "
                         f"up to {WALK_DEPTH} folders below it)")
    if any(os.path.isfile(p) for p in paths):
        require_decord()


def _read_json(path):
    if not os.path.isfile(path):
        raise AnnotationError(f"{path}: no such annotation file")
    with open(path, encoding="utf-8-sig") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise AnnotationError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None


def _read_csv(path, columns):
    if not os.path.isfile(path):
        raise AnnotationError(f"{path}: no such annotation file")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise AnnotationError(f"{path}:1: missing column(s) {missing}; found {reader.fieldnames}")
        rows = []
        for line, row in enumerate(reader, start=2):
            if any(not row.get(c) for c in columns):
                raise AnnotationError(f"{path}:{line}: empty value for {columns}")
            rows.append(row)
        return rows


def _read_list(path):
    if not os.path.isfile(path):
        raise AnnotationError(f"{path}: no such annotation file")
    with open(path, encoding="utf-8-sig") as f:
        return [line.strip() for line in f if line.strip()]


def _key(obj, key, path, where):
    if not isinstance(obj, dict) or key not in obj:
        raise AnnotationError(f"{path}: {where}: missing key {key!r}")
    return obj[key]


def _texts(value, path, where):
    """A list of caption strings (a single string is one caption); anything else names the place."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise AnnotationError(f"{path}: {where}: expected a caption string or a list of them, got {str(value)[:80]}")


def load_msrvtt(root, split="test", video_dir=None):
    """split "train" (9k) or "train7k": every caption of every video in MSRVTT_train.9k.csv /
    MSRVTT_train.7k.csv; "test" (1k-A): the 1000 pairs of MSRVTT_JSFUSION_test.csv."""
    if split not in ("train", "train7k", "test"):
        raise ValueError(f"msrvtt split must be train, train7k or test, got {split!r}")
    train_csv = "MSRVTT_train.7k.csv" if split == "train7k" else "MSRVTT_train.9k.csv"
    find = VideoFinder(video_dir or os.path.join(root, "videos"))
    ann = Annotations()
    if split == "test":
        for row in _read_csv(os.path.join(root, "MSRVTT_JSFUSION_test.csv"), ["video_id", "sentence"]):
            ann.add(row["video_id"], find(row["video_id"]), [row["sentence"]])
        return ann
    ids = [row["video_id"] for row in _read_csv(os.path.join(root, train_csv), ["video_id"])]
    path = os.path.join(root, "MSRVTT_data.json")
    sentences = _key(_read_json(path), "sentences", path, "top level")
    by_video = {}
    for i, s in enumerate(sentences):
        where = f"sentences[{i}]"
        by_video.setdefault(_key(s, "video_id", path, where), []).append(_key(s, "caption", path, where))
    for vid in ids:
        if vid not in by_video:
            raise AnnotationError(f"{path}: no sentences for video_id {vid!r} listed in {train_csv}")
        ann.add(vid, find(vid), by_video[vid])
    return ann


def load_msvd(root, split="test", video_dir=None):
    """MSVD as CLIP4Clip has it: `{split}_list.txt` and `raw-captions.pkl` (token lists) in `root`."""
    find = VideoFinder(video_dir or os.path.join(root, "videos"))
    path = os.path.join(root, "raw-captions.pkl")
    if not os.path.isfile(path):
        raise AnnotationError(f"{path}: no such annotation file")
    with open(path, "rb") as f:
        captions = pickle.load(f)   # CLIP4Clip's format: only load files you trust
    ann = Annotations()
    for vid in _read_list(os.path.join(root, f"{split}_list.txt")):
        tokens = _key(captions, vid, path, f"video listed in {split}_list.txt")
        ann.add(vid, find(vid), [" ".join(t) if isinstance(t, list) else str(t) for t in tokens])
    return ann


def load_didemo(root, split="test", video_dir=None):
    """Paragraph-to-video retrieval on {split}_data.json: a video's descriptions joined, in order."""
    find = VideoFinder(video_dir or os.path.join(root, "videos"))
    path = os.path.join(root, f"{split}_data.json")
    list_path = os.path.join(root, f"{split}_list.txt")
    listed = set(_read_list(list_path)) if os.path.isfile(list_path) else None
    paragraphs, files = {}, {}   # video id -> its sentences, its file name as written
    for i, item in enumerate(_read_json(path)):
        video = _key(item, "video", path, f"entry {i}")
        if not isinstance(video, str):
            raise AnnotationError(f"{path}: entry {i}: expected a video file name, got {str(video)[:80]}")
        vid = os.path.splitext(video)[0]
        if listed is not None and video not in listed and vid not in listed:
            continue
        files.setdefault(vid, video)
        paragraphs.setdefault(vid, []).extend(
            _texts(_key(item, "description", path, f"entry {i}"), path, f"entry {i}"))
    if listed is not None and not paragraphs:
        raise AnnotationError(f"{list_path}: names none of the videos of {path}")
    ann = Annotations()
    for vid, sentences in paragraphs.items():   # the file as named, else a re-encoded copy: the id + an extension
        ann.add(vid, find(files[vid], vid), [" ".join(s.strip() for s in sentences)])
    return ann


def load_activitynet(root, split="test", video_dir=None):
    """Paragraph-to-video retrieval: "train" reads train.json, "test"/"val" reads val_1.json."""
    find = VideoFinder(video_dir or os.path.join(root, "videos"))
    path = os.path.join(root, "train.json" if split == "train" else "val_1.json")
    data = _read_json(path)
    ids_path = os.path.join(root, "train_ids.json" if split == "train" else "val_ids.json")
    ids = _read_json(ids_path) if os.path.isfile(ids_path) else list(data)
    ann = Annotations()
    for vid in ids:
        sentences = _texts(_key(_key(data, vid, path, "top level"), "sentences", path, vid), path, vid)
        youtube_id = vid[2:] if vid.startswith("v_") else vid   # CLIP4Clip's file names drop the v_
        ann.add(vid, find(vid, youtube_id), [" ".join(s.strip() for s in sentences)])
    return ann


def load_vatex(root, split="test", video_dir=None):
    """VATEX as CLIP4Clip has it: `{split}_list.txt` and `ref_captions.json` in `root`."""
    find = VideoFinder(video_dir or os.path.join(root, "videos"))
    path = os.path.join(root, "ref_captions.json")
    captions = _read_json(path)
    ann = Annotations()
    for vid in _read_list(os.path.join(root, f"{split}_list.txt")):
        where = f"video in {split}_list.txt"
        ann.add(vid, find(vid), _texts(_key(captions, vid, path, where), path, vid))
    return ann


def load_jsonl(path, split=None, video_dir=None):
    """One {"video": path, "caption": text} per line; lines of the same video share it. `path` is
    the file (whatever the split), or a folder holding one `{split}.jsonl` per split."""
    if os.path.isdir(path):
        path = os.path.join(path, f"{split}.jsonl")
    if not os.path.isfile(path):
        raise AnnotationError(f"{path}: no such annotation file")
    base = video_dir or os.path.dirname(os.path.abspath(path))
    ann, index, ids = Annotations(), {}, {}   # index: path -> row; ids: video id -> the path as written
    with open(path, encoding="utf-8-sig") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise AnnotationError(f"{path}:{line_no}: invalid JSON ({e.msg})") from None
            if not (isinstance(item, dict) and isinstance(item.get("video"), str)
                    and isinstance(item.get("caption"), str)):
                raise AnnotationError(f'{path}:{line_no}: expected {{"video": str, "caption": str}}, '
                                      f'got {line.strip()[:80]}')
            video = os.path.normpath(os.path.join(base, item["video"]))
            if video not in index:
                # the id keys the frame cache: the path as written, not its base name, so that
                # a/clip.mp4 and b/clip.mp4 are two videos; the extension is dropped, as for the
                # CLIP4Clip datasets' ids
                video_id = os.path.splitext(os.path.normpath(item["video"]))[0]
                if video_id in ids:
                    raise AnnotationError(f"{path}:{line_no}: {item['video']} and {ids[video_id]} share the "
                                          f"video id {video_id!r} (the name without extension); rename one")
                ids[video_id] = item["video"]
                index[video] = len(ann.video_ids)
                ann.video_ids.append(video_id)
                ann.video_paths.append(video)
            ann.captions.append(item["caption"])
            ann.caption_video.append(index[video])
    if not ann.captions:
        raise AnnotationError(f"{path}: no entries")
    return ann


LOADERS = {"msrvtt": load_msrvtt, "msvd": load_msvd, "didemo": load_didemo, "activitynet": load_activitynet,
           "vatex": load_vatex, "jsonl": load_jsonl}


def load_annotations(dataset, root, split="test", video_dir=None):
    """Annotations of `dataset` (one of LOADERS) at `root` (for jsonl: the .jsonl file)."""
    if dataset not in LOADERS:
        raise ValueError(f"unknown dataset {dataset!r}; choose from {sorted(LOADERS)}")
    try:
        ann = LOADERS[dataset](root, split=split, video_dir=video_dir)
    except UnicodeDecodeError as e:   # annotation files are read as UTF-8
        raise AnnotationError(f"{dataset} {split} annotations at {root}: not UTF-8 text (byte {e.start}: "
                              f"{e.reason}); convert the file, e.g. iconv -f latin1 -t utf-8") from None
    if not ann.captions:   # an empty list or split file: nothing to train on or to rank
        raise AnnotationError(f"{dataset} {split} at {root}: no captions (empty split)")
    return ann
