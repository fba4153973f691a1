"""The frozen open_clip block, run lean: the same math as open_clip's ResidualAttentionBlock, with
less memory and fewer kernels when only the adapters train.

What stock open_clip pays under bf16 autocast on CUDA, and what this path does instead (per block,
in units of one bf16 [N, D] activation; N tokens, D width):
- LayerNorm: autocast runs it in fp32, so the bf16 input is copied to fp32 (kept for backward:
  2 units per norm) and the fp32 output cast back. Here the norm runs outside autocast in the
  activation's dtype (statistics are still accumulated in fp32 by the kernel): 1 unit, no casts.
  The norm's weight and bias are cast to that dtype, the one rounding this path adds; the cast
  copies are kept while the frozen parameters are unchanged (not 4 casts per block per call).
- Attention: nn.MultiheadAttention copies the packed q/k/v projection into a new layout before
  scaled_dot_product_attention. Here q, k, v are views of the projection: one SDPA call, no copy,
  on any SDPA backend but cuDNN's (SDPA_BACKENDS says why). In backward, a frozen projection's
  input gradient comes from three matmuls reading SDPA's q, k, v gradients where they are
  (_FrozenQKV); autograd would first stack them into the projection's layout (a trainable
  projection's backward does, once, not twice as nn.MultiheadAttention's).
- quick_gelu (OpenAI CLIP weights): `x * sigmoid(1.702 x)` in autograd keeps x AND the sigmoid
  (8 units). Here it keeps x only and recomputes the sigmoid in backward (4 units); where the
  adapters run fused, it is also one Triton launch each way instead of about ten elementwise
  passes over the [N, 4 D] hidden activation (cma_kernels.quick_gelu).
- Neither the attention adapter's input h (out_proj's output) nor its output, the block's
  mid-point x (ln_2's input), is kept (2 units): out_proj_adapter keeps SDPA's output, which SDPA
  keeps anyway, and the block's input, which ln_1 keeps, and recomputes h and x in backward (one
  more [N, D] x [D, D] matmul and one more adapter forward per block; the adapted block's
  `recompute_out_proj`, on by default; with recompute_mlp, whose checkpoint keeps x, h alone).
- recompute_mlp=True (optional): the MLP's hidden activation (LayerNorm, c_fc, act: 4 units) is
  not kept at all but recomputed in backward from the block's mid-point (already kept), at the
  cost of one more c_fc matmul per block. Measured on the CPU (`cma bench --e2e --memory-only`,
  ViT-B/32, 8 videos, bf16 autocast), fused adapters keep 0.57x the activations of full
  fine-tuning (0.62x keeping h), 0.36x with recompute_mlp too; stock frozen floor 0.69x,
  reference adapters 0.75x.
Frozen linears keep no inputs (their weights get no gradient), as in stock PyTorch. Under autocast
they are cast to bf16 at every use, and the cast copy is kept for backward; store_frozen_linears
keeps them in bf16 instead (bit-identical matmul inputs, no casts, no copies).

Used by the adapted blocks (cma_model.adapter) unless the adapters run the "reference" backend,
which keeps open_clip's own block code as the reference every fast path is checked against.
"""
import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from open_clip.transformer import LayerNorm, QuickGELU
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint
from torch.utils.weak import WeakIdKeyDictionary

from cma_kernels import adapter_backward, adapter_forward
from cma_kernels.quick_gelu import fused_quick_gelu


# The lean attention's SDPA backends: all but cuDNN's, the configuration measured on an H200 (torch
# 2.11, CUDA 13): the GPU tests, the end-to-end step and the loss-curve check ran clean with it. With
# cuDNN's backend, PyTorch's first choice there, the first H200 run failed inside it under
# torch.compile ("mha_graph.execute(...).is_good()"); that run's adapter backward was broken too, so
# the cause is not settled, but PyTorch #169849 reports cuDNN attention reading out of bounds on q,
# k, v that are, as here, strided views of one packed projection. Flash and memory-efficient
# attention take the views as they are, and were not slower: ViT-B/32 floor_lean 44.6 ms/step
# without cuDNN, 46.2 with it (two runs of the same day).
SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@contextlib.contextmanager
def _no_cudnn_attention():
    """sdpa_kernel(SDPA_BACKENDS) for eager calls, where the backends are as PyTorch's defaults
    have them: cuDNN's turned off for the call, the others left as they are. A sixth of
    sdpa_kernel's host time (4 us against 22 on a 2-core CPU; once per block per step)."""
    cudnn = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        yield
    finally:
        torch.backends.cuda.enable_cudnn_sdp(cudnn)


_no_autocast = torch._C._DisableAutocast   # the guard torch's own AOT autograd runs graphs under

_frozen_casts = WeakIdKeyDictionary()   # frozen parameter -> (what it was cast from, the cast copy)


def cast_frozen(p, dtype):
    """p.to(dtype), kept for the next call while the frozen p is unchanged (same device, storage and
    version counter: in-place writes and load_state_dict bump it). Trainable parameters and
    torch.compile's tracing get a plain cast."""
    if p is None or p.dtype == dtype:
        return p
    if p.requires_grad or torch.compiler.is_compiling():
        return p.to(dtype)
    source = (dtype, p.device, p.data_ptr(), p._version, torch.is_inference_mode_enabled())
    kept = _frozen_casts.get(p)
    if kept is None or kept[0] != source:
        kept = _frozen_casts[p] = (source, p.detach().to(dtype))
    return kept[1]


def kept_casts(params):
    """The cast copies cast_frozen keeps now for these parameters. A CUDA graph that read them holds
    them (cma_model.cuda_graphs): a later cast for another dtype or inference mode replaces the
    kept one, which would free the memory the graph reads."""
    return [kept[1] for p in params if (kept := _frozen_casts.get(p)) is not None]


def layer_norm(ln: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """ln(x) in x's dtype, outside autocast: x [..., D] fp32/fp16/bf16 -> same shape and dtype.
    Modules that are not plain (open_clip) LayerNorms, e.g. LayerNormFp32, run as they are."""
    if type(ln) not in (nn.LayerNorm, LayerNorm):
        return ln(x)
    weight, bias = cast_frozen(ln.weight, x.dtype), cast_frozen(ln.bias, x.dtype)
    # eager: autocast off through its C++ guard (1 us on a 2-core CPU; the torch.autocast context
    # costs 8, twice per block per step); torch.compile traces the context manager
    with torch.autocast(x.device.type, enabled=False) if torch.compiler.is_compiling() else _no_autocast():
        return F.layer_norm(x, ln.normalized_shape, weight, bias, ln.eps)


def _split_heads(qkv, heads):
    """[B, L, 3 D] -> q, k, v [B, H, L, hd], views. Unbound along the "3" dim before the heads move
    forward: in backward autograd stacks dq, dk, dv ([B, L, H, hd] layout, as SDPA gives them)
    straight into qkv's [B, L, 3, H, hd] layout, one copy (permuting first would stack them as
    [3, B, H, L, hd], then copy again to reshape)."""
    batch, length, width = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
    return tuple(t.transpose(1, 2) for t in qkv.view(batch, length, 3, heads, width // heads).unbind(2))


class _FrozenQKV(torch.autograd.Function):
    """q, k, v = _split_heads(x @ W^T + b) for a frozen packed projection W [3 D, D] (no weight
    gradient). Backward makes dx = dq W_q + dk W_k + dv W_v: three matmuls into one output, reading
    SDPA's gradients where they are, instead of autograd's stack of them into the packed layout and
    one matmul (that copy, CatArrayBatchedCopy, took 2.1 of the 35.5 busy ms of the ViT-B/32 fused
    step on an H200, 7.5 of 103 on ViT-B/16). dx is rounded to its dtype between the matmuls (bf16
    under autocast: noise of the order of bf16 training's own)."""

    @staticmethod
    def forward(ctx, x, weight, bias, heads):
        ctx.save_for_backward(weight)
        return _split_heads(F.linear(x, weight, bias), heads)   # under autocast as F.linear is anywhere

    @staticmethod
    def backward(ctx, *grads):   # dq, dk, dv: [B, H, L, hd], as SDPA gives them ([B, L, H, hd] in memory)
        (weight,) = ctx.saved_tensors
        width = weight.shape[1]
        given = next(g for g in grads if g is not None)
        dx = None
        for grad, w in zip(grads, cast_frozen(weight, given.dtype).split(width)):   # W_q, W_k, W_v: [D, D]
            if grad is not None:
                grad = grad.transpose(1, 2).reshape(-1, width)   # [B * L, D]: a view of SDPA's layout
                dx = grad @ w if dx is None else dx.addmm_(grad, w)
        return dx.view(given.shape[0], -1, width), None, None, None


def attention_heads(attn: nn.MultiheadAttention, x: torch.Tensor, attn_mask=None) -> torch.Tensor:
    """SDPA's output for batch-first x [B, L, D]: [B, H, L, hd] (laid out [B, L, H, hd] by CUDA's
    flash and memory-efficient backends, so that merge_heads is a view), before attn.out_proj.
    attn_mask: None, float [L, L] or [B * heads, L, L] added to the scores, or bool with True =
    masked (nn.MultiheadAttention's convention). A frozen projection's backward reads q, k and v's
    gradients in place (_FrozenQKV); a trainable one's, as autograd does it (one copy of them)."""
    batch, length, _ = x.shape
    heads = attn.num_heads
    weight, bias = attn.in_proj_weight, attn.in_proj_bias
    if weight.requires_grad or (bias is not None and bias.requires_grad) or torch.compiler.is_compiling():
        q, k, v = _split_heads(F.linear(x, weight, bias), heads)                    # [B, H, L, hd] each
    else:
        q, k, v = _FrozenQKV.apply(x, weight, bias, heads)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            attn_mask = torch.zeros_like(attn_mask, dtype=q.dtype).masked_fill_(attn_mask, float("-inf"))
        attn_mask = attn_mask.to(q.dtype)
        if attn_mask.dim() == 3:
            attn_mask = attn_mask.view(batch, heads, length, length)
    with sdpa_kernel(SDPA_BACKENDS) if torch.compiler.is_compiling() else _no_cudnn_attention():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                              dropout_p=attn.dropout if attn.training else 0.0)


def merge_heads(heads: torch.Tensor) -> torch.Tensor:
    """[B, H, L, hd] -> [B, L, H * hd]: a view where the heads are laid out [B, L, H, hd]."""
    batch, n_heads, length, head_dim = heads.shape
    return heads.transpose(1, 2).reshape(batch, length, n_heads * head_dim)


def self_attention(attn: nn.MultiheadAttention, x: torch.Tensor, attn_mask=None) -> torch.Tensor:
    """attn(x, x, x, need_weights=False)[0] as one SDPA call on views of the packed projection
    (attention_heads), then attn.out_proj. x: [B, L, D] if attn.batch_first else [L, B, D]; returns
    x's shape and dtype."""
    if not attn.batch_first:
        x = x.transpose(0, 1)
    out = F.linear(merge_heads(attention_heads(attn, x, attn_mask)), attn.out_proj.weight, attn.out_proj.bias)
    return out if attn.batch_first else out.transpose(0, 1)


def _adapter_params(adapter):
    """The adapter's tensors in fused_adapter's order: w_down, b_down, w_up_unique, b_up_unique,
    w_up_shared, b_up_shared."""
    return (adapter.w_down, adapter.b_down, adapter.w_up_unique, adapter.b_up_unique,
            adapter.shared.weight, adapter.shared.bias)


class _OutProjAdapter(torch.autograd.Function):
    """x = adapter(out_proj(merge_heads(heads)), residual) for a frozen out_proj, and with a frozen
    norm also norm(x): the block's mid-point and ln_2's output. For backward it keeps SDPA's output
    `heads` (which SDPA keeps anyway) instead of the adapter's input h, and with a norm the block's
    input `residual` (which ln_1 keeps anyway) and the norm's statistics instead of x. Backward
    recomputes h (one more [N, D] x [D, D] matmul, on the inputs autocast gave forward's: the same
    values, bit for bit), with a norm x too (one more adapter forward), runs the norm's backward,
    then the adapter's: the fused kernel, or autograd over the reference adapter run again under
    forward's autocast state (no dropout: the caller's condition)."""

    @staticmethod
    def forward(ctx, heads, weight, bias, residual, norm, adapter, *params):
        h = F.linear(merge_heads(heads), weight, bias)
        device = heads.device.type
        ctx.adapter, ctx.fused, ctx.has_residual = adapter, adapter.uses_triton(h), residual is not None
        ctx.h_dtype = h.dtype
        ctx.autocast = (device, torch.get_autocast_dtype(device), torch.is_autocast_enabled(device))
        if ctx.fused:
            x = adapter_forward(h, *params, residual, adapter.config.activation)
        else:
            x = adapter(h, residual=residual)
        ctx.norm = None if norm is None else (norm.normalized_shape, norm.eps)
        if norm is None:
            ctx.save_for_backward(heads, weight, bias, None, None, None, None, None, *params)
            return x, None
        ln_weight, ln_bias = cast_frozen(norm.weight, x.dtype), cast_frozen(norm.bias, x.dtype)
        with _no_autocast():   # as layer_norm() runs it: F.layer_norm is this op's first output
            normed, mean, rstd = torch.native_layer_norm(x, norm.normalized_shape, ln_weight, ln_bias, norm.eps)
        ctx.save_for_backward(heads, weight, bias, residual, ln_weight, ln_bias, mean, rstd, *params)
        return x, normed

    @staticmethod
    def backward(ctx, dx, d_normed):
        heads, weight, bias, residual, ln_weight, ln_bias, mean, rstd, *params = ctx.saved_tensors
        need_dheads, need_params = ctx.needs_input_grad[0], ctx.needs_input_grad[6:]
        dtype = ctx.h_dtype   # autocast's casts by hand (an autocast context costs the host ~8 us)
        h = F.linear(merge_heads(heads).to(dtype), cast_frozen(weight, dtype), cast_frozen(bias, dtype))
        residual = None if residual is None else residual.detach()
        if ctx.fused:
            if ctx.norm is not None:
                x = adapter_forward(h, *params, residual, ctx.adapter.config.activation)
                dx = _add_norm_grad(dx, d_normed, x, ctx.norm, mean, rstd, ln_weight, ln_bias)
            w_down, b_down, w_up_unique, _, w_up_shared, _ = params
            dh, *grads = adapter_backward(dx, h, w_down, b_down, w_up_unique, w_up_shared,
                                          ctx.adapter.config.activation, need_dh=need_dheads)
        else:
            h = h.requires_grad_(need_dheads)
            device, autocast_dtype, enabled = ctx.autocast
            with torch.enable_grad(), torch.autocast(device, dtype=autocast_dtype, enabled=enabled):
                x = ctx.adapter(h, residual=residual)
            if ctx.norm is not None:
                dx = _add_norm_grad(dx, d_normed, x.detach(), ctx.norm, mean, rstd, ln_weight, ln_bias)
            needs = (need_dheads, *need_params)
            wanted = [t for t, need in zip((h, *_adapter_params(ctx.adapter)), needs) if need]
            got = iter(torch.autograd.grad(x, wanted, dx) if wanted else ())
            dh, *grads = [next(got) if need else None for need in needs]
        d_heads = None
        if need_dheads:   # out_proj's input gradient, as autograd computes it: dh W in dh's dtype
            batch, n_heads, length, head_dim = heads.shape
            d_heads = (dh @ cast_frozen(weight, dh.dtype)).view(batch, length, n_heads, head_dim).transpose(1, 2)
        return d_heads, None, None, dx if ctx.has_residual else None, None, None, *grads


def _add_norm_grad(dx, d_normed, x, norm, mean, rstd, ln_weight, ln_bias):
    """dx + the norm's input gradient from d_normed, as autograd sums them (either may be None)."""
    if d_normed is None:
        return dx
    normalized_shape, _ = norm
    d_x_norm = torch.ops.aten.native_layer_norm_backward(d_normed, x, normalized_shape, mean, rstd, ln_weight,
                                                         ln_bias, [True, False, False])[0]
    return d_x_norm if dx is None else dx + d_x_norm


def _frozen(module: nn.Module) -> bool:
    return not any(p.requires_grad for p in module.parameters())


def out_proj_adapter(out_proj: nn.Linear, heads: torch.Tensor, adapter: nn.Module, residual: torch.Tensor = None,
                     norm: nn.Module = None):
    """(x, norm(x) or None) for x = adapter(out_proj(merge_heads(heads)), residual=residual): heads
    [B, H, L, hd] (attention_heads), residual [B, L, D] -> [B, L, D] each; norm: the block's ln_2, or
    None. Where heads need a gradient (so SDPA keeps them) and out_proj is frozen, it keeps them
    instead of the adapter's input h, and recomputes h in backward; with a frozen plain LayerNorm
    as `norm` it also keeps the residual (the block's input, which ln_1 keeps) instead of x, and
    recomputes x: two [N, D] activations fewer (_OutProjAdapter). Otherwise (each tower's first
    block, inference, torch.compile's tracing) as written. adapter: a cma_model.CrossModalAdapter
    without dropout in training."""
    recomputes = heads.requires_grad and torch.is_grad_enabled() and not torch.compiler.is_compiling()
    if not (recomputes and _frozen(out_proj)):
        x = adapter(F.linear(merge_heads(heads), out_proj.weight, out_proj.bias), residual=residual)
        return x, None if norm is None else layer_norm(norm, x)
    if norm is not None and (type(norm) not in (nn.LayerNorm, LayerNorm) or not _frozen(norm)):
        x, _ = _OutProjAdapter.apply(heads, out_proj.weight, out_proj.bias, residual, None, adapter,
                                     *_adapter_params(adapter))
        return x, layer_norm(norm, x)
    return _OutProjAdapter.apply(heads, out_proj.weight, out_proj.bias, residual, norm, adapter,
                                 *_adapter_params(adapter))


class _QuickGELU(torch.autograd.Function):
    """z * sigmoid(1.702 z) keeping only z for backward."""

    @staticmethod
    def forward(ctx, z):
        ctx.save_for_backward(z)
        return z * torch.sigmoid(1.702 * z)

    @staticmethod
    def backward(ctx, grad):
        (z,) = ctx.saved_tensors
        s = torch.sigmoid(1.702 * z)
        return grad * (s * (1 + 1.702 * z * (1 - s)))


def activation(act: nn.Module, z: torch.Tensor, fused: bool = False) -> torch.Tensor:
    """The MLP activation module applied to z; open_clip's QuickGELU through _QuickGELU, or with
    fused=True through the one-launch Triton kernel (cma_kernels.quick_gelu; not while
    torch.compile traces, which fuses the plain expression itself)."""
    if type(act) is not QuickGELU:
        return act(z)
    if fused and not torch.compiler.is_compiling():
        return fused_quick_gelu(z)
    return _QuickGELU.apply(z)


def _mlp_hidden(block, x, fused=False, normed=None):
    """act(c_fc(ln_2(x))): [..., D] -> [..., mlp_width]; normed: ln_2(x) where the caller has it."""
    normed = layer_norm(block.ln_2, x) if normed is None else normed
    hidden = F.linear(normed, block.mlp.c_fc.weight, block.mlp.c_fc.bias)
    return activation(block.mlp.gelu, hidden, fused)


def mlp(block, x: torch.Tensor, recompute: bool = False, fused: bool = False, normed=None) -> torch.Tensor:
    """block.mlp(block.ln_2(x)), x [..., D] -> [..., D]; recompute=True keeps only x for backward
    and recomputes the hidden activation (ln_2, c_fc, act) there; fused=True runs quick_gelu as
    one Triton launch each way (the adapters' device); normed: ln_2(x) where the caller has it
    (out_proj_adapter; not with recompute, whose checkpoint starts from x)."""
    if recompute and torch.is_grad_enabled() and x.requires_grad:
        hidden = checkpoint(_mlp_hidden, block, x, fused, use_reentrant=False, preserve_rng_state=False)
    else:
        hidden = _mlp_hidden(block, x, fused, normed)
    return F.linear(hidden, block.mlp.c_proj.weight, block.mlp.c_proj.bias)


def has_lean_layout(block) -> bool:
    """Whether the block is open_clip's standard layout that these functions assume: MLP c_fc, gelu,
    c_proj; self-attention with a packed projection and no extra k/v bias."""
    m, attn = getattr(block, "mlp", None), getattr(block, "attn", None)
    return (isinstance(m, nn.Sequential) and list(m._modules) == ["c_fc", "gelu", "c_proj"]
            and isinstance(attn, nn.MultiheadAttention) and attn._qkv_same_embed_dim and attn.bias_k is None
            and not attn.add_zero_attn
            and not hasattr(block, "ln_1_kv"))


def store_frozen_linears(model: nn.Module, dtype=torch.bfloat16) -> int:
    """Store the frozen weights and biases of the model's nn.Linear layers and nn.MultiheadAttention
    input projections in `dtype`, in place. Under autocast to that dtype their matmuls get
    bit-identical inputs (autocast would cast them at every use, and keep each copy for backward);
    called without autocast, the model would meet weights of another dtype, so use it only for a
    model that always runs under autocast (cma train and cma eval on CUDA). Norms, embeddings and
    trainable parameters stay as they are. Only for models with adapters: open_clip reads the text
    tower's cast dtype from a block's c_fc weight, which adapted blocks read from the norm instead.
    Returns the number of values converted."""
    plain = [type(m).__name__ for m in model.modules()
             if hasattr(m, "get_weight_dtype") and not hasattr(m, "adapter_attn")]
    if plain:
        raise ValueError(f"store_frozen_linears needs every open_clip block adapted; {plain[0]} is not "
                         f"(call cma_model.add_cross_modal_adapters first)")
    converted = 0
    for module in model.modules():
        if isinstance(module, nn.MultiheadAttention):
            params = [module.in_proj_weight, module.in_proj_bias]
        elif isinstance(module, nn.Linear):
            params = [module.weight, module.bias]
        else:
            continue
        for p in params:
            if p is not None and not p.requires_grad and p.dtype != dtype:
                p.data = p.data.to(dtype)
                converted += p.numel()
    return converted
