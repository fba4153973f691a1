"""What a run folder holds, read and written safely: training checkpoints (adapters, optimizer,
scheduler, step, config, RNG), adapter files with the backbone and scoring settings of their run
(read back by `cma eval --adapters`), metrics.jsonl trimmed back to a checkpoint on resume, and
the lock the training process writing there holds. Every file is written to a temporary name and
renamed, so a crash never leaves a broken one."""
import json
import os
import random
import sys

import numpy as np
import torch

from cma_model import adapter_state_dict
from cma_model.cache import atomic_write
from cma_train.config import architecture

CHECKPOINT_FORMAT = "cma-train-v1"
# Kept with a run's adapters, so that `cma eval --adapters` rebuilds the backbone they were trained
# on and scores them the same way
BACKBONE = ("model", "model_config")
SCORING = ("pooling", "temperature", "max_words", "max_frames", "sample_fps")
RUN_LOCK = "train.lock"   # in the run folder, held by the training process writing there (cache.folder_lock)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message says which file and why."""


def rng_state():
    """Every RNG a run draws from (torch CPU and CUDA, numpy, Python), as tensors and lists that
    torch.load(weights_only=True) accepts."""
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
            "python": list(random.getstate()[1]), "python_version": random.getstate()[0],
            "python_gauss": random.getstate()[2]}


def set_rng_state(state):
    """Restore what rng_state() returned."""
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))


def save_checkpoint(path, payload):
    """torch.save, write-then-rename: a crash mid-save leaves the previous file intact, and a full
    disk an OSError naming the file (cma_model.cache.atomic_write)."""
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def scoring_of(cfg):
    """{setting: value} of cfg's SCORING settings: how a run scores similarity."""
    return {k: getattr(cfg, k) for k in SCORING}


def results_record(cfg, split, adapters):
    """What a results JSON holds beside the metrics: what was evaluated (dataset and split, the
    adapter file, None for the backbone alone, and the backbone with its weights) and how it was
    scored (SCORING)."""
    return {"evaluated": {"dataset": cfg.dataset, "split": split,
                          "adapters": os.path.abspath(adapters) if adapters else None,
                          **{k: getattr(cfg, k) for k in BACKBONE}, "pretrained": cfg.pretrained},
            "scoring": scoring_of(cfg)}


def adapters_file(model, cfg):
    """adapters.pt: `adapter_state_dict(model)` plus the run's backbone architecture (BACKBONE),
    scoring settings (SCORING) and the --pretrained weights it trained on (for a note, not adopted:
    a weights path need not exist where the adapters are evaluated)."""
    return {**adapter_state_dict(model), "backbone": {k: getattr(cfg, k) for k in BACKBONE},
            "scoring": scoring_of(cfg), "pretrained": cfg.pretrained}


def _same_weights(a, b):
    """The same --pretrained: the same tag or path, or two paths of one file."""
    return a == b or (os.path.isfile(a) and os.path.isfile(b) and os.path.samefile(a, b))


def load_checkpoint(path):
    """Load a training checkpoint; CheckpointError naming the file if it is missing, truncated or foreign."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path} is truncated or corrupt and cannot be resumed from "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                              f"delete it to start over or point --resume elsewhere") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a cma training checkpoint")
    return ckpt


def drop_records_after(log_path, step, evaluated_step):
    """Resuming: metrics.jsonl keeps only what the checkpoint holds (training steps up to `step`,
    evaluations up to `evaluated_step`); the run redoes the rest and logs it again. A line torn by
    a crash is dropped too."""
    if not os.path.isfile(log_path):
        return
    with open(log_path) as f:
        lines = f.read().splitlines()
    keep = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record["step"] <= (evaluated_step if "eval_split" in record else step):
            keep.append(line + "\n")
    if len(keep) < len(lines):
        with open(log_path + ".tmp", "w") as f:
            f.writelines(keep)
        os.replace(log_path + ".tmp", log_path)


def read_adapters(path, cfg, given=()):
    """The adapter state in `path` (adapters.pt or a training checkpoint), for load_adapter_state_dict.
    Their shape, the backbone they were trained on and how their run scored become the TrainConfig
    cfg's, except the settings named in `given` (set on purpose): those stay, and a note on stderr
    names the ones that differ. ValueError naming the file if it is not one of ours."""
    if os.path.isdir(path):   # a run folder: which of its files is the user's call
        files = [os.path.join(path, f) for f in ("adapters.pt", "adapters_best.pt", "checkpoint_latest.pt")
                 if os.path.isfile(os.path.join(path, f))]
        raise ValueError(f"--adapters {path} is a folder: pass one of its adapter files"
                         + (f" ({', '.join(files)})" if files else "; it holds none (adapters.pt, adapters_best.pt)"))
    if not os.path.isfile(path):
        raise ValueError(f"--adapters {path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:   # not a torch file, truncated, or pickled objects weights_only refuses
        raise ValueError(f"--adapters {path}: cannot be read ({type(e).__name__})") from None
    run = {}   # older adapter files lack the backbone and scoring: the flags' values stand
    if isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT:   # a training checkpoint
        run = {k: state["config"][k] for k in BACKBONE + SCORING}
        state = {**state["adapters"], "pretrained": state["config"].get("pretrained")}
    if not (isinstance(state, dict) and isinstance(state.get("config"), dict)):
        raise ValueError(f"--adapters {path}: not a cma adapter file or training checkpoint")
    run = run or {**state.get("backbone", {}), **state.get("scoring", {})}
    for key in ("reduction_dim", "shared_dim", "activation"):   # the adapters' shape: no choice
        trained = state["config"][key]
        if key in given and getattr(cfg, key) != trained:
            raise ValueError(f"--{key.replace('_', '-')} {getattr(cfg, key)}, but {path} holds adapters with "
                             f"{key}={trained!r}; leave the flag out")
        setattr(cfg, key, trained)
    unlike = []
    if "model" in run and given & set(BACKBONE):   # --model and --model-config are one choice: the architecture
        trained = (run.pop("model"), run.pop("model_config", None))
        if trained[1] is not None and cfg.model_config is not None and trained[1] != cfg.model_config:
            unlike.append("--model-config (another config than the adapters were trained with)")
        elif architecture(*trained) != architecture(cfg.model, cfg.model_config):
            unlike.append(f"{architecture(cfg.model, cfg.model_config)} (trained with {architecture(*trained)})")
    for key, trained in run.items():
        if key not in given:
            setattr(cfg, key, trained)
        elif getattr(cfg, key) != trained:
            unlike.append(f"--{key.replace('_', '-')} {str(getattr(cfg, key))[:60]} (trained with {str(trained)[:60]})")
    trained_on = state.get("pretrained")   # older adapter files do not say
    if trained_on and cfg.pretrained and not _same_weights(cfg.pretrained, trained_on):
        unlike.append(f"--pretrained {cfg.pretrained} (trained on {trained_on})")
    if unlike and int(os.environ.get("RANK", 0)) == 0:
        print(f"cma eval: note: evaluating with {', '.join(unlike)}", file=sys.stderr)
    return state
