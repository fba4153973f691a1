"""cma_model.metrics against hand-computed small matrices."""
import pytest
import torch

from cma_model import multi_caption_metrics, retrieval_metrics


def test_hand_computed_3x3():
    sim = torch.tensor([[0.9, 0.1, 0.2],    # text 0: match first -> rank 1
                        [0.8, 0.3, 0.5],    # text 1: 0.3 below 0.8 and 0.5 -> rank 3
                        [0.1, 0.7, 0.6]])   # text 2: 0.6 below 0.7 -> rank 2
    m = retrieval_metrics(sim)
    assert m["R1"] == pytest.approx(100 / 3) and m["R5"] == 100 and m["R10"] == 100
    assert m["MdR"] == 2 and m["MnR"] == 2


def test_even_count_median_and_r5_r10():
    ranks = [1, 6, 11, 2, 1, 1, 1, 1, 12, 3, 5, 10]
    n = len(ranks)
    sim = torch.zeros(n, n)
    for i, r in enumerate(ranks):   # exactly r - 1 other videos score above the match (0)
        others = [j for j in range(n) if j != i]
        for k, j in enumerate(others):
            sim[i, j] = 10.0 if k < r - 1 else -10.0
    m = retrieval_metrics(sim)
    # sorted ranks 1 1 1 1 1 2 3 5 6 10 11 12
    assert m["R1"] == pytest.approx(100 * 5 / 12) and m["R5"] == pytest.approx(100 * 8 / 12)
    assert m["R10"] == pytest.approx(100 * 10 / 12)
    assert m["MdR"] == 2.5 and m["MnR"] == 4.5


def test_ties_count_against_the_query():
    assert retrieval_metrics(torch.ones(5, 5))["R1"] == 0
    assert retrieval_metrics(torch.ones(5, 5))["MnR"] == 5
    sim = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    m = retrieval_metrics(sim)
    assert m["R1"] == 50 and m["MnR"] == 1.5


def test_multi_caption_video_to_text_uses_the_best_caption():
    # 3 captions, 2 videos: captions 0,1 -> video 0; caption 2 -> video 1
    sim = torch.tensor([[0.2, 0.9],    # caption 0 prefers video 1 (its video 0 ranks 2nd)
                        [0.8, 0.1],    # caption 1 ranks video 0 first
                        [0.3, 0.5]])   # caption 2 ranks video 1 first
    m = multi_caption_metrics(sim, torch.tensor([0, 0, 1]))
    assert m["t2v"]["R1"] == pytest.approx(200 / 3)
    # video 0 column [0.2, 0.8, 0.3]: its captions rank 3 and 1 -> best 1
    # video 1 column [0.9, 0.1, 0.5]: caption 2 ranks 2 -> 2
    assert m["v2t"]["R1"] == 50 and m["v2t"]["MnR"] == 1.5


def test_errors():
    sim = torch.rand(3, 3)
    sim[1, 1] = float("nan")   # NaN >= x is false: it would rank first, R@1 for a broken model
    for metrics in (lambda: retrieval_metrics(sim), lambda: multi_caption_metrics(sim, torch.arange(3))):
        with pytest.raises(ValueError, match="1 NaN similarities"):
            metrics()
    with pytest.raises(ValueError, match="square"):
        retrieval_metrics(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="at least one caption"):
        multi_caption_metrics(torch.zeros(2, 3), torch.tensor([0, 1]))
