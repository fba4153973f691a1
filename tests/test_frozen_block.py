"""cma_model.frozen_block: the lean frozen block against open_clip's own block and nn.MultiheadAttention
(float64, tolerance 1e-10), and the activation memory it keeps, measured with autograd's hooks."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import clip_inputs, gpu_check, requires_cuda, small_clip
from open_clip.transformer import LayerNormFp32, QuickGELU, ResidualAttentionBlock
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from cma_benchmarks.common import saved_activation_bytes
from cma_model import (CrossModalAdapterConfig, add_cross_modal_adapters, adapter_modules, set_adapter_backend,
                       set_recompute)
from cma_model import frozen_block

TOL = dict(rtol=1e-10, atol=1e-10)


def _block(width=64, heads=4, act=QuickGELU, batch_first=True, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    block = ResidualAttentionBlock(width, heads, act_layer=act, batch_first=batch_first).to(dtype)
    with torch.no_grad():   # non-trivial norms and biases, so that every term is exercised
        for ln in (block.ln_1, block.ln_2):
            ln.weight.normal_(1.0, 0.2)
            ln.bias.normal_(0.0, 0.2)
        block.attn.in_proj_bias.normal_(0.0, 0.2)
    return block


def _lean(block, x, mask, recompute):
    x = x + frozen_block.self_attention(block.attn, frozen_block.layer_norm(block.ln_1, x), mask)
    return x + frozen_block.mlp(block, x, recompute)


def _causal(length, dtype):
    return torch.full((length, length), float("-inf"), dtype=dtype).triu(1)   # open_clip's text mask


@pytest.mark.parametrize("act", [QuickGELU, nn.GELU])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("recompute", [False, True])
def test_lean_block_is_open_clip_block(act, batch_first, masked, recompute):
    """Forward and the gradients of the input and of every block weight, against block.forward."""
    block = _block(act=act, batch_first=batch_first)
    shape = (3, 7, 64) if batch_first else (7, 3, 64)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    mask = _causal(7, torch.float64) if masked else None
    _assert_same_block(block, x, lambda: block(x, attn_mask=mask), lambda: _lean(block, x, mask, recompute), TOL)


def _assert_same_block(block, x, reference, candidate, tol):
    """candidate() against reference(): output, the input's gradient and every block weight's."""
    grad_out = torch.randn(x.shape, dtype=x.dtype)
    results = []
    for run in (reference, candidate):
        block.zero_grad(set_to_none=True)
        x.grad = None
        out = run()
        out.backward(grad_out)
        results.append((out.detach(), x.grad.clone(), {n: p.grad.clone() for n, p in block.named_parameters()}))
    (ref, ref_dx, ref_grads), (got, dx, grads) = results
    torch.testing.assert_close(got, ref, **tol)
    torch.testing.assert_close(dx, ref_dx, **tol)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], **tol, msg=name)


@pytest.mark.parametrize("recompute", [False, True])
def test_lean_block_with_fused_quick_gelu_is_open_clip_block(recompute, monkeypatch):
    """fused=True (the Triton quick_gelu, here in the interpreter; fp32 arithmetic, so fp32 and
    1e-5): forward and every gradient against block.forward, and the kernel really ran."""
    calls = []
    kernel = frozen_block.fused_quick_gelu
    monkeypatch.setattr(frozen_block, "fused_quick_gelu", lambda z: calls.append(z.shape) or kernel(z))
    block = _block(dtype=torch.float32)
    x = torch.randn(3, 7, 64, requires_grad=True)
    _assert_same_block(block, x, lambda: block(x), lambda: _lean_fused(block, x, recompute), dict(rtol=1e-5, atol=1e-5))
    assert len(calls) == (2 if recompute else 1)   # recompute runs the hidden activation again in backward


def _lean_fused(block, x, recompute):
    x = x + frozen_block.self_attention(block.attn, frozen_block.layer_norm(block.ln_1, x))
    return x + frozen_block.mlp(block, x, recompute, fused=True)


@pytest.mark.parametrize("mask_kind", ["bool_2d", "float_3d"])
def test_self_attention_masks_follow_multihead_attention(mask_kind):
    """bool masks use nn.MultiheadAttention's convention (True = not attended); 3-D masks are per (batch, head)."""
    attn = _block().attn
    x = torch.randn(2, 5, 64, dtype=torch.float64)
    if mask_kind == "bool_2d":
        mask = torch.rand(5, 5) < 0.3
        mask.fill_diagonal_(False)
    else:
        mask = torch.randn(2 * attn.num_heads, 5, 5, dtype=torch.float64)
    want = attn(x, x, x, attn_mask=mask, need_weights=False)[0]
    torch.testing.assert_close(frozen_block.self_attention(attn, x, mask), want, **TOL)


def test_self_attention_keeps_cudnn_attention_out(monkeypatch):
    """SDPA runs with cuDNN's backend off (frozen_block.SDPA_BACKENDS says why) and the others on;
    the process's settings are as before afterwards."""
    attn = _block().attn
    x = torch.randn(2, 5, 64, dtype=torch.float64)
    want = attn(x, x, x, need_weights=False)[0]
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append((torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled(),
                     torch.backends.cuda.mem_efficient_sdp_enabled()))
        return sdpa(*args, **kwargs)
    monkeypatch.setattr(frozen_block.F, "scaled_dot_product_attention", spy)
    before = torch.backends.cuda.cudnn_sdp_enabled()
    torch.testing.assert_close(frozen_block.self_attention(attn, x), want, **TOL)
    assert seen == [(False, True, True)]
    assert torch.backends.cuda.cudnn_sdp_enabled() == before


class _NewTensorsOfSize(TorchDispatchMode):
    """Records each op that returns a tensor of `numel` values in storage of its own (a copy, not a
    view of an input)."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.ops = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        self.ops += [str(func) for t in tree_leaves(out) if isinstance(t, torch.Tensor)
                     and t.numel() == self.numel and t.untyped_storage().data_ptr() not in inputs]
        return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("batch_first", [True, False])
def test_self_attention_backward_copies_the_qkv_gradient_once(dtype, batch_first):
    """Backward makes q, k and v's gradients into the packed projection's gradient [B, L, 3 D] with
    one copy (autograd's stack of the three); SDPA's own gradients are [B, H, L, hd] each."""
    attn = _block(batch_first=batch_first, dtype=dtype).attn
    x = torch.randn((3, 7, 64) if batch_first else (7, 3, 64), dtype=dtype, requires_grad=True)
    out = frozen_block.self_attention(attn, x)
    with _NewTensorsOfSize(3 * 7 * 3 * 64) as copies:
        out.backward(torch.randn_like(out))
    assert copies.ops == ["aten.stack.default"]   # its values: test_lean_block_is_open_clip_block


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("masked", [False, True])
def test_frozen_projection_backward_reads_the_qkv_gradients_in_place(batch_first, masked):
    """A frozen block (the adapters' case): the input's gradient through the lean attention is
    open_clip's (float64), made by three matmuls from SDPA's q, k, v gradients, with no tensor of
    the packed projection's size [B, L, 3 D] made in backward (autograd's stack of them)."""
    block = _block(batch_first=batch_first).requires_grad_(False)
    shape = (3, 7, 64) if batch_first else (7, 3, 64)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    mask = _causal(7, torch.float64) if masked else None
    grad_out = torch.randn(shape, dtype=torch.float64)
    want = torch.autograd.grad(block(x, attn_mask=mask), x, grad_out)[0]
    out = _lean(block, x, mask, recompute=False)
    with _NewTensorsOfSize(3 * 7 * 3 * 64) as copies:
        got = torch.autograd.grad(out, x, grad_out)[0]
    assert copies.ops == []
    torch.testing.assert_close(got, want, **TOL)


def test_frozen_projection_backward_under_autocast_gives_the_inputs_dtype():
    """Under bf16 autocast an fp32 input (the text tower's residual stream) gets an fp32 gradient,
    the bf16 matmuls' result within bf16 rounding of the float64 one (3e-2 of its norm)."""
    block = _block()
    x = torch.randn(3, 7, 64, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(3, 7, 64, dtype=torch.float64)
    want = torch.autograd.grad(frozen_block.self_attention(block.attn, x), x, grad_out)[0]
    attn = copy.deepcopy(block.attn).float().requires_grad_(False)
    x32 = x.detach().float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = frozen_block.self_attention(attn, x32)
    got = torch.autograd.grad(out, x32, grad_out.to(out.dtype))[0]
    assert got.dtype == torch.float32
    assert ((got.double() - want).norm() / want.norm()).item() < 3e-2


@gpu_check
@requires_cuda
def test_frozen_projection_reads_sdpa_gradients_in_place_on_cuda():
    """On CUDA (flash attention under bf16 autocast) a frozen projection's backward copies none of
    q, k, v's gradients: SDPA leaves them [B, L, H, hd] in memory, so the matmuls read views (a
    copy would show as a clone). The input gradient is the float64 one within bf16 rounding (3e-2
    of its norm)."""
    attn = _block(width=256, heads=4).attn.requires_grad_(False)   # head width 64: flash attention
    x = torch.randn(4, 50, 256, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(4, 50, 256, dtype=torch.float64)
    want = torch.autograd.grad(frozen_block.self_attention(attn, x), x, grad_out)[0]
    attn = attn.float().cuda()
    x_cuda = x.detach().to("cuda", torch.bfloat16).requires_grad_()   # the vision tower's residual stream
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = frozen_block.self_attention(attn, x_cuda)
    with _NewTensorsOfSize(4 * 50 * 256) as made:
        got = torch.autograd.grad(out, x_cuda, grad_out.to("cuda", out.dtype))[0]
    assert made.ops and all("attention_backward" in op or op == "aten.mm.default" for op in made.ops), made.ops
    assert ((got.double().cpu() - want).norm() / want.norm()).item() < 3e-2


def test_adapted_model_lean_path_matches_reference_path():
    """Whole small CLIP with adapters: the lean frozen block ("auto": PyTorch adapters on the CPU,
    lean block; attention adapter's input recomputed, kept, and with the MLP recomputed) against
    open_clip's own block ("reference"): embeddings and adapter gradients."""
    lean = add_cross_modal_adapters(small_clip().double(), backend="auto")
    with torch.no_grad():
        for m in adapter_modules(lean):   # nonzero up-projections: the adapters change the output
            m.w_up_unique.normal_(0, 0.1)
            m.shared.weight.normal_(0, 0.1)
    ref = set_adapter_backend(copy.deepcopy(lean), "reference")
    images, texts = clip_inputs()
    outs = []
    variants = [set_recompute(copy.deepcopy(lean), **kw) for kw in ({"out_proj": False}, {"mlp": True})]
    for model in [ref, lean] + variants:
        model.train()
        feats = model.encode_image(images.double()), model.encode_text(texts)
        (feats[0].square().sum() + feats[1].sin().sum()).backward()
        outs.append((feats, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (ref_feats, ref_grads) = outs[0]
    for feats, grads in outs[1:]:
        for got, want in zip(feats, ref_feats):
            torch.testing.assert_close(got, want, **TOL)
        assert grads.keys() == ref_grads.keys() and len(grads) > 0
        for name in ref_grads:
            torch.testing.assert_close(grads[name], ref_grads[name], **TOL, msg=name)


def _adapted_clip(shared_dim, backend, dropout=0.0, text_width=48):
    """small_clip (vision width 64) with adapters whose up-projections are not zero, and norms that
    are not the identity."""
    model = add_cross_modal_adapters(small_clip(text_width=text_width),
                                     CrossModalAdapterConfig(4, shared_dim, dropout=dropout), backend=backend)
    torch.manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.2)
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.normal_(1.0, 0.2)
                m.bias.normal_(0.0, 0.2)
    return model.train()


def _embed_and_backward(model, autocast=False, device="cpu"):
    """(image and text embeddings, {name: gradient} of the adapter parameters)."""
    images, texts = (t.to(device) for t in clip_inputs())
    with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
        feats = model.encode_image(images).float(), model.encode_text(texts).float()
    (feats[0].square().sum() + feats[1].sin().sum()).backward()
    return feats, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("backend", ["auto", "triton"])   # PyTorch adapters on the CPU; Triton's interpreter
@pytest.mark.parametrize("shared_dim", [0, 16, 48])      # 48: the text tower's whole width is shared
def test_recomputed_attention_output_trains_bit_identically(backend, shared_dim):
    """recompute_out_proj (the default) against keeping out_proj's output h and the block's
    mid-point x, fp32: the same embeddings and adapter gradients bit for bit (backward recomputes h
    and x with the same ops on the same inputs, and sums x's two gradients as autograd does). With
    recompute_mlp (h alone recomputed) too. Both towers, so: the first blocks, whose input needs no
    gradient, the text tower's causal mask, and the up-projection shared between the towers."""
    recomputed = _adapted_clip(shared_dim, backend)
    kept = set_recompute(copy.deepcopy(recomputed), out_proj=False)
    want_feats, want_grads = _embed_and_backward(kept)
    for model in (recomputed, set_recompute(copy.deepcopy(recomputed), mlp=True)):
        feats, grads = _embed_and_backward(model)
        assert all(torch.equal(a, b) for a, b in zip(feats, want_feats))
        assert grads.keys() == want_grads.keys() and len(grads) == 8 * 4 + 4 * 2   # shared: once per pair
        for name in grads:
            assert torch.equal(grads[name], want_grads[name]), name


def test_recomputed_attention_output_under_cpu_autocast():
    """Under bf16 autocast (PyTorch adapters, d_s = 0) the same embeddings and gradients bit for
    bit. With shared tensors the shared gradients differ by bf16 rounding, and only they: kept,
    both towers' gradients of autocast's one cached bf16 copy of the shared weight are summed in
    bf16; recomputed, backward casts it afresh per tower and the sum is fp32 (2e-2 of the norm)."""
    for shared_dim in (0, 16):
        recomputed = _adapted_clip(shared_dim, "auto")
        kept = set_recompute(copy.deepcopy(recomputed), out_proj=False)
        (feats, grads), (want_feats, want_grads) = (_embed_and_backward(m, autocast=True) for m in (recomputed, kept))
        assert all(torch.equal(a, b) for a, b in zip(feats, want_feats))
        for name in grads:
            if shared_dim and ".shared." in name:
                assert (grads[name] - want_grads[name]).norm() <= 2e-2 * want_grads[name].norm(), name
            else:
                assert torch.equal(grads[name], want_grads[name]), name


def test_recomputing_the_attention_output_keeps_two_activations_less_per_block():
    """Measured with autograd's hooks (fp32, fused adapters in the interpreter: they keep h alone):
    recomputing from out_proj on keeps exactly two [tokens, width] tensors less per adapted block
    but each tower's first (there SDPA keeps nothing, so its output would cost what h does):
    out_proj's output h and the block's mid-point x, in the second vision block 2 x 17 tokens x 64
    each, in the second text block 2 x 16 x 48. With recompute_mlp, whose checkpoint starts from x
    and so keeps it, h alone. With dropout in training (PyTorch adapters) nothing is recomputed (it
    would draw another mask) and as much is kept as with recompute off."""
    images, texts = clip_inputs()
    one_per_block = 4 * (2 * 17 * 64 + 2 * 16 * 48)

    def kept_bytes(model):
        return saved_activation_bytes(lambda: (model.encode_image(images), model.encode_text(texts)),
                                      model.parameters())[1]
    for backend, dropout, recompute_mlp, less in (("triton", 0.0, False, 2 * one_per_block),
                                                  ("triton", 0.0, True, one_per_block), ("auto", 0.1, False, 0)):
        model = set_recompute(_adapted_clip(16, backend, dropout), mlp=recompute_mlp)
        recomputed = kept_bytes(model)
        assert kept_bytes(set_recompute(model, out_proj=False)) - recomputed == less, (dropout, recompute_mlp)


@pytest.mark.parametrize("norm_kind", ["frozen", "trainable", "fp32"])
def test_out_proj_adapter_matches_its_plain_composition(norm_kind):
    """out_proj_adapter against x = adapter(out_proj(merge_heads(heads)), residual) and norm(x) as
    written (PyTorch adapter, d_s = 16): both outputs and the gradients of heads, residual, the
    adapter's tensors and a trainable norm's, bit for bit. A frozen plain LayerNorm is folded into
    the recompute (fp32); a trainable one (fp32), or open_clip's LayerNormFp32 (bf16 activations
    under CPU autocast, where it differs from a plain norm), runs after it as written."""
    torch.manual_seed(3)
    batch, n_heads, length, width = 2, 4, 5, 64
    out_proj = nn.Linear(width, width).requires_grad_(False)
    adapter = _adapted_clip(16, "auto").visual.transformer.resblocks[1].adapter_attn
    norm = (LayerNormFp32 if norm_kind == "fp32" else nn.LayerNorm)(width)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.2)
        norm.bias.normal_(0.0, 0.2)
    norm.requires_grad_(norm_kind == "trainable")
    dtype = torch.bfloat16 if norm_kind == "fp32" else torch.float32
    heads = torch.randn(batch, n_heads, length, width // n_heads, dtype=dtype)
    residual = torch.randn(batch, length, width, dtype=dtype)
    weights = torch.randn(batch, length, width), torch.randn(batch, length, width)

    def run(fn):
        inputs = heads.clone().requires_grad_(), residual.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            x, normed = fn(*inputs)
        assert x.dtype == normed.dtype == dtype
        params = [p for p in (*adapter.parameters(), *norm.parameters()) if p.requires_grad]
        grads = torch.autograd.grad((x * weights[0]).sum() + (normed.sin() * weights[1]).sum(), [*inputs, *params])
        return x, normed, grads

    def written(heads, residual):
        x = adapter(F.linear(frozen_block.merge_heads(heads), out_proj.weight, out_proj.bias), residual=residual)
        return x, norm(x)
    got = run(lambda heads, residual: frozen_block.out_proj_adapter(out_proj, heads, adapter, residual, norm))
    want = run(written)
    assert len(got[2]) == 2 + 6 + 2 * (norm_kind == "trainable")
    for a, b in zip((*got[:2], *got[2]), (*want[:2], *want[2])):
        assert torch.equal(a, b)


@gpu_check
@requires_cuda
def test_recomputed_attention_output_on_cuda():
    """As `cma train` runs on CUDA (fused adapters, bf16 autocast, frozen linears in bf16, flash
    attention: head widths 32 and 16): the same embeddings and adapter gradients bit for bit as
    keeping out_proj's output, and per block after each tower's first two [tokens, width] tensors
    less kept (SDPA lays its output out [B, L, H, hd], so its merged view costs nothing): out_proj's
    output h in bf16 and the block's mid-point in the residual stream's dtype, bf16 in the vision
    tower (conv1's output under autocast), fp32 in the text tower (its embeddings)."""
    recomputed = _adapted_clip(16, "auto", text_width=64).cuda()
    frozen_block.store_frozen_linears(recomputed)
    kept = set_recompute(copy.deepcopy(recomputed), out_proj=False)
    (feats, grads), (want_feats, want_grads) = (_embed_and_backward(m, True, "cuda") for m in (recomputed, kept))
    assert all(torch.equal(a, b) for a, b in zip(feats, want_feats)) and grads.keys() == want_grads.keys()
    for name in grads:
        assert torch.equal(grads[name], want_grads[name]), name
    images, texts = (t.cuda() for t in clip_inputs())

    def kept_bytes(model):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return saved_activation_bytes(lambda: (model.encode_image(images), model.encode_text(texts)),
                                          model.parameters())[1]
    h_bytes, mid_bytes = 2 * (2 * 17 * 64 + 2 * 16 * 64), 2 * 2 * 17 * 64 + 4 * 2 * 16 * 64
    assert kept_bytes(kept) - kept_bytes(recomputed) == h_bytes + mid_bytes


def _kept_bytes(run, block):
    _, nbytes = saved_activation_bytes(run, block.parameters())
    return nbytes


@pytest.mark.parametrize("tokens,width", [(64, 64), (197, 96)])
def test_lean_block_keeps_less_activation_memory(tokens, width):
    """Measured with autograd's saved-tensor hooks (fp32 on the CPU, frozen weights). open_clip's
    quick_gelu keeps x and sigmoid(1.702 x), 2 x 4 units of [N, D]; the lean one keeps x (4 units);
    recompute keeps none of the MLP's hidden activation. A unit is N x D x 4 bytes."""
    block = _block(width=width, heads=4, dtype=torch.float32).requires_grad_(False)
    x = torch.randn(2, tokens, width, requires_grad=True)
    unit = x.numel() * 4
    stock = _kept_bytes(lambda: block(x), block)
    lean = _kept_bytes(lambda: _lean(block, x, None, False), block)
    recompute = _kept_bytes(lambda: _lean(block, x, None, True), block)
    assert _kept_bytes(lambda: _lean_fused(block, x, False), block) == lean   # the Triton quick_gelu too
    assert stock - lean >= 4 * unit, (stock / unit, lean / unit)
    assert lean - recompute >= 4 * unit, (lean / unit, recompute / unit)
    assert recompute <= 6.2 * unit, recompute / unit   # ln_1 input, q/k/v, attention output, MLP input


def test_layer_norm_runs_with_autocast_off(monkeypatch):
    """Under CUDA autocast (enabled by hand: this test needs no GPU), the eager norm runs with
    autocast's dispatch keys excluded, so autocast does not move it to fp32, and autocast is on
    again after it. (Under torch.compile it runs in torch.autocast(enabled=False), traced:
    test_lean_layer_norm_keeps_bf16_under_cuda_autocast and the CUDA fullgraph test.)"""
    keys = [torch._C.DispatchKey.AutocastCUDA, torch._C.DispatchKey.AutocastCPU]
    seen = []
    layer_norm = frozen_block.F.layer_norm

    def spy(*args, **kwargs):
        seen.append([torch._C._dispatch_tls_is_dispatch_key_excluded(k) for k in keys])
        return layer_norm(*args, **kwargs)
    monkeypatch.setattr(frozen_block.F, "layer_norm", spy)
    ln = nn.LayerNorm(64).requires_grad_(False)
    x = torch.randn(2, 5, 64, dtype=torch.bfloat16)
    before = torch.is_autocast_enabled("cuda")
    torch.set_autocast_enabled("cuda", True)
    try:
        out = frozen_block.layer_norm(ln, x)
        after = torch._C._dispatch_tls_is_dispatch_key_excluded(keys[0])
    finally:
        torch.set_autocast_enabled("cuda", before)
    assert seen == [[True, True]] and not after
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, layer_norm(x.float(), (64,)).to(torch.bfloat16), rtol=0.02, atol=0.02)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_layer_norm_keeps_its_weight_cast_until_the_weights_change(dtype):
    """The lean norm casts its frozen weight and bias once: equal to F.layer_norm with freshly cast
    parameters (bit for bit) after in-place edits, load_state_dict, .data swaps and inference mode."""
    g = torch.Generator().manual_seed(5)
    ln = nn.LayerNorm(96).requires_grad_(False)
    x = torch.randn(3, 7, 96, generator=g).to(dtype)

    def check():
        expected = nn.functional.layer_norm(x, (96,), ln.weight.to(dtype), ln.bias.to(dtype), ln.eps)
        assert torch.equal(frozen_block.layer_norm(ln, x), expected)

    with torch.no_grad():
        ln.weight.normal_(1.0, 0.3, generator=g)
        ln.bias.normal_(0.0, 0.3, generator=g)
    check()
    assert frozen_block.cast_frozen(ln.weight, dtype) is frozen_block.cast_frozen(ln.weight, dtype)
    with torch.no_grad():
        ln.weight.mul_(-2.0)
    check()
    ln.load_state_dict({"weight": torch.randn(96, generator=g), "bias": torch.randn(96, generator=g)})
    check()
    ln.bias.data = torch.randn(96, generator=g)
    check()

    with torch.no_grad():
        ln.weight.add_(0.5)
    with torch.inference_mode():   # a cast made in inference mode is not reused by autograd
        frozen_block.layer_norm(ln, x)
    x_grad = x.clone().requires_grad_()
    frozen_block.layer_norm(ln, x_grad).sum().backward()
    assert torch.isfinite(x_grad.grad).all()

    ln.weight.requires_grad_(True)   # a trainable norm gets its gradient through the cast
    frozen_block.layer_norm(ln, x).float().pow(2).sum().backward()
    reference = ln.weight.detach().clone().requires_grad_()
    nn.functional.layer_norm(x, (96,), reference.to(dtype), ln.bias.to(dtype), ln.eps).float().pow(2).sum().backward()
    assert torch.equal(ln.weight.grad, reference.grad)


@gpu_check
@requires_cuda
def test_lean_layer_norm_keeps_bf16_under_cuda_autocast():
    """CUDA autocast runs LayerNorm in fp32 and keeps an fp32 copy of its input; the lean norm keeps
    the bf16 input: 2 units fewer per block, where a unit is N x D x 2 bytes, less what the lean
    path keeps of its own that is not per token (the norms' bf16 weight copies: 6 KB here, 0.25% of
    a unit; measured on an H200: 2 units less 6152 bytes), hence the 1% allowance."""
    block = _block(width=768, heads=12, act=nn.GELU, dtype=torch.float32).cuda().requires_grad_(False)
    x = torch.randn(32, 50, 768, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    unit = x.numel() * 2
    with torch.autocast("cuda", dtype=torch.bfloat16):
        stock = _kept_bytes(lambda: block(x), block)
        lean = _kept_bytes(lambda: _lean(block, x, None, False), block)
        ref = block(x)
        got = _lean(block, x, None, False)
    assert stock - lean >= 1.99 * unit, (stock / unit, lean / unit)
    torch.testing.assert_close(got.float(), ref.float(), rtol=0.03, atol=0.03)   # bf16 rounding of the norm weights


def test_frozen_linears_in_bf16_give_bit_identical_training_under_autocast():
    """store_frozen_linears: under bf16 autocast the matmuls see the same bf16 values autocast
    would make, so embeddings and adapter gradients are bit-identical; norms and adapters stay fp32."""
    base = add_cross_modal_adapters(small_clip(), backend="auto")
    with torch.no_grad():
        for m in adapter_modules(base):
            m.w_up_unique.normal_(0, 0.1)
    stored = copy.deepcopy(base)
    converted = frozen_block.store_frozen_linears(stored)
    blocks = list(stored.visual.transformer.resblocks) + list(stored.transformer.resblocks)
    per_block = lambda b: sum(p.numel() for n, p in b.named_parameters()  # noqa: E731
                              if n.startswith(("attn.", "mlp.")))
    assert converted >= sum(per_block(b) for b in blocks) > 0
    assert all(b.mlp.c_fc.weight.dtype == torch.bfloat16 and b.attn.in_proj_weight.dtype == torch.bfloat16
               and b.ln_1.weight.dtype == torch.float32 for b in blocks)
    assert all(p.dtype == torch.float32 for p in stored.parameters() if p.requires_grad)
    images, texts = clip_inputs()
    results = []
    for model in (base, stored):
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            feats = model.encode_image(images), model.encode_text(texts)
        (feats[0].float().square().sum() + feats[1].float().sin().sum()).backward()
        results.append((feats, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (want_feats, want_grads), (got_feats, got_grads) = results
    for got, want in zip(got_feats, want_feats):
        assert torch.equal(got, want)
    assert got_grads.keys() == want_grads.keys() and len(got_grads) > 0
    for name in want_grads:
        assert torch.equal(got_grads[name], want_grads[name]), name


def test_store_frozen_linears_refuses_a_model_without_adapters():
    """A plain open_clip model would take the bf16 c_fc weight as its text cast dtype: refused, clearly."""
    plain = small_clip()
    with pytest.raises(ValueError, match="needs every open_clip block adapted"):
        frozen_block.store_frozen_linears(plain)
    assert plain.transformer.resblocks[0].mlp.c_fc.weight.dtype == torch.float32   # nothing half-done


@gpu_check
@requires_cuda
def test_cma_train_model_on_cuda_keeps_frozen_linears_in_bf16():
    from conftest import TINY_TRAIN_CLIP
    from cma_train.config import TrainConfig
    from cma_train.backbone import build_model
    cfg = TrainConfig(model_config=TINY_TRAIN_CLIP, pretrained="none", max_words=12)
    model, _, _ = build_model(cfg, torch.device("cuda"))
    block = model.visual.transformer.resblocks[0]
    assert block.mlp.c_fc.weight.dtype == torch.bfloat16 and block.ln_1.weight.dtype == torch.float32
    assert model.transformer.get_cast_dtype() == torch.float32
