"""cma_model.retrieval: frame encoding with padded slots, eager and on a compiled vision tower."""
import copy

import pytest
import torch
from conftest import small_clip

from cma_model import CrossModalAdapterConfig, add_cross_modal_adapters
from cma_model.retrieval import COMPILE_MODES, compile_towers, encode_frames


def _frames_and_masks(videos=3, frames=4, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(videos, frames, 3, size, size, generator=g)
    masks = [torch.ones(videos, frames, dtype=torch.bool), torch.ones(videos, frames, dtype=torch.bool)]
    masks[1][0, 2:] = False
    masks[1][2, 1:] = False
    return x, masks


def test_compiled_tower_gets_one_shape_and_the_same_embeddings():
    """A compiled vision tower encodes every frame (one graph for any mask) and zeroes the padded
    slots: the same embeddings and adapter gradients as the eager path that skips them (float64,
    1e-10), and exactly zero where padded."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    eager = add_cross_modal_adapters(small_clip(), CrossModalAdapterConfig(reduction_dim=4, shared_dim=8)).double()
    compiled = copy.deepcopy(eager)
    compiled.visual.compile(backend="eager")
    frames, masks = _frames_and_masks()
    frames = frames.double()
    counters.clear()
    for mask in masks:
        want = encode_frames(eager, frames, mask)
        got = encode_frames(compiled, frames, mask)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        assert (got[~mask] == 0).all()
        weights = torch.randn(want.shape, dtype=want.dtype)
        (want * weights).sum().backward()
        (got * weights).sum().backward()
    assert counters["stats"]["unique_graphs"] == 1   # both masks, one shape
    grads = {n: p.grad for n, p in eager.named_parameters() if p.requires_grad}
    for n, p in compiled.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-10, atol=1e-12, msg=lambda m: f"{n}: {m}")


def test_compile_towers_rejects_an_unknown_mode():
    with pytest.raises(ValueError, match="compile mode must be one of"):
        compile_towers(small_clip(), "fastest")
    assert "reduce-overhead" in COMPILE_MODES
