"""The backbone a run trains: an open_clip model by name (--model) or by config (--model-config), its
weights (--pretrained: an open_clip checkpoint file or tag, or OpenAI's own TorchScript CLIP file)
with the activation they were trained with, the cross-modal adapters on it, and the dtype its towers
run in (--precision)."""
import os
import warnings
import zipfile

import open_clip
import torch

from cma_kernels import describe_device, fuses_by_default, triton_runs_on
from cma_model import CrossModalAdapterConfig, add_cross_modal_adapters
from cma_model.adapter import tower_blocks
from cma_model.frozen_block import store_frozen_linears
from cma_train.config import TrainConfig, architecture

OPENAI_JIT_METADATA = ("input_resolution", "context_length", "vocab_size")   # in the state dict, not weights


def autocast_dtype(precision: str, device: torch.device):
    """The dtype the towers run in under autocast for --precision (config.PRECISIONS) on `device`;
    None for fp32 (no autocast). auto: bf16 on a GPU with native bf16 (compute capability 8.0+:
    A100, H100, RTX 30xx and later), fp16 on an older one (T4, V100: the trainer scales the loss),
    fp32 on the CPU. ValueError for bf16 on a GPU without bf16 tensor cores."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    native_bf16 = device.type != "cuda" or torch.cuda.get_device_capability(device) >= (8, 0)
    if precision == "bf16" and not native_bf16:
        major, minor = torch.cuda.get_device_capability(device)
        raise ValueError(f"--precision bf16: the {torch.cuda.get_device_name(device)} (compute capability "
                         f"{major}.{minor}) has no bf16, which needs 8.0 or newer; use --precision fp16 (auto picks "
                         f"it)")
    if precision == "auto":
        precision = "bf16" if native_bf16 else "fp16"
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def unfused_gpu_note(backend, device):
    """The note for --backend auto on a GPU the fused kernels do not serve by default (compute
    capability below 8.0: V100, T4); None anywhere else."""
    if backend != "auto" or device.type != "cuda" or fuses_by_default(device):
        return None
    return (f"note: the adapters run the PyTorch reference path on {describe_device(device)}: the fused Triton "
            f"kernels serve compute capability 8.0+, the GPUs Triton supports (--backend triton runs them from 7.0, "
            f"untested there)")


def openai_jit_state_dict(path):
    """The state dict of one of OpenAI's own CLIP files (ViT-B-32.pt as CLIP4Clip downloads it), else
    None. They are TorchScript archives, which torch.load(weights_only=True), and so open_clip's
    loader, refuses; their parameter names are open_clip's."""
    if not zipfile.is_zipfile(path):
        return None
    with zipfile.ZipFile(path) as archive:
        if not any(name.rsplit("/", 1)[-1] == "constants.pkl" for name in archive.namelist()):
            return None   # a torch.save file (zip too): open_clip reads it
    with warnings.catch_warnings():   # torch.jit.load is deprecated; these files need it all the same
        warnings.simplefilter("ignore", FutureWarning)
        state = torch.jit.load(path, map_location="cpu").state_dict()
    return {k: v for k, v in state.items() if k not in OPENAI_JIT_METADATA}


def _trained_with_quick_gelu(cfg, pretrained, openai_jit):
    """True where the weights were trained with QuickGELU: OpenAI's files, and the open_clip tags
    that say so (`openai` of ViT-B-32)."""
    if openai_jit is not None:
        return True
    if pretrained is None or cfg.model_config is not None or os.path.isfile(pretrained):
        return False
    return bool(open_clip.get_pretrained_cfg(cfg.model.replace("/", "-"), pretrained).get("quick_gelu"))


def _config_says_quick_gelu(cfg):
    """Whether the model's own config (open_clip's built-in one, or --model-config) has QuickGELU;
    True for models open_clip resolves elsewhere (hf-hub:), which no note is about."""
    if cfg.model_config is not None:
        return cfg.model_config.get("quick_gelu", False)
    arch = cfg.model.replace("/", "-")
    return arch not in open_clip.list_models() or open_clip.get_model_config(arch).get("quick_gelu", False)


class ModelConfigError(ValueError):
    """A --model-config open_clip cannot build."""


def model_from_config(config: dict, quick_gelu=False):
    """open_clip CLIP (CustomTextCLIP where the config says custom_text) of a model config dict laid out
    as open_clip's model_configs/*.json, random weights; quick_gelu=True forces QuickGELU. ValueError
    naming --model-config (ModelConfigError) where open_clip cannot build it."""
    config = {**config, **({"quick_gelu": True} if quick_gelu else {})}
    model_class = open_clip.CustomTextCLIP if config.pop("custom_text", False) else open_clip.CLIP
    try:
        return model_class(**config)
    except Exception as e:   # TypeError for an unknown key, and whatever a config open_clip cannot build raises
        raise ModelConfigError(f"--model-config: open_clip cannot build a model from it "
                               f"({type(e).__name__}: {' '.join(str(e).split())[:300]})") from None


def build_model(cfg: TrainConfig, device):
    """open_clip model (pretrained or random) with adapters; returns (model, tokenizer, image_size).
    Weights trained with QuickGELU (OpenAI's) make the model run QuickGELU, whatever its config says
    (open_clip's ViT-B-32 says GELU; its ViT-B-32-quickgelu is the same model with QuickGELU)."""
    if cfg.backend == "triton" and not triton_runs_on(device):   # before the model is built
        raise ValueError(f"--backend triton needs a CUDA GPU of compute capability 7.0+, got "
                         f"{describe_device(device)}; use --backend auto (the PyTorch path there)")
    pretrained = None if cfg.pretrained == "none" else cfg.pretrained
    arch = architecture(cfg.model, cfg.model_config)
    try:
        openai_jit = openai_jit_state_dict(pretrained) if pretrained and os.path.isfile(pretrained) else None
        quick_gelu = _trained_with_quick_gelu(cfg, pretrained, openai_jit)
        if cfg.model_config is not None:
            model = model_from_config(cfg.model_config, quick_gelu)
        else:
            model = open_clip.create_model(cfg.model, pretrained=pretrained if openai_jit is None else None,
                                           force_quick_gelu=quick_gelu)
        if openai_jit is not None:
            model.load_state_dict(openai_jit)
        elif pretrained and cfg.model_config is not None:
            open_clip.load_checkpoint(model, pretrained)
    except Exception as e:
        if not pretrained or isinstance(e, ModelConfigError):
            raise
        reason = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
        if os.path.isfile(pretrained):   # another architecture's weights, or not a checkpoint at all
            raise ValueError(f"--pretrained {pretrained}: cannot be loaded into {arch} ({reason}): "
                             f"not an open_clip or OpenAI CLIP checkpoint of that architecture") from None
        # a tag validate() accepted, so a download: no network, hub refused, ...
        raise ValueError(f"--pretrained {pretrained}: could not fetch open_clip's {cfg.model} weights "
                         f"({reason}); download them where there is network and pass the file") from None
    if quick_gelu and not _config_says_quick_gelu(cfg) and int(os.environ.get("RANK", 0)) == 0:
        print(f"note: --pretrained {cfg.pretrained} was trained with QuickGELU (OpenAI's CLIP): {arch} runs with "
              f"QuickGELU too")
    model = model.to(device)
    # settings the model bounds; unset, they are the dataset's recipe, e.g. ActivityNet's d_s = 512 (ViT-B's
    # text width) or DiDeMo's 64 words, which a smaller custom model cannot take
    unset = f"(unset, it is the paper's value for --dataset {cfg.dataset})"
    narrower = min(blocks[0].ln_1.normalized_shape[0] for blocks in tower_blocks(model))
    if cfg.shared_dim > narrower:
        raise ValueError(f"--shared-dim {cfg.shared_dim} is wider than this model's narrower tower ({narrower}): "
                         f"set --shared-dim {unset}")
    if not 2 <= cfg.max_words <= model.context_length:
        raise ValueError(f"--max-words {cfg.max_words} does not fit this model's text context of "
                         f"{model.context_length} tokens: set --max-words in [2, {model.context_length}] {unset}")
    add_cross_modal_adapters(model, CrossModalAdapterConfig(cfg.reduction_dim, cfg.shared_dim, cfg.activation,
                                                           dropout=cfg.dropout), backend=cfg.backend)
    dtype = autocast_dtype(cfg.precision, device)
    if dtype is not None and cfg.backend != "reference":   # the dtype autocast casts them to: bit-identical, leaner
        store_frozen_linears(model, dtype)
    return model, tokenizer_for(cfg), image_size(model)


def tokenizer_for(cfg: TrainConfig):
    """The tokenizer of the run's model: open_clip's for --model; CLIP's for a --model-config (one
    naming a Hugging Face tokenizer is refused by TrainConfig.validate)."""
    return open_clip.get_tokenizer("ViT-B-32" if cfg.model_config is not None else cfg.model)


def image_size(model) -> int:
    """The side of the square frames the model's vision tower takes."""
    size = model.visual.image_size
    return size[0] if isinstance(size, (tuple, list)) else size
