"""Video-text similarity (the paper's two poolings) and the symmetric InfoNCE loss (REFERENCE.md section 2)."""
import torch
import torch.nn.functional as F

POOLINGS = ("meanP", "softmax")


def similarity(text, frames, mask, pooling="meanP", temperature=5.0, chunk=256):
    """Cosine similarity of texts and videos: [Nt, Nv].

    text: [Nt, E] text embeddings; frames: [Nv, T, E] frame embeddings; mask: [Nv, T] bool, or 0/1
    of any dtype (False = padded frame, excluded). meanP: video = mean of its L2-normalised frames.
    softmax (the paper's parameter-free pooling): per text, frame weights = softmax over the video's
    frames of <text, frame> / temperature on UN-normalised embeddings; video = weighted mean of
    frames. Texts are processed `chunk` at a time so evaluation sets fit in memory.

    The softmax pooling never forms the pooled videos ([Nt, Nv, E] per chunk): with dots_f =
    <text, frame_f> and w the weights, <text, video> = sum_f w_f dots_f and |video|^2 = w^T G w,
    G [T, T] the Gram matrix of the video's frames, computed once. That is T/E of the work (12/512
    for 12 frames) and the same numbers up to float rounding.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if text.dim() != 2 or frames.dim() != 3 or text.shape[1] != frames.shape[2] or mask.shape != frames.shape[:2]:
        raise ValueError(f"similarity takes text [Nt, E], frames [Nv, T, E] and mask [Nv, T], got text "
                         f"{list(text.shape)}, frames {list(frames.shape)}, mask {list(mask.shape)}")
    mask = mask.bool()   # a 0/1 mask of another dtype means the same
    if not mask.any(dim=1).all():
        raise ValueError("every video needs at least one unmasked frame")
    if pooling == "meanP":
        m = mask.unsqueeze(-1).to(frames.dtype)
        video = (F.normalize(frames, dim=-1) * m).sum(1) / m.sum(1)
        return F.normalize(text, dim=-1) @ F.normalize(video, dim=-1).T
    gram = torch.einsum("vfe,vge->vfg", frames, frames)                       # [Nv, T, T]
    eps = 1e-12   # F.normalize's
    out = []
    for t in text.split(chunk):
        dots = torch.einsum("te,vfe->tvf", t, frames)                          # [t, Nv, T]
        weights = (dots / temperature).masked_fill(~mask, float("-inf")).softmax(-1)
        text_video = (weights * dots).sum(-1)                                  # <text, video>
        video_sq = torch.einsum("tvf,vfg,tvg->tv", weights, gram, weights)     # |video|^2
        norms = t.norm(dim=-1, keepdim=True).clamp_min(eps) * video_sq.clamp_min(eps * eps).sqrt()
        out.append(text_video / norms)
    return torch.cat(out)


def infonce(sim, logit_scale):
    """Symmetric InfoNCE (CE(S) + CE(S^T)) / 2, S = exp(logit_scale) * sim, matches on the diagonal."""
    logits = logit_scale.exp() * sim
    labels = torch.arange(len(sim), device=sim.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
