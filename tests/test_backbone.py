"""cma_train.backbone: the model a run trains, by name or config, with its weights (open_clip's, or
OpenAI's own TorchScript file) and the activation they were trained with, the bounds the model
sets on the recipe, and the dtype --precision runs the towers in."""
import json

import pytest
import torch
from conftest import GPUS, TINY_TRAIN_CLIP, fake_gpu, write_openai_style_clip

from cma_model import adapter_modules
from cma_train.backbone import autocast_dtype, build_model, model_from_config, unfused_gpu_note
from cma_train.config import TrainConfig


def test_recipe_values_the_model_cannot_take_name_their_flag():
    cfg = TrainConfig(model="tiny", model_config=TINY_TRAIN_CLIP, pretrained="none", dataset="activitynet")
    with pytest.raises(ValueError, match=r"--shared-dim 512 is wider than this model's narrower tower \(\d+\): set "
                                         r"--shared-dim \(unset, it is the paper's value for --dataset activitynet\)"):
        build_model(cfg, torch.device("cpu"))
    cfg.shared_dim = 16
    context = TINY_TRAIN_CLIP["text_cfg"]["context_length"]
    with pytest.raises(ValueError, match=rf"--max-words 64 does not fit this model's text context of {context} tokens: "
                                         rf"set --max-words in \[2, {context}\] \(unset, it is the paper's value"):
        build_model(cfg, torch.device("cpu"))   # ActivityNet's 64 words
    cfg.max_words = context
    model, _, _ = build_model(cfg, torch.device("cpu"))
    assert model.transformer.resblocks[0].adapter_mlp.shared.weight.shape == (16, 16)   # [d_s, r]


# (GPU compute capability, --precision) -> the autocast dtype, None = fp32 without autocast
PRECISION_ON_GPU = [((9, 0), "auto", torch.bfloat16), ((8, 0), "auto", torch.bfloat16), ((7, 5), "auto", torch.float16),
                    ((7, 0), "auto", torch.float16), ((7, 5), "fp16", torch.float16), ((9, 0), "fp16", torch.float16),
                    ((9, 0), "fp32", None), ((7, 0), "fp32", None), ((8, 6), "bf16", torch.bfloat16)]


@pytest.mark.parametrize("capability, precision, dtype", PRECISION_ON_GPU)
def test_precision_picks_bf16_where_the_gpu_has_it_and_fp16_before(monkeypatch, capability, precision, dtype):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert autocast_dtype(precision, torch.device("cuda", 0)) == dtype


def test_precision_bf16_on_a_gpu_without_it_is_refused_naming_the_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    with pytest.raises(ValueError, match=r"--precision bf16: the Tesla T4 \(compute capability 7\.5\) has no bf16, "
                                         r"which needs 8\.0 or newer; use --precision fp16"):
        autocast_dtype("bf16", torch.device("cuda", 0))


@pytest.mark.parametrize("gpu, backend, noted", [("H200", "auto", False), ("A100", "auto", False), ("T4", "auto", True),
                                                 ("V100", "auto", True), ("T4", "triton", False),
                                                 ("T4", "reference", False)])
def test_a_gpu_the_fused_kernels_do_not_serve_by_default_is_noted(monkeypatch, gpu, backend, noted):
    fake_gpu(monkeypatch, gpu)
    note = unfused_gpu_note(backend, torch.device("cuda", 0))
    name, (major, minor) = GPUS[gpu]
    assert (note is not None) == noted
    assert not noted or note.startswith(f"note: the adapters run the PyTorch reference path on cuda:0 ({name}, "
                                        f"compute capability {major}.{minor}): the fused Triton kernels serve "
                                        f"compute capability 8.0+")
    assert unfused_gpu_note(backend, torch.device("cpu")) is None


def test_backend_triton_on_a_gpu_triton_cannot_compile_for_is_refused_before_the_model_is_built(monkeypatch):
    import cma_train.backbone as backbone
    fake_gpu(monkeypatch, "P100")
    monkeypatch.setattr(backbone, "model_from_config", lambda *_: pytest.fail("the model was built"))
    cfg = TrainConfig(model="tiny", model_config=TINY_TRAIN_CLIP, pretrained="none", max_words=12, backend="triton")
    with pytest.raises(ValueError, match=r"^--backend triton needs a CUDA GPU of compute capability 7\.0\+, got cuda:0 "
                                         r"\(Tesla P100-PCIE-16GB, compute capability 6\.0\); use --backend auto"):
        build_model(cfg, torch.device("cuda", 0))


@pytest.mark.parametrize("precision, dtype", [("auto", None), ("fp32", None), ("bf16", torch.bfloat16),
                                              ("fp16", torch.float16)])
def test_precision_on_the_cpu_is_fp32_unless_asked_and_stores_frozen_linears_in_it(precision, dtype):
    """auto is fp32 on the CPU; asked for, 16 bits run there too, and the model's frozen linears are
    stored in that dtype (the one autocast casts them to), the norms and adapters not."""
    assert autocast_dtype(precision, torch.device("cpu")) == dtype
    cfg = TrainConfig(model="tiny", model_config=TINY_TRAIN_CLIP, pretrained="none", max_words=12, precision=precision)
    model, _, _ = build_model(cfg, torch.device("cpu"))
    block = model.visual.transformer.resblocks[0]
    assert block.mlp.c_fc.weight.dtype == block.attn.in_proj_weight.dtype == (dtype or torch.float32)
    assert block.ln_1.weight.dtype == block.adapter_mlp.w_down.dtype == torch.float32


@pytest.mark.parametrize("extra", [{}, {"custom_text": True}, {"quick_gelu": True}])
def test_a_model_config_builds_the_model_open_clips_factory_builds(tmp_path, extra):
    """model_from_config(config) against open_clip.create_model of the same config registered as a
    file (open_clip's own reading of its model_configs layout): same class and parameters, and with
    the factory's weights loaded, the same embeddings (fp32, 1e-6). custom_text gives a CustomTextCLIP."""
    import open_clip
    config = {**TINY_TRAIN_CLIP, **extra}
    (tmp_path / "cma-test-tiny.json").write_text(json.dumps(config))
    open_clip.add_model_config(str(tmp_path / "cma-test-tiny.json"))
    want = open_clip.create_model("cma-test-tiny").eval()
    got = model_from_config(config).eval()
    assert type(got) is type(want) and type(got).__name__ == ("CustomTextCLIP" if extra.get("custom_text") else "CLIP")
    assert {k: v.shape for k, v in got.state_dict().items()} == {k: v.shape for k, v in want.state_dict().items()}
    got.load_state_dict(want.state_dict())
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 32, 32, generator=gen)
    tokens = torch.randint(1, 1000, (2, TINY_TRAIN_CLIP["text_cfg"]["context_length"]), generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(got.encode_image(images), want.encode_image(images), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got.encode_text(tokens), want.encode_text(tokens), rtol=1e-6, atol=1e-6)
    forced = model_from_config(config, quick_gelu=True)   # also where the config names quick_gelu itself
    assert type(forced.visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"


def test_openais_own_clip_file_loads_and_runs_quick_gelu(tmp_path, capsys):
    """OpenAI's ViT-B-32.pt (a TorchScript archive, trained with QuickGELU) into a model whose config
    says GELU: the weights load and the model runs QuickGELU, so with its adapters' up-projections
    zeroed it embeds exactly as the QuickGELU open_clip model the file was made from (fp32, 1e-5)."""
    gelu_config = {**TINY_TRAIN_CLIP, "quick_gelu": False}
    source = write_openai_style_clip(tmp_path / "ViT-tiny.pt", gelu_config)
    cfg = TrainConfig(model="tiny", model_config=gelu_config, pretrained=str(tmp_path / "ViT-tiny.pt"), max_words=12)
    model, tokenizer, size = build_model(cfg, torch.device("cpu"))
    assert f"note: --pretrained {tmp_path / 'ViT-tiny.pt'} was trained with QuickGELU" in capsys.readouterr().out
    with torch.no_grad():
        for m in adapter_modules(model):
            for p in (m.w_up_unique, m.b_up_unique, m.shared.weight, m.shared.bias):
                p.zero_()
    model.eval()
    images = torch.randn(3, 3, size, size)
    tokens = tokenizer(["a red circle", "a dog runs"], context_length=model.context_length)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), source.encode_image(images), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.encode_text(tokens), source.encode_text(tokens), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_name, tag, quick_gelu, note", [
    ("ViT-B-32", "openai", True, True),              # OpenAI's weights, open_clip's GELU config: QuickGELU
    ("ViT-B-32-quickgelu", "openai", True, False),   # the config says so already
    ("ViT-B-32", "laion2b_s34b_b79k", False, False),
])
def test_a_quick_gelu_tag_builds_its_model_with_quick_gelu(monkeypatch, capsys, model_name, tag, quick_gelu, note):
    import open_clip
    asked = {}

    def create_model(name, pretrained=None, force_quick_gelu=False):   # no download: a tiny stand-in
        asked.update(name=name, pretrained=pretrained, force_quick_gelu=force_quick_gelu)
        return open_clip.model.CLIP(**TINY_TRAIN_CLIP)
    monkeypatch.setattr(open_clip, "create_model", create_model)
    build_model(TrainConfig(model=model_name, pretrained=tag, max_words=12), torch.device("cpu"))
    assert asked == {"name": model_name, "pretrained": tag, "force_quick_gelu": quick_gelu}
    assert ("was trained with QuickGELU (OpenAI's CLIP): --model ViT-B-32 runs with QuickGELU too"
            in capsys.readouterr().out) == note
