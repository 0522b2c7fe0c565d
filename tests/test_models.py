"""Every registered model builds with the right size; tiny models run, train and behave."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

import sparseformer
from sparseformer import count_params, create_model, list_models

EXACT_PARAMS = {
    "sparseformer_v1_tiny": 31_522_212,
    "sparseformer_v1_small": 47_575_056,
    "sparseformer_v1_base": 81_076_996,
}


@pytest.mark.parametrize("name", list_models())
def test_every_model_constructs_with_its_parameter_count(name):
    with torch.device("meta"):
        model = create_model(name)
    n = count_params(model)
    assert n > 0
    if name in EXACT_PARAMS:
        assert n == EXACT_PARAMS[name]


@pytest.mark.parametrize("name", ["sparseformer_v1_nano", "sparseformer_v1_micro"])
def test_forward_backward_reaches_every_parameter(name):
    model = create_model(name, num_classes=7, drop_path_rate=0.1)
    x = torch.randn(8, 3, 64, 64)  # enough samples that drop path never drops an op for all
    logits = model(x)
    assert logits.shape == (8, 7) and torch.isfinite(logits).all()
    logits.logsumexp(-1).sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
    # Zero-initialised projections get a non-zero gradient, so RoIs and points can move.
    for pname, p in model.named_parameters():
        if pname.endswith(("roi_adjust.proj.weight", "offset_proj.weight")):
            assert p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("size", [(32, 32), (48, 96), (123, 57)])
def test_any_input_size_and_aspect_ratio(size):
    model = create_model("sparseformer_v1_nano").eval()
    out = model.forward_with_details(torch.randn(1, 3, *size))
    assert out.logits.shape == (1, 1000)
    assert torch.isfinite(out.logits).all()


def test_forward_with_details_shapes_and_consistency():
    model = create_model("sparseformer_v1_nano").eval()
    config = model.config
    x = torch.randn(3, 3, 40, 56)
    out = model.forward_with_details(x)
    torch.testing.assert_close(out.logits, model(x))
    assert len(out.rois) == config.num_applications
    sampling_steps = sum(
        s.unit_repeats(i)
        for s in config.stages
        for i in range(s.depth)
        if "sample_mix" in s.unit_ops(i)
    )
    assert len(out.sampling_points) == sampling_steps
    for rois in out.rois:
        assert rois.shape == (3, config.num_tokens, 4) and rois.dtype == torch.float32
    for pts in out.sampling_points:
        assert pts.shape == (3, config.num_tokens, config.num_points, 2)
    # freshly initialised: RoIs do not move and the first points form a grid in the first RoI
    torch.testing.assert_close(out.rois[-1][0], model.initial_rois.detach())
    first = out.sampling_points[0][0, 0]
    assert first[:, 0].min() > 0 and first[:, 0].max() < 0.5


def test_timm_api():
    model = timm.create_model("sparseformer_v1_nano", num_classes=5)
    assert isinstance(model, sparseformer.SparseFormer)
    x = torch.randn(2, 3, 32, 32)
    tokens = model.forward_features(x)
    assert tokens.shape == (2, model.config.num_tokens, model.num_features)
    assert model.forward_head(tokens, pre_logits=True).shape == (2, model.num_features)
    assert model.get_classifier().out_features == 5
    model.reset_classifier(3)
    assert model(x).shape == (2, 3)
    model.reset_classifier(0)
    assert model(x).shape == (2, model.num_features)
    assert "initial_rois" in model.no_weight_decay()


def test_pre_logits_come_after_the_head_dropout_as_in_timm():
    model = timm.create_model("sparseformer_v1_nano", num_classes=5, drop_rate=0.9).train()
    tokens = torch.randn(2, model.config.num_tokens, model.num_features)
    features = model.forward_head(tokens, pre_logits=True)
    assert (features == 0).float().mean() > 0.5  # dropped out


def test_list_models_and_unknown_name():
    assert "sparseformer_v1_tiny" in list_models("*tiny*")
    with pytest.raises(sparseformer.UnknownModelError, match="sparseformer_v1_tiny"):
        create_model("sparseformer_v1_tiy")
    with pytest.raises(TypeError, match="no config field"):
        create_model("sparseformer_v1_nano", not_a_field=1)


def test_bf16_autocast_on_cpu_keeps_geometry_in_fp32():
    model = create_model("sparseformer_v1_nano")
    x = torch.randn(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.forward_with_details(x)
    assert out.logits.dtype == torch.bfloat16
    assert all(r.dtype == torch.float32 for r in out.rois)
    assert all(p.dtype == torch.float32 for p in out.sampling_points)
    out.logits.float().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_geometry_projections_run_in_fp32_under_autocast_and_in_a_bf16_model():
    # the spec's "geometry (steps 3-RoI, 4, 5) runs in float32" includes the RoI-adjust and
    # offset projections that start it
    from sparseformer.models.blocks import RoiAdjustOp, SampleMixOp

    model = create_model("sparseformer_v1_nano")
    seen = []
    for op in model.modules():
        proj = getattr(op, "proj", None) if isinstance(op, RoiAdjustOp) else None
        proj = op.offset_proj if isinstance(op, SampleMixOp) else proj
        if proj is not None:
            proj.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randn(1, 3, 32, 32))
    assert seen and set(seen) == {torch.float32}
    seen.clear()
    out = model.to(torch.bfloat16).forward_with_details(torch.randn(1, 3, 32, 32).bfloat16())
    assert set(seen) == {torch.bfloat16}  # a half model projects in its own precision
    assert all(r.dtype == torch.float32 for r in out.rois)


@pytest.mark.parametrize("name", ["sparseformer_v1_nano", "video_sparseformer_v1_tiny"])
def test_the_map_is_raised_to_fp32_once_for_every_sampling_under_autocast(name):
    """Sampling reads the map in float32: under bf16 autocast the stem's output is raised once
    and every unit gets that same tensor, instead of raising it again per unit."""
    from sparseformer.models.blocks import Unit

    model = create_model(name)
    maps = []
    for unit in (m for m in model.modules() if isinstance(m, Unit)):
        unit.register_forward_pre_hook(lambda m, args: maps.append(args[2]))
    x = torch.randn((1, 3, 4, 32, 32) if name.startswith("video") else (1, 3, 32, 32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)
    assert len(maps) > 1 and maps[0].dtype == torch.float32
    assert all(m is maps[0] for m in maps)


def test_two_models_run_independently():
    """The clamp's scale is an argument, not state (the authors' GRAD_SCALE was a class
    attribute written in forward): one model's fp16 loss scale must not reach another's."""
    alone, a, b = (create_model("sparseformer_v1_nano").eval() for _ in range(3))
    a.load_state_dict(alone.state_dict())
    b.load_state_dict(alone.state_dict())
    x = torch.randn(2, 3, 32, 32)

    def grads(model, **kwargs):
        (1e3 * model(x, **kwargs).square().sum()).backward()  # large: the clamp bites
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    expected = grads(alone)
    scaled = grads(b, coord_grad_scale=1024.0)
    got = grads(a)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=name)
    assert any(not torch.equal(scaled[n], expected[n]) for n in expected)  # the scale acted


def test_config_validation():
    from sparseformer import SparseFormerConfig, StageConfig

    with pytest.raises(ValueError, match="perfect square"):
        SparseFormerConfig(num_tokens=50)
    with pytest.raises(ValueError, match="at least 4"):  # one point's offsets have no spread
        SparseFormerConfig(num_points=1)
    with pytest.raises(ValueError, match="unknown op"):
        StageConfig(64, first_ops=("attn", "teleport"))
    with pytest.raises(ValueError, match="at most once"):
        StageConfig(64, first_ops=("attn", "attn"))
    for bad, message in (
        ({"num_tokens": 0}, "num_tokens must be an integer >= 1"),
        ({"stem_channels": 0}, "stem_channels must be an integer >= 1"),
        ({"stem_channels": 1}, "stem_channels must be at least 2"),  # NaN logits, in silence
        ({"mlp_ratio": 0.001}, "an MLP of no hidden width"),
        ({"num_heads": 0}, "num_heads must be an integer >= 1"),
        ({"num_classes": 2.5}, "num_classes must be an integer >= 0"),
        ({"activation": "relu"}, "activation must be one of"),
        ({"padding_mode": "reflection"}, "padding_mode must be one of"),
        ({"ln_eps": -1}, "ln_eps must be a positive number"),
        ({"offset_eps": float("nan")}, "offset_eps must be a positive number, got nan"),
        ({"mlp_ratio": float("inf")}, "mlp_ratio must be a positive number, got inf"),
        ({"stages": [(36, 1, 1, ("attn", "pos_embed"))], "num_heads": 4}, "divisible by 8"),
        ({"stages": [(200, 1)], "attn_head_dim": 64}, r"3 heads \(width // attn_head_dim=64\)"),
        ({"stages": ["wide"]}, "a stage is a StageConfig"),
    ):
        with pytest.raises(ValueError, match=message):
            create_model("sparseformer_v1_nano", **bad)
    # stages as plain tuples (e.g. from JSON) become StageConfigs
    model = create_model("sparseformer_v1_nano", stages=[(32, 1, 2), [64, 1]])
    assert [s.width for s in model.config.stages] == [32, 64]


def test_float64_model_keeps_its_geometry_in_float64():
    model = create_model("sparseformer_v1_nano").double().eval()
    out = model.forward_with_details(torch.randn(1, 3, 32, 32, dtype=torch.float64))
    assert out.logits.dtype == torch.float64
    assert all(r.dtype == torch.float64 for r in out.rois)
    assert all(p.dtype == torch.float64 for p in out.sampling_points)


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::torch.jit.TracerWarning")
def test_trace_export_and_meta_device():
    import io

    model = create_model("sparseformer_v1_nano").eval()
    x = torch.randn(2, 3, 32, 32)
    traced = torch.jit.trace(model, x)  # with grad enabled, as by default
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    buffer.seek(0)
    torch.testing.assert_close(torch.jit.load(buffer)(x), model(x))
    # a dynamic batch above the CPU inference chunk (4 MB of generated matrices: 420 images)
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(model, (x,), dynamic_shapes={"x": {0: batch}})
    big = torch.randn(900, 3, 32, 32)
    torch.testing.assert_close(program.module()(big), model(big), atol=1e-5, rtol=1e-4)
    meta = create_model("sparseformer_v1_nano").to("meta")
    assert meta(torch.randn(2, 3, 32, 32, device="meta")).shape == (2, 1000)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_tracing_a_model_in_training_mode_says_it_trains_without_the_gradient_clamp(recwarn):
    """A traced graph keeps no clamp of the coordinates' gradient: a traced model trained with
    gradients over 1,000 times the model's, in silence."""
    model = create_model("sparseformer_v1_nano").eval()
    torch.jit.trace(model, torch.randn(1, 3, 32, 32))
    assert not [w for w in recwarn if "records no clamp" in str(w.message)]
    torch.jit.trace(model.train(), torch.randn(1, 3, 32, 32), check_trace=False)
    assert [w for w in recwarn if "records no clamp" in str(w.message)]


def test_torch_func_vmap_gives_per_sample_outputs_and_gradients():
    """vmap failed in the stem (a memory format asked of a batched tensor) and at the
    coordinate-gradient clamp (an autograd.Function without setup_context)."""
    model = create_model("sparseformer_v1_nano").eval()
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([3, 7])
    with warnings.catch_warnings():  # torch's note that attention has no batching rule yet
        warnings.simplefilter("ignore", UserWarning)
        out = torch.func.vmap(lambda image: model(image[None])[0])(x)
        torch.testing.assert_close(out, model(x), atol=1e-5, rtol=1e-5)
        params = {k: v.detach() for k, v in model.named_parameters()}

        def loss(p, image, label):
            logits = torch.func.functional_call(model, p, (image[None],))
            return F.cross_entropy(logits, label[None])

        grads = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, y)
    F.cross_entropy(model(x[1:]), y[1:]).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name][1], p.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_a_numpy_array_is_named_not_an_attribute_error():
    import numpy as np

    model = create_model("sparseformer_v1_nano")
    with pytest.raises(TypeError, match=r"takes a torch.Tensor batch .* got a ndarray"):
        model(np.zeros((1, 3, 32, 32), np.float32))


def test_weights_of_another_size_are_said_in_a_few_lines(tmp_path):
    """torch listed every tensor of another shape, one line each (143 from SparseFormer-S into
    -T), through timm.create_model(checkpoint_path=) too."""
    nano, micro = create_model("sparseformer_v1_nano"), create_model("sparseformer_v1_micro")
    with pytest.raises(RuntimeError, match=r"tensor\(s\) have other shapes than this mod") as e:
        nano.load_state_dict(micro.state_dict())
    assert "sparseformer.create_model(NAME, checkpoint_path=FILE)" in str(e.value)
    said = str(e.value).splitlines()  # one line for 81 tensors, then torch's other lines
    assert "81 tensor(s)" in said[0] and "initial_rois: [16, 4] in the file" in said[0]
    assert len(said) == 2 and said[1].startswith("\tUnexpected key(s) in state_dict:")
    torch.save({"model": micro.state_dict()}, tmp_path / "micro.pt")
    with pytest.raises(RuntimeError, match="have other shapes"):
        timm.create_model("sparseformer_v1_nano", checkpoint_path=str(tmp_path / "micro.pt"))
    from sparseformer.models import loading, sparseformer

    # whole models pickled before the hook moved to models/loading.py name it by its old name
    assert sparseformer._accept_official_layouts is loading.accept_official_layouts
    state = nano.state_dict()
    del state["head.bias"]  # other errors as torch says them
    with pytest.raises(RuntimeError, match='Missing key\\(s\\) in state_dict: "head.bias"'):
        nano.load_state_dict(state)


def test_weights_asked_into_a_meta_model_are_refused(tmp_path):
    """They were copied as no-ops (90 warnings) and logged as loaded."""
    torch.save(create_model("sparseformer_v1_nano").state_dict(), tmp_path / "nano.pth")
    assert create_model("sparseformer_v1_nano", device="meta").initial_rois.is_meta
    with pytest.raises(ValueError, match="device='meta' .*builds a model without storage"):
        create_model("sparseformer_v1_nano", checkpoint_path=tmp_path / "nano.pth", device="meta")
    with torch.device("meta"), pytest.raises(ValueError, match="without storage"):
        create_model("sparseformer_v1_nano", checkpoint_path=tmp_path / "nano.pth")


@pytest.mark.cuda
def test_fp16_autocast_with_loss_scale_on_cuda():
    model = create_model("sparseformer_v1_nano").cuda()
    scaler = torch.amp.GradScaler("cuda")
    x = torch.randn(2, 3, 64, 64, device="cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        logits = model(x, coord_grad_scale=scaler.get_scale())
    scaler.scale(logits.float().logsumexp(-1).mean()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_timm_training_script_arguments():
    # timm's train.py passes drop_rate and global_pool to every model
    model = timm.create_model(
        "sparseformer_v1_nano", num_classes=3, drop_rate=0.5, drop_path_rate=0.1, global_pool="avg"
    )
    x = torch.randn(2, 3, 32, 32)
    model.train()
    assert not torch.equal(model(x), model(x))  # dropout before the classifier
    model.eval()
    torch.testing.assert_close(model(x), model(x))
    with pytest.raises(ValueError, match="global_pool must be 'avg'"):
        create_model("sparseformer_v1_nano", global_pool="token")
    with pytest.raises(NotImplementedError, match="features_only"):
        timm.create_model("sparseformer_v1_nano", features_only=True)
    # img_size, which timm users pass to ViTs: any size works; timm's data config follows it
    sized = timm.create_model("sparseformer_v1_nano", img_size=320)
    assert timm.data.resolve_model_data_config(sized)["input_size"] == (3, 320, 320)
    assert create_model("sparseformer_v1_nano", img_size=(256, 192)).pretrained_cfg[
        "input_size"
    ] == (3, 256, 192)
    with pytest.raises(ValueError, match="img_size must be a positive int"):
        create_model("sparseformer_v1_nano", img_size=0)


def test_pretrained_cfg_for_timm_data_config():
    assert timm.list_models("sparseformer_v1*", pretrained=True) == [
        f"sparseformer_v1_{size}.{tag}" for size in ("base", "small", "tiny")
        for tag in ("in1k", "in1k_v2")
    ]  # fmt: skip
    assert timm.list_models("sparseformer_btsp*", pretrained=True) == [
        f"sparseformer_btsp_{family}_{size}.{tag}"
        for family, tag in (("augreg", "augreg_in21k_ft_in1k"), ("openai_clip", "openai"))
        for size in ("base", "large")
    ]  # fmt: skip
    for patterns in ("sparseformer_v1*", "sparseformer_btsp*", ["sparseformer_*", "video_*"]):
        assert list_models(patterns, pretrained=True) == timm.list_models(patterns, pretrained=True)
    assert list_models(["*micro", "*nano"], exclude="video_*") == [
        "sparseformer_btsp_nano", "sparseformer_v1_micro", "sparseformer_v1_nano",
    ]  # fmt: skip
    clip = timm.models.get_pretrained_cfg("sparseformer_btsp_openai_clip_base.openai")
    assert clip.interpolation == "bilinear" and clip.mean[0] == 0.48145466
    assert timm.models.get_pretrained_cfg("sparseformer_v1_tiny").input_size == (3, 224, 224)
    model = timm.create_model(
        "sparseformer_v1_nano", num_classes=7, pretrained_cfg_overlay={"input_size": (3, 96, 96)}
    )
    config = timm.data.resolve_model_data_config(model)
    assert config["input_size"] == (3, 96, 96) and config["interpolation"] == "bicubic"
    assert model.pretrained_cfg["num_classes"] == 7
    assert create_model("sparseformer_v1_tiny").pretrained_cfg["url"].startswith("https://")


def test_a_runs_checkpoint_sets_the_pretrained_cfg_to_its_preprocessing(tmp_path):
    # timm users prepare images from pretrained_cfg: it must be the run's, as predict's is
    nano = create_model("sparseformer_v1_nano", num_classes=2)
    pre = {"img_size": 32, "crop_pct": 1.0, "interpolation": "bilinear",
           "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}  # fmt: skip
    path = tmp_path / "best.pt"
    torch.save({"model": nano.state_dict(), "preprocessing": pre, "class_names": ["a", "b"]}, path)
    model = create_model("sparseformer_v1_nano", checkpoint_path=path)
    config = timm.data.resolve_model_data_config(model)
    assert config["input_size"] == (3, 32, 32) and config["crop_pct"] == 1.0
    assert config["interpolation"] == "bilinear" and config["mean"] == (0.5, 0.5, 0.5)
    assert model.pretrained_cfg["label_names"] == ("a", "b")
    overlaid = create_model(
        "sparseformer_v1_nano", checkpoint_path=path, pretrained_cfg_overlay={"crop_pct": 0.9}
    )
    assert overlaid.pretrained_cfg["crop_pct"] == 0.9  # the caller's overlay still wins
    # a new classifier (fine-tuning): the run's class names do not name its outputs
    assert (
        "label_names"
        not in create_model(
            "sparseformer_v1_nano", checkpoint_path=path, num_classes=5
        ).pretrained_cfg
    )


def test_an_unknown_timm_tag_and_an_empty_video_batch():
    with pytest.raises(ValueError, match="has no pretrained tag 'in1k'"):
        timm.create_model("sparseformer_v1_nano.in1k")
    video = create_model("video_sparseformer_v1_micro", num_classes=5).eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")  # no "statistics of nothing" notes from torch
        assert video(torch.randn(0, 3, 4, 32, 32)).shape == (0, 5)


@pytest.mark.parametrize(
    "name, shape",
    [("sparseformer_v1_nano", (2, 3, 32, 48)), ("video_sparseformer_v1_micro", (2, 3, 4, 32, 32))],
)
def test_grad_checkpointing_gives_the_same_gradients(name, shape):
    model = create_model(name, num_classes=3, drop_path_rate=0.3).train()
    x = torch.randn(*shape)
    grads = []
    for enabled in (False, True):
        model.set_grad_checkpointing(enabled)
        model.zero_grad()
        torch.manual_seed(1)  # the same stochastic-depth draws; recomputation must replay them
        model(x).square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=0, atol=0, msg=n)
    # the unit outputs are not kept: the backward graph holds fewer saved tensors
    saved = {False: [], True: []}
    for enabled, kept in saved.items():
        model.set_grad_checkpointing(enabled)
        with torch.autograd.graph.saved_tensors_hooks(
            lambda t, k=kept: k.append(t) or t, lambda t: t
        ):
            model(x)
    assert len(saved[True]) < len(saved[False]) / 3
    # details need every sampling step once: forward_with_details does not recompute
    out = model.forward_with_details(x)
    assert len(out.sampling_points) == sum(
        s.unit_repeats(i) for s in model.config.stages for i in range(s.depth)
        if "sample_mix" in s.unit_ops(i)
    )  # fmt: skip


def test_group_matcher_orders_layer_decay_by_depth():
    from timm.optim import create_optimizer_v2

    model = create_model("sparseformer_v1_nano", num_classes=3)
    opt = create_optimizer_v2(model, "adamw", lr=1.0, weight_decay=0.05, layer_decay=0.5)
    scale = {id(p): g["lr_scale"] for g in opt.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert len(scale) == len(named)

    def of(prefix):
        values = {scale[id(p)] for n, p in named.items() if n.startswith(prefix)}
        assert len(values) == 1, prefix  # a unit, a transition, the stem: one group each
        return values.pop()

    order = ["stem", "stages.0.units.0", "stages.1.transition", "stages.1.units.0"]
    order += ["stages.1.units.1", "head"]
    scales = [of(p) for p in order]
    assert scales == [0.5 ** (len(order) - 1 - i) for i in range(len(order))]
    assert of("initial_rois") == of("initial_tokens") == of("stem")  # the deepest
    assert of("fc_norm") == of("stages.1.units.1")  # with the last unit, as timm's ViT norm
    coarse = model.group_matcher(coarse=True)
    groups = timm.models.group_parameters(model, coarse)
    assert len(groups) == 4  # stem, stage 0, stage 1 (with fc_norm), head


def test_timm_pooling_device_and_dtype_arguments():
    x = torch.randn(2, 3, 32, 32)
    # global_pool="" with num_classes=0: per-token features, as timm's ViTs give
    model = timm.create_model("sparseformer_v1_nano", num_classes=0, global_pool="")
    assert model(x).shape == (2, model.config.num_tokens, model.num_features)
    assert model.head_hidden_size == model.num_features
    model.reset_classifier(4, "")
    assert model(x).shape == (2, model.config.num_tokens, 4)
    model.reset_classifier(4, "avg")
    assert model(x).shape == (2, 4)
    with pytest.raises(ValueError, match="global_pool must be 'avg'.* or ''"):
        model.reset_classifier(4, "max")
    # a new classifier takes the model's dtype, not only its device
    model = timm.create_model("sparseformer_v1_nano").double()
    model.reset_classifier(3)
    assert model(x.double()).dtype == torch.float64
    assert timm.create_model("sparseformer_v1_nano", device="meta").head.weight.is_meta
    model = timm.create_model("sparseformer_v1_nano", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_pretrained_follows_the_pretrained_cfg_file_and_url(tmp_path):
    source = create_model("sparseformer_v1_nano", num_classes=5)
    path = tmp_path / "mine.pth"
    torch.save(source.state_dict(), path)
    # timm's train.py --pretrained-path: pretrained=True with the file in the overlay
    model = timm.create_model(
        "sparseformer_v1_nano", pretrained=True, pretrained_cfg_overlay={"file": str(path)}
    )
    assert model.num_classes == 5 and torch.equal(model.head.weight, source.head.weight)
    # another url (here a local one) is fetched into cache_dir, with no published hash to check
    model = create_model(
        "sparseformer_v1_nano",
        pretrained=True,
        pretrained_cfg_overlay={"url": path.as_uri()},
        cache_dir=tmp_path / "cache",
    )
    assert (tmp_path / "cache" / "mine.pth").is_file()
    assert torch.equal(model.initial_tokens, source.initial_tokens)


def test_image_weights_load_into_a_video_model_by_every_route(tmp_path):
    image = create_model("sparseformer_v1_micro", num_classes=5)
    path = tmp_path / "image.pth"
    torch.save(image.state_dict(), path)
    ours = create_model("video_sparseformer_v1_micro", checkpoint_path=path)
    by_timm = timm.create_model("video_sparseformer_v1_micro", num_classes=5, checkpoint_path=path)
    by_hook = create_model("video_sparseformer_v1_micro", num_classes=5)
    by_hook.load_state_dict(image.state_dict())  # inflated by the load hook
    for other in (by_timm, by_hook):
        for (name, a), b in zip(ours.state_dict().items(), other.state_dict().values()):
            assert torch.equal(a, b), name
    two = create_model("video_sparseformer_v1_micro", num_classes=5, replicates=2)
    with pytest.raises(ValueError, match="build it with replicates=2"):
        by_hook.load_state_dict(two.state_dict())


def test_torch_compile_captures_one_graph_and_matches_eager():
    model = create_model("sparseformer_v1_nano", num_classes=3, drop_path_rate=0.3).train()
    x = torch.randn(2, 3, 32, 48)
    explained = torch._dynamo.explain(model)(x)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)
    compiled = torch.compile(model, backend="aot_eager")  # the autograd graph, no C++ compiler
    torch.manual_seed(0)
    eager = model(x, coord_grad_scale=2.0)  # drop path and the clamp bound, traced as well
    torch.manual_seed(0)
    torch.testing.assert_close(compiled(x, coord_grad_scale=2.0), eager)
    compiled(torch.randn(2, 3, 40, 40)).sum().backward()  # another size, and a backward
    assert model.head.weight.grad is not None


def test_torch_export_with_a_dynamic_height_and_width():
    model = create_model("sparseformer_v1_nano", num_classes=3).eval()
    dims = {
        0: torch.export.Dim("batch", min=1),
        2: torch.export.Dim("height", min=8, max=1024),
        3: torch.export.Dim("width", min=8, max=1024),
    }
    # gradients on: the coordinate-gradient clamp stays symbolic in the feature height
    program = torch.export.export(model, (torch.randn(2, 3, 64, 64),), dynamic_shapes={"x": dims})
    for shape in ((1, 3, 48, 80), (3, 3, 100, 60)):
        x = torch.randn(*shape)
        torch.testing.assert_close(program.module()(x), model(x))


def test_torch_export_of_a_video_model_with_a_dynamic_frame_count():
    # fewer frames than replicates is allowed (with a warning in eager mode): the range holds
    model = create_model("video_sparseformer_v1_micro", num_classes=3, replicates=4).eval()
    dims = {0: torch.export.Dim("batch", min=1), 2: torch.export.Dim("frames", min=2, max=16)}
    program = torch.export.export(
        model, (torch.randn(2, 3, 4, 32, 32),), dynamic_shapes={"x": dims}
    )
    for frames in (2, 8):
        x = torch.randn(1, 3, frames, 32, 32)
        torch.testing.assert_close(program.module()(x), model(x))


@pytest.mark.parametrize("count", [-1, 3.0, None, "10", True, np.int64(-1)])
def test_reset_classifier_refuses_what_create_model_refuses_and_changes_nothing(count):
    """reset_classifier(-1) made a headless model, and 3.0 raised a TypeError after setting
    num_classes to 3.0: the model said 3.0 classes while its old head ran."""
    model = create_model("sparseformer_v1_nano", num_classes=4)
    head = model.head
    with pytest.raises(ValueError, match="num_classes must be an integer >= 0"):
        model.reset_classifier(count, "")
    assert model.num_classes == 4 and model.head is head and model.global_pool == "avg"


@pytest.mark.parametrize("scale", [0, -1.0, float("nan")])
def test_a_coord_grad_scale_that_is_no_loss_scale_is_refused(scale):
    """A scale of 0 or below clamped every RoI coordinate's gradient to nothing, silently."""
    model = create_model("sparseformer_v1_nano")
    with pytest.raises(ValueError, match="coord_grad_scale must be > 0"):
        model(torch.randn(1, 3, 32, 32), coord_grad_scale=scale)


def test_the_cls_token_is_counted_on_the_model_as_timm_vits_count_it():
    assert create_model("sparseformer_v1_nano").num_prefix_tokens == 0
    model = create_model("sparseformer_btsp_nano")
    out = model.forward_with_details(torch.randn(1, 3, 32, 32))
    assert model.num_prefix_tokens == out.num_prefix_tokens == 1


def test_fx_tracing_is_said_to_be_unsupported_and_what_to_use():
    """torchvision's feature extractor (torch.fx) ended in 'got a Proxy; convert it with
    torch.as_tensor', which sent users to convert their input."""
    from torchvision.models.feature_extraction import create_feature_extractor

    with pytest.raises(TypeError, match=r"torch.fx cannot trace SparseFormer .* torch.export"):
        create_feature_extractor(create_model("sparseformer_v1_nano"), ["stages.0"])


def test_pretrained_cfg_names_the_release_tag_as_timms_do():
    assert create_model("sparseformer_v1_tiny.in1k_v2").pretrained_cfg["tag"] == "in1k_v2"
    assert create_model("sparseformer_v1_nano").pretrained_cfg["tag"] == ""  # no release


def test_reset_classifier_takes_a_numpy_count():
    model = create_model("sparseformer_v1_nano")
    model.reset_classifier(np.arange(5).max() + 1)  # labels.max() + 1
    assert model.num_classes == 5 and type(model.num_classes) is int
    assert model.head.out_features == 5
    assert model.config.num_classes == 5  # what a bootstrapping run records, among others


def test_create_model_takes_a_numpy_count_as_reset_classifier_and_timm_do():
    """create_model(num_classes=labels.max() + 1) was refused, where timm's models and
    reset_classifier take it."""
    import timm

    for model in (
        create_model("sparseformer_v1_nano", num_classes=np.int64(7)),
        timm.create_model("sparseformer_v1_nano", num_classes=np.int64(7)),
    ):
        assert model.head.out_features == 7 and type(model.config.num_classes) is int
        assert type(model.num_classes) is int
