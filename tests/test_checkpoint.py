"""cma_train.checkpoint: RNG state round trip, write-then-rename saves, adapter files with their
run's settings (written and read back), and metrics.jsonl trimmed back to a checkpoint."""
import json
import os
import re
import random

import numpy as np
import pytest
import torch

from conftest import small_clip

from cma_model import CrossModalAdapterConfig, add_cross_modal_adapters
from cma_train.checkpoint import (SCORING, adapters_file, drop_records_after, load_checkpoint, read_adapters,
                                  rng_state, save_checkpoint, set_rng_state)
from cma_train.config import TrainConfig


def _draws():
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]


def test_rng_state_survives_a_save_and_load(tmp_path):
    torch.manual_seed(7), np.random.seed(7), random.seed(7)
    _draws()
    state = rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = _draws()
    _draws()   # move every generator on
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert _draws() == expected


def test_a_failed_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint_latest.pt")
    save_checkpoint(path, {"format": "cma-train-v1", "step": 1})

    def torn(payload, target):   # the disk fills half way through
        open(target, "wb").write(b"half a checkpoint")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", torn)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(path, {"format": "cma-train-v1", "step": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1


def test_adapters_file_carries_the_run_scoring():
    model = add_cross_modal_adapters(small_clip(), CrossModalAdapterConfig(reduction_dim=8, shared_dim=16))
    cfg = TrainConfig(pooling="meanP", max_words=20, max_frames=8)
    state = adapters_file(model, cfg)
    assert set(state["scoring"]) == set(SCORING) and state["backbone"] == {"model": "ViT-B-32", "model_config": None}
    assert state["scoring"]["pooling"] == "meanP" and state["scoring"]["max_frames"] == 8
    assert state["state_dict"] and state["config"]["reduction_dim"] == 8


@pytest.mark.parametrize("step, evaluated_step, kept", [
    (4, 4, [1, 2, "eval 2", 3, 4, "eval 4"]),
    (3, 2, [1, 2, "eval 2", 3]),   # the crash came after step 3's checkpoint, before the evaluation at 4
    (0, 0, []),
])
def test_drop_records_after_keeps_what_the_checkpoint_holds(tmp_path, step, evaluated_step, kept):
    log = tmp_path / "metrics.jsonl"
    lines = []
    for s in range(1, 6):
        lines.append(json.dumps({"step": s, "loss": 1.0 / s}))
        if s % 2 == 0:
            lines.append(json.dumps({"step": s, "eval_split": "test", "t2v": {}}))
    log.write_text("\n".join(lines) + '\n{"step": 6, "lo')   # and a line torn by the crash
    drop_records_after(str(log), step, evaluated_step)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [f"eval {r['step']}" if "eval_split" in r else r["step"] for r in records] == kept


def test_a_write_that_fails_keeps_the_previous_file_and_says_why(tmp_path, monkeypatch):
    """A full disk: torch.save fails part way (with a RuntimeError, as it does on a full disk). The
    partial file goes, the previous checkpoint stays loadable, and the error names the file."""
    path = str(tmp_path / "checkpoint_latest.pt")
    save_checkpoint(path, {"step": 1})

    def full_disk(obj, f):
        with open(f, "wb") as out:
            out.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match=rf"^{re.escape(path)}: could not be written \(RuntimeError: \[enforce fail.*"
                                      rf"unexpected pos 576 vs 534\); [\d,]+ MiB free there$"):
        save_checkpoint(path, {"step": 2})
    monkeypatch.undo()
    assert not os.path.exists(path + ".tmp") and torch.load(path)["step"] == 1


def test_read_adapters_takes_the_run_settings_unless_given(tmp_path, capsys):
    """The shape, the named model and the scoring come with the file; a setting given on purpose
    stays and is said. (End to end, with a --model-config backbone: test_cli.)"""
    model = add_cross_modal_adapters(small_clip(), CrossModalAdapterConfig(reduction_dim=4, shared_dim=8))
    torch.save(adapters_file(model, TrainConfig(model="ViT-B-16", pooling="meanP")), tmp_path / "a.pt")
    cfg = TrainConfig()
    read_adapters(str(tmp_path / "a.pt"), cfg, given=set())
    assert (cfg.model, cfg.pooling, cfg.reduction_dim, cfg.shared_dim) == ("ViT-B-16", "meanP", 4, 8)
    assert capsys.readouterr().err == ""
    cfg = TrainConfig(model="ViT-B-16-quickgelu")
    read_adapters(str(tmp_path / "a.pt"), cfg, given={"model"})
    assert cfg.model == "ViT-B-16-quickgelu"
    assert "note: evaluating with --model ViT-B-16-quickgelu (trained with --model ViT-B-16)" in capsys.readouterr().err
    # --model and --model-config are one choice: given either, the run's other one is not taken
    custom = {"embed_dim": 32, "vision_cfg": {"width": 64}, "text_cfg": {"width": 48}}
    torch.save(adapters_file(model, TrainConfig(model="tiny", model_config=custom)), tmp_path / "c.pt")
    cfg = TrainConfig(model="ViT-B-16")
    read_adapters(str(tmp_path / "c.pt"), cfg, given={"model"})
    assert (cfg.model, cfg.model_config) == ("ViT-B-16", None)
    assert "note: evaluating with --model ViT-B-16 (trained with the --model-config model)" in capsys.readouterr().err
    cfg = TrainConfig(model_config={**custom, "embed_dim": 16})
    read_adapters(str(tmp_path / "c.pt"), cfg, given={"model_config"})
    assert cfg.model_config["embed_dim"] == 16
    assert "--model-config (another config than the adapters were trained with)" in capsys.readouterr().err
    cfg = TrainConfig(model_config=custom)
    read_adapters(str(tmp_path / "c.pt"), cfg, given={"model_config"})
    assert capsys.readouterr().err == ""
    cfg = TrainConfig(model_config=custom)
    read_adapters(str(tmp_path / "a.pt"), cfg, given={"model_config"})
    assert cfg.model_config == custom
    assert "note: evaluating with the --model-config model (trained with --model ViT-B-16)" in capsys.readouterr().err
    torch.save({"weights": torch.zeros(2)}, tmp_path / "b.pt")
    with pytest.raises(ValueError, match="not a cma adapter file or training checkpoint"):
        read_adapters(str(tmp_path / "b.pt"), TrainConfig())


def test_a_run_folder_as_adapters_names_its_adapter_files(tmp_path):
    with pytest.raises(ValueError, match="is a folder: pass one of its adapter files; it holds none"):
        read_adapters(str(tmp_path), TrainConfig())
    for name in ("adapters.pt", "adapters_best.pt"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(ValueError, match=f"is a folder: pass one of its adapter files \\({tmp_path / 'adapters.pt'}, "
                                         f"{tmp_path / 'adapters_best.pt'}\\)"):
        read_adapters(str(tmp_path), TrainConfig())


def test_other_weights_than_the_adapters_trained_on_are_noted(tmp_path, capsys):
    """Adapters learn a correction of one backbone's features: evaluated on other weights they
    mean little, so `cma eval` says so (it does not adopt the path, which need not exist here)."""
    model = add_cross_modal_adapters(small_clip(), CrossModalAdapterConfig(reduction_dim=4, shared_dim=8))
    weights = tmp_path / "ViT-B-32.pt"
    weights.write_bytes(b"weights")
    torch.save(adapters_file(model, TrainConfig(pretrained=str(weights))), tmp_path / "a.pt")
    for pretrained, noted in ((str(weights), False), (os.path.relpath(weights), False), ("openai", True)):
        read_adapters(str(tmp_path / "a.pt"), TrainConfig(pretrained=pretrained), given={"pretrained"})
        err = capsys.readouterr().err
        assert (f"note: evaluating with --pretrained {pretrained} (trained on {weights})" in err) == noted, err

