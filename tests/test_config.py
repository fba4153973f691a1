"""cma_train.config: the settings' checks, and the paper's per-dataset recipe for what is left unset."""
import importlib.util
import os

import pytest
import torch

from cma_train.config import TrainConfig


@pytest.mark.parametrize("setting,value,message", [
    ("grad_clip", 0.0, r"grad_clip must be > 0 \(inf: no clipping\), got 0.0"),   # 0 would zero every gradient
    ("temperature", -1.0, "temperature must be > 0"), ("sample_fps", float("nan"), "sample_fps must be > 0 and finite, "
                                                                                   "got nan"),
    ("lr", float("inf"), "lr must be > 0 and finite, got inf"),   # inf passed a bare > 0 and trained to NaN
    ("temperature", float("inf"), "temperature must be > 0 and finite"),
    ("weight_decay", float("inf"), "weight_decay must be >= 0 and finite"),
    ("workers", -1, "workers must be >= 0"), ("weight_decay", -0.1, "weight_decay must be >= 0"),
    ("eps", 0.0, "eps must be > 0"), ("betas", (0.9, 1.0), r"betas must be two values in \[0, 1\)"),
    ("save_every", -1, "save_every must be >= 0"), ("max_steps", -2, "max_steps must be >= 0"),
    ("save_every_min", -5.0, "save_every_min must be >= 0 and finite"),
    ("save_every_min", float("nan"), "save_every_min must be >= 0 and finite, got nan"),
    ("epochs", 0, "epochs must be >= 1, got 0"), ("warmup", 1.0, r"warmup must be a fraction in \[0, 1\)"),
    ("batch_size", 1, r"batch_size must be >= 2 \(InfoNCE contrasts"),   # one caption: the loss is 0, nothing learnt
])
def test_settings_out_of_range_are_refused_before_anything_runs(setting, value, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(pretrained="none", **{setting: value}).validate()


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="pooling must be one of"):
        TrainConfig(pretrained="none", pooling="max").validate()
    with pytest.raises(ValueError, match="--pretrained none"):
        TrainConfig().validate()
    with pytest.raises(ValueError, match="compile must be one of"):
        TrainConfig(pretrained="none", compile="fast").validate()
    with pytest.raises(ValueError, match="--recompute-mlp works in the lean frozen block"):
        TrainConfig(pretrained="none", recompute_mlp=True, backend="reference").validate()
    with pytest.raises(ValueError, match="--eval-every needs --eval-split"):
        TrainConfig(pretrained="none", eval_every=1).validate()
    with pytest.raises(ValueError, match="eval_every must be >= 0"):
        TrainConfig(pretrained="none", eval_every=-1, eval_split="test").validate()
    with pytest.raises(ValueError, match="precision must be one of auto, bf16, fp16, fp32, got 'half'"):
        TrainConfig(pretrained="none", precision="half").validate()
    with pytest.raises(ValueError, match="micro_batch must be >= 0"):
        TrainConfig(pretrained="none", micro_batch=-1).validate()
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ValueError, match="a_file is a file: --out names the run's folder"):
        TrainConfig(pretrained="none", out=str(tmp_path / "a_file")).validate()
    if importlib.util.find_spec("tensorboard") is None:   # refused before anything runs, not after the model
        with pytest.raises(ValueError, match="--tensorboard needs the tensorboard package"):
            TrainConfig(pretrained="none", tensorboard=True).validate()
    one_file = tmp_path / "all.jsonl"
    one_file.write_text('{"video": "a.mp4", "caption": "x"}\n')
    with pytest.raises(ValueError, match="would evaluate on the training file: pass as --root a folder holding "
                                         "train.jsonl and test.jsonl"):
        TrainConfig(pretrained="none", dataset="jsonl", root=str(one_file), eval_split="test").validate()
    TrainConfig(pretrained="none", dataset="jsonl", root=str(tmp_path), eval_split="test").validate()
    with pytest.raises(ValueError, match="new dropout masks"):
        TrainConfig(pretrained="none", micro_batch=4, dropout=0.1).validate()
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            TrainConfig(pretrained="none", device="cuda").validate()
    with pytest.raises(ValueError, match="'ViT-b-32' is not an open_clip architecture; did you mean ViT-B-32"):
        TrainConfig(pretrained="none", model="ViT-b-32").validate()
    TrainConfig(pretrained="none", model="ViT-B/32").validate()   # open_clip's own spelling
    TrainConfig(pretrained="openai", model="ViT-B/16").validate()   # a tag of that architecture
    TrainConfig(pretrained="openai", model="hf-hub:org/model").validate()   # open_clip resolves these


# The paper's per-dataset settings, written out from REFERENCE.md sections 1 and 2 (not read from
# PAPER_RECIPES): (r, d_s, frames, words, epochs).
PAPER = {"msrvtt": (8, 16, 12, 32, 5), "msvd": (16, 16, 12, 32, 5), "vatex": (16, 64, 12, 32, 5),
         "didemo": (8, 8, 64, 64, 5), "activitynet": (16, 512, 64, 64, 20), "jsonl": (8, 16, 12, 32, 5)}
RECIPE_SETTINGS = ("reduction_dim", "shared_dim", "max_frames", "max_words", "epochs")


@pytest.mark.parametrize("dataset", sorted(PAPER))
def test_unset_settings_take_the_papers_values_for_the_dataset(dataset):
    cfg = TrainConfig(dataset=dataset)
    assert tuple(getattr(cfg, name) for name in RECIPE_SETTINGS) == PAPER[dataset]
    given = TrainConfig(dataset=dataset, reduction_dim=4, shared_dim=0, max_frames=3, max_words=7, epochs=2)
    assert tuple(getattr(given, name) for name in RECIPE_SETTINGS) == (4, 0, 3, 7, 2)   # set on purpose: kept
    assert (cfg.lr, cfg.batch_size, cfg.warmup) == (1e-5, 128, 0.1)   # the rest of the recipe is shared


@pytest.mark.parametrize("allowed, quota, cpus", [(range(8), None, 8), (range(8), "max 100000", 8),
                                                 (range(8), "150000 100000", 2), (range(3), "800000 100000", 3),
                                                 (range(8), "garbled", 8)])
def test_available_cpus_are_the_allocated_ones_not_the_machines(tmp_path, monkeypatch, allowed, quota, cpus):
    """A SLURM allocation or taskset (the affinity) and a container's CPU quota (cgroup v2 cpu.max,
    rounded up) bound what `cma prepare` and the loaders start, not os.cpu_count()."""
    from cma_train import config
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(allowed))
    monkeypatch.setattr(os, "cpu_count", lambda: 128)
    monkeypatch.setattr(config, "CPU_QUOTA", str(tmp_path / "cpu.max"))
    if quota is not None:
        (tmp_path / "cpu.max").write_text(quota + "\n")
    assert config.available_cpus() == cpus


@pytest.mark.parametrize("cpus, local_processes, workers", [(16, None, 4), (16, "8", 2), (8, "8", 1), (4, "8", 1),
                                                            (2, None, 2), (64, "8", 4)])
def test_loader_workers_share_the_cpus_among_torchruns_processes(monkeypatch, cpus, local_processes, workers):
    """Each of torchrun's processes on a node starts its own loaders: the default gives each its
    share of the CPUs (at least 1, at most 4)."""
    from cma_train import config
    monkeypatch.setattr(config, "available_cpus", lambda: cpus)
    if local_processes is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local_processes)
    assert config.default_workers() == workers
