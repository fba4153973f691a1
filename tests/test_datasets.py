"""cma_model.datasets: every supported layout on tiny fixture files, and malformed-file errors."""
import json
import os
import pickle

import pytest

from cma_model.datasets import AnnotationError, load_annotations


def write(path, text):
    path.write_text(text)
    return path


@pytest.fixture
def msrvtt(tmp_path):
    data = {"videos": [{"video_id": f"video{i}"} for i in range(3)],
            "sentences": [{"video_id": "video0", "caption": "a cat"}, {"video_id": "video1", "caption": "a dog"},
                          {"video_id": "video0", "caption": "a kitten"}, {"video_id": "video2", "caption": "a car"}]}
    write(tmp_path / "MSRVTT_data.json", json.dumps(data))
    write(tmp_path / "MSRVTT_train.9k.csv", "video_id\nvideo0\nvideo1\n")
    write(tmp_path / "MSRVTT_train.7k.csv", "video_id\nvideo1\n")
    write(tmp_path / "MSRVTT_JSFUSION_test.csv", "key,vid_key,video_id,sentence\nret0,msr2,video2,a red car\n")
    return tmp_path


def test_msrvtt_splits(msrvtt):
    train = load_annotations("msrvtt", msrvtt, "train")
    assert train.video_ids == ["video0", "video1"]
    assert train.captions == ["a cat", "a kitten", "a dog"] and train.caption_video == [0, 0, 1]
    assert train.video_paths[0].endswith("videos/video0.mp4")
    assert load_annotations("msrvtt", msrvtt, "train7k").captions == ["a dog"]
    test = load_annotations("msrvtt", msrvtt, "test")
    assert test.video_ids == ["video2"] and test.captions == ["a red car"]


def test_the_official_codes_frame_folders_are_named_as_the_video_files(msrvtt, monkeypatch):
    """The official code (--dataset_type img) reads images/fps_1/video0.mp4/, a folder named as the
    video file; a folder named by the id is found too, and a file of either name comes first. All
    at the top: the tree of frame images is not walked."""
    frames = msrvtt / "images" / "fps_1"
    for folder in ("video0.mp4", "video1", "video2"):
        (frames / folder).mkdir(parents=True)
        (frames / folder / "00001.jpg").write_bytes(b"x")
    (frames / "video2.mp4").write_bytes(b"x")
    walks = []
    monkeypatch.setattr(os, "walk", lambda top, *a, **kw: walks.append(top) or iter(()))
    paths = [load_annotations("msrvtt", msrvtt, split, str(frames)).video_paths for split in ("train", "test")]
    assert paths == [[str(frames / "video0.mp4"), str(frames / "video1")], [str(frames / "video2.mp4")]]
    assert os.path.isdir(paths[0][0]) and os.path.isfile(paths[1][0]) and walks == []


def test_msvd(tmp_path):
    with open(tmp_path / "raw-captions.pkl", "wb") as f:
        pickle.dump({"abc": [["a", "man", "runs"], ["someone", "runs"]], "xyz": [["a", "bird"]]}, f)
    write(tmp_path / "test_list.txt", "abc\nxyz\n")
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "abc.avi").write_bytes(b"x")
    ann = load_annotations("msvd", tmp_path, "test")
    assert ann.captions == ["a man runs", "someone runs", "a bird"] and ann.caption_video == [0, 0, 1]
    assert ann.video_paths[0].endswith("abc.avi")   # the real file's extension is found
    (tmp_path / "videos" / "xyz").mkdir()   # a folder of its frame images (the official code's images/fps_1/)
    assert load_annotations("msvd", tmp_path, "test").video_paths[1] == str(tmp_path / "videos" / "xyz")


def test_didemo_paragraphs(tmp_path):
    items = [{"video": "v1.mp4", "description": "a man walks ", "times": [[0, 1]]},
             {"video": "v2.mp4", "description": "rain"}, {"video": "v1.mp4", "description": "he sits"}]
    write(tmp_path / "test_data.json", json.dumps(items))
    ann = load_annotations("didemo", tmp_path, "test")
    assert ann.video_ids == ["v1", "v2"] and ann.captions == ["a man walks he sits", "rain"]



def test_didemo_opens_the_file_named_and_keeps_the_listed_videos(tmp_path):
    """CLIP4Clip opens DiDeMo's "video" name as written (any extension) and keeps only the videos of
    {split}_list.txt; a re-encoded copy under the id with a known extension is found too."""
    items = [{"video": "a.m4v", "description": "one"}, {"video": "b.mov", "description": "two"},
             {"video": "c.3gp", "description": "three"}]
    write(tmp_path / "test_data.json", json.dumps(items))
    (tmp_path / "videos").mkdir()
    for name in ("a.m4v", "b.mp4", "b.3gp"):
        (tmp_path / "videos" / name).write_bytes(b"x")
    ann = load_annotations("didemo", tmp_path, "test")
    assert ann.video_ids == ["a", "b", "c"]
    assert [p.split("/")[-2:] for p in ann.video_paths] == [["videos", "a.m4v"], ["videos", "b.mp4"],
                                                            ["videos", "c.3gp"]]   # c: missing, named when read
    write(tmp_path / "test_list.txt", "c.3gp\na\n")   # CLIP4Clip's lists name files; an id does too
    listed = load_annotations("didemo", tmp_path, "test")
    assert listed.video_ids == ["a", "c"] and listed.captions == ["one", "three"]
    write(tmp_path / "test_list.txt", "z.mp4\n")
    with pytest.raises(AnnotationError, match="test_list.txt: names none of the videos of .*test_data.json"):
        load_annotations("didemo", tmp_path, "test")


def test_activitynet_paragraphs(tmp_path):
    write(tmp_path / "val_1.json", json.dumps({"v_a": {"duration": 3, "sentences": ["One.", " Two."]},
                                               "v_b": {"sentences": ["Three."]}}))
    ann = load_annotations("activitynet", tmp_path, "test")
    assert ann.captions == ["One. Two.", "Three."]
    write(tmp_path / "val_ids.json", json.dumps(["v_b"]))
    assert load_annotations("activitynet", tmp_path, "test").video_ids == ["v_b"]


def test_videos_below_the_video_folder_are_found_as_clip4clip_finds_them(tmp_path, monkeypatch):
    """CLIP4Clip walks the video folder: ActivityNet's downloads come in subfolders, its files drop
    the ids' v_, MSVD's and DiDeMo's may sit anywhere below. The folder is walked once per split,
    and only where a video is not at its top."""
    videos = tmp_path / "videos"
    for name in ("v1-2/train/a.mp4", "v1-3/train_val/b.mkv", "v1-3/train_val/b.json", "v_c.mp4",
                 "v1-2/val/e.mp4", "v1-3/train_val/e.mp4", "notes/f.txt", "x/y/z/g.mp4", "x/y/z/deeper/h.mp4"):
        (videos / name).parent.mkdir(parents=True, exist_ok=True)
        (videos / name).write_bytes(b"x")
    ids = ["v_a", "v_b", "v_c", "v_d", "v_e", "v_f", "v_g", "v_h"]
    write(tmp_path / "val_1.json", json.dumps({vid: {"sentences": [vid]} for vid in ids}))
    walks, walk = [], os.walk
    monkeypatch.setattr(os, "walk", lambda top, *a, **kw: walks.append(top) or walk(top, *a, **kw))
    monkeypatch.chdir(tmp_path)   # --root given relative, as on a command line
    paths = load_annotations("activitynet", ".", "test").video_paths
    assert [os.path.relpath(p, "videos") for p in paths] == [
        "v1-2/train/a.mp4", "v1-3/train_val/b.mkv", "v_c.mp4",
        "v_d.mp4",                 # missing: named as the id says, reported when read
        "v1-2/val/e.mp4",          # in two folders: the first in sorted order
        "v_f.mp4",                 # f.txt is not a video
        "x/y/z/g.mp4",             # 3 folders deep
        "v_h.mp4"]                 # 4: not walked (a mistaken --video-dir, such as a home folder, stays quick)
    assert walks == [os.path.join(".", "videos")]
    write(tmp_path / "val_ids.json", json.dumps(["v_c"]))   # every video at the top: no walk
    walks.clear()
    assert load_annotations("activitynet", tmp_path, "test").video_paths == [str(videos / "v_c.mp4")]
    assert walks == []

    with open(tmp_path / "raw-captions.pkl", "wb") as f:
        pickle.dump({"-4wsuPCjDBc_5_15": [["a", "dog"]]}, f)
    write(tmp_path / "test_list.txt", "-4wsuPCjDBc_5_15\n")
    (videos / "YouTubeClips").mkdir()
    (videos / "YouTubeClips" / "-4wsuPCjDBc_5_15.avi").write_bytes(b"x")
    assert load_annotations("msvd", tmp_path, "test").video_paths == [str(videos / "YouTubeClips" /
                                                                          "-4wsuPCjDBc_5_15.avi")]
    os.remove(tmp_path / "test_list.txt")   # MSVD's; DiDeMo's would keep only the videos it names
    write(tmp_path / "test_data.json", json.dumps([{"video": "12@N00_3_x.m4v", "description": "rain"}]))
    (videos / "didemo").mkdir()
    (videos / "didemo" / "12@N00_3_x.m4v").write_bytes(b"x")
    assert load_annotations("didemo", tmp_path, "test").video_paths == [str(videos / "didemo" / "12@N00_3_x.m4v")]


def test_a_single_string_is_one_caption_not_its_characters(tmp_path):
    write(tmp_path / "val_1.json", json.dumps({"v_a": {"sentences": "A man walks."}}))
    assert load_annotations("activitynet", tmp_path, "test").captions == ["A man walks."]
    write(tmp_path / "ref_captions.json", json.dumps({"q1": "a dog"}))
    write(tmp_path / "test_list.txt", "q1\n")
    assert load_annotations("vatex", tmp_path, "test").captions == ["a dog"]


def test_vatex(tmp_path):
    write(tmp_path / "ref_captions.json", json.dumps({"q1": ["c1", "c2"], "q2": ["c3"]}))
    write(tmp_path / "train_list.txt", "q2\n")
    ann = load_annotations("vatex", tmp_path, "train")
    assert ann.captions == ["c3"] and ann.video_ids == ["q2"]


def test_jsonl(tmp_path):
    write(tmp_path / "d.jsonl", '{"video": "a.mp4", "caption": "x"}\n\n{"video": "b.mp4", "caption": "y"}\n'
                                '{"video": "a.mp4", "caption": "z"}\n')
    ann = load_annotations("jsonl", tmp_path / "d.jsonl")
    assert ann.video_paths == [str(tmp_path / "a.mp4"), str(tmp_path / "b.mp4")]
    assert ann.captions == ["x", "y", "z"] and ann.caption_video == [0, 1, 0]
    assert ann.video_ids == ["a", "b"]


def test_jsonl_folder_holds_one_file_per_split(tmp_path):
    write(tmp_path / "train.jsonl", '{"video": "a.mp4", "caption": "x"}\n')
    write(tmp_path / "test.jsonl", '{"video": "b.mp4", "caption": "y"}\n')
    assert load_annotations("jsonl", tmp_path, "train").captions == ["x"]
    assert load_annotations("jsonl", tmp_path, "test").captions == ["y"]
    assert load_annotations("jsonl", tmp_path / "test.jsonl", "train").captions == ["y"]   # a file is every split
    with pytest.raises(AnnotationError, match="val.jsonl: no such annotation file"):
        load_annotations("jsonl", tmp_path, "val")


def test_jsonl_video_ids_are_paths_so_equal_base_names_stay_two_videos(tmp_path):
    """The id keys the frame cache: a/clip.mp4 and b/clip.mp4 sharing one would get one video's frames."""
    write(tmp_path / "d.jsonl", '{"video": "a/clip.mp4", "caption": "x"}\n{"video": "b/clip.mp4", "caption": "y"}\n'
                                '{"video": "./a/clip.mp4", "caption": "z"}\n')
    ann = load_annotations("jsonl", tmp_path / "d.jsonl")
    assert ann.video_ids == ["a/clip", "b/clip"] and ann.caption_video == [0, 1, 0]
    assert ann.video_paths == [str(tmp_path / "a" / "clip.mp4"), str(tmp_path / "b" / "clip.mp4")]


@pytest.mark.parametrize("dataset,files,split,message", [
    ("jsonl", {"d.jsonl": '{"video": "a.mp4", "caption": "x"}\n{"video": "a.mp4"}\n'}, None, r"d.jsonl:2: expected"),
    ("jsonl", {"d.jsonl": '{"video": "a.mp4", "caption": "x"}\n{oops\n'}, None, r"d.jsonl:2: invalid JSON"),
    ("jsonl", {"d.jsonl": "\n"}, None, "no entries"),
    ("jsonl", {"d.jsonl": '{"video": "a.mp4", "caption": "x"}\n{"video": "a.avi", "caption": "y"}\n'}, None,
     r"d.jsonl:2: a.avi and a.mp4 share the video id 'a'"),
    ("vatex", {"ref_captions.json": '{"a": ["x"]}', "test_list.txt": "\n"}, "test", "vatex test at .*: no captions"),
    ("msrvtt", {"MSRVTT_JSFUSION_test.csv": "video_id,sentence\n"}, "test", "msrvtt test at .*: no captions"),
    ("msrvtt", {"MSRVTT_JSFUSION_test.csv": "key,video\n1,2\n"}, "test", r"MSRVTT_JSFUSION_test.csv:1: missing column"),
    ("msrvtt", {"MSRVTT_JSFUSION_test.csv": "video_id,sentence\nvideo1,\n"}, "test",
     r"MSRVTT_JSFUSION_test.csv:2: empty"),
    ("msrvtt", {"MSRVTT_train.9k.csv": "video_id\nvideo9\n", "MSRVTT_data.json": '{"sentences": []}'}, "train",
     "no sentences for video_id 'video9'"),
    ("msrvtt", {"MSRVTT_train.9k.csv": "video_id\nvideo9\n", "MSRVTT_data.json": '{"videos": []}'}, "train",
     "MSRVTT_data.json: top level: missing key 'sentences'"),
    ("msrvtt", {"MSRVTT_train.9k.csv": "video_id\nv\n", "MSRVTT_data.json": '{"sentences": [\n{"video_id": "v"}]}'},
     "train", r"sentences\[0\]: missing key 'caption'"),
    ("msrvtt", {"MSRVTT_train.9k.csv": "video_id\nv\n", "MSRVTT_data.json": '{\n\n"sentences": [,]}'}, "train",
     r"MSRVTT_data.json:3: invalid JSON"),
    ("vatex", {"ref_captions.json": '{"a": ["x"]}', "test_list.txt": "a\nb\n"}, "test", "missing key 'b'"),
    ("didemo", {"test_data.json": '[{"video": "v.mp4"}]'}, "test", "entry 0: missing key 'description'"),
    ("didemo", {"test_data.json": '[{"video": ["v.mp4"], "description": "x"}]'}, "test",
     "entry 0: expected a video file name, got"),
    ("didemo", {"test_data.json": '[{"video": "v.mp4", "description": 3}]'}, "test",
     "entry 0: expected a caption string or a list of them, got 3"),
    ("activitynet", {"val_1.json": '{"v_a": {"sentences": [["nested"]]}}'}, "test", "v_a: expected a caption string"),
    ("vatex", {"ref_captions.json": '{"a": {"en": "x"}}', "test_list.txt": "a\n"}, "test", "a: expected a caption"),
    ("msvd", {}, "test", "raw-captions.pkl: no such annotation file"),
])
def test_malformed_files_name_file_and_place(tmp_path, dataset, files, split, message):
    for name, text in files.items():
        write(tmp_path / name, text)
    root = tmp_path / "d.jsonl" if dataset == "jsonl" else tmp_path
    with pytest.raises(AnnotationError, match=message):
        load_annotations(dataset, root, split)


@pytest.mark.parametrize("dataset,name,split", [("jsonl", "d.jsonl", None),
                                                ("msrvtt", "MSRVTT_JSFUSION_test.csv", "test")])
def test_annotations_are_utf8_and_other_encodings_are_named(tmp_path, dataset, name, split):
    caption = "un café à Zürich"
    row = json.dumps({"video": "a.mp4", "caption": caption}, ensure_ascii=False) if dataset == "jsonl" \
        else f"video_id,sentence\nvideo1,{caption}"
    root = tmp_path / "d.jsonl" if dataset == "jsonl" else tmp_path
    (tmp_path / name).write_bytes((row + "\n").encode("utf-8"))
    assert load_annotations(dataset, root, split).captions == [caption]
    (tmp_path / name).write_bytes((row + "\n").encode("utf-8-sig"))   # with the BOM Excel and Notepad write
    assert load_annotations(dataset, root, split).captions == [caption]
    (tmp_path / name).write_bytes((row + "\n").encode("latin-1"))
    with pytest.raises(AnnotationError, match=rf"{dataset} {split} annotations at .*: not UTF-8 text \(byte \d+: "
                                              r"invalid continuation byte\); convert the file"):
        load_annotations(dataset, root, split)


def test_unknown_dataset_and_split(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'kinetics'"):
        load_annotations("kinetics", tmp_path)
    with pytest.raises(ValueError, match="msrvtt split must be"):
        load_annotations("msrvtt", tmp_path, "val")
