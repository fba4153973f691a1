"""cma_train.evaluate: what it refuses to score (its metrics are checked against a hand-built model
in test_train.py and test_cli.py)."""
import open_clip
import pytest
import torch
from conftest import TINY_TRAIN_CLIP

from cma_model import CrossModalAdapter
from cma_model.cache import FrameCache
from cma_model.data import VideoFrames
from cma_model.datasets import load_annotations
from cma_train.evaluate import evaluate
from cma_train.config import TrainConfig
from cma_train.backbone import build_model


@pytest.mark.parametrize("tower", ["visual", "transformer"])
def test_non_finite_embeddings_are_an_error_not_a_perfect_score(video_set, tower):
    jsonl, cache = video_set
    cfg = TrainConfig(model_config=TINY_TRAIN_CLIP, pretrained="none", max_words=12)
    model, tokenizer, size = build_model(cfg, torch.device("cpu"))
    adapter = next(m for name, m in model.named_modules()
                   if name.startswith(tower) and isinstance(m, CrossModalAdapter))
    with torch.no_grad():
        adapter.b_down.fill_(float("nan"))   # diverged adapters in one tower
    with pytest.raises(ValueError, match="non-finite embeddings for"):
        evaluate(model, open_clip.get_tokenizer("ViT-B-32"), load_annotations("jsonl", jsonl),
                 VideoFrames(FrameCache(cache), 12, size), "meanP", max_words=12, workers=0, progress=False)
