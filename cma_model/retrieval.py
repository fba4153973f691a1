"""Model-side helpers for retrieval: embed videos frame by frame and captions at their own length,
compile the towers, gather features across ranks."""
import open_clip
import torch
import torch.distributed as dist
import torch.nn.functional as F
from open_clip.utils import to_2tuple

from cma_model.cuda_graphs import graphed, replays_fixed_shapes, text_transformer

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")   # the modes that run the compiled towers as CUDA graphs


def compile_towers(model, mode="default"):
    """torch.compile the vision tower and the text transformer of an open_clip model, in place:
    parameter names do not change, so adapter checkpoints still fit. The fused adapter is a
    registered custom op and compiles without graph breaks; encode_frames then feeds the vision
    tower every frame slot, so batches keep one shape. mode: one of COMPILE_MODES
    ("reduce-overhead" adds CUDA graphs). Returns the model."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {COMPILE_MODES}, got {mode!r}")
    for tower in (model.visual, text_transformer(model)):
        if graphed(tower) is not None:
            raise ValueError("compile_towers: the towers replay CUDA graphs (cma_model.cuda_graphs.graph_towers); "
                             "use one or the other")
        tower.compile(mode=mode)
    return model


def encode_frames(model, frames, mask):
    """frames [B, T, 3, S, S], mask [B, T] -> frame embeddings [B, T, E] (un-normalised), zero in
    padded slots. Only the unmasked frames go through the vision tower, except on a compiled one
    or one that replays CUDA graphs (cma_model.cuda_graphs): that gets all B * T frames, one fixed
    shape whatever the mask, so neither torch.compile nor the graphs meet a new shape for every
    count of padded frames in a batch."""
    height, width = to_2tuple(model.visual.image_size)
    if frames.dim() != 5 or tuple(frames.shape[2:]) != (3, height, width) or mask.shape != frames.shape[:2]:
        raise ValueError(f"encode_frames takes frames [B, T, 3, {height}, {width}] (this vision tower's size) and mask "
                         f"[B, T], got frames {list(frames.shape)}, mask {list(mask.shape)}")
    if replays_fixed_shapes(model.visual):
        feats = model.encode_image(frames.flatten(0, 1)).unflatten(0, mask.shape)
        return torch.where(mask.unsqueeze(-1), feats, 0)
    feats = model.encode_image(frames[mask])
    out = feats.new_zeros(*mask.shape, feats.shape[-1])
    out[mask] = feats
    return out


def encode_text(model, tokens):
    """tokens [B, L] (open_clip token ids, zero-padded; L <= model.context_length) -> text
    embeddings [B, E] (un-normalised), the same as model.encode_text on the tokens zero-padded to
    the full context. open_clip's CLIP text tower is causal (a position never sees the ones after
    it) and pools at the end token (pool type "argmax", OpenAI's CLIP), so it runs only the L
    positions: captions of 32 words cost 32/77 of the full context. Other text towers get the
    padded tokens."""
    context = model.context_length
    if tokens.shape[1] > context:
        raise ValueError(f"{tokens.shape[1]} tokens per caption, the text tower takes at most {context}")
    short = tokens.shape[1] < context
    if not (short and type(model) is open_clip.CLIP and model.attn_mask is not None
            and getattr(model, "text_pool_type", "argmax") == "argmax"):
        return model.encode_text(F.pad(tokens, (0, context - tokens.shape[1])) if short else tokens)
    length, cast_dtype = tokens.shape[1], model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype) + model.positional_embedding[:length].to(cast_dtype)
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:length, :length].contiguous()))
    x = x[torch.arange(len(x), device=x.device), tokens.argmax(dim=-1)]   # at the end token, the largest id
    if model.text_projection is None:
        return x
    return model.text_projection(x) if isinstance(model.text_projection, torch.nn.Linear) else x @ model.text_projection


class RetrievalForward(torch.nn.Module):
    """forward(frames, mask, tokens) -> (frame embeddings [B, T, E], text embeddings [B, E]) of an
    open_clip model: both towers in one module, the one a training step runs."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.embed_dim = model.visual.output_dim   # E

    def forward(self, frames, mask, tokens):
        return encode_frames(self.model, frames, mask), encode_text(self.model, tokens)


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
    if max(sizes) == 0:   # every rank's share is empty: no collective of empty tensors (gloo's could abort)
        return x
    padded = x.new_zeros(max(sizes), *x.shape[1:])
    padded[: x.shape[0]] = x.detach()
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    parts = [p[:n] for p, n in zip(parts, sizes)]
    parts[rank] = x
    return torch.cat(parts)
