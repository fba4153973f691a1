"""Video-text similarity (the paper's two poolings) and the symmetric InfoNCE loss (REFERENCE.md section 2)."""
import torch
import torch.nn.functional as F

POOLINGS = ("meanP", "softmax")


def similarity(text, frames, mask, pooling="meanP", temperature=5.0, chunk=256):
    """Cosine similarity of texts and videos: [Nt, Nv].

    text: [Nt, E] text embeddings; frames: [Nv, T, E] frame embeddings; mask: [Nv, T] bool (False =
    padded frame, excluded). meanP: video = mean of its L2-normalised frames. softmax (the paper's
    parameter-free pooling): per text, frame weights = softmax over the video's frames of
    <text, frame> / temperature on UN-normalised embeddings; video = weighted mean of frames.
    Texts are processed `chunk` at a time so evaluation sets fit in memory.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if not mask.any(dim=1).all():
        raise ValueError("every video needs at least one unmasked frame")
    text_n = F.normalize(text, dim=-1)
    if pooling == "meanP":
        m = mask.unsqueeze(-1).to(frames.dtype)
        video = (F.normalize(frames, dim=-1) * m).sum(1) / m.sum(1)
        return text_n @ F.normalize(video, dim=-1).T
    out = []
    for t in text.split(chunk):
        scores = torch.einsum("te,vfe->tvf", t, frames) / temperature
        weights = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        video = torch.einsum("tvf,vfe->tve", weights, frames)
        out.append(torch.einsum("te,tve->tv", F.normalize(t, dim=-1), F.normalize(video, dim=-1)))
    return torch.cat(out)


def infonce(sim, logit_scale):
    """Symmetric InfoNCE (CE(S) + CE(S^T)) / 2, S = exp(logit_scale) * sim, matches on the diagonal."""
    logits = logit_scale.exp() * sim
    labels = torch.arange(len(sim), device=sim.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
