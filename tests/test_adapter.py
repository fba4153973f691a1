"""cma_model.adapter: placement, sharing, freezing, checkpoints and config errors, against open_clip itself."""
import copy

import open_clip
import pytest
import torch
from conftest import clip_inputs, fake_gpu, small_clip

from cma_model import (CrossModalAdapter, CrossModalAdapterConfig, adapter_modules, adapter_state_dict,
                       add_cross_modal_adapters, count_trainable_parameters, load_adapter_state_dict, pair_blocks,
                       remove_cross_modal_adapters, set_recompute)

PAPER_COUNTS = {(8, 16): 519_168, (8, 8): 520_896, (16, 16): 1_008_000, (16, 64): 988_416, (16, 512): 805_632}


@pytest.mark.parametrize("r,ds", list(PAPER_COUNTS))
def test_trainable_parameters_vit_b32_match_paper(vit_b32, r, ds):
    model = add_cross_modal_adapters(copy.deepcopy(vit_b32), CrossModalAdapterConfig(reduction_dim=r, shared_dim=ds))
    assert count_trainable_parameters(model) == PAPER_COUNTS[(r, ds)]
    assert not model.logit_scale.requires_grad
    assert all(p.requires_grad == ("adapter_" in n) for n, p in model.named_parameters())


def test_adapter_state_dict_size_vit_b32(vit_b32):
    state = adapter_state_dict(add_cross_modal_adapters(copy.deepcopy(vit_b32)))
    nbytes = sum(t.numel() * t.element_size() for t in state["state_dict"].values())
    assert nbytes == 519_168 * 4   # ~2 MB: shared tensors stored once


def _shared_of(block, sub):
    return getattr(block, f"adapter_{sub}").shared


@pytest.mark.parametrize("nv,nt", [(2, 2), (4, 2), (2, 3)])
def test_paired_blocks_share_one_tensor(nv, nt):
    model = add_cross_modal_adapters(small_clip(nv, nt), CrossModalAdapterConfig(reduction_dim=4, shared_dim=8))
    vision, text = model.visual.transformer.resblocks, model.transformer.resblocks
    pairs = pair_blocks(nv, nt)
    assert len(pairs) == min(nv, nt) and pairs[-1] == (nv - 1, nt - 1)
    for sub in ("attn", "mlp"):
        for v, t in pairs:
            assert _shared_of(vision[v], sub) is _shared_of(text[t], sub)
        shared = [_shared_of(b, sub) for b in list(vision) + list(text)]
        assert len({id(s) for s in shared}) == max(nv, nt)   # unpaired blocks own theirs
    assert len(adapter_modules(model)) == 2 * (nv + nt)


def test_vit_l14_pairing_and_count():
    model = open_clip.create_model("ViT-L-14")
    assert pair_blocks(24, 12) == [(2 * j + 1, j) for j in range(12)]
    add_cross_modal_adapters(model, CrossModalAdapterConfig(reduction_dim=8, shared_dim=16))
    vision, text = model.visual.transformer.resblocks, model.transformer.resblocks
    assert all(_shared_of(vision[2 * j + 1], "mlp") is _shared_of(text[j], "mlp") for j in range(12))
    r, ds, dv, dt = 8, 16, 1024, 768
    per = lambda d: r * d + r + (d - ds) * r + (d - ds)  # noqa: E731
    expected = 2 * (24 * per(dv) + 12 * per(dt) + 24 * (ds * r + ds))   # 24 vision blocks own or share one each
    assert count_trainable_parameters(model) == expected


def _zero_up(model):
    with torch.no_grad():
        for m in adapter_modules(model):
            m.w_up_unique.zero_()
            m.shared.weight.zero_()


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("custom_text", [False, True])
def test_zeroed_up_projection_reproduces_open_clip(backend, custom_text):
    """W_up = 0 and b_up = 0 make each adapter the identity on h: embeddings must equal plain open_clip's."""
    plain = small_clip(custom_text=custom_text)
    model = add_cross_modal_adapters(copy.deepcopy(plain), backend=backend)
    _zero_up(model)
    images, texts = clip_inputs()
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), plain.encode_image(images), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.encode_text(texts), plain.encode_text(texts), rtol=1e-5, atol=1e-5)
        model.train()   # nonzero adapters really change the output (the check above can fail)
        m = adapter_modules(model)[0]
        m.w_up_unique.normal_()
        assert not torch.allclose(model.encode_image(images), plain.encode_image(images), atol=1e-3)


def _adapter_grads(model, images=None, texts=None):
    model.zero_grad(set_to_none=True)
    loss = 0
    for seed, encode, inputs in ((5, model.encode_image, images), (6, model.encode_text, texts)):
        if inputs is not None:
            feats = encode(inputs)
            loss = loss + (feats * torch.randn(feats.shape, generator=torch.Generator().manual_seed(seed))).sum()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("ds", [8, 48])
def test_gradients_only_on_adapters_and_shared_grad_sums_towers(ds):
    model = add_cross_modal_adapters(small_clip(), CrossModalAdapterConfig(reduction_dim=4, shared_dim=ds))
    images, texts = clip_inputs()
    both = _adapter_grads(model, images, texts)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(both) == trainable and all("adapter_" in n for n in both)
    vision_only = _adapter_grads(model, images=images)
    text_only = _adapter_grads(model, texts=texts)
    shared = [n for n in both if ".shared." in n]
    assert len(shared) == 2 * 2 * 2   # 2 blocks x 2 sublayers x (weight, bias)
    for n in shared:
        assert vision_only[n].abs().sum() > 0 and text_only[n].abs().sum() > 0
        torch.testing.assert_close(both[n], vision_only[n] + text_only[n], rtol=1e-5, atol=1e-6)


def test_checkpoint_round_trip_is_exact(tmp_path):
    model = add_cross_modal_adapters(small_clip(), CrossModalAdapterConfig(reduction_dim=4, shared_dim=8))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    torch.save(adapter_state_dict(model), tmp_path / "a.pt")
    fresh = load_adapter_state_dict(small_clip(), torch.load(tmp_path / "a.pt"))
    images, texts = clip_inputs()
    with torch.no_grad():
        assert torch.equal(fresh.encode_image(images), model.encode_image(images))
        assert torch.equal(fresh.encode_text(texts), model.encode_text(texts))
    assert count_trainable_parameters(fresh) == count_trainable_parameters(model)
    fresh_vision = fresh.visual.transformer.resblocks[1].adapter_mlp.shared
    assert fresh_vision is fresh.transformer.resblocks[1].adapter_mlp.shared   # sharing survives loading


def _randomize_adapters(model, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=generator))
    return model


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("custom_text", [False, True])
def test_removed_adapters_leave_open_clip_as_it_was_and_adapters_of_another_shape_fit(backend, custom_text):
    """One backbone, several datasets' adapters (the paper's point): removing a model's adapters gives
    back open_clip's blocks, outputs and state dict exactly, the backbone's tensors not copied, and
    adapters of another shape then load; without the removal, loading them names the way."""
    plain = small_clip(custom_text=custom_text).requires_grad_(False)   # frozen: torch picks its kernels by that
    images, texts = clip_inputs()
    with torch.no_grad():
        want = plain.encode_image(images), plain.encode_text(texts)
    keys, block_types = plain.state_dict().keys(), [type(m) for m in plain.modules()]
    backbone = {n: p.data_ptr() for n, p in plain.named_parameters()}
    narrow = CrossModalAdapterConfig(reduction_dim=4, shared_dim=8)
    wide = _randomize_adapters(add_cross_modal_adapters(small_clip(custom_text=custom_text),
                                                        CrossModalAdapterConfig(reduction_dim=8, shared_dim=16)), 1)
    model = _randomize_adapters(add_cross_modal_adapters(plain, narrow, backend=backend), 0)
    set_recompute(model, mlp=True, out_proj=False)
    with torch.no_grad():
        assert not torch.allclose(model.encode_image(images), want[0], atol=1e-3)   # the adapters did something
    with pytest.raises(ValueError, match=r"remove_cross_modal_adapters\(model\) first replaces them"):
        load_adapter_state_dict(model, adapter_state_dict(wide))

    assert remove_cross_modal_adapters(model) is model
    assert model.state_dict().keys() == keys and [type(m) for m in model.modules()] == block_types
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == backbone and not adapter_modules(model)
    assert count_trainable_parameters(model) == 0   # the backbone stays frozen
    with torch.no_grad():
        assert torch.equal(model.encode_image(images), want[0]) and torch.equal(model.encode_text(texts), want[1])
    assert remove_cross_modal_adapters(model) is model   # nothing left to remove: as it is

    load_adapter_state_dict(model, adapter_state_dict(wide), backend=backend)
    blocks = [block for block in model.modules() if hasattr(block, "adapter_mlp")]
    assert not any(b.recompute_mlp for b in blocks) and all(b.recompute_out_proj for b in blocks)   # new: defaults
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), wide.encode_image(images), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.encode_text(texts), wide.encode_text(texts), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("other,message", [
    (dict(config=CrossModalAdapterConfig(reduction_dim=8, shared_dim=8)), "reduction_dim=4"),
    (dict(config=CrossModalAdapterConfig(reduction_dim=4, shared_dim=16)), "shared_dim=8"),
    (dict(config=CrossModalAdapterConfig(reduction_dim=4, shared_dim=8, activation="gelu")), "activation"),
    (dict(text_width=64), "text_width=48"),
    (dict(vision_layers=3), "vision_layers=2"),
    (dict(patch_size=4), r"vision_patch_size=\[8, 8\], but this model has vision_patch_size=\[4, 4\]"),
])
def test_loading_into_a_mismatched_model_names_the_mismatch(other, message):
    config = CrossModalAdapterConfig(reduction_dim=4, shared_dim=8)
    state = adapter_state_dict(add_cross_modal_adapters(small_clip(), config))
    config = other.pop("config", None)
    target = small_clip(**other)
    if config is not None:
        add_cross_modal_adapters(target, config)
    with pytest.raises(ValueError, match=message):
        load_adapter_state_dict(target, state)


def test_loading_garbage_fails_clearly():
    with pytest.raises(ValueError, match="not a cma adapter checkpoint"):
        load_adapter_state_dict(small_clip(), {"w": torch.zeros(2)})
    state = adapter_state_dict(add_cross_modal_adapters(small_clip(), CrossModalAdapterConfig(4, 8)))
    del state["state_dict"]
    with pytest.raises(ValueError, match=r"adapter checkpoint lacks \['state_dict'\]"):
        load_adapter_state_dict(small_clip(), state)


@pytest.mark.parametrize("kwargs,message", [
    (dict(shared_dim=-1), r"shared_dim must be an integer in \[0, min\(tower widths\) = 48\], got -1"),
    (dict(shared_dim=49), r"shared_dim .* = 48\], got 49"),
    (dict(reduction_dim=0), "reduction_dim must be an integer >= 1, got 0"),
    (dict(activation="relu"), "activation must be one of .*quick_gelu.*got 'relu'"),
    (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
])
def test_invalid_config_raises(kwargs, message):
    with pytest.raises(ValueError, match=message):
        add_cross_modal_adapters(small_clip(), CrossModalAdapterConfig(**kwargs))


def test_shared_dim_may_equal_the_smaller_width():
    model = add_cross_modal_adapters(small_clip(), CrossModalAdapterConfig(reduction_dim=4, shared_dim=48))
    assert model.transformer.resblocks[0].adapter_attn.w_up_unique.shape == (0, 4)
    with torch.no_grad():
        model.encode_text(clip_inputs()[1])


def test_not_an_open_clip_model_raises():
    with pytest.raises(ValueError, match="expected an open_clip CLIP or CustomTextCLIP model, got Linear"):
        add_cross_modal_adapters(torch.nn.Linear(4, 4))


def test_bad_backend_and_double_insertion_raise():
    with pytest.raises(ValueError, match="backend must be one of"):
        add_cross_modal_adapters(small_clip(), backend="cuda")
    model = add_cross_modal_adapters(small_clip())
    with pytest.raises(ValueError, match="already has cross-modal adapters"):
        add_cross_modal_adapters(model)


@pytest.mark.parametrize("gpu, auto_fuses, triton_runs", [("H200", True, True), ("A100", True, True),
                                                          ("T4", False, True), ("V100", False, True),
                                                          ("P100", False, False)])
def test_auto_fuses_on_the_gpus_triton_supports_and_triton_is_refused_where_it_cannot_compile(monkeypatch, gpu,
                                                                                            auto_fuses, triton_runs):
    """backend "auto" takes the fused kernels on compute capability 8.0+ only (Triton's supported
    GPUs; a T4 or V100 runs PyTorch); "triton" runs them from 7.0 and names an older GPU."""
    import types
    fake_gpu(monkeypatch, gpu)
    on_gpu = types.SimpleNamespace(device=torch.device("cuda", 0))   # uses_triton reads only its device
    adapter = adapter_modules(add_cross_modal_adapters(small_clip()))[0]
    assert adapter.uses_triton(on_gpu) == auto_fuses
    adapter.backend = "triton"
    if triton_runs:
        assert adapter.uses_triton(on_gpu)
    else:
        with pytest.raises(ValueError, match=r"backend='triton' needs a CUDA GPU of compute capability 7\.0\+ .*, got "
                                             r"cuda:0 \(Tesla P100-PCIE-16GB, compute capability 6\.0\); use "
                                             r"backend='auto' or 'reference'"):
            adapter.uses_triton(on_gpu)


def test_adapter_module_is_the_reference_formula():
    """The module computes x + h + W_up act(W_down h + b_down) + b_up with the shared rows last (float64)."""
    torch.manual_seed(0)
    cfg = CrossModalAdapterConfig(reduction_dim=4, shared_dim=3)
    from cma_model import SharedUpProjection
    m = CrossModalAdapter(10, cfg, SharedUpProjection(3, 4, 0.5), backend="reference").double()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_()
    h, x = torch.randn(5, 10, dtype=torch.float64), torch.randn(5, 10, dtype=torch.float64)
    z = h @ m.w_down.T + m.b_down
    a = z * torch.sigmoid(1.702 * z)
    w_up = torch.cat([m.w_up_unique, m.shared.weight])
    b_up = torch.cat([m.b_up_unique, m.shared.bias])
    torch.testing.assert_close(m(h, residual=x), x + h + a @ w_up.T + b_up, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("std", [0.01, 0.5])
def test_adapter_init_is_the_truncated_normal_of_nn_init(std):
    """cma_model.adapter.trunc_normal draws from torch.rand (the same values from one seed on every
    torch release) and is distributed as nn.init.trunc_normal_ cut at +-2 std: bounds, and every
    percentile of 200k draws within 0.02 std of nn.init's (sampling noise is about 0.005 std)."""
    from cma_model.adapter import trunc_normal
    torch.manual_seed(0)
    ours = trunc_normal((200_000,), std)
    theirs = torch.nn.init.trunc_normal_(torch.empty(200_000), std=std, a=-2 * std, b=2 * std)
    assert ours.dtype == torch.float32 and ours.abs().max() <= 2 * std
    q = torch.linspace(0.01, 0.99, 99)
    assert (ours.quantile(q) - theirs.quantile(q)).abs().max() <= 0.02 * std
    torch.manual_seed(1)
    first = trunc_normal((64,), std)
    torch.manual_seed(1)
    assert torch.equal(trunc_normal((64,), std), first) and not torch.equal(first, ours[:64])
