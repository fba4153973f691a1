"""cma_kernels.adapter_op (fused_adapter) against the PyTorch reference computed in float64.

On CPU the kernels run in the Triton interpreter (fp32, fp16: REFERENCE.md section 7); bf16,
compilation by the real Triton compiler and inductor need CUDA and are marked so.
Tolerance: max |fused - reference64| <= TOL[dtype] * max(1, max |reference64|), per tensor.
"""
import copy
import os
import subprocess
import sys

import pytest
import torch
from conftest import CUDA, clip_inputs, gpu_check, requires_cuda, small_clip
from torch.utils._python_dispatch import TorchDispatchMode

import cma_kernels.adapter_op as adapter_op
from cma_benchmarks.bench_host import kernels_not_launched
from cma_kernels import adapter_backward, adapter_reference, fused_adapter
from cma_model import CrossModalAdapterConfig, adapter_named_parameters, add_cross_modal_adapters, set_adapter_backend

DEVICE = "cuda" if CUDA else "cpu"
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def make_case(N, D, r, ds, dtype, seed=0, lead=(), weight_dtype=None):
    """Fresh random inputs with an adapter term of the same order as h (weights scaled to fan-in)."""
    g = torch.Generator().manual_seed(seed)

    def rand(shape, scale, dt):
        return (torch.randn(shape, generator=g) * scale).to(DEVICE, dt).requires_grad_()

    wd = weight_dtype or dtype
    h, x = rand((*lead, N, D), 1.0, dtype), rand((*lead, N, D), 1.0, dtype)
    weights = [rand((r, D), D ** -0.5, wd), rand((r,), 0.5, wd), rand((D - ds, r), r ** -0.5, wd),
               rand((D - ds,), 0.5, wd), rand((ds, r), r ** -0.5, wd), rand((ds,), 0.5, wd)]
    return h, x, weights


def assert_matches(actual, expected, dtype, name):
    assert actual.shape == expected.shape, name
    if expected.numel() == 0:
        return
    err = (actual.double() - expected).abs().max().item()
    bound = TOL[dtype] * max(1.0, expected.abs().max().item())
    assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g}"


def check_against_float64(h, x, weights, activation="quick_gelu", residual=True, tol_dtype=None):
    """fused_adapter's output and gradients against the float64 reference, within TOL[h's dtype]
    (TOL[tol_dtype] where given)."""
    dtype = h.dtype
    inputs = [h] + ([x] if residual else []) + weights
    out = fused_adapter(h, *weights, residual=x if residual else None, activation=activation)
    dy = torch.randn(out.shape, generator=torch.Generator().manual_seed(9)).to(out)
    grads = torch.autograd.grad(out, inputs, dy)

    ref_inputs = [t.detach().double().cpu().requires_grad_() for t in inputs]
    ref_x = ref_inputs[1] if residual else None
    ref = adapter_reference(ref_inputs[0], *ref_inputs[-6:], residual=ref_x, activation=activation)
    ref_grads = torch.autograd.grad(ref, ref_inputs, dy.double().cpu())

    assert out.dtype == dtype
    tol_dtype = tol_dtype or dtype
    assert_matches(out.cpu(), ref, tol_dtype, "out")
    names = ["dh"] + (["dx"] if residual else []) + ["dw_down", "db_down", "dw_up_unique", "db_up_unique",
                                                     "dw_up_shared", "db_up_shared"]
    for name, g, rg, t in zip(names, grads, ref_grads, inputs):
        assert g.dtype == t.dtype, name
        assert_matches(g.cpu(), rg, tol_dtype, name)
    return out, grads


SMALL = [(N, D, r, ds) for N in (0, 1, 7, 257) for D in (64, 96) for r in (4, 8, 16) for ds in (0, 16, D)]
WIDE = [(N, D, r, ds) for N in (1, 257) for D in (512, 768) for r in (4, 8, 16) for ds in (0, 16, D)]


@pytest.mark.parametrize("N,D,r,ds", SMALL + WIDE)
def test_fp32_forward_and_every_gradient(N, D, r, ds):
    residual = (N + D + r + ds) % 2 == 0   # half the cases without the residual, spread over the grid
    check_against_float64(*make_case(N, D, r, ds, torch.float32), residual=residual)


@pytest.mark.parametrize("N,D,r,ds", [(7, 96, 4, 16), (257, 96, 8, 0), (257, 96, 16, 96), (257, 768, 8, 16),
                                      (1, 512, 16, 512), (0, 768, 8, 16)])
@gpu_check
def test_fp16_forward_and_every_gradient(N, D, r, ds):
    check_against_float64(*make_case(N, D, r, ds, torch.float16))


@gpu_check
@pytest.mark.parametrize("r", [1, 4, 8, 16, 32, 64])
def test_every_rank(r):
    check_against_float64(*make_case(65, 96, r, 16, torch.float32))


@pytest.mark.skipif(CUDA, reason="on a GPU every test runs these configurations")
@pytest.mark.parametrize("fp32_inputs,wide_r", list(adapter_op._CONFIGS))
def test_every_gpu_launch_configuration_in_the_interpreter(fp32_inputs, wide_r, monkeypatch):
    """On the CPU the launchers take the largest tiles (launch_configs); here each (forward,
    backward) configuration the GPU uses runs instead, with its dtype and r, so every tile shape's
    masks and multi-tile loop are checked against float64 before a GPU sees them."""
    config = adapter_op._CONFIGS[fp32_inputs, wide_r]
    monkeypatch.setattr(adapter_op, "launch_configs", lambda dtype, r, device: config)
    dtype = torch.float32 if fp32_inputs else torch.float16
    check_against_float64(*make_case(257, 96, 64 if wide_r else 8, 16, dtype))


@pytest.fixture
def fma_kernels(monkeypatch):
    """Inputs of every dtype take the FMA kernels with the GPU's fp32 tiles (FP32_FMA_CONFIGS):
    several row tiles, row groups and D chunks per call."""
    monkeypatch.setattr(adapter_op, "launch_configs", lambda dtype, r, device: adapter_op.FP32_FMA_CONFIGS[r <= 8])


@pytest.mark.skipif(CUDA, reason="on a GPU every fp32 test at r <= 16 runs these kernels")
@pytest.mark.parametrize("N,D,r,ds,residual,dtype", [(257, 96, 8, 16, True, torch.float32),
                                                     (7, 64, 4, 0, False, torch.float32),
                                                     (300, 768, 16, 16, True, torch.float32),
                                                     (1, 512, 1, 512, True, torch.float32),
                                                     (65, 96, 3, 96, False, torch.float32),
                                                     (130, 768, 8, 0, False, torch.float32),
                                                     (257, 96, 8, 16, True, torch.float16),
                                                     (70, 512, 16, 0, False, torch.float16)])
def test_fma_kernels_every_gradient(N, D, r, ds, residual, dtype, fma_kernels):
    """fp32 (their default) and fp16 (a tuner candidate for 16-bit inputs: products in fp32)."""
    check_against_float64(*make_case(N, D, r, ds, dtype), residual=residual)


@pytest.mark.skipif(CUDA, reason="on a GPU every fp32 test at r <= 16 runs these kernels")
def test_fp32_fma_kernels_gelu_and_deterministic(fma_kernels):
    """gelu; the weight gradients bit-identical run to run, and the same without dh."""
    check_against_float64(*make_case(40, 96, 16, 16, torch.float32), activation="gelu")
    h, x, weights = make_case(300, 96, 8, 16, torch.float32)
    dy = torch.randn(300, 96, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    args = (dy, h, *weights[:3], weights[4])
    first, again, without_dh = adapter_backward(*args), adapter_backward(*args), adapter_backward(*args, need_dh=False)
    assert torch.equal(first[0], again[0]) and without_dh[0] is None
    for a, b, c in zip(first[1:], again[1:], without_dh[1:]):
        assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("dtype,r,precision,fma", [(torch.float32, 8, "highest", True),
                                                   (torch.float32, 16, "highest", True),
                                                   (torch.float32, 32, "highest", False),
                                                   (torch.float32, 8, "high", False),
                                                   (torch.bfloat16, 8, "highest", False)])
def test_fp32_takes_the_fma_kernels_where_its_products_are_ieee(dtype, r, precision, fma, monkeypatch):
    """On a GPU: fp32 at r <= 16 under the default "highest" matmul precision; not where TF32 dots
    are allowed ("high"), for 16-bit inputs or for wider bottlenecks."""
    monkeypatch.setattr(adapter_op, "_capability_major", lambda index: 9)   # as an H100 answers
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: precision)
    forward, backward = adapter_op.launch_configs(dtype, r, torch.device("cuda", 0))
    assert forward.get("FMA", False) == backward.get("FMA", False) == fma
    assert adapter_op._fma(forward) == fma


@pytest.fixture
def split_backward(monkeypatch):
    """The backward in two launches (launch configuration SPLIT, a candidate the GPU sweep times),
    with tiles small enough for several row tiles, row groups and D chunks per call; its products
    through tl.dot (not FMA, which fp32 would take on a GPU)."""
    configs = adapter_op.launch_configs

    def split(dtype, r, device):
        forward, backward = configs(dtype, r, device)
        return forward, dict(backward, SPLIT=True, FMA=False, BLOCK_N=32, BLOCK_D=64)
    monkeypatch.setattr(adapter_op, "launch_configs", split)


@pytest.mark.parametrize("N,D,r,ds,dtype", [(257, 96, 8, 16, torch.float32), (7, 64, 4, 0, torch.float32),
                                            (257, 96, 16, 96, torch.float16), (1, 768, 8, 16, torch.float32),
                                            (300, 512, 4, 16, torch.float16)])
@pytest.mark.parametrize("residual", [True, False])
def test_split_backward_every_gradient(N, D, r, ds, dtype, residual, split_backward):
    check_against_float64(*make_case(N, D, r, ds, dtype), residual=residual)


def test_split_backward_is_the_one_launch_backward_and_deterministic(split_backward):
    """The same dots on the same values: dh bit-identical to the one-launch backward's, the weight
    gradients (summed over tokens in another order) within fp32 rounding; run twice, bit-identical;
    without dh, the same weight gradients."""
    h, x, weights = make_case(700, 96, 8, 16, torch.float32)
    dy = torch.randn(700, 96, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    args = (dy, h, *weights[:3], weights[4])
    split, again, without_dh = adapter_backward(*args), adapter_backward(*args), adapter_backward(*args, need_dh=False)
    forward, backward = adapter_op.launch_configs(torch.float32, 8, h.device)
    with pytest.MonkeyPatch.context() as m:   # the same tiles, in one launch
        m.setattr(adapter_op, "launch_configs", lambda *_: (forward, dict(backward, SPLIT=False)))
        one_launch = adapter_backward(*args)
    assert torch.equal(split[0], one_launch[0]) and without_dh[0] is None
    for a, b, c, d in zip(split[1:], again[1:], without_dh[1:], one_launch[1:]):
        assert torch.equal(a, b) and torch.equal(a, c)
        assert_matches(a, d.double(), torch.float32, "weight gradient")   # fp32 sums in another order


@pytest.mark.parametrize("activation", ["quick_gelu", "gelu"])
def test_activations(activation):
    check_against_float64(*make_case(33, 64, 8, 16, torch.float32), activation=activation)


def test_three_dimensional_input():
    check_against_float64(*make_case(19, 96, 8, 16, torch.float32, lead=(3,)))


def test_non_contiguous_inputs():
    h, x, weights = make_case(40, 96, 8, 16, torch.float32, lead=(2,))
    # [2, 40, D] -> transposed [40, 2, D] views: rows are not evenly strided, a copy is made
    check_against_float64(h.transpose(0, 1), x.transpose(0, 1), weights)
    # every other row: a strided 2-D view the kernel reads in place
    big, _, _ = make_case(80, 96, 8, 16, torch.float32)
    check_against_float64(big[::2], x[0], weights)
    # weights given transposed-and-back (non-contiguous)
    w_down = weights[0].detach().t().contiguous().t().requires_grad_()
    check_against_float64(h[0], x[0], [w_down] + weights[1:])


@gpu_check
def test_fp32_weights_with_fp16_activations():
    """Autocast-style: fp32 master weights, 16-bit activations; grads come back in the weights' dtype."""
    check_against_float64(*make_case(33, 96, 8, 16, torch.float16, weight_dtype=torch.float32))


def test_backward_kernel_gets_the_weights_in_h_dtype(monkeypatch):
    """The kernel fed fp32 weights with 16-bit h computed wrong gradients on an H200 (benchmarks/
    gpu_cases.py): adapter_backward_flat casts the weights to h's dtype and leaves dy as it is."""
    seen = []
    launch = adapter_op._launch_backward

    def spy(dy, h, *weights_and_flags):
        seen.append([t.dtype for t in (dy, h, *weights_and_flags[:4])])
        return launch(dy, h, *weights_and_flags)
    monkeypatch.setattr(adapter_op, "_launch_backward", spy)
    h, x, weights = make_case(33, 96, 8, 16, torch.float16, weight_dtype=torch.float32)
    out = fused_adapter(h, *weights, residual=x.detach().float())
    torch.autograd.grad(out, [h] + weights, torch.randn_like(out))
    assert seen == [[torch.float32] + [torch.float16] * 5]


class _RecordPrecision:
    """A kernel whose launches record their DOT_PRECISION, then run the real kernel."""

    def __init__(self, kernel, seen):
        self.kernel, self.seen = kernel, seen

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.seen.append(kwargs["DOT_PRECISION"])
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.fixture
def matmul_precision():
    """torch.set_float32_matmul_precision, put back as it was after the test."""
    before = torch.get_float32_matmul_precision()
    yield torch.set_float32_matmul_precision
    torch.set_float32_matmul_precision(before)


@pytest.mark.parametrize("precision,dtype,expected", [("highest", torch.float32, "ieee"),
                                                      ("high", torch.float32, "tf32x3"),
                                                      ("medium", torch.float32, "tf32"),
                                                      ("high", torch.float16, "tf32")])
def test_fp32_dots_follow_torch_matmul_precision(precision, dtype, expected, matmul_precision, monkeypatch):
    """Both launches take their dots' input_precision from torch.get_float32_matmul_precision()
    for fp32 (16-bit dots ignore it); their values: test_cuda_fp32_dot_precisions_match_float64."""
    seen = []
    for name in ("_adapter_fwd_kernel", "_adapter_bwd_kernel"):
        monkeypatch.setattr(adapter_op, name, _RecordPrecision(getattr(adapter_op, name), seen))
    matmul_precision(precision)
    h, x, weights = make_case(33, 96, 8, 16, dtype)
    out = fused_adapter(h, *weights, residual=x)
    torch.autograd.grad(out, [h] + weights, torch.randn_like(out))
    assert seen == [expected, expected]


@pytest.mark.parametrize("major,expected", [(7, "ieee"), (8, "tf32x3"), (9, "tf32x3")])
def test_gpus_without_tf32_get_ieee_fp32_dots(major, expected, matmul_precision, monkeypatch):
    """GPUs before compute capability 8.0 (T4, V100) have no TF32: fp32 dots stay IEEE there."""
    monkeypatch.setattr(adapter_op, "_capability_major", lambda index: major)
    matmul_precision("high")
    assert adapter_op._dot_precision(torch.float32, torch.device("cuda", 0)) == expected
    assert adapter_op._dot_precision(torch.float32, torch.device("cpu")) == "tf32x3"


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func).removeprefix("aten.").removesuffix(".default"))
        return func(*args, **(kwargs or {}))


def test_a_fused_call_dispatches_only_the_ops_it_needs():
    """The host work of one training-step call (bf16 [..., D] h, fp32 master weights; the ViT-B/32
    step is bound by it: benchmarks/bench_host.py), as the ops it dispatches besides the two kernel
    launches (stubbed here). Forward: the output. Backward: the 4 weight casts, dh and the partials,
    their sum, one split and 3 views for the six gradients. A change here is a change of the host
    cost of every adapter call: make it on purpose."""
    h, x, weights = make_case(64, 96, 8, 16, torch.bfloat16, lead=(2,), weight_dtype=torch.float32)
    with kernels_not_launched():
        with _Ops() as forward:
            out = fused_adapter(h, *weights, residual=x)
        dy = torch.randn_like(out)
        with _Ops() as backward:
            torch.autograd.grad(out, [h, x] + weights, dy)
    assert [op for op in forward.ops if op != "promote_types"] == ["empty.memory_format"]
    ours = [op for op in backward.ops if op not in ("detach", "alias")]   # autograd's own bookkeeping
    assert ours == ["_to_copy"] * 4 + ["empty.memory_format"] * 2 + ["slice.Tensor", "sum.dim_IntList",
                                                                     "split_with_sizes", "view", "view", "view"]


def test_gpu_cases_script_runs_its_cases_on_the_cpu():
    """benchmarks/gpu_cases.py (the GPU check's first section: each dtype mix of the backward in its
    own process) with --smoke: small cases in Triton's interpreter, every one right."""
    if CUDA:
        pytest.skip("the smoke run is for machines without a GPU")
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "gpu_cases.py")
    done = subprocess.run([sys.executable, script, "--smoke"], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TRITON_INTERPRET": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    results = [line.split() for line in done.stdout.splitlines() if line.endswith(tuple("0123456789"))]
    assert len(results) == 10 and all(result[1] == "ok" and float(result[2]) < 1e-3 for result in results), done.stdout


@gpu_check
@requires_cuda
@pytest.mark.parametrize("h_needs_grad", [True, False])
def test_cuda_text_tower_dtype_mix(h_needs_grad):
    """A text tower under bf16 autocast: bf16 h, an fp32 residual stream (so out and dy are fp32),
    fp32 master weights. Without the weights' cast, the backward of that mix computed wrong
    gradients on an H200 (benchmarks/gpu_cases.py)."""
    h, x, weights = make_case(2464, 512, 8, 16, torch.bfloat16, weight_dtype=torch.float32)
    h.requires_grad_(h_needs_grad)
    x = x.detach().float()
    out = fused_adapter(h, *weights, residual=x)
    dy = torch.randn(out.shape, generator=torch.Generator().manual_seed(9)).to(out)
    inputs = ([h] if h_needs_grad else []) + weights
    grads = torch.autograd.grad(out, inputs, dy)
    ref_inputs = [t.detach().double().cpu().requires_grad_() for t in [h] + weights]
    ref = adapter_reference(*ref_inputs, residual=x.double().cpu())
    ref_grads = torch.autograd.grad(ref, ref_inputs, dy.double().cpu())[0 if h_needs_grad else 1:]
    assert out.dtype == torch.float32
    assert_matches(out.cpu(), ref, torch.bfloat16, "out")
    for i, (g, rg) in enumerate(zip(grads, ref_grads)):
        assert_matches(g.cpu(), rg, torch.bfloat16, f"grad {i}")


@gpu_check
def test_backward_is_deterministic():
    h, x, weights = make_case(700, 96, 8, 16, torch.float32)   # several programs with several tiles each
    dy = torch.randn(700, 96).to(DEVICE)
    first = adapter_backward(dy, h, *weights[:3], weights[4])
    second = adapter_backward(dy, h, *weights[:3], weights[4])
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("registered_op", [False, True])
@pytest.mark.parametrize("residual", [False, True])
def test_h_without_grad_gets_no_dh(residual, registered_op):
    """Each tower's first attention adapter: h comes from frozen layers, so the backward skips dh.
    Weight gradients match float64, and are bit-identical to a backward that computes dh."""
    h, x, weights = make_case(257, 96, 8, 16, torch.float32)
    h = h.detach()
    inputs = ([x] if residual else []) + weights
    args = (h, *weights, x if residual else None, "quick_gelu")
    out = torch.ops.cma.fused_adapter(*args) if registered_op else fused_adapter(*args)
    dy = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, dy)

    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    ref = adapter_reference(h.double(), *ref_inputs[-6:], residual=ref_inputs[0] if residual else None)
    for name, g, rg in zip(["dx"] * residual + ["dw_down", "db_down", "dw_up_unique", "db_up_unique",
                                                 "dw_up_shared", "db_up_shared"],
                           grads, torch.autograd.grad(ref, ref_inputs, dy.double())):
        assert_matches(g, rg, torch.float32, name)

    with_dh = adapter_backward(dy, h, *weights[:3], weights[4])
    without_dh = adapter_backward(dy, h, *weights[:3], weights[4], need_dh=False)
    assert without_dh[0] is None and with_dh[0] is not None
    for a, b in zip(with_dh[1:], without_dh[1:]):
        assert torch.equal(a, b)


def test_residual_gradient_is_dy_itself():
    h, x, weights = make_case(7, 64, 4, 16, torch.float32)
    out = fused_adapter(h, *weights, residual=x)
    dy = torch.randn_like(out)
    captured = []
    x.register_hook(lambda g: captured.append(g))
    out.backward(dy)
    assert captured[0].data_ptr() == dy.data_ptr()


@pytest.mark.parametrize("bad,message", [
    (dict(w_down=torch.zeros(8, 95)), r"w_down must be \[r, D=96\]"),
    (dict(b_down=torch.zeros(7)), r"b_down must have shape \[8\]"),
    (dict(w_up_unique=torch.zeros(79, 8)), r"w_up_unique must have shape \[80, 8\]"),
    (dict(residual=torch.zeros(3, 96)), r"residual must have shape \[5, 96\]"),
    (dict(h=torch.zeros(5, 96, dtype=torch.int32)), "h must be a floating point tensor"),
    (dict(activation="relu"), "unknown activation 'relu'"),
    (dict(w_down=torch.zeros(65, 96), b_down=torch.zeros(65), w_up_unique=torch.zeros(80, 65),
          w_up_shared=torch.zeros(16, 65)), "1 <= r <= 64"),
])
def test_bad_arguments_raise(bad, message):
    args = dict(h=torch.zeros(5, 96), w_down=torch.zeros(8, 96), b_down=torch.zeros(8), w_up_unique=torch.zeros(80, 8),
                b_up_unique=torch.zeros(80), w_up_shared=torch.zeros(16, 8), b_up_shared=torch.zeros(16),
                residual=None, activation="quick_gelu")
    args.update(bad)
    with pytest.raises(ValueError, match=message):
        fused_adapter(**{k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in args.items()})


def _model_pair(make, config):
    reference = add_cross_modal_adapters(make(), config, backend="reference")
    with torch.no_grad():   # adapter weights large enough to matter
        for _, p in adapter_named_parameters(reference):
            p.normal_(0, 0.05)
    fused = set_adapter_backend(copy.deepcopy(reference), "triton")
    return reference.to(DEVICE), fused.to(DEVICE)


def _embeddings_and_grads(model, images, texts):
    model.zero_grad(set_to_none=True)
    img, txt = model.encode_image(images), model.encode_text(texts)
    g = torch.Generator().manual_seed(3)
    ((img * torch.randn(img.shape, generator=g).to(img)).sum()
     + (txt * torch.randn(txt.shape, generator=g).to(txt)).sum()).backward()
    return img, txt, {n: p.grad for n, p in adapter_named_parameters(model)}


def _compare_models(reference, fused, images, texts, rtol):
    ref = _embeddings_and_grads(reference, images, texts)
    out = _embeddings_and_grads(fused, images, texts)
    for a, b, name in ((out[0], ref[0], "image"), (out[1], ref[1], "text")):
        assert (a - b).abs().max() <= rtol * b.abs().max(), name
    assert out[2].keys() == ref[2].keys()
    for n in ref[2]:
        assert (out[2][n] - ref[2][n]).abs().max() <= rtol * ref[2][n].abs().max() + 1e-12, n


@gpu_check
def test_whole_small_clip_triton_matches_reference():
    reference, fused = _model_pair(small_clip, CrossModalAdapterConfig(reduction_dim=8, shared_dim=16))
    images, texts = clip_inputs()
    _compare_models(reference, fused, images.to(DEVICE), texts.to(DEVICE), rtol=1e-4)


@gpu_check
def test_whole_vit_b32_triton_matches_reference(vit_b32):
    config = CrossModalAdapterConfig(reduction_dim=8, shared_dim=16)
    reference, fused = _model_pair(lambda: copy.deepcopy(vit_b32), config)
    images, texts = clip_inputs(batch=1, image_size=224, context=77, vocab=49408)
    _compare_models(reference, fused, images.to(DEVICE), texts.to(DEVICE), rtol=1e-4)


def test_gpu_cases_sanitizes_a_faulted_and_a_wrong_raw_case(monkeypatch, capsys):
    """gpu_cases.py --sanitize: memcheck on the first raw case that faulted, racecheck on the first
    that came out wrong; a wrong "lib" case fails the run."""
    from cma_benchmarks import gpu_cases
    outcome = {"raw": "WRONG 2.1e+00", "lib": "ok 1.0e-03", "raw1": "ok 1.0e-03"}
    raw = [case for case in gpu_cases.cases() if case.split("-")[4] == "raw"]
    faulted = raw[2:4]   # memcheck takes the first of these; racecheck the first wrong one, raw[0]
    monkeypatch.setattr(gpu_cases, "spawn", lambda case: "FAULT: illegal memory access" if case in faulted
                        else outcome[case.split("-")[4]])
    sanitized = []
    monkeypatch.setattr(gpu_cases, "sanitize", lambda tool, case, timeout: sanitized.append((tool, case)))
    monkeypatch.setattr(gpu_cases.shutil, "which", lambda name: "/bin/" + name)
    monkeypatch.setattr(gpu_cases.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(sys, "argv", ["gpu_cases.py", "--sanitize"])
    gpu_cases.main()
    assert sanitized == [("memcheck", raw[2]), ("racecheck", raw[0])]
    outcome["lib"] = "WRONG 5.0e-02"
    with pytest.raises(SystemExit):
        gpu_cases.main()


@gpu_check
def test_compiles_without_graph_breaks():
    """fullgraph=True fails on any graph break; aot_eager on CPU, inductor on CUDA (below)."""
    reference, fused = _model_pair(small_clip, CrossModalAdapterConfig(reduction_dim=4, shared_dim=8))
    images, _ = clip_inputs()
    torch._dynamo.reset()
    compiled = torch.compile(fused.encode_image, fullgraph=True, backend="aot_eager")
    out = compiled(images.to(DEVICE))
    out.sum().backward()
    with torch.no_grad():
        torch.testing.assert_close(out, reference.encode_image(images.to(DEVICE)), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------ CUDA


@requires_cuda
@pytest.mark.parametrize("N,D,r,ds", [(19200, 768, 8, 16), (12288, 512, 8, 16), (1000, 1280, 16, 64),
                                      (257, 96, 4, 96), (3, 1024, 8, 0)])
@gpu_check
def test_cuda_bf16_matches_float64(N, D, r, ds):
    check_against_float64(*make_case(N, D, r, ds, torch.bfloat16))


@gpu_check
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("r", [8, 64])
def test_cuda_split_backward_matches_float64(r, dtype, split_backward):
    """The two-launch backward (a tuner candidate) compiled by Triton for the GPU."""
    check_against_float64(*make_case(4099, 768, r, 16, dtype))


@gpu_check
@requires_cuda
@pytest.mark.parametrize("r", [8, 16])
def test_cuda_bf16_fma_backward_matches_float64(r, fma_kernels):
    """The FMA kernels for bf16 inputs (a tuner candidate, BWD_FIRST) compiled for the GPU."""
    check_against_float64(*make_case(4099, 768, r, 16, torch.bfloat16))


@gpu_check
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("r", [4, 8, 16, 32, 64])
def test_cuda_every_rank_compiles(r, dtype):
    check_against_float64(*make_case(4099, 768, r, 16, dtype))


@gpu_check
@requires_cuda
@pytest.mark.parametrize("precision,tol_dtype", [("high", torch.float32), ("medium", torch.float16)])
@pytest.mark.parametrize("r", [8, 64])
def test_cuda_fp32_dot_precisions_match_float64(precision, tol_dtype, r, matmul_precision):
    """fp32 under torch.set_float32_matmul_precision: "high" (three TF32 dots each) within fp32's
    tolerance, "medium" (one TF32 dot: 10-bit mantissas, as fp16 has) within fp16's."""
    matmul_precision(precision)
    check_against_float64(*make_case(4099, 768, r, 16, torch.float32), tol_dtype=tol_dtype)


@gpu_check
@requires_cuda
def test_cuda_inductor_fullgraph_and_bf16_autocast_model():
    reference, fused = _model_pair(small_clip, CrossModalAdapterConfig(reduction_dim=8, shared_dim=16))
    images, texts = clip_inputs()
    images, texts = images.cuda(), texts.cuda()
    torch._dynamo.reset()
    compiled = torch.compile(fused.encode_image, fullgraph=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = compiled(images)
        ref = reference.encode_image(images)
    assert (out.float() - ref.float()).abs().max() <= 3e-2 * ref.float().abs().max()


def test_eager_function_and_registered_op_agree():
    """Eager mode runs FusedAdapterFunction, torch.compile the torch.library op: same numbers."""
    h, x, weights = make_case(40, 96, 8, 16, torch.float32)
    inputs = [h, x] + weights
    out_fn = fused_adapter(h, *weights, residual=x)
    out_op = torch.ops.cma.fused_adapter(h, *weights, x, "quick_gelu")
    dy = torch.randn_like(out_fn)
    for a, b in zip(torch.autograd.grad(out_fn, inputs, dy), torch.autograd.grad(out_op, inputs, dy)):
        assert torch.equal(a, b)
    assert torch.equal(out_fn, out_op)


def test_kernels_compile_for_sm90_without_a_gpu():
    """Triton's real compiler (to sm_90 cubin, bundled ptxas), in a process without the interpreter;
    the adapter kernels also fit the shared memory of sm_86/89 and T4 (sm_75)."""
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    here = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run([sys.executable, os.path.join(here, "sm90_compile.py")], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0 and "all compiled for sm_90" in out.stdout, out.stdout[-2000:] + out.stderr[-3000:]
    assert "shared memory fits: sm_86 needs at most" in out.stdout and "sm_75 needs at most" in out.stdout
