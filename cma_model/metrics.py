"""Retrieval metrics: R@1, R@5, R@10 (percent of queries whose match ranks in the top K), MdR and
MnR (median and mean 1-based rank of the match).

Ties count against the query: the match's rank is 1 + the number of OTHER candidates scoring at
least as high. A model that scores everything equally therefore gets the worst rank, never R@1 = 100.
"""
import torch


def _summary(ranks):
    ranks = ranks.double()
    return {"R1": 100 * (ranks <= 1).double().mean().item(), "R5": 100 * (ranks <= 5).double().mean().item(),
            "R10": 100 * (ranks <= 10).double().mean().item(), "MdR": ranks.quantile(0.5).item(),
            "MnR": ranks.mean().item()}


def match_ranks(sim, match):
    """1-based rank of candidate match[i] in row i of sim [Nq, Nc] (ties counted against the query).
    Raises ValueError on a NaN score: it compares false with everything, so it would rank first."""
    if torch.isnan(sim).any():
        raise ValueError(f"{int(torch.isnan(sim).sum())} NaN similarities: ranks would be meaningless")
    return (sim >= sim.gather(1, match.view(-1, 1))).sum(1)   # the match itself counts once


def retrieval_metrics(sim):
    """Metrics of a [num_texts, num_videos] similarity matrix whose diagonal holds the matches
    (text i describes video i): {"R1", "R5", "R10", "MdR", "MnR"} (recalls in percent). MdR is
    the usual median (mean of the two middle ranks for an even count)."""
    sim = torch.as_tensor(sim)
    if sim.dim() != 2 or sim.shape[0] != sim.shape[1]:
        raise ValueError(f"retrieval_metrics needs a square [N, N] matrix, got {list(sim.shape)}; "
                         f"use multi_caption_metrics for several captions per video")
    return _summary(match_ranks(sim, torch.arange(len(sim))))


def multi_caption_metrics(sim, caption_video):
    """Both directions for sim [num_captions, num_videos] where caption i describes video
    caption_video[i]. t2v ranks each caption's video; v2t ranks, per video, its best-ranked caption
    among all captions. Returns {"t2v": {...}, "v2t": {...}}."""
    sim = torch.as_tensor(sim)
    caption_video = torch.as_tensor(caption_video)
    t2v = _summary(match_ranks(sim, caption_video))
    # v2t: for video v and each of its captions c, rank of c in column v; keep the best
    col = sim.T   # [Nv, Nc]
    per_caption = (col[caption_video] >= sim.gather(1, caption_video.view(-1, 1)).view(-1, 1)).sum(1)
    best = torch.full((sim.shape[1],), torch.iinfo(torch.long).max)
    best = best.scatter_reduce(0, caption_video, per_caption, reduce="amin")
    if (best == torch.iinfo(torch.long).max).any():
        raise ValueError("every video needs at least one caption")
    return {"t2v": t2v, "v2t": _summary(best)}
