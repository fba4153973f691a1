"""cma_model.retrieval: frame encoding with padded slots, eager and on a compiled vision tower."""
import copy
import re

import pytest
import torch
from conftest import small_clip

from cma_model import CrossModalAdapterConfig, add_cross_modal_adapters
from cma_model.retrieval import COMPILE_MODES, compile_towers, encode_frames, encode_text


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


@pytest.mark.parametrize("frames_shape, mask_shape", [((2, 3, 32, 32), (2, 1)), ((1, 2, 3, 64, 64), (1, 2)),
                                                      ((1, 2, 32, 32, 3), (1, 2)), ((1, 2, 3, 32, 32), (1, 3))])
def test_encode_frames_refuses_frames_the_tower_cannot_take_naming_the_shapes(frames_shape, mask_shape):
    """A batch of images without the frame axis, frames of another size or channels-last, a mask
    of another shape: one line with what it takes (32-pixel frames here) and what it got."""
    said = (rf"^encode_frames takes frames \[B, T, 3, 32, 32\] \(this vision tower's size\) and mask \[B, T\], got "
            rf"frames {re.escape(str(list(frames_shape)))}, mask {re.escape(str(list(mask_shape)))}$")
    with pytest.raises(ValueError, match=said):
        encode_frames(small_clip(), torch.randn(frames_shape), torch.ones(mask_shape, dtype=torch.bool))


def test_compile_towers_rejects_an_unknown_mode():
    with pytest.raises(ValueError, match="compile mode must be one of"):
        compile_towers(small_clip(), "fastest")
    assert "reduce-overhead" in COMPILE_MODES


def _captions(batch, length, vocab=100, seed=0):
    """Token ids as open_clip's tokenizer lays them out: words, the end token (the largest id, where
    CLIP pools) at a random position < length, zeros after: [batch, length]."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, vocab - 1, (batch, length), generator=g)
    ends = torch.randint(1, length, (batch,), generator=g)
    tokens[torch.arange(batch), ends] = vocab - 1
    return tokens.masked_fill(torch.arange(length) > ends[:, None], 0)


@pytest.mark.parametrize("length", [2, 9, 16])
@pytest.mark.parametrize("kind", ["plain", "reference", "lean", "custom_text", "last_token_pool"])
def test_encode_text_at_caption_length_matches_the_full_context(kind, length):
    """encode_text on [B, L] tokens equals open_clip's encode_text on them zero-padded to the
    16-token context, embeddings and adapter gradients (float64, 1e-10); open_clip's CLIP pooling
    at the end token runs only L positions, other text towers (CustomTextCLIP, or a CLIP pooling
    the last position) the full context."""
    model = small_clip(custom_text=kind == "custom_text", seed=3)
    if kind == "last_token_pool":
        model.text_pool_type = "last"
    if kind in ("reference", "lean"):
        add_cross_modal_adapters(model, CrossModalAdapterConfig(reduction_dim=4, shared_dim=8),
                                 backend="reference" if kind == "reference" else "auto")
        for p in model.parameters():   # adapters start at zero up-projections' scale: make them count
            if p.requires_grad:
                torch.nn.init.normal_(p, std=0.2)
    model = model.double()
    tokens = _captions(5, length)
    positions = []
    text_tower = model.text.transformer if kind == "custom_text" else model.transformer
    hook = text_tower.register_forward_pre_hook(lambda m, args, kwargs: positions.append(args[0].shape[1]),
                                                with_kwargs=True)
    got = encode_text(model, tokens)
    hook.remove()
    assert positions == [16 if kind in ("custom_text", "last_token_pool") else length]
    want = model.encode_text(torch.nn.functional.pad(tokens, (0, 16 - length)))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    if kind in ("reference", "lean"):
        weights = torch.randn(got.shape, dtype=got.dtype)
        trainable = [p for p in model.parameters() if p.requires_grad]
        grads_got = torch.autograd.grad((got * weights).sum(), trainable, allow_unused=True)
        grads_want = torch.autograd.grad((want * weights).sum(), trainable, allow_unused=True)
        assert sum(g is not None for g in grads_want) > len(trainable) // 2   # the text side's adapters
        for a, b in zip(grads_got, grads_want):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_encode_text_rejects_more_tokens_than_the_context():
    with pytest.raises(ValueError, match="at most 16"):
        encode_text(small_clip(), torch.ones(2, 17, dtype=torch.long))
