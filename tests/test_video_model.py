"""The video SparseFormer: 3-D geometry, token inflation, image-weight inflation."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import sparseformer
from sparseformer import (
    CheckpointError,
    SparseFormer,
    SparseFormerConfig,
    StageConfig,
    VideoSparseFormer,
    VideoSparseFormerConfig,
    count_flops,
    create_model,
    inflate_image_state_dict,
    load_checkpoint,
)
from sparseformer.layers import (
    adjust_rois,
    grid_offsets,
    grid_rois,
    sampling_points,
    standardize_offsets,
)
from sparseformer.models.video import time_grid_offsets, time_tiled_rois
from sparseformer.weights.inflate import _time_tiled_rois

from .test_conformance import FIXTURE, fixture_config, layout

NANO = SparseFormerConfig(
    stages=(StageConfig(32, 1, 2), StageConfig(64, 2, 1)),
    num_tokens=9,
    num_points=4,
    stem_channels=16,
    num_heads=8,
    num_classes=5,
)


def video_config(image: SparseFormerConfig, **kw) -> VideoSparseFormerConfig:
    same = {f.name: getattr(image, f.name) for f in dataclasses.fields(SparseFormerConfig)}
    return VideoSparseFormerConfig(**{**same, **kw})


def test_time_tiled_rois_cover_consecutive_slices():
    rois = time_tiled_rois(grid_rois(4), 4)
    assert rois.shape == (16, 6)
    for i in range(4):
        block = rois[4 * i : 4 * (i + 1)]
        torch.testing.assert_close(block[:, [0, 1, 3, 4]], grid_rois(4))
        assert torch.all(block[:, 2] == i / 4) and torch.all(block[:, 5] == (i + 1) / 4)
    torch.testing.assert_close(_time_tiled_rois(grid_rois(9), 3), time_tiled_rois(grid_rois(9), 3))


def test_adjust_rois_3d_moves_and_scales_time():
    rois = torch.tensor([[[0.2, 0.2, 0.25, 0.6, 0.4, 0.75]]])  # centre (0.4, 0.3, 0.5)
    delta = torch.tensor([[[0.0, 0.0, 0.5, 0.0, 0.0, float(torch.tensor(2.0).log())]]])
    out = adjust_rois(rois, delta)
    # time centre 0.5 + 0.5 * 0.5 = 0.75, time size 0.5 * 2 = 1; space unchanged
    torch.testing.assert_close(out, torch.tensor([[[0.2, 0.2, 0.25, 0.6, 0.4, 1.25]]]))


def test_offsets_3d_standardize_per_axis_and_points_land_in_the_roi():
    offsets = torch.randn(2, 3, 16, 3, dtype=torch.float64) * torch.tensor([1.0, 5.0, 0.1])
    std = standardize_offsets(offsets, eps=0.0)
    torch.testing.assert_close(std.mean(2), torch.zeros(2, 3, 3, dtype=torch.float64))
    torch.testing.assert_close(std.std(2), torch.full((2, 3, 3), 1 / 3, dtype=torch.float64))
    rois = torch.tensor([0.1, 0.2, 0.5, 0.3, 0.6, 0.75], dtype=torch.float64).expand(2, 3, 6)
    pts = sampling_points(rois, std)
    centre = torch.tensor([0.2, 0.4, 0.625], dtype=torch.float64)
    size = torch.tensor([0.2, 0.4, 0.25], dtype=torch.float64)
    torch.testing.assert_close(pts.mean(2), centre.expand(2, 3, 3))
    torch.testing.assert_close(pts.std(2), (size / 3).expand(2, 3, 3))


def test_time_grid_offsets_are_a_latin_square():
    t = time_grid_offsets(16).reshape(4, 4)  # (row y, column x)
    for i in range(4):
        assert len(set(t[i].tolist())) == 4 and len(set(t[:, i].tolist())) == 4
    torch.testing.assert_close(t.std(), grid_offsets(16)[:, 0].std())  # same spread as x


def test_video_model_shapes_tokens_and_gradients():
    config = video_config(NANO, replicates=3, drop_path_rate=0.1)
    model = VideoSparseFormer(config)
    x = torch.randn(2, 3, 5, 32, 40)
    out = model.forward_with_details(x)
    assert out.logits.shape == (2, 5) and torch.isfinite(out.logits).all()
    assert out.tokens.shape == (2, 27, 64)
    assert all(r.shape == (2, 27, 6) for r in out.rois)
    assert all(p.shape == (2, 27, 4, 3) for p in out.sampling_points)
    # replicates share one embedding per spatial token and cover consecutive time slices
    emb = model.initial_tokens.detach()
    torch.testing.assert_close(emb[:9], emb[18:])
    first = out.sampling_points[0][0]  # (N*R, P, 3)
    for i in range(3):
        t = first[9 * i : 9 * (i + 1), :, 2]
        assert t.min() >= i / 3 and t.max() <= (i + 1) / 3
        assert t.std() > 0  # points spread in time, not all at the slice centre
    out.logits.logsumexp(-1).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    # time rows of the zero-initialised heads get gradients of the same order as space rows
    for name, g in grads.items():
        if name.endswith("offset_proj.weight"):
            per_axis = g.reshape(-1, 3, g.shape[-1]).abs().amax(dim=(0, 2))  # (x, y, t)
            assert per_axis[2] > 0 and per_axis[2] < 100 * per_axis[:2].max()


def test_video_model_rejects_images_with_a_clear_error():
    model = VideoSparseFormer(video_config(NANO))
    with pytest.raises(ValueError, match="5-D input"):
        model(torch.randn(1, 3, 32, 32))
    with pytest.raises(TypeError, match="VideoSparseFormerConfig"):
        VideoSparseFormer(NANO)


@pytest.mark.parametrize(
    "x, message",
    [
        (torch.randn(2, 1, 4, 32, 32), r"3 channels in dimension 1, got shape \(2, 1, 4"),
        (torch.randn(2, 4, 3, 32, 32), r"for \(B, T, 3, H, W\) clips use x.transpose\(1, 2\)"),
        (torch.zeros(2, 3, 4, 32, 32, dtype=torch.uint8), "floating-point input, got torch.uint8"),
        (torch.randn(2, 3, 4, 32, 32, dtype=torch.float64), r"x.to\(torch.float32\)"),
        (torch.randn(2, 3, 0, 32, 32), "T, H and W of at least 1"),
    ],
)
def test_input_mistakes_are_named_before_the_stem(x, message):
    model = VideoSparseFormer(video_config(NANO, num_frames=4))
    with pytest.raises(ValueError, match=message):
        model(x)
    image = SparseFormer(NANO)
    with pytest.raises(ValueError, match=r"channels-last arrays use x.movedim\(-1, 1\)"):
        image(torch.randn(1, 32, 32, 3))
    half = VideoSparseFormer(video_config(NANO, num_frames=4)).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts the input: no error
        assert half(torch.randn(1, 3, 4, 32, 32)).dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"x.to\(torch.bfloat16\)\) or run under torch.autocast"):
        half(torch.randn(1, 3, 4, 32, 32))
    wide = SparseFormer(dataclasses.replace(NANO, in_chans=1)).to(torch.float64)
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\) images with 1 channels"):
        wide(torch.randn(1, 3, 32, 32, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"x.to\(torch.float64\)\)$"):  # autocast cannot help
        wide(torch.randn(1, 1, 32, 32))
    meta = SparseFormer(NANO).to("meta")  # a device autocast does not know: still our error
    with pytest.raises(ValueError, match="weights are torch.float32"):
        meta(torch.randn(1, 3, 32, 32, device="meta", dtype=torch.float64))


def test_clips_with_fewer_frames_than_replicates_are_warned_of_once(caplog):
    model = VideoSparseFormer(video_config(NANO, num_frames=8, replicates=4))
    with caplog.at_level("WARNING"):
        model(torch.randn(1, 3, 8, 32, 32))
        assert not caplog.records
        model(torch.randn(1, 3, 2, 32, 32))
        model(torch.randn(1, 3, 2, 32, 32))
    assert len(caplog.records) == 1
    assert "clips of 2 frame(s) for 4 token replicates" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):  # built for 2 frames: said once, not again by its clips
        few = VideoSparseFormer(video_config(NANO, num_frames=2, replicates=4))
        few(torch.randn(1, 3, 2, 32, 32))
    assert len(caplog.records) == 1 and "2 frames for 4 token replicates" in caplog.text


def image_and_inflated(image_config: SparseFormerConfig, image_state, replicates: int = 1):
    image = SparseFormer(image_config).eval()
    load_checkpoint(image, image_state)
    video = VideoSparseFormer(video_config(image_config, replicates=replicates)).eval()
    load_checkpoint(video, image_state)  # an image checkpoint: inflated on load
    return image, video


def test_single_frame_through_an_inflated_model_equals_the_image_model():
    source = SparseFormer(NANO)
    with torch.no_grad():  # move RoIs and offsets off their init so the test means something
        for p in source.parameters():
            p.add_(0.05 * torch.randn_like(p))
    image, video = image_and_inflated(NANO, source.state_dict())
    x = torch.randn(3, 3, 48, 40)
    a, b = image.forward_with_details(x), video.forward_with_details(x.unsqueeze(2))
    torch.testing.assert_close(b.logits, a.logits, rtol=0, atol=1e-5)
    # and the RoIs agree in space, with the time extent untouched
    torch.testing.assert_close(b.rois[-1][..., [0, 1, 3, 4]], a.rois[-1], rtol=0, atol=1e-5)
    torch.testing.assert_close(b.rois[-1][..., 2], torch.zeros(3, 9))
    torch.testing.assert_close(b.rois[-1][..., 5], torch.ones(3, 9))


def test_inflated_models_start_time_symmetric_and_fresh_ones_do_not():
    source = SparseFormer(NANO).state_dict()
    image, video1 = image_and_inflated(NANO, source, 1)
    _, video4 = image_and_inflated(NANO, source, 4)
    x = torch.randn(2, 3, 32, 32)
    # R=4 on one frame: replicates centred off the frame read zero padding in time, so the
    # output is no longer the image model's: the R = 1 equality above is not trivially true
    assert not torch.allclose(video4(x.unsqueeze(2)), image(x), atol=1e-3)
    clip = torch.randn(2, 3, 4, 32, 32)
    # Inflated with R = 1: every point sits at the clip's time centre until training moves
    # the (zero) time offsets and RoI-time updates, so the model cannot tell time's arrow yet.
    torch.testing.assert_close(video1(clip), video1(clip.flip(2)))
    # A fresh video model spreads its points in time, so reversing a clip changes its output.
    fresh = VideoSparseFormer(video_config(NANO, replicates=2)).eval()
    assert not torch.allclose(fresh(clip), fresh(clip.flip(2)), atol=1e-4)


@pytest.mark.parametrize("fmt", ["imagenet", "v2"])
def test_inflating_either_official_layout_matches_the_image_model(fmt):
    from safetensors.torch import load_file

    fixture = load_file(str(FIXTURE))
    official = {"model": layout(fixture, fmt)}
    config = fixture_config()
    image, video = image_and_inflated(config, official)
    x = fixture["input_a"]
    torch.testing.assert_close(video(x.unsqueeze(2)), image(x), rtol=0, atol=1e-5)
    torch.testing.assert_close(video(x.unsqueeze(2)), fixture["logits_a"], rtol=0, atol=1e-5)
    state = inflate_image_state_dict(official, video_config(config, replicates=2))
    N = config.num_tokens
    assert state["initial_rois"].shape == (2 * N, 6)
    assert state["stem.conv.weight"].shape[2] == 1
    bias = state["stages.0.units.0.sample_mix.offset_bias"].reshape(-1, 3)
    assert torch.all(bias[:, 2] == 0)
    ours = inflate_image_state_dict(image.state_dict(), video_config(config, replicates=2))
    torch.testing.assert_close(
        bias[:, :2], image.state_dict()["stages.0.units.0.sample_mix.offset_bias"].reshape(-1, 2)
    )
    assert set(ours) == set(state)
    adjust = state["stages.0.units.0.roi_adjust.proj.weight"]
    torch.testing.assert_close(
        adjust[[0, 1, 3, 4]], image.stages[0].units[0].roi_adjust.proj.weight
    )
    assert torch.all(adjust[[2, 5]] == 0)


def test_inflation_refuses_mismatched_or_video_checkpoints():
    image = SparseFormer(NANO).state_dict()
    with pytest.raises(CheckpointError, match="num_tokens"):
        inflate_image_state_dict(image, video_config(NANO, num_tokens=16))
    video = VideoSparseFormer(video_config(NANO)).state_dict()
    with pytest.raises(CheckpointError, match="without inflation"):
        inflate_image_state_dict(video, video_config(NANO))
    from sparseformer import create_model  # was told to pick the video model of its size

    bootstrapped = create_model("sparseformer_btsp_nano").state_dict()
    with pytest.raises(CheckpointError, match="a bootstrapped SparseFormer's checkpoint"):
        inflate_image_state_dict(bootstrapped, video_config(NANO))


def test_create_model_inflates_an_image_checkpoint(tmp_path, caplog):
    from safetensors.torch import save_file

    image = create_model("sparseformer_v1_micro", num_classes=3)
    path = tmp_path / "image.safetensors"
    save_file(image.state_dict(), str(path))
    with caplog.at_level("INFO"):
        video = create_model("video_sparseformer_v1_micro", checkpoint_path=path, num_classes=3)
    assert any("inflated" in r.message for r in caplog.records)
    assert isinstance(video, VideoSparseFormer) and video.initial_rois.shape == (64, 6)
    x = torch.randn(1, 3, 32, 32)
    one = create_model(
        "video_sparseformer_v1_micro", checkpoint_path=path, num_classes=3, replicates=1
    )
    torch.testing.assert_close(one.eval()(x.unsqueeze(2)), image.eval()(x), rtol=0, atol=1e-5)
    # a video checkpoint loads as is
    again = create_model("video_sparseformer_v1_micro", num_classes=3)
    load_checkpoint(again, video.state_dict())
    torch.testing.assert_close(again.initial_rois, video.initial_rois)


@pytest.mark.parametrize("name", ["tiny", "small", "base"])
def test_named_video_configs_defaults_and_overrides(name):
    with torch.device("meta"):
        model = create_model(f"video_sparseformer_v1_{name}", num_frames=16, replicates=2)
    image = sparseformer.get_model_spec(f"sparseformer_v1_{name}").config
    assert model.config.num_frames == 16 and model.config.replicates == 2
    assert model.initial_rois.shape == (2 * image.num_tokens, 6)
    spec = sparseformer.get_model_spec(f"video_sparseformer_v1_{name}").config
    assert spec.num_frames == 8 and spec.replicates == 4


def test_flops_grow_with_tokens_and_frames_only_in_the_stem():
    config = video_config(NANO, replicates=1)
    small = count_flops(VideoSparseFormer(config), (3, 2, 32, 32))
    more_frames = count_flops(VideoSparseFormer(config), (3, 4, 32, 32))
    more_tokens = count_flops(
        VideoSparseFormer(dataclasses.replace(config, replicates=2)), (3, 2, 32, 32)
    )
    assert "grid_sampler_3d" in small.by_op
    # frames cost stem convolution only; tokens cost everything but the stem
    assert more_frames.by_op["convolution"] == 2 * small.by_op["convolution"]
    assert more_frames.complete - more_frames.by_op["convolution"] == (
        small.complete - small.by_op["convolution"]
    )
    assert more_tokens.by_op["grid_sampler_3d"] == 2 * small.by_op["grid_sampler_3d"]


def test_3d_sampling_path_gradcheck_and_reference():
    """RoIs and offsets -> points -> trilinear sampling, in float64: gradients and values."""
    from torch.autograd import gradcheck

    from sparseformer.layers import sample_features, sample_features_reference

    feats = torch.randn(1, 2, 3, 5, 6, dtype=torch.float64)
    rois = torch.tensor([[[0.1, 0.2, 0.1, 0.7, 0.8, 0.9]]], dtype=torch.float64)
    offsets = torch.randn(1, 1, 4, 3, dtype=torch.float64)

    def run(feats, rois, offsets):
        points = sampling_points(rois, standardize_offsets(offsets))
        return sample_features(feats, points)

    args = (feats.requires_grad_(), rois.requires_grad_(), offsets.requires_grad_())
    assert gradcheck(run, args, eps=1e-6, atol=1e-5)
    points = sampling_points(rois, standardize_offsets(offsets)).detach()
    torch.testing.assert_close(
        sample_features(feats.detach(), points), sample_features_reference(feats.detach(), points)
    )


def test_pretrained_video_models_inflate_their_image_release(tmp_path, monkeypatch):
    import sparseformer.weights.factory as factory
    from sparseformer.weights.registry import ModelSpec, WeightsSpec

    with pytest.raises(ValueError, match="no released weights for video_sparseformer_v1_micro"):
        create_model("video_sparseformer_v1_micro", pretrained=True)  # micro has no release
    image = create_model("sparseformer_v1_micro", num_classes=7)
    release = tmp_path / "micro_release.pth"
    torch.save(image.state_dict(), release)
    url = "https://example.invalid/micro_release.pth"  # as if the micro model had one
    config = factory.MODELS["sparseformer_v1_micro"].config
    released = {**factory.MODELS, "sparseformer_v1_micro": ModelSpec(config, WeightsSpec(url))}
    monkeypatch.setattr(factory, "MODELS", released)
    fetched = []
    monkeypatch.setattr(
        factory, "download_weights", lambda u, sha256, directory=None: fetched.append(u) or release
    )
    video = create_model("video_sparseformer_v1_micro", pretrained=True)
    assert fetched == [url]
    assert video.num_classes == 7 and video.initial_rois.shape == (64, 6)  # inflated, R = 4


def test_a_video_model_says_its_clips_are_resized_bilinearly(tmp_path):
    """timm's ``pretrained_cfg`` (which export's metadata and timm's data config read) names
    the interpolation clips are resized with, whatever an image checkpoint it inflates says."""
    from sparseformer import create_model

    assert create_model("video_sparseformer_v1_micro").pretrained_cfg["interpolation"] == (
        "bilinear"
    )
    image = create_model("sparseformer_v1_micro", num_classes=2)
    ckpt = tmp_path / "image.pt"
    pre = {"img_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 1.0,
           "interpolation": "bicubic"}  # fmt: skip
    torch.save({"model": image.state_dict(), "model_name": "sparseformer_v1_micro",
                "preprocessing": pre}, ckpt)  # fmt: skip
    video = create_model("video_sparseformer_v1_micro", checkpoint_path=ckpt)
    assert video.pretrained_cfg["interpolation"] == "bilinear"
    assert video.pretrained_cfg["input_size"] == (3, 32, 32)  # the rest is the checkpoint's
    asked = create_model(
        "video_sparseformer_v1_micro", pretrained_cfg_overlay={"interpolation": "bicubic"}
    )
    assert asked.pretrained_cfg["interpolation"] == "bicubic"


def test_a_video_run_records_the_interpolation_its_clips_are_resized_with(tmp_path):
    from sparseformer.data.clips import ClipSpec
    from sparseformer.data.datasets import DataSource
    from sparseformer.engine.inputs import training_preprocessing
    from sparseformer.engine.recipe import load_recipe

    recipe = load_recipe("imagenet1k")  # bicubic, for images
    assert recipe.interpolation == "bicubic"
    videos = DataSource(data_dir=tmp_path, video=ClipSpec())
    pre = training_preprocessing(videos, "video_sparseformer_v1_micro", recipe)
    assert pre.interpolation == "bilinear"
    # the commands give every source clip settings (a folder may turn out to hold videos)
    images = training_preprocessing(videos, "sparseformer_v1_micro", recipe)
    assert images.interpolation == "bicubic"
