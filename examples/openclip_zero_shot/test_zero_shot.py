"""The OpenCLIP zero-shot example, offline: OpenCLIP architectures built without weights."""

from __future__ import annotations

import pytest
import torch

open_clip = pytest.importorskip("open_clip")

from openclip_zero_shot.zero_shot import sparseformer_clip, zero_shot  # noqa: E402


def test_sparseformer_is_openclips_image_tower():
    clip_model = open_clip.create_model("ViT-B-16-quickgelu", pretrained=None).eval()
    sparseformer_clip(clip_model)
    images = torch.randn(2, 3, 224, 224)
    assert clip_model.encode_image(images).shape == (2, 512)  # CLIP-B's embedding width
    tokenizer = open_clip.get_tokenizer("ViT-B-16")
    probs = zero_shot(clip_model, tokenizer, images, ["tench", "cat", "dog"])
    assert probs.shape == (2, 3)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2))


def test_embedding_widths_must_agree():
    clip_model = open_clip.create_model("ViT-B-16-quickgelu", pretrained=None)
    with pytest.raises(ValueError, match="768 dimensions, the text 512"):
        sparseformer_clip(clip_model, "sparseformer_btsp_openai_clip_large")
