"""cma_model.losses: both poolings against the pooling written out directly, and InfoNCE by hand."""
import math
import re

import pytest
import torch
import torch.nn.functional as F

from cma_model.losses import infonce, similarity


def _inputs(texts, videos, frames, dim, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(texts, dim, generator=g, dtype=torch.float64).to(dtype)
    feats = (torch.randn(videos, frames, dim, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    mask = torch.rand(videos, frames, generator=g) < 0.7
    mask[:, 0] = True                       # every video keeps a frame
    mask[0] = True                          # and one keeps all
    feats[~mask] = 0                        # padded slots are zeros, as encode_frames leaves them
    return text, feats, mask


def _direct(text, frames, mask, pooling, temperature):
    """The pooled video formed explicitly, one text and one video at a time."""
    out = torch.empty(len(text), len(frames), dtype=text.dtype)
    for i, t in enumerate(text):
        for v, (f, m) in enumerate(zip(frames, mask)):
            f = f[m]
            if pooling == "meanP":
                video = F.normalize(f, dim=-1).mean(0)
            else:
                video = torch.softmax(f @ t / temperature, 0) @ f
            out[i, v] = F.normalize(t, dim=-1) @ F.normalize(video, dim=-1)
    return out


@pytest.mark.parametrize("pooling", ["meanP", "softmax"])
@pytest.mark.parametrize("texts,videos,frames,dim", [(5, 7, 4, 16), (9, 3, 12, 32)])
def test_similarity_matches_the_pooling_written_out(pooling, texts, videos, frames, dim):
    """float64 within 1e-12; the softmax path (Gram-matrix form, chunked) also in its gradients."""
    text, feats, mask = _inputs(texts, videos, frames, dim, torch.float64, seed=texts)
    text.requires_grad_(), feats.requires_grad_()
    got = similarity(text, feats, mask, pooling, temperature=0.7, chunk=4)
    want = _direct(text, feats, mask, pooling, temperature=0.7)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    weights = torch.randn(got.shape, dtype=torch.float64)
    grads = torch.autograd.grad((got * weights).sum(), (text, feats))
    want_grads = torch.autograd.grad((want * weights).sum(), (text, feats))
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_softmax_similarity_in_fp32_is_within_float_rounding():
    """fp32 against the float64 pooling written out: within 1e-5."""
    text, feats, mask = _inputs(16, 24, 12, 64, torch.float32, seed=3)
    got = similarity(text, feats, mask, "softmax", 5.0)
    want = _direct(text.double(), feats.double(), mask, "softmax", 5.0)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)


def test_similarity_errors():
    text, feats, mask = _inputs(2, 3, 4, 8, torch.float32)
    with pytest.raises(ValueError, match="pooling must be one of"):
        similarity(text, feats, mask, "max")
    for args, shapes in [((text, feats[..., :6], mask), "text [2, 8], frames [3, 4, 6], mask [3, 4]"),
                         ((text, feats, mask[:, :3]), "text [2, 8], frames [3, 4, 8], mask [3, 3]"),
                         ((text, feats[0], mask), "text [2, 8], frames [4, 8], mask [3, 4]")]:
        with pytest.raises(ValueError, match=rf"takes text \[Nt, E\], frames \[Nv, T, E\] and mask \[Nv, T\], got "
                                             rf"{re.escape(shapes)}$"):
            similarity(*args, "softmax")
    mask[1] = False
    with pytest.raises(ValueError, match="at least one unmasked frame"):
        similarity(text, feats, mask, "softmax")


@pytest.mark.parametrize("pooling", ["meanP", "softmax"])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_a_0_1_mask_of_another_dtype_means_what_the_bool_mask_does(pooling, dtype):
    text, feats, mask = _inputs(4, 5, 6, 8, torch.float64, seed=2)
    assert not mask.all()   # some padded frames
    torch.testing.assert_close(similarity(text, feats, mask.to(dtype), pooling),
                               similarity(text, feats, mask, pooling), rtol=0, atol=0)


def test_infonce_by_hand():
    g = torch.Generator().manual_seed(0)
    sim = torch.rand(5, 5, generator=g, dtype=torch.float64) * 2 - 1
    scale = torch.tensor(math.log(20.0), dtype=torch.float64)
    logits = 20.0 * sim
    t2v = -sum(logits[i, i] - torch.logsumexp(logits[i], 0) for i in range(5)) / 5
    v2t = -sum(logits[i, i] - torch.logsumexp(logits[:, i], 0) for i in range(5)) / 5
    assert infonce(sim, scale).item() == pytest.approx(((t2v + v2t) / 2).item(), rel=1e-12)
