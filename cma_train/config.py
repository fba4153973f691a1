"""Training settings: TrainConfig (every `cma train` / `cma eval` setting, its default and its
check) and the paper's per-dataset recipe. Imports nothing heavy, so `cma --help` is quick;
validate() imports torch and open_clip when it runs."""
import difflib
import importlib.util
import json
import os
from dataclasses import dataclass
from typing import Optional

# The paper's per-dataset settings (REFERENCE.md sections 1 and 2; the rest of the recipe is shared by
# all datasets): adapter shape, frames and words per video, epochs. A TrainConfig setting left at
# None takes its dataset's value; jsonl (your own data) takes MSR-VTT's. ActivityNet's d_s = 512 is
# ViT-B's text width: its text tower has no unique up-projection.
PAPER_RECIPES = {
    "msrvtt": {"reduction_dim": 8, "shared_dim": 16, "max_frames": 12, "max_words": 32, "epochs": 5},
    "msvd": {"reduction_dim": 16, "shared_dim": 16, "max_frames": 12, "max_words": 32, "epochs": 5},
    "vatex": {"reduction_dim": 16, "shared_dim": 64, "max_frames": 12, "max_words": 32, "epochs": 5},
    "didemo": {"reduction_dim": 8, "shared_dim": 8, "max_frames": 64, "max_words": 64, "epochs": 5},
    "activitynet": {"reduction_dim": 16, "shared_dim": 512, "max_frames": 64, "max_words": 64, "epochs": 20},
}


# auto: bf16 on a GPU with native bf16 (compute capability 8.0+), fp16 with loss scaling on older
# GPUs (V100, T4), fp32 on the CPU.
PRECISIONS = ("auto", "bf16", "fp16", "fp32")


CPU_QUOTA = "/sys/fs/cgroup/cpu.max"   # cgroup v2: "<quota> <period>" microseconds, or "max <period>"


def available_cpus():
    """The CPUs this process may use: those its affinity allows (a SLURM allocation, taskset), capped
    by its cgroup's CPU quota (docker --cpus, a Kubernetes limit), rounded up. os.cpu_count() is the
    machine's: on a 128-core node with 8 allocated it would start 127 decoding processes."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        with open(CPU_QUOTA) as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):   # no cgroup v2 file, or one that does not read as expected
        pass
    return cpus


def default_workers():
    """The data-loading workers of one training process: up to 4, the CPUs this process may use
    shared among the processes torchrun starts on this machine (LOCAL_WORLD_SIZE; its ranks share
    one affinity), at least 1. Eight ranks on a 16-core node start 2 each, not 4 (32 loaders)."""
    local_processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    return max(1, min(4, available_cpus() // local_processes))


def paper_recipe(dataset):
    """{setting: value} of the paper's recipe for `dataset` (MSR-VTT's for jsonl and unknown names)."""
    return PAPER_RECIPES.get(dataset, PAPER_RECIPES["msrvtt"])


def architecture(model: str, model_config) -> str:
    """The backbone's architecture as messages name it: --model NAME, or the --model-config model."""
    return f"--model {model}" if model_config is None else "the --model-config model"


def read_model_config(value: str) -> dict:
    """--model-config's value, a JSON file (the layout of open_clip's model_configs/*.json) or the JSON
    text itself, as a dict. ValueError where it is neither, or not a JSON object."""
    where, text = "--model-config", value
    if os.path.isfile(value):
        where = f"--model-config {value}"
        with open(value, encoding="utf-8") as f:
            text = f.read()
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        if where == "--model-config":
            raise ValueError(f"--model-config {value[:80]!r}: neither a file nor JSON ({e.msg})") from None
        raise ValueError(f"{where}:{e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{where}: expected a JSON object with embed_dim, vision_cfg and text_cfg")
    return config


@dataclass
class TrainConfig:
    """Every setting of `cma train` / `cma eval` with its default (the flags' names, `-` for `_`);
    validate() checks them."""
    # model
    model: str = "ViT-B-32"
    pretrained: str = ""          # open_clip checkpoint file or pretrained tag; "none" = random init (on purpose)
    model_config: Optional[dict] = None   # custom open_clip config (embed_dim, vision_cfg, text_cfg) instead of
    # `model`; a JSON file or JSON text is read into the dict (read_model_config)
    reduction_dim: Optional[int] = None   # None here and below: the dataset's value (PAPER_RECIPES)
    shared_dim: Optional[int] = None
    activation: str = "quick_gelu"
    dropout: float = 0.0
    backend: str = "auto"
    compile: str = ""             # torch.compile mode for the towers ("" = eager), see cma_model.retrieval
    recompute_mlp: bool = False   # recompute each block's MLP hidden activation in backward (less memory)
    recompute_out_proj: bool = True   # recompute each attention adapter's input and output in backward (less memory)
    cuda_graphs: bool = False     # replay the towers' training calls as CUDA graphs (cma_model.cuda_graphs)
    # data
    dataset: str = "msrvtt"
    root: str = ""
    split: str = "train"
    video_dir: Optional[str] = None
    cache: Optional[str] = None
    max_frames: Optional[int] = None
    max_words: Optional[int] = None
    sample_fps: float = 1.0
    workers: int = default_workers()   # read at import: torchrun sets LOCAL_WORLD_SIZE before
    # recipe (the paper's, REFERENCE.md section 2)
    epochs: Optional[int] = None
    batch_size: int = 128         # global, over all ranks
    micro_batch: int = 0          # videos per forward/backward pass on a rank (0: its whole share), same gradients
    lr: float = 1e-5
    weight_decay: float = 0.2
    warmup: float = 0.1
    grad_clip: float = 1.0
    betas: tuple = (0.9, 0.98)
    eps: float = 1e-6
    pooling: str = "softmax"
    temperature: float = 5.0
    seed: int = 42
    # run
    out: str = "runs/cma"
    resume: bool = False
    save_every: int = 0           # steps between checkpoints (0: once per epoch)
    save_every_min: float = 30.0  # also checkpoint once this many minutes passed since the last one (0: never)
    eval_split: Optional[str] = None
    eval_every: int = 0           # also evaluate every N epochs during training (0: after training only)
    tensorboard: bool = False
    device: str = "auto"
    precision: str = "auto"       # autocast dtype of the towers (PRECISIONS; cma_train.backbone.autocast_dtype)
    max_steps: int = 0            # stop after this many steps in total (0: all epochs); for smoke tests
    progress: bool = True

    def __post_init__(self):
        if isinstance(self.model_config, str):
            self.model_config = read_model_config(self.model_config)
        for name, value in paper_recipe(self.dataset).items():
            if getattr(self, name) is None:
                setattr(self, name, value)

    def validate(self):
        """ValueError naming the first setting that is out of range or cannot work here."""
        import torch   # here, not at import: `cma --help` should not wait for torch
        from cma_model.losses import POOLINGS
        from cma_model.retrieval import COMPILE_MODES
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        inf = float("inf")
        ranges = {   # setting -> (holds, what it must be); NaN fails every comparison
            "epochs": (self.epochs >= 1, ">= 1"),
            "batch_size": (self.batch_size >= 2, ">= 2 (InfoNCE contrasts each caption with the batch's other videos)"),
            "max_frames": (self.max_frames >= 1, ">= 1"), "micro_batch": (self.micro_batch >= 0, ">= 0"),
            "eval_every": (self.eval_every >= 0, ">= 0"), "save_every": (self.save_every >= 0, ">= 0"),
            "save_every_min": (0 <= self.save_every_min < inf, ">= 0 and finite"),
            "max_steps": (self.max_steps >= 0, ">= 0"), "workers": (self.workers >= 0, ">= 0"),
            "lr": (0 < self.lr < inf, "> 0 and finite"), "eps": (0 < self.eps < inf, "> 0 and finite"),
            "sample_fps": (0 < self.sample_fps < inf, "> 0 and finite"),
            "temperature": (0 < self.temperature < inf, "> 0 and finite"),
            "weight_decay": (0 <= self.weight_decay < inf, ">= 0 and finite"),
            "grad_clip": (self.grad_clip > 0, "> 0 (inf: no clipping)"),
            "warmup": (0 <= self.warmup < 1, "a fraction in [0, 1)"),
            "betas": (len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "two values in [0, 1)"),
        }
        for name, (holds, must) in ranges.items():
            if not holds:
                raise ValueError(f"{name} must be {must}, got {getattr(self, name)}")
        if self.micro_batch and self.dropout > 0:
            raise ValueError("--micro-batch runs every forward twice, which would draw new dropout masks: "
                             "use it with --dropout 0")
        if os.path.exists(self.out) and not os.path.isdir(self.out):
            raise ValueError(f"--out {self.out} is a file: --out names the run's folder")
        if self.eval_every and not self.eval_split:
            raise ValueError("--eval-every needs --eval-split (the split to evaluate on, e.g. test)")
        if self.eval_split and self.dataset == "jsonl" and os.path.isfile(self.root):   # one file is one split
            raise ValueError(f"--eval-split {self.eval_split} with --dataset jsonl --root {self.root} would evaluate "
                             f"on the training file: pass as --root a folder holding {self.split}.jsonl and "
                             f"{self.eval_split}.jsonl")
        if self.compile not in ("",) + COMPILE_MODES:
            raise ValueError(f"compile must be one of {COMPILE_MODES} (or empty for eager), got {self.compile!r}")
        if self.cuda_graphs and self.compile:
            raise ValueError(f"--cuda-graphs with --compile {self.compile}: use one or the other (--compile "
                             f"reduce-overhead records CUDA graphs of the compiled towers itself)")
        if self.cuda_graphs and self.device == "cpu":
            raise ValueError("--cuda-graphs needs a CUDA GPU; leave it out on --device cpu")
        if self.recompute_mlp and self.backend == "reference":
            raise ValueError("--recompute-mlp works in the lean frozen block, which --backend reference does not use "
                             "(it keeps open_clip's own block as the reference); use --backend auto or triton")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda was given but no CUDA device is available; use --device cpu or auto")
        if self.backend == "triton" and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("--backend triton needs a CUDA GPU; use --backend auto (fused on GPU, PyTorch on CPU)")
        if self.tensorboard and importlib.util.find_spec("tensorboard") is None:
            raise ValueError("--tensorboard needs the tensorboard package: pip install tensorboard")
        if not self.pretrained:
            raise ValueError("say which weights to start from: --pretrained PATH_OR_TAG, or --pretrained none for "
                             "random init (adapters on a random backbone learn little)")
        self._validate_model_and_weights()

    def _validate_model_and_weights(self):
        """--model names an open_clip architecture, --pretrained a file or one of its tags."""
        import open_clip
        if self.model_config is None and self.model.startswith(("hf-hub:", "local-dir:")):
            return   # open_clip resolves these (weights included) itself
        arch = self.model.replace("/", "-")   # open_clip's own spelling of ViT-B/32
        if self.model_config is None and arch not in open_clip.list_models():
            by_lower = {m.lower(): m for m in open_clip.list_models()}
            close = [by_lower[m] for m in difflib.get_close_matches(arch.lower(), by_lower, n=3, cutoff=0.6)]
            raise ValueError(f"--model {self.model!r} is not an open_clip architecture"
                             + (f"; did you mean {', '.join(close)}?" if close else "")
                             + " (open_clip.list_models() lists them; --model-config takes a custom one)")
        text_cfg = self.model_config.get("text_cfg") if self.model_config is not None else None
        hf = [k for k in ("hf_tokenizer_name", "hf_model_name") if isinstance(text_cfg, dict) and text_cfg.get(k)]
        if hf:   # the captions of a --model-config model go through CLIP's tokenizer
            raise ValueError(f"--model-config: a text tower with {hf[0]} {text_cfg[hf[0]]!r} is not supported (cma "
                             f"tokenizes a custom model's captions with CLIP's tokenizer); use --model with a name "
                             f"open_clip knows")
        if self.pretrained == "none" or os.path.isfile(self.pretrained):
            return
        tags = open_clip.list_pretrained_tags_by_model(arch) if self.model_config is None else []
        if os.path.sep in self.pretrained or "." in self.pretrained or not tags:
            raise ValueError(f"--pretrained {self.pretrained}: no such file")
        if self.pretrained not in tags:
            raise ValueError(f"--pretrained {self.pretrained}: neither a file nor an open_clip tag of {arch} "
                             f"(its tags: {', '.join(tags)})")
