"""Everything v1 has, the bootstrapped family has: timm's API, forward_with_details, viz,
bench, ONNX export, train / eval / predict and fine-tuning from the authors' weights with a
fresh classifier. Tiny configurations: the authors' fixture's two (``augreg``: GELU,
classifier with bias; ``clip``: QuickGELU cortex, projection without bias), the first
registered as ``sparseformer_btsp_nano``."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import timm
import torch
from PIL import Image

from sparseformer import SparseFormer, create_model, load_checkpoint
from sparseformer.cli import main
from sparseformer.data.datasets import DataSource
from sparseformer.engine.inputs import training_preprocessing
from sparseformer.engine.recipe import load_recipe
from sparseformer.weights.convert import CheckpointError
from sparseformer.weights.convert_btsp import btsp_config
from sparseformer.weights.registry import MODELS

from .conftest import DATA
from .test_conformance_btsp import authors_config, weights
from .test_train_errors import one_line_error

NANO = "sparseformer_btsp_nano"
VARIANTS = ("augreg", "clip")
TENCH = DATA / "tench.jpeg"


@pytest.fixture(scope="module")
def fixture():
    from safetensors.torch import load_file

    return load_file(str(DATA / "official-btsp-small-config.safetensors"))


@pytest.fixture(scope="module")
def authors_file(fixture, tmp_path_factory):
    """The fixture's ``augreg`` weights as the authors release them: a ``*_converted.pth``."""
    path = tmp_path_factory.mktemp("btsp") / "sparseformer_btsp_nano_converted.pth"
    torch.save(weights(fixture, "augreg"), path)
    return path


def tiny(variant: str) -> SparseFormer:
    return SparseFormer(btsp_config(authors_config(variant)))


def test_nano_is_the_fixtures_augreg_configuration(fixture, authors_file):
    assert MODELS[NANO].config == btsp_config(authors_config("augreg"))
    model = create_model(NANO, checkpoint_path=authors_file).eval()
    x = fixture["augreg.input_a"]
    torch.testing.assert_close(model(x), fixture["augreg.output_a"], rtol=0, atol=1e-5)
    assert model.pretrained_cfg["paper_ids"] == "arXiv:2312.01987"
    assert create_model("sparseformer_v1_nano").pretrained_cfg["paper_ids"] == "arXiv:2304.03768"


@pytest.mark.parametrize("variant", VARIANTS)
def test_timm_api(variant):
    model = tiny(variant).eval()
    x = torch.randn(2, 3, 40, 48)
    tokens = model.forward_features(x)
    assert tokens.shape == (2, 1 + 7, 96)  # the CLS token first
    torch.testing.assert_close(model.forward_head(tokens), model(x))
    pre = model.forward_head(tokens, pre_logits=True)
    torch.testing.assert_close(pre, model.fc_norm(tokens[:, 0]))  # CLS pooling
    model.reset_classifier(3)
    assert model(x).shape == (2, 3)
    assert (model.head.bias is None) == (variant == "clip")  # the config's head bias
    model.reset_classifier(0, "")
    assert model(x).shape == (2, 8, 96)
    # layer-wise decay groups cover every parameter exactly once
    groups = timm.optim.create_optimizer_v2(model, "adamw", lr=1e-3, layer_decay=0.7)
    grouped = [id(p) for g in groups.param_groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())


def test_grad_checkpointing_gives_the_same_gradients():
    model = tiny("clip").train()
    x = torch.randn(2, 3, 32, 32)
    grads = []
    for enable in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(enable)
        torch.manual_seed(0)
        model(x).square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, msg=name)


def test_timm_create_model_and_token_pooling():
    model = timm.create_model(NANO, num_classes=4)
    assert model.global_pool == "token" and model(torch.randn(1, 3, 32, 32)).shape == (1, 4)
    assert create_model(NANO, global_pool="avg").global_pool == "avg"
    assert create_model(NANO, global_pool="token").global_pool == "token"
    with pytest.raises(ValueError, match="without a CLS token"):
        create_model("sparseformer_v1_nano", global_pool="token")


def test_details_of_the_latent_tokens_only():
    out = tiny("augreg").eval().forward_with_details(torch.randn(1, 3, 32, 32))
    assert out.num_prefix_tokens == 1 and out.latent_tokens.shape == (1, 7, 96)
    torch.testing.assert_close(out.latent_tokens, out.tokens[:, 1:])
    assert out.initial_rois.shape == (1, 7, 4)


def test_viz_draws_the_latent_tokens(authors_file, tmp_path, capsys):
    from sparseformer.viz.draw import top_tokens
    from sparseformer.viz.figures import plot_rois

    model = create_model(NANO, checkpoint_path=authors_file).eval()
    out = model.forward_with_details(torch.randn(1, 3, 48, 48))
    assert all(0 <= t < 7 for t in top_tokens(out, 7))  # indices of RoI tokens, not the CLS
    fig = plot_rois(torch.rand(3, 48, 48), out, highlight=3)
    points = [c for ax in fig.axes for c in ax.collections if c.get_gid() == "points"]
    assert points and all(len(c.get_offsets()) == 7 * 4 for c in points)
    argv = ["viz", "--model", NANO, "--checkpoint", str(authors_file), str(TENCH)]
    assert main([*argv, "--out", str(tmp_path)]) == 0
    stats = json.loads((tmp_path / "tench_roi_stats.json").read_text())
    assert stats  # the RoI statistics of the 7 latent tokens were written
    assert "wrote" in capsys.readouterr().out


def test_bench_takes_a_btsp_name():
    from sparseformer.bench.throughput import BenchSettings, run_benchmark

    settings = BenchSettings(
        models=(NANO,), img_sizes=(32,), batch_size=2, train_batch_size=2, repeats=1,
        warmup=1, min_time=0.0, num_classes=10, baseline=NANO, train=False,
    )  # fmt: skip
    (row,) = run_benchmark(settings).rows
    assert row.model == NANO and row.params == sum(p.numel() for p in tiny("augreg").parameters())
    assert 0 < row.gflops_paper == row.gflops_complete  # no mixing biases: nothing left out


def test_onnx_export_matches_onnxruntime(authors_file, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from sparseformer.export import onnx_max_difference

    out = tmp_path / "nano.onnx"
    argv = ["export", "--model", NANO, "--checkpoint", str(authors_file), "--out", str(out)]
    assert main([*argv, "--img-size", "32"]) == 0
    printed = re.findall(r"max \|onnxruntime - pytorch\| = (\S+)", capsys.readouterr().out)
    assert len(printed) == 3 and all(float(d) <= 1e-4 for d in printed)  # batches 1, 3; a size
    model = create_model(NANO, checkpoint_path=authors_file).eval()
    assert onnx_max_difference(out, model, torch.randn(2, 3, 40, 24)) <= 1e-4


def test_clip_projection_gives_way_to_a_fresh_classifier(fixture, caplog):
    authors = weights(fixture, "clip")
    reference = tiny("clip").eval()
    load_checkpoint(reference, {"model": authors})
    config = btsp_config(authors_config("clip"), num_classes=5)
    model = SparseFormer(config).eval()
    with caplog.at_level("INFO"):
        load_checkpoint(model, {"model": authors})
    assert "freshly initialised classifier" in caplog.text
    x = fixture["clip.input_a"]
    features = model.forward_head(model.forward_features(x), pre_logits=True)
    torch.testing.assert_close(
        features, reference.forward_head(reference.forward_features(x), pre_logits=True)
    )
    assert model(x).shape == (2, 5) and model.head.bias is None  # the config's: no bias
    with_bias = SparseFormer(btsp_config(authors_config("clip"), num_classes=5, head_bias=True))
    load_checkpoint(with_bias, {"model": authors})
    assert with_bias.head.bias is not None


def test_training_normalises_as_the_released_weights_do(tmp_path):
    source = DataSource(data_dir=str(tmp_path))
    recipe = load_recipe("imagenet1k")
    for name, mean in (
        ("sparseformer_btsp_augreg_base", (0.5, 0.5, 0.5)),
        ("sparseformer_btsp_openai_clip_base", MODELS["sparseformer_btsp_openai_clip_base"]
         .weights.mean),
        ("sparseformer_v1_tiny", (0.485, 0.456, 0.406)),
        # timm names: their pretrained config's, as timm's resolve_data_config gives them
        ("vit_tiny_patch16_224", (0.5, 0.5, 0.5)),
        ("vit_base_patch16_clip_224.openai", (0.48145466, 0.4578275, 0.40821073)),
        ("resnet18", (0.485, 0.456, 0.406)),
    ):  # fmt: skip
        assert training_preprocessing(source, name, recipe).mean == mean


def _folder(root):
    image = Image.open(TENCH).convert("RGB")
    for split in ("train", "val"):
        for c, name in enumerate(("upright", "turned")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(4):
                image.rotate(90 * c).crop((4 * i, 4 * i, 160, 160)).save(folder / f"{i}.jpg")
    return root


def test_fine_tune_eval_predict_from_the_authors_weights(authors_file, tmp_path, capsys):
    data, run = _folder(tmp_path / "data"), tmp_path / "run"
    argv = ["train", "--model", NANO, "--checkpoint", str(authors_file), "--data-dir", str(data)]
    argv += ["--output", str(run), "--epochs", "1", "--batch-size", "4", "--img-size", "32"]
    assert main([*argv, "--warmup-epochs", "0", "--quiet", "--threads", "1"]) == 0
    model = create_model(NANO, checkpoint_path=run / "best.pt")
    assert model.num_classes == 2 and model.pretrained_cfg["label_names"] == ("turned", "upright")
    capsys.readouterr()
    assert main(["eval", "--model", NANO, "--checkpoint", str(run / "best.pt"),
                 "--data-dir", str(data)]) == 0  # fmt: skip
    assert "8 images" in capsys.readouterr().out
    assert main(["predict", "--model", NANO, "--checkpoint", str(run / "best.pt"), str(TENCH)]) == 0
    out = capsys.readouterr().out
    assert "upright" in out and "turned" in out


def test_a_clip_towers_embedding_is_not_class_scores():
    """A CLIP tower's bias-free projection at its released width is an embedding; a run's
    named classes, a bias-free head of other classes, or a timm classifier score classes."""
    from sparseformer.weights.build import classes_problem, embedding_width

    name = "sparseformer_btsp_openai_clip_base"  # a 512-d projection, released
    clip = SparseFormer(btsp_config(authors_config("clip"), num_classes=512))
    assert clip.head.bias is None and embedding_width(clip, name) == 512
    assert "outputs a 512-d embedding (a CLIP image tower" in classes_problem(clip, name)
    assert classes_problem(clip, name, [str(i) for i in range(512)]) is None
    tuned = SparseFormer(btsp_config(authors_config("clip"), num_classes=1000))
    assert classes_problem(tuned, name) is None  # fine-tuned elsewhere on 1000 classes
    assert classes_problem(tiny("augreg"), NANO) is None
    assert classes_problem(timm.create_model("test_vit", num_classes=2), "test_vit") is None
    headless = SparseFormer(btsp_config(authors_config("augreg"), num_classes=0))
    assert "has no classifier here" in classes_problem(headless, NANO)


def test_eval_and_info_speak_of_a_clip_towers_embedding(tmp_path, capsys):
    """eval of a CLIP tower's checkpoint says it is an embedding (it said "classifies 512
    classes but the data has 2"); info counts no "512 classes"."""
    name = "sparseformer_btsp_openai_clip_base"
    config = btsp_config(authors_config("clip"), num_classes=512)  # small, the released head
    released = dataclasses.asdict(MODELS[name].config)
    fields = {k: v for k, v in dataclasses.asdict(config).items() if v != released[k]}
    state = SparseFormer(config).state_dict()
    torch.save({"model": state, "model_name": name, "architecture": fields}, tmp_path / "clip.pth")
    for i, color in enumerate(("red", "blue")):
        (tmp_path / "data" / "val" / color).mkdir(parents=True)
        Image.new("RGB", (40, 40), color).save(tmp_path / "data" / "val" / color / f"{i}.png")
    ckpt = ["--model", name, "--checkpoint", str(tmp_path / "clip.pth"), "--img-size", "64"]
    err = one_line_error(capsys, "eval", *ckpt, "--data-dir", str(tmp_path / "data"))
    assert "outputs a 512-d embedding (a CLIP image tower's projection)" in err
    assert main(["info", *ckpt]) == 0
    out = capsys.readouterr().out
    assert "a 512-d embedding" in out and "512 classes" not in out


def test_a_clip_checkpoint_in_an_augreg_model_is_a_warning(fixture, caplog):
    # the same keys but the head's bias: loading works, and computes with the other activation
    with caplog.at_level("WARNING"):
        create_model(NANO, num_classes=3, checkpoint_path={"model": weights(fixture, "clip")})
    assert "runs GELU: build it as a sparseformer_btsp_openai_clip_* model" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        load_checkpoint(tiny("clip"), {"model": weights(fixture, "clip")})
        create_model(NANO, checkpoint_path={"model": weights(fixture, "augreg")})
    assert "sparseformer_btsp_" not in caplog.text


def test_a_run_that_records_its_model_is_not_second_guessed_by_its_head(tmp_path, caplog):
    # a LAION CLIP tower's student runs GELU with a bias-free head: a run records that, and
    # "build it as a sparseformer_btsp_openai_clip_* model" was wrong advice on every load
    import dataclasses

    from sparseformer.bootstrap.derive import architecture_overrides

    laion = dataclasses.replace(MODELS[NANO].config, head_bias=False)
    run = {"model": SparseFormer(laion).state_dict(), "model_name": NANO,
           "architecture": architecture_overrides(laion, NANO)}  # fmt: skip
    torch.save(run, tmp_path / "run.pt")
    with caplog.at_level("WARNING"):
        model = create_model(NANO, checkpoint_path=tmp_path / "run.pt")
    assert model.head.bias is None and "sparseformer_btsp_" not in caplog.text


def clip_like(model: SparseFormer) -> SparseFormer:
    """The CLIP variant with ``model``'s classes: the same keys and shapes but the head bias."""
    return SparseFormer(btsp_config(authors_config("clip"), num_classes=model.num_classes))


def test_our_own_files_of_the_other_variant_are_named_too(fixture, caplog, tmp_path):
    # before, the warning was for the authors' layout alone, and a model with a classifier
    # without bias dropped a file's classifier bias in silence
    clip, augreg = tiny("clip"), tiny("augreg")
    load_checkpoint(clip, {"model": weights(fixture, "clip")})
    torch.save(clip.state_dict(), tmp_path / "clip.pth")
    torch.save(augreg.state_dict(), tmp_path / "augreg.pth")
    with caplog.at_level("WARNING"):
        create_model(NANO, num_classes=3, checkpoint_path=tmp_path / "clip.pth")
    assert "runs GELU: build it as a sparseformer_btsp_openai_clip_* model" in caplog.text
    with pytest.raises(
        CheckpointError,
        match=r"unexpected keys: head\.bias\. The classifier's "
        r"bias is the only difference.*sparseformer_btsp_openai_clip_\*",
    ):
        load_checkpoint(clip_like(augreg), tmp_path / "augreg.pth")  # fmt: skip
    with pytest.raises(CheckpointError, match=r"missing keys: head\.bias\. The classifier's"):
        create_model(NANO, num_classes=clip.num_classes, checkpoint_path=tmp_path / "clip.pth")
    fresh = SparseFormer(btsp_config(authors_config("clip"), num_classes=5))
    load_checkpoint(fresh, tmp_path / "augreg.pth")  # a new classifier: the file's goes whole
    assert fresh.head.bias is None
