"""Model-side helpers for retrieval: embed videos frame by frame, compile the towers, gather
features across ranks."""
import torch
import torch.distributed as dist

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_towers(model, mode="default"):
    """torch.compile the vision tower and the text transformer of an open_clip model, in place:
    parameter names do not change, so adapter checkpoints still fit. The fused adapter is a
    registered custom op and compiles without graph breaks; encode_frames then feeds the vision
    tower every frame slot, so batches keep one shape. mode: one of COMPILE_MODES
    ("reduce-overhead" adds CUDA graphs). Returns the model."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {COMPILE_MODES}, got {mode!r}")
    text = model.transformer if hasattr(model, "transformer") else model.text.transformer
    for tower in (model.visual, text):
        tower.compile(mode=mode)
    return model


def encode_frames(model, frames, mask):
    """frames [B, T, 3, S, S], mask [B, T] -> frame embeddings [B, T, E] (un-normalised), zero in
    padded slots. Only the unmasked frames go through the vision tower, except on a compiled one:
    that gets all B * T frames, one fixed shape whatever the mask, so neither torch.compile nor
    its CUDA graphs meet a new shape for every count of padded frames in a batch."""
    if getattr(model.visual, "_compiled_call_impl", None) is not None:   # nn.Module.compile (compile_towers)
        feats = model.encode_image(frames.flatten(0, 1)).unflatten(0, mask.shape)
        return torch.where(mask.unsqueeze(-1), feats, 0)
    feats = model.encode_image(frames[mask])
    out = feats.new_zeros(*mask.shape, feats.shape[-1])
    out[mask] = feats
    return out


class RetrievalForward(torch.nn.Module):
    """forward(frames, mask, tokens) -> (frame embeddings [B, T, E], text embeddings [B, E]) of an
    open_clip model: one forward for both towers, so DistributedDataParallel can wrap it."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, frames, mask, tokens):
        return encode_frames(self.model, frames, mask), self.model.encode_text(tokens)


def gather_with_grad(x):
    """All-gather x [B_local, ...] from every rank (B_local may differ per rank), keeping autograd
    only through this rank's slice. Returns gathered [B_global, ...], ranks in order."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    world, rank = dist.get_world_size(), dist.get_rank()
    size = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    sizes = [int(s) for s in sizes]
    padded = x.new_zeros(max(sizes), *x.shape[1:])
    padded[: x.shape[0]] = x.detach()
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    parts = [p[:n] for p, n in zip(parts, sizes)]
    parts[rank] = x
    return torch.cat(parts)
