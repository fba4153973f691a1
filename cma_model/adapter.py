"""Cross-Modal Adapter on open_clip CLIP models (REFERENCE.md section 1).

Every residual block of both towers gets two adapters, on the attention and on the MLP sublayer
output h (after open_clip's ls_1 / ls_2): x = x + h + W_up . act(W_down . h + b_down) + b_up.
The last d_s output channels of W_up (and b_up) are ONE tensor shared by paired vision and text
blocks. Adapted blocks keep their open_clip class as a base and their parameter names; the
adapters are the submodules `adapter_attn` / `adapter_mlp` and the block forward calls them with
the residual, so the fused backend costs one launch per sublayer.

Block pairing for the shared tensors: blocks are paired by relative depth, and the deepest
blocks always pair. With m blocks in the shallower tower and n in the deeper one, shallow block k
pairs with deep block floor((k + 1) * n / m) - 1. Equal depths (ViT-B) give the official
i <-> i pairing; ViT-L/14 (24 vision, 12 text) pairs text block j with vision block 2j + 1.
Unpaired blocks get an unshared up-projection of the same [d_s, r] shape.
"""
import dataclasses
import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
from open_clip.model import CLIP, CustomTextCLIP
from open_clip.transformer import (CustomResidualAttentionBlock, ResidualAttentionBlock, TextTransformer,
                                   VisionTransformer)

from cma_kernels import (MAX_RANK, adapter_reference, describe_device, fused_adapter_unchecked, fuses_by_default,
                         triton_runs_on)
from cma_kernels.reference import ACTIVATIONS
from cma_model import frozen_block

BACKENDS = ("auto", "reference", "triton")
FORMAT = "cma-adapter-v1"


@dataclass
class CrossModalAdapterConfig:
    """reduction_dim r: bottleneck width; shared_dim d_s: up-projection channels shared across towers
    (the last d_s); init_std: truncated-normal std of the adapter weights (cut at +-2 std), biases zero."""
    reduction_dim: int = 8
    shared_dim: int = 16
    activation: str = "quick_gelu"
    init_std: float = 0.01
    dropout: float = 0.0

    def validate(self, max_shared_dim=None):
        """ValueError for a setting no adapter can have; max_shared_dim: the narrower tower's width."""
        if not isinstance(self.reduction_dim, int) or self.reduction_dim < 1:
            raise ValueError(f"reduction_dim must be an integer >= 1, got {self.reduction_dim!r}")
        upper = "min(tower widths)" if max_shared_dim is None else f"min(tower widths) = {max_shared_dim}"
        if not isinstance(self.shared_dim, int) or self.shared_dim < 0 or (
                max_shared_dim is not None and self.shared_dim > max_shared_dim):
            raise ValueError(f"shared_dim must be an integer in [0, {upper}], got {self.shared_dim!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if not self.init_std >= 0:
            raise ValueError(f"init_std must be >= 0, got {self.init_std!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")


def trunc_normal(shape, std):
    """fp32 tensor of `shape` from Normal(0, std) truncated to [-2 std, 2 std], by the inverse CDF of
    float64 torch.rand draws: the same values from the same seed on every torch release
    (nn.init.trunc_normal_ draws other values from one seed in torch 2.11 and 2.14)."""
    lo = 0.5 * math.erfc(math.sqrt(2))   # Phi(-2)
    u = lo + (1 - 2 * lo) * torch.rand(shape, dtype=torch.float64)
    return (math.sqrt(2) * std * torch.erfinv(2 * u - 1)).float()


class SharedUpProjection(nn.Module):
    """The up-projection rows for the last d_s channels: weight [d_s, r], bias [d_s]. One instance
    is held by a paired vision block and text block (tied weights, like a tied LM head)."""

    def __init__(self, shared_dim, reduction_dim, init_std):
        super().__init__()
        self.weight = nn.Parameter(trunc_normal((shared_dim, reduction_dim), init_std))
        self.bias = nn.Parameter(torch.zeros(shared_dim))


class CrossModalAdapter(nn.Module):
    """One adapter of width D: w_down [r, D], b_down [r], w_up_unique [D - d_s, r],
    b_up_unique [D - d_s], plus the (possibly shared) `shared` up-projection."""

    def __init__(self, width, config: CrossModalAdapterConfig, shared: SharedUpProjection, backend="auto"):
        super().__init__()
        r, ds = config.reduction_dim, config.shared_dim
        self.config, self.backend = config, backend
        self.w_down = nn.Parameter(trunc_normal((r, width), config.init_std))
        self.b_down = nn.Parameter(torch.zeros(r))
        self.w_up_unique = nn.Parameter(trunc_normal((width - ds, r), config.init_std))
        self.b_up_unique = nn.Parameter(torch.zeros(width - ds))
        self.shared = shared

    def uses_triton(self, h: torch.Tensor) -> bool:
        """Whether forward(h) runs the fused kernels: by the backend, h's device (cma_kernels.fuses_by_default
        for "auto"), r <= MAX_RANK and no dropout in training. ValueError for "triton" where it cannot run."""
        if self.backend == "reference":
            return False
        fusable = self.config.reduction_dim <= MAX_RANK and not (self.training and self.config.dropout > 0)
        if self.backend == "triton":
            if not triton_runs_on(h.device):
                raise ValueError(f"backend='triton' needs a CUDA GPU of compute capability 7.0+ (or TRITON_INTERPRET=1 "
                                 f"on CPU), got {describe_device(h.device)}; use backend='auto' or 'reference'")
            if not fusable:
                _warn_once(f"fused adapter does not do dropout in training or r > {MAX_RANK}: using the reference path")
            return fusable
        return fusable and fuses_by_default(h.device)

    def forward(self, h, residual=None):
        """h, residual: [..., D] -> residual + h + W_up . act(W_down . h + b_down) + b_up."""
        args = (h, self.w_down, self.b_down, self.w_up_unique, self.b_up_unique, self.shared.weight, self.shared.bias)
        if self.uses_triton(h):
            return fused_adapter_unchecked(*args, residual=residual, activation=self.config.activation)
        return adapter_reference(*args, residual=residual, activation=self.config.activation,
                                 dropout_p=self.config.dropout, training=self.training)


_warned = set()


def _warn_once(msg):
    if msg not in _warned:
        _warned.add(msg)
        warnings.warn(msg, stacklevel=3)


class _KeepsCastDtype:
    def get_weight_dtype(self) -> torch.dtype:
        """open_clip casts the text embeddings to this: the dtype the block was built in, read from
        its norm, which frozen_block.store_frozen_linears leaves alone."""
        return self.ln_1.weight.dtype


class AdaptedResidualAttentionBlock(_KeepsCastDtype, ResidualAttentionBlock):
    """open_clip ResidualAttentionBlock with an adapter on each sublayer (self-attention only).
    Unless the adapters run the "reference" backend, the frozen sublayers run lean
    (cma_model.frozen_block) and recompute the attention adapter's input and output in backward
    instead of keeping them (`recompute_out_proj`); `recompute_mlp` also recomputes the MLP's hidden
    activation (both set by set_recompute)."""
    recompute_mlp = False
    recompute_out_proj = True
    lean_layout = False   # frozen_block.has_lean_layout, decided once by add_cross_modal_adapters

    def _recomputes_out_proj(self) -> bool:
        """Whether the attention adapter's input h = out_proj(attention) and its output, the block's
        mid-point, are recomputed in backward (frozen_block.out_proj_adapter): where set, for
        batch-first attention without layer scale and a cma adapter that has no dropout to draw in
        training."""
        adapter = self.adapter_attn
        return (self.recompute_out_proj and self.attn.batch_first and isinstance(self.ls_1, nn.Identity)
                and isinstance(adapter, CrossModalAdapter) and not (self.training and adapter.config.dropout > 0))

    def forward(self, q_x, k_x=None, v_x=None, attn_mask=None):
        if k_x is not None or v_x is not None:
            raise ValueError("cross-attention blocks are not adapted")
        if self.adapter_attn.backend == "reference" or not self.lean_layout:
            h = self.ls_1(self.attention(q_x=self.ln_1(q_x), attn_mask=attn_mask))
            x = self.adapter_attn(h, residual=q_x)
            return self.adapter_mlp(self.ls_2(self.mlp(self.ln_2(x))), residual=x)
        mask = attn_mask.to(q_x.dtype) if attn_mask is not None else None   # as open_clip's attention() does
        normed = frozen_block.layer_norm(self.ln_1, q_x)
        if self._recomputes_out_proj():
            heads = frozen_block.attention_heads(self.attn, normed, mask)
            ln_2 = None if self.recompute_mlp else self.ln_2   # recompute_mlp's checkpoint keeps x
            x, normed = frozen_block.out_proj_adapter(self.attn.out_proj, heads, self.adapter_attn, q_x, ln_2)
        else:
            h = self.ls_1(frozen_block.self_attention(self.attn, normed, mask))
            x, normed = self.adapter_attn(h, residual=q_x), None
        hidden = frozen_block.mlp(self, x, self.recompute_mlp, fused=self.adapter_mlp.uses_triton(x), normed=normed)
        return self.adapter_mlp(self.ls_2(hidden), residual=x)


class AdaptedCustomResidualAttentionBlock(_KeepsCastDtype, CustomResidualAttentionBlock):
    """open_clip CustomResidualAttentionBlock with an adapter on each sublayer."""

    def forward(self, x, attn_mask=None):
        h = self.ls_1(self.ln_attn(self.attn(self.ln_1(x), attn_mask=attn_mask)))
        x = self.adapter_attn(h, residual=x)
        return self.adapter_mlp(self.ls_2(self.mlp(self.ln_2(x))), residual=x)


_ADAPTED = {ResidualAttentionBlock: AdaptedResidualAttentionBlock,
            CustomResidualAttentionBlock: AdaptedCustomResidualAttentionBlock}


def tower_blocks(model):
    """(vision blocks, text blocks) of an open_clip CLIP or CustomTextCLIP; ValueError otherwise."""
    if not isinstance(model, (CLIP, CustomTextCLIP)):
        raise ValueError(f"expected an open_clip CLIP or CustomTextCLIP model, got {type(model).__name__}")
    if not isinstance(model.visual, VisionTransformer):
        raise ValueError(f"the vision tower must be an open_clip VisionTransformer, got {type(model.visual).__name__}")
    text = model.transformer if isinstance(model, CLIP) else getattr(model.text, "transformer", None)
    if isinstance(model, CustomTextCLIP) and not isinstance(model.text, TextTransformer):
        raise ValueError(f"the text tower must be an open_clip TextTransformer, got {type(model.text).__name__}")
    towers = (list(model.visual.transformer.resblocks), list(text.resblocks))
    for blocks in towers:
        for b in blocks:
            if not isinstance(b, tuple(_ADAPTED)) and not isinstance(b, tuple(_ADAPTED.values())):
                raise ValueError(f"unsupported residual block type {type(b).__name__}")
    return towers


def pair_blocks(n_vision: int, n_text: int):
    """[(vision_index, text_index)] pairs that share an up-projection: relative depth, deepest pair."""
    m, n = min(n_vision, n_text), max(n_vision, n_text)
    shallow_deep = [(k, (k + 1) * n // m - 1) for k in range(m)]
    if n_text <= n_vision:
        return [(deep, k) for k, deep in shallow_deep]
    return shallow_deep


def _tower_info(model):
    vision, text = tower_blocks(model)
    return {"vision_width": _width(vision[0]), "vision_layers": len(vision),
            "vision_patch_size": list(model.visual.patch_size),   # ViT-B/32 adapters do not fit ViT-B/16
            "text_width": _width(text[0]), "text_layers": len(text)}


def _width(block):
    return block.ln_1.normalized_shape[0]


def add_cross_modal_adapters(model, config: CrossModalAdapterConfig = None, backend: str = "auto"):
    """Insert adapters into both towers of an open_clip CLIP model (in place), freeze everything
    else (logit_scale included) and return the model.

    backend: "reference" (PyTorch), "triton" (fused kernels; CUDA GPUs of compute capability 7.0+,
    or CPU with TRITON_INTERPRET=1) or "auto" (triton on GPUs of compute capability 8.0+, the ones
    Triton supports; reference elsewhere). Adapter weights take the device and dtype of the model's
    weights (train an fp32 model under autocast, as open_clip does).
    """
    config = config or CrossModalAdapterConfig()
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    vision, text = tower_blocks(model)
    if any(hasattr(b, "adapter_attn") for b in vision + text):
        raise ValueError("this model already has cross-modal adapters")
    widths = [_width(vision[0]), _width(text[0])]
    config.validate(max_shared_dim=min(widths))

    for p in model.parameters():
        p.requires_grad_(False)
    like = model.visual.transformer.resblocks[0].mlp.c_fc.weight
    to = dict(device=like.device, dtype=like.dtype)
    r, ds, std = config.reduction_dim, config.shared_dim, config.init_std
    shared = {}   # (tower, block index, sublayer) -> SharedUpProjection
    for v, t in pair_blocks(len(vision), len(text)):
        for sub in ("attn", "mlp"):
            shared[("vision", v, sub)] = shared[("text", t, sub)] = SharedUpProjection(ds, r, std).to(**to)
    for tower, blocks in (("vision", vision), ("text", text)):
        for i, block in enumerate(blocks):
            for sub in ("attn", "mlp"):
                key = (tower, i, sub)
                up = shared[key] if key in shared else SharedUpProjection(ds, r, std).to(**to)
                block.add_module(f"adapter_{sub}", CrossModalAdapter(_width(block), config, up, backend).to(**to))
            block.__class__ = _ADAPTED[type(block)]
            block.lean_layout = frozen_block.has_lean_layout(block)
    return model


def remove_cross_modal_adapters(model):
    """Take the adapters out of an open_clip model (in place) and return it: its blocks are plain
    open_clip blocks again and compute what they did before add_cross_modal_adapters, so that
    adapters of another shape, another dataset's, can go in without building or loading the
    backbone again. The backbone's parameters stay frozen. A model without adapters is returned
    as it is."""
    plain = {adapted: block_type for block_type, adapted in _ADAPTED.items()}
    for block in [b for blocks in tower_blocks(model) for b in blocks if type(b) in plain]:
        del block.adapter_attn, block.adapter_mlp
        for flag in ("lean_layout", "recompute_mlp", "recompute_out_proj"):   # add_cross_modal_adapters, set_recompute
            block.__dict__.pop(flag, None)
        block.__class__ = plain[type(block)]
    return model


def adapter_modules(model):
    """Every CrossModalAdapter of the model, vision tower first, in block order."""
    return [m for m in model.modules() if isinstance(m, CrossModalAdapter)]


def adapter_named_parameters(model):
    """(name, parameter) of every adapter parameter, shared tensors once (under their first name)."""
    ids = {id(p) for m in adapter_modules(model) for p in m.parameters()}
    return [(n, p) for n, p in model.named_parameters() if id(p) in ids]


def count_trainable_parameters(model) -> int:
    """Elements of the parameters that require grad (shared tensors counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def set_adapter_backend(model, backend):
    """Switch every adapter of the model to backend "auto", "reference" or "triton"."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    for m in adapter_modules(model):
        m.backend = backend
    return model


def set_recompute(model, mlp: bool = None, out_proj: bool = None):
    """What each adapted open_clip block (on a non-reference backend) recomputes in backward instead
    of keeping; None leaves a setting as it is. Returns the model.
    - mlp (off by default): the MLP's hidden activation, 4 fewer [N, D] activations kept per block
      for one more c_fc matmul per block;
    - out_proj (on by default): the attention adapter's input (out_proj's output) and output (the
      block's mid-point), 2 fewer for one more [N, D] x [D, D] matmul and one more adapter forward
      per block (1 fewer with mlp, whose recompute starts from the mid-point and so keeps it)."""
    blocks = [m for m in model.modules() if isinstance(m, AdaptedResidualAttentionBlock)]
    if not blocks:
        raise ValueError("the model has no adapted open_clip blocks; call add_cross_modal_adapters first")
    for b in blocks:
        if mlp is not None:
            b.recompute_mlp = bool(mlp)
        if out_proj is not None:
            b.recompute_out_proj = bool(out_proj)
    return model


def _adapter_config(model):
    adapters = adapter_modules(model)
    if not adapters:
        raise ValueError("the model has no cross-modal adapters; call add_cross_modal_adapters first")
    return adapters[0].config


def adapter_state_dict(model):
    """Adapter-only checkpoint: {"format", "config", "towers", "state_dict"} (tensors on CPU).
    About 2 MB for ViT-B/32 at the paper's MSR-VTT config; save it with torch.save."""
    return {"format": FORMAT, "config": dataclasses.asdict(_adapter_config(model)), "towers": _tower_info(model),
            "state_dict": {n: p.detach().cpu().clone() for n, p in adapter_named_parameters(model)}}


def load_adapter_state_dict(model, state, backend="auto"):
    """Load `adapter_state_dict` output into an open_clip model, adding adapters first if it has
    none. Raises ValueError naming the mismatch when the checkpoint does not fit the model."""
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"not a cma adapter checkpoint (expected format {FORMAT!r})")
    if not {"towers", "config", "state_dict"} <= state.keys():
        raise ValueError(f"adapter checkpoint lacks {sorted({'towers', 'config', 'state_dict'} - state.keys())}")
    towers = _tower_info(model)
    for key, want in state["towers"].items():
        if towers.get(key) != want:
            raise ValueError(f"adapter checkpoint was made for {key}={want}, "
                             f"but this model has {key}={towers.get(key)}")
    if not adapter_modules(model):
        add_cross_modal_adapters(model, CrossModalAdapterConfig(**state["config"]), backend=backend)
    config = dataclasses.asdict(_adapter_config(model))
    for key, want in state["config"].items():
        if config.get(key) != want:
            raise ValueError(f"adapter checkpoint has {key}={want!r}, but this model's adapters have "
                             f"{key}={config.get(key)!r} (cma_model.remove_cross_modal_adapters(model) first "
                             f"replaces them)")
    params = dict(adapter_named_parameters(model))
    missing, unexpected = params.keys() - state["state_dict"].keys(), state["state_dict"].keys() - params.keys()
    if missing or unexpected:
        raise ValueError(f"adapter checkpoint does not match the model: missing {sorted(missing)[:3]}, "
                         f"unexpected {sorted(unexpected)[:3]}")
    with torch.no_grad():
        for name, p in params.items():
            src = state["state_dict"][name]
            if src.shape != p.shape:
                raise ValueError(f"adapter tensor {name} has shape {list(src.shape)} in the checkpoint, "
                                 f"{list(p.shape)} in the model")
            p.copy_(src)
    return model
