"""The bootstrapped SparseFormers (CVPR 2024): registry entries, the config language they use,
and the generic model invariants on a tiny configuration of the family."""

from __future__ import annotations

import math

import pytest
import torch

from sparseformer import SparseFormer, SparseFormerConfig, count_flops, create_model
from sparseformer.layers import grid_and_whole_rois, grid_rois, roi_sine_embedding
from sparseformer.weights.convert_btsp import btsp_config
from sparseformer.weights.registry import BTSP_NANO_ARGS, MODELS

BTSP = {
    # name: (parameters, outputs, tokens)
    "sparseformer_btsp_augreg_base": (64_728_792, 1000, 48),
    "sparseformer_btsp_augreg_large": (213_083_992, 1000, 48),
    "sparseformer_btsp_openai_clip_base": (64_353_008, 512, 48),
    "sparseformer_btsp_openai_clip_large": (212_845_484, 768, 63),
}
RELEASE = "https://github.com/showlab/sparseformer/releases/download/v2.0.0-refactor/"


def tiny(quick_gelu: bool = False, **overrides) -> SparseFormerConfig:
    """The fixture's small configuration (7 tokens + CLS, 4 points, 32 output points)."""
    compat = {**BTSP_NANO_ARGS["compatible_config"], "clip_quick_gelu": quick_gelu}
    return btsp_config({**BTSP_NANO_ARGS, "compatible_config": compat}, **overrides)


@pytest.mark.parametrize("name", sorted(BTSP))
def test_registered_sizes_and_weights(name):
    params, outputs, tokens = BTSP[name]
    with torch.device("meta"):
        model = create_model(name)
    assert sum(p.numel() for p in model.parameters()) == params
    assert model.num_classes == outputs and model.config.num_tokens == tokens
    assert model.initial_rois.shape == (tokens, 4) and model.initial_tokens.shape[0] == 1
    clip = "clip" in name
    assert (model.head.bias is None) == clip
    cfg = model.pretrained_cfg
    assert cfg["url"] == RELEASE + f"{name}_converted.pth"
    assert cfg["interpolation"] == "bilinear" and cfg["crop_pct"] == 224 / 256
    assert cfg["mean"] == ((0.48145466, 0.4578275, 0.40821073) if clip else (0.5,) * 3)
    assert MODELS[name].weights.source_format == "btsp"
    width = model.config.stages[1].width
    assert model.config.heads_at(width) == width // 64


def test_flops_of_the_base_models():
    flops = count_flops(create_model("sparseformer_btsp_augreg_base"), (3, 224, 224))
    assert flops.gflops_complete == pytest.approx(3.869, abs=1e-3)
    assert "baddbmm" not in flops.by_op  # no mixing biases: plain bmm, in both conventions
    assert flops.gflops_paper == flops.gflops_complete


def test_tiny_flops_pinned():
    config = tiny()
    flops = count_flops(SparseFormer(config), (3, 32, 32))
    # the mixing: per sampling step, N * (P * C * C + Q * P * C) with Q = max(P, 32) = 32
    steps, N, P, C, Q = 3 + 1, 7, 4, 16, 32
    mixing = steps * N * (P * C * C + Q * P * C)
    assert flops.by_op["bmm"] == mixing  # attention runs through SDPA, counted apart
    assert flops.by_op["grid_sampler_2d"] == steps * N * P * C * 4


def test_tiny_model_invariants():
    model = SparseFormer(tiny()).train()
    x = torch.randn(2, 3, 48, 40)
    out = model.forward_with_details(x)
    assert out.logits.shape == (2, 10) and out.tokens.shape == (2, 8, 96)
    # RoIs and points are the 7 latent tokens' only: the CLS token is not a RoI token
    assert all(r.shape == (2, 7, 4) for r in out.rois)
    assert all(p.shape == (2, 7, 4, 2) for p in out.sampling_points)
    assert len(out.sampling_points) == 3 + 1
    out.logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    torch.testing.assert_close(model.forward_with_details(x).logits, model(x))
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, 96)
    assert {"cls_token", "stages.0.stage_embedding"} <= model.no_weight_decay()


def test_reset_classifier_keeps_cls_pooling_and_takes_a_bias():
    model = SparseFormer(tiny(head_bias=False)).eval()
    model.reset_classifier(5)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 5) and model.head.bias is None
    model.reset_classifier(5, "avg")
    assert model.global_pool == "avg"
    x = torch.randn(1, 3, 32, 32)  # every token averaged, the CLS token among them (see docs)
    tokens = model.forward_features(x)
    torch.testing.assert_close(model(x), model.head(model.fc_norm(tokens.mean(dim=1))))
    model.reset_classifier(5, "token")
    with pytest.raises(ValueError, match="'token'"):
        model.reset_classifier(5, "max")


def test_lock_freezes_all_but_the_last_groups_as_openclip_asks():
    """clip_model.lock_image_tower(n) calls visual.lock(n): a SparseFormer tower had none."""
    from timm.models import group_parameters

    model = create_model("sparseformer_btsp_nano", num_classes=512)
    groups = group_parameters(model, model.group_matcher())
    model.lock(2)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == set(groups[max(groups)]) | set(groups[max(groups) - 1])
    model.lock()
    assert not any(p.requires_grad for p in model.parameters())


def test_stage_embedding_row_i_joins_before_repeat_i():
    model = SparseFormer(tiny()).eval()
    stage = model.stages[0]
    assert stage.repeats == (3,)
    entering = []  # the tokens each repetition of the stage's unit receives
    stage.units[0].register_forward_pre_hook(lambda m, args: entering.append(args[0]))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        base = model(x)
        before, entering[:] = list(entering), []
        stage.stage_embedding[2].add_(1.0)  # row 2: repetition 2 only, and after it
        changed = model(x)
    assert [torch.equal(a, b) for a, b in zip(before, entering)] == [True, True, False]
    torch.testing.assert_close(entering[2] - before[2], torch.ones_like(before[2]))
    assert not torch.allclose(base, changed)


def test_cls_token_and_roi_ops_are_validated():
    with pytest.raises(ValueError, match="no RoI op"):
        tiny(cls_token_unit=1)
    with pytest.raises(ValueError, match="without a CLS token"):
        tiny(cls_token_unit=None)
    with pytest.raises(ValueError, match="cls_token_unit must index"):
        tiny(cls_token_unit=9)
    with pytest.raises(ValueError, match="perfect square"):
        tiny(roi_init="grid")


def test_grid_and_whole_rois():
    rois = grid_and_whole_rois(63)
    torch.testing.assert_close(rois[:49], grid_rois(49))
    assert torch.equal(rois[49:], torch.tensor([[0.0, 0.0, 1.0, 1.0]]).expand(14, 4))
    assert torch.equal(grid_and_whole_rois(49), grid_rois(49))


def test_roi_sine_embedding_reference():
    rois = torch.rand(2, 3, 4)
    dim = 16
    code = roi_sine_embedding(rois, dim)
    f = dim // 4
    freqs = [math.exp(math.log(128.0) * k / (f - 1)) for k in range(f)]
    for b, n, c in ((0, 0, 0), (1, 2, 3), (0, 1, 2)):
        a = [float(rois[b, n, c]) * math.pi * fr for fr in freqs]
        expected = [math.sin(v) for v in a[0::2]] + [math.cos(v) for v in a[1::2]]
        torch.testing.assert_close(
            code[b, n, c * f : (c + 1) * f], torch.tensor(expected), rtol=1e-5, atol=1e-5
        )


def test_quick_gelu_only_in_the_cortex():
    model = SparseFormer(tiny(quick_gelu=True))
    assert model.stages[0].units[0]["mlp"].activation == "gelu"
    assert model.stages[1].units[1]["mlp"].activation == "quick_gelu"
    assert model.stages[1].units[0]["sample_mix"].mixing.activation == "gelu"


def authors_keys(model: SparseFormer) -> dict[str, torch.Tensor]:
    """The authors' library layout of a full-size model, written from their description: one
    flat ``layers.K`` list (unit 0, the transition as ``layers.1.0``, unit 1, the ViT blocks),
    without the stage embedding their converter deletes."""
    from sparseformer.weights.convert_btsp import BTSP_TOP_LEVEL, BTSP_UNIT

    top = {ours: theirs for theirs, ours in BTSP_TOP_LEVEL.items()}
    unit = {ours: theirs for theirs, ours in BTSP_UNIT.items()}
    layer = {"stages.0.units.0.": "layers.0.", "stages.1.transition.proj.": "layers.1.0."}
    layer |= {
        f"stages.1.units.{u}.": f"layers.{u + 2}." for u in range(model.config.stages[1].depth)
    }
    out = {}
    for key, value in model.state_dict().items():
        if key.endswith("stage_embedding"):
            continue
        if key in top:
            out[top[key]] = value
            continue
        prefix = max((p for p in layer if key.startswith(p)), key=len)
        rest = key[len(prefix) :]
        if "transition" in prefix:
            out[layer[prefix] + rest] = value
            continue
        old = max((o for o in unit if rest.startswith(o)), key=len)
        out[layer[prefix] + unit[old] + rest[len(old) :]] = value
    return out


@pytest.mark.parametrize("name", sorted(BTSP))
def test_full_size_released_key_sets_convert_and_fit(name):
    from sparseformer.weights.convert import convert_state_dict
    from sparseformer.weights.convert_btsp import fill_missing_stage_embeddings

    with torch.device("meta"):
        model = create_model(name)
    authors = authors_keys(model)
    cortex = model.config.stages[1].depth - 1
    assert f"layers.{cortex + 2}.mlp.fc2.weight" in authors  # 2-digit K for the large models
    assert authors["initial_roi.weight"].shape == (BTSP[name][2], 4)
    converted, report = convert_state_dict(authors)
    assert report.source_format == "btsp" and not report.dropped
    own = model.state_dict()
    assert fill_missing_stage_embeddings(converted, own) == ["stages.0.stage_embedding"]
    assert sorted(converted) == sorted(own)
    assert all(converted[k].shape == own[k].shape for k in own)
