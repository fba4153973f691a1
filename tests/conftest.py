"""Shared fixtures. Without CUDA the Triton kernels run in the CPU interpreter: TRITON_INTERPRET must
be set before triton decorates them, so it is set here, before anything imports cma_kernels."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import open_clip  # noqa: E402
import pytest  # noqa: E402
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg  # noqa: E402

CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def small_clip(vision_layers=2, text_layers=2, vision_width=64, text_width=48, seed=0, custom_text=False):
    """A tiny open_clip CLIP (32x32 images, 8x8 patches, 16-token context) with random weights."""
    torch.manual_seed(seed)
    vision = CLIPVisionCfg(layers=vision_layers, width=vision_width, head_width=32, patch_size=8, image_size=32)
    text = CLIPTextCfg(context_length=16, vocab_size=100, width=text_width, heads=4, layers=text_layers)
    if custom_text:
        return open_clip.model.CustomTextCLIP(embed_dim=32, vision_cfg=vision, text_cfg=text, quick_gelu=True).eval()
    return CLIP(embed_dim=32, vision_cfg=vision, text_cfg=text, quick_gelu=True).eval()


def clip_inputs(batch=2, seed=1, image_size=32, context=16, vocab=100):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, image_size, image_size, generator=g), torch.randint(1, vocab, (batch, context), generator=g)


@pytest.fixture(scope="session")
def vit_b32():
    """An open_clip ViT-B-32 with random weights; copy it before changing it."""
    return open_clip.create_model("ViT-B-32").eval()
