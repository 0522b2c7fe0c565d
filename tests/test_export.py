"""ONNX export: onnxruntime matches PyTorch on real images at two batch sizes."""

from __future__ import annotations

import json
import os
import re
import sys

import pytest
import torch
from PIL import Image
from torchvision.transforms import functional as TF

from sparseformer import create_model
from sparseformer.cli import main
from sparseformer.weights.registry import IMAGENET_MEAN, IMAGENET_STD

from .conftest import DATA

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from sparseformer.export import ExportError, export_onnx, onnx_max_difference  # noqa: E402

SIZE = 64


def tench_batch() -> torch.Tensor:
    """Three real views of the shipped photo: whole, a corner crop, mirrored; normalised."""
    image = Image.open(DATA / "tench.jpeg").convert("RGB")
    w, h = image.size
    views = [image, image.crop((0, 0, w // 2, h // 2)), TF.hflip(image)]
    tensors = [
        TF.normalize(
            TF.to_tensor(TF.resize(v, [SIZE, SIZE], antialias=True)), IMAGENET_MEAN, IMAGENET_STD
        )  # fmt: skip
        for v in views
    ]
    return torch.stack(tensors)  # 3 x (3, S, S) -> (3, 3, S, S)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = create_model("sparseformer_v1_micro").eval()
    with torch.no_grad():  # random, but not the zero-initialised offsets and RoI adjustments
        for name, p in model.named_parameters():
            if name.endswith(("offset_proj.weight", "roi_adjust.proj.weight")):
                p.normal_(std=0.05)
    path = export_onnx(model, tmp_path_factory.mktemp("onnx") / "micro.onnx", img_size=SIZE)
    return model, path


def test_onnx_matches_pytorch_on_real_images_at_two_batch_sizes(exported):
    model, path = exported
    images = tench_batch()
    for batch in (images[:1], images):
        assert onnx_max_difference(path, model, batch) <= 1e-4
    # any height and width, as the model takes them
    for size in ((SIZE + 32, SIZE), (37, 90)):
        resized = torch.nn.functional.interpolate(images, size=size, mode="bilinear")
        assert onnx_max_difference(path, model, resized) <= 1e-4


def test_export_leaves_the_callers_model_as_it_was(tmp_path):
    """... and takes the model's own input channels (one here) for the example input."""
    model = create_model("sparseformer_v1_nano", in_chans=1).train().to(torch.float64)
    export_onnx(model, tmp_path / "nano.onnx", img_size=32)
    assert onnx_max_difference(tmp_path / "nano.onnx", model, torch.randn(1, 1, 32, 32)) < 1e-4
    assert model.training and model.head.weight.dtype == torch.float64
    from sparseformer.export import _cpu_float_copy

    fp32 = create_model("sparseformer_v1_nano")
    copy = _cpu_float_copy(fp32)
    assert copy.head.weight.data_ptr() != fp32.head.weight.data_ptr()  # not shared
    torch.testing.assert_close(copy.head.weight, fp32.head.weight)


def test_a_graph_onnxruntime_refuses_leaves_the_previous_file(tmp_path, monkeypatch):
    """Some opsets export a graph that onnxruntime cannot load (opset 26's Attention node, with
    onnxruntime 1.32): one clear error, and the file of a previous export stays as it was."""
    import onnxruntime

    path = tmp_path / "nano.onnx"
    path.write_bytes(b"a previous export")

    def refuse(staged, *args, **kwargs):  # onnxruntime names the file it was given
        raise RuntimeError(f"[ONNXRuntimeError] : 10 : INVALID_GRAPH : Load model from {staged}"
                           " failed: an invalid model\nmore")  # fmt: skip

    monkeypatch.setattr(onnxruntime, "InferenceSession", refuse)
    with pytest.raises(ExportError, match=r"cannot load the graph exported at opset 18 \(") as e:
        export_onnx(create_model("sparseformer_v1_nano"), path, img_size=32)
    assert "Load model from the file failed" in str(e.value) and ".tmp" not in str(e.value)
    assert path.read_bytes() == b"a previous export"
    assert [p.name for p in tmp_path.iterdir()] == ["nano.onnx"]  # no temporary file left


def test_onnx_graph_has_dynamic_batch_and_size_and_grid_sample(exported):
    _, path = exported
    graph = onnx.load(str(path)).graph
    (images,) = graph.input
    dims = images.type.tensor_type.shape.dim
    for d in (dims[0], dims[2], dims[3]):  # batch, height, width
        assert d.dim_param and not d.HasField("dim_value")
    assert dims[1].dim_value == 3
    assert "GridSample" in {node.op_type for node in graph.node}


def test_export_cli_prints_differences(tmp_path, capsys):
    out = tmp_path / "nano.onnx"
    argv = ["export", "--model", "sparseformer_v1_nano", "--out", str(out), "--img-size", "32"]
    assert main(argv + ["--check-batch-sizes", "1", "2"]) == 0
    printed = capsys.readouterr().out
    diffs = [float(line.rsplit("=", 1)[1]) for line in printed.splitlines() if "max |" in line]
    assert len(diffs) == 3 and max(diffs) <= 1e-4  # two batch sizes and a second size
    assert "no --checkpoint: sparseformer_v1_nano exports with untrained (random)" in printed
    assert out.is_file()
    meta = {p.key: json.loads(p.value) for p in onnx.load(str(out)).metadata_props}
    assert meta["class_names"][0] == "tench, Tinca tinca"  # 1000 outputs: ImageNet's, as predict


def test_export_cli_replaces_only_an_onnx_file_and_fails_a_wrong_graph(
    tmp_path, capsys, monkeypatch
):
    from sparseformer import export

    run = tmp_path / "best.pt"  # a training checkpoint given as --out by mistake
    run.write_bytes(b"weights")
    argv = ["export", "--model", "sparseformer_v1_nano", "--img-size", "32"]
    assert main([*argv, "--out", str(run)]) == 1
    assert "give a name ending in .onnx, e.g." in capsys.readouterr().err
    assert run.read_bytes() == b"weights"
    link = tmp_path / "link.onnx"  # named .onnx, but replacing the checkpoint it links to
    link.symlink_to(run)
    assert main([*argv, "--out", str(link)]) == 1
    assert f"is a link to {str(run)!r}" in capsys.readouterr().err
    assert run.read_bytes() == b"weights"
    link.unlink()
    monkeypatch.setattr(export, "onnx_max_difference", lambda path, model, x: 0.5)
    good = tmp_path / "model.onnx"
    good.write_bytes(b"a previous export that worked")
    assert main([*argv, "--out", str(good), "--check-batch-sizes", "1"]) == 1
    out, err = capsys.readouterr()
    assert "differ from PyTorch's by 5.00e-01, more than 0.001" in err and "wrote" not in out
    assert good.read_bytes() == b"a previous export that worked"  # not replaced by a bad graph
    assert [p.name for p in tmp_path.iterdir() if "model" in p.name] == ["model.onnx"]
    diffs = iter([1e-7, float("nan"), 1e-7])  # one NaN among good ones: max() passed over it
    monkeypatch.setattr(export, "onnx_max_difference", lambda path, model, x: next(diffs))
    assert main([*argv, "--out", str(good), "--check-batch-sizes", "1", "2"]) == 1
    out, err = capsys.readouterr()
    assert "the logits are NaN for random inputs" in err and "wrote" not in out
    assert good.read_bytes() == b"a previous export that worked"


def test_export_cli_keeps_a_trained_classifier(tmp_path, capsys):
    # a 10-class checkpoint exports 10 logits, not a fresh 1000-class head
    model = create_model("sparseformer_v1_nano", num_classes=10)
    pre = {"img_size": 32, "crop_pct": 1.0, "interpolation": "bilinear",
           "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}  # fmt: skip
    names = [f"class {i}" for i in range(10)]
    saved = {"model": model.state_dict(), "preprocessing": pre, "class_names": names}
    torch.save(saved, tmp_path / "ten.pth")
    out = tmp_path / "ten.onnx"
    argv = ["export", "--model", "sparseformer_v1_nano", "--checkpoint", str(tmp_path / "ten.pth"),
            "--out", str(out), "--check-batch-sizes", "1"]  # fmt: skip
    assert main(argv) == 0
    graph = onnx.load(str(out))
    (logits,) = graph.graph.output
    assert logits.type.tensor_type.shape.dim[1].dim_value == 10
    # the file says how to prepare its input and what its outputs are: the run's own
    meta = {p.key: json.loads(p.value) for p in graph.metadata_props}
    assert meta["input_size"] == [3, 32, 32] and meta["mean"] == [0.5, 0.5, 0.5]
    assert meta["interpolation"] == "bilinear" and meta["class_names"] == names
    assert meta["architecture"] == "sparseformer_v1_nano"


def test_export_cli_missing_checkpoint_is_one_line(tmp_path, capsys):
    argv = ["export", "--model", "sparseformer_v1_nano", "--out", str(tmp_path / "x.onnx")]
    assert main(argv + ["--checkpoint", str(tmp_path / "missing.pth")]) == 1
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_export_without_the_export_extra_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # as if not installed: import raises
    argv = ["export", "--model", "sparseformer_v1_nano", "--out", str(tmp_path / "x.onnx")]
    assert main(argv) == 1  # was a traceback ending in ModuleNotFoundError
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["sparseformer export: error: ONNX export needs the 'onnx' package: pip "
                   "install 'sparseformer[export]'"]  # fmt: skip


def test_export_and_info_name_what_they_cannot_take(tmp_path, capsys):
    out = ["--out", str(tmp_path / "x.onnx")]
    assert main(["export", "--model", "resnet18", *out]) == 1
    assert "export handles SparseFormer models only" in capsys.readouterr().err
    assert main(["info", "resnet18"]) == 1
    assert "'resnet18' is a timm model" in capsys.readouterr().err
    run = tmp_path / "run.pt"  # `info FILE` counts the model the file names
    torch.save({"model": create_model("sparseformer_v1_nano").state_dict(),
                "model_name": "sparseformer_v1_nano"}, run)  # fmt: skip
    assert main(["info", str(run)]) == 0 and "sparseformer_v1_nano" in capsys.readouterr().out
    torch.save(create_model("sparseformer_v1_nano").state_dict(), run)  # names none
    assert main(["info", str(run)]) == 1
    assert (
        "does not name its model (its weights are those of sparseformer_v1_nano); pass "
        "--model sparseformer_v1_nano" in capsys.readouterr().err
    )
    assert main(["info", "sparseformer_v1_nanno"]) == 1
    assert "did you mean sparseformer_v1_nano" in capsys.readouterr().err
    assert main(["info", "sparseformer_v1_tiny.in1k"]) == 1  # a tagged name: not a timm model
    assert "without a pretrained tag ('in1k'): 'sparseformer_v1_tiny'" in capsys.readouterr().err
    nano = create_model("sparseformer_v1_nano", num_classes=2)
    ckpt = tmp_path / "nano.pt"
    torch.save({"model": nano.state_dict(), "model_name": "sparseformer_v1_nano"}, ckpt)
    assert (
        main(["export", "--model", "sparseformer_v1_micro", "--checkpoint", str(ckpt), *out]) == 1
    )
    err = capsys.readouterr().err
    assert "is a checkpoint of 'sparseformer_v1_nano'" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x.onnx").exists()
    to = str(tmp_path / "x.safetensors")
    assert main(["convert", str(ckpt), to, "--model", "sparseformer_v1_micro"]) == 1
    assert "is a checkpoint of 'sparseformer_v1_nano'" in capsys.readouterr().err


def test_export_cli_video_model_takes_clips(tmp_path, capsys):
    out = tmp_path / "video.onnx"
    model = create_model("video_sparseformer_v1_micro", num_classes=3)
    clip = {"num_frames": 4, "stride": 2, "sampling": "dense"}
    torch.save({"model": model.state_dict(), "video": clip}, tmp_path / "v.pt")
    argv = [
        "export",
        "--model",
        "video_sparseformer_v1_micro",
        "--checkpoint",
        str(tmp_path / "v.pt"),
    ]
    argv += ["--out", str(out), "--img-size", "32", "--check-batch-sizes", "1", "2"]
    assert main(argv) == 0  # opset 20 chosen for the 5-D GridSample; 4 frames from the run
    meta = {p.key: json.loads(p.value) for p in onnx.load(str(out)).metadata_props}
    assert meta["clip"] == clip
    printed = capsys.readouterr().out
    diffs = [float(line.rsplit("=", 1)[1]) for line in printed.splitlines() if "max |" in line]
    assert len(diffs) == 3 and max(diffs) <= 1e-4  # and at a second size
    (clips,) = onnx.load(str(out)).graph.input
    dims = clips.type.tensor_type.shape.dim
    assert [d.dim_value for d in dims[1:3]] == [3, 4]  # the clip length is fixed
    assert dims[0].dim_param and dims[3].dim_param and dims[4].dim_param  # batch, H, W are not
    assert main(argv[:2] + ["sparseformer_v1_nano", "--num-frames", "4", "--out", str(out)]) == 1
    assert "video models" in capsys.readouterr().err
    # --frames, as train, eval, predict and viz spell it
    assert main(["info", "video_sparseformer_v1_micro", "--frames", "2", "--img-size", "32"]) == 0
    assert "input 3x2x32x32" in capsys.readouterr().out


def test_export_refuses_another_class_count_than_the_checkpoints(tmp_path, capsys):
    # before, --num-classes 5 on a 2-class checkpoint exported a randomly initialised classifier
    ckpt = tmp_path / "two.pt"
    two = create_model("sparseformer_v1_nano", num_classes=2)
    torch.save({"model": two.state_dict(), "model_name": "sparseformer_v1_nano"}, ckpt)
    out = tmp_path / "x.onnx"
    argv = ["export", "--model", "sparseformer_v1_nano", "--checkpoint", str(ckpt), "--out",
            str(out), "--num-classes", "5"]  # fmt: skip
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--num-classes 5 differs from the 2 classes of" in err
    assert "leave --num-classes out" in err and not out.exists()


def test_export_metadata_is_true_of_the_graph_and_opsets_are_checked_first(tmp_path, capsys):
    """The metadata describes the graph written (its channels, fixed size, frames and
    outputs), whatever the model's pretrained_cfg says; an opset the exporter cannot write or
    the installed onnx does not know is one line before any work."""
    gray = create_model("sparseformer_v1_nano", in_chans=1)
    gray.reset_classifier(5)  # pretrained_cfg names no classes: none are written
    path = export_onnx(gray, tmp_path / "gray.onnx", img_size=32, dynamic_size=False)
    meta = {p.key: json.loads(p.value) for p in onnx.load(str(path)).metadata_props}
    assert meta["input_size"] == [1, 32, 32] and "mean" not in meta and "std" not in meta
    video = create_model("video_sparseformer_v1_micro", num_frames=4)  # opset 20 by default
    path = export_onnx(video, tmp_path / "video.onnx", img_size=32)
    meta = {p.key: json.loads(p.value) for p in onnx.load(str(path)).metadata_props}
    assert meta["clip"]["num_frames"] == 4
    run = create_model("sparseformer_v1_nano", num_classes=3)
    run.pretrained_cfg["label_names"] = ("a", "b", "c")
    run.reset_classifier(5)  # a new classifier: the run's 3 names no longer name its outputs
    path = export_onnx(run, tmp_path / "reset.onnx", img_size=32)
    assert "class_names" not in {p.key for p in onnx.load(str(path)).metadata_props}
    for bad, said in (
        (["--out", os.devnull], "give a file, which is then checked"),
        (["--out", "-"], "--out '-': give a file"),  # was told to name it -.onnx
        (["--ema", "--out", str(tmp_path / "e.onnx")], "--ema exports a checkpoint"),
    ):
        assert main(["export", "--model", "sparseformer_v1_nano", *bad]) == 1  # fmt: skip
        assert said in capsys.readouterr().err
    for opset in (16, 99):
        argv = ["export", "--model", "sparseformer_v1_nano", "--opset", str(opset), "--out",
                str(tmp_path / "o.onnx")]  # fmt: skip
        assert main(argv) == 1
        err = capsys.readouterr().err.strip()
        assert "torch's exporter writes opset 18 and later" in err and "\n" not in err
    assert not (tmp_path / "o.onnx").exists()


def test_export_ema_exports_the_ema_weights(tmp_path, capsys):
    model = create_model("sparseformer_v1_nano", num_classes=2).eval()
    ema = {k: v + 0.05 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    ckpt = tmp_path / "run.pt"
    torch.save({"model": model.state_dict(), "model_ema": ema,
                "model_name": "sparseformer_v1_nano"}, ckpt)  # fmt: skip
    out = tmp_path / "ema.onnx"
    argv = ["export", "--checkpoint", str(ckpt), "--out", str(out), "--img-size", "32"]
    assert main([*argv, "--ema", "--check-batch-sizes", "1"]) == 0
    with_ema = create_model("sparseformer_v1_nano", num_classes=2).eval()
    with_ema.load_state_dict(ema)
    x = torch.randn(1, 3, 32, 32)
    assert onnx_max_difference(out, with_ema, x) <= 1e-4
    assert onnx_max_difference(out, model, x) > 1e-3


def test_a_deployer_following_the_docs_matches_predict(tmp_path, capsys):
    """docs/export.md's recipe, written with PIL, numpy and onnxruntime only, from the file's
    metadata, gives predict's probabilities: the graph and its metadata are enough to deploy."""
    import math

    import numpy as np
    import onnxruntime as ort

    model = create_model("sparseformer_v1_nano", num_classes=4)
    with torch.no_grad():
        model.head.weight.mul_(10)  # far from uniform: a pixel's shift shows in the probabilities
    pre = {"img_size": 40, "crop_pct": 0.9, "interpolation": "bilinear",
           "mean": [0.4, 0.5, 0.6], "std": [0.2, 0.25, 0.3]}  # fmt: skip
    names = ["a", "b", "c", "d"]
    ckpt = tmp_path / "run.pt"
    torch.save({"model": model.state_dict(), "model_name": "sparseformer_v1_nano",
                "preprocessing": pre, "class_names": names}, ckpt)  # fmt: skip
    out = tmp_path / "run.onnx"
    argv = ["export", "--checkpoint", str(ckpt), "--out", str(out), "--check-batch-sizes", "1"]
    assert main(argv) == 0
    images = [tmp_path / "wide.png", tmp_path / "gray.png"]
    Image.open(DATA / "tench.jpeg").crop((0, 30, 300, 130)).save(images[0])
    Image.open(DATA / "tench.jpeg").convert("L").resize((61, 97)).save(images[1])
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(ckpt), *map(str, images), "--json",
                 "--topk", "4"]) == 0  # fmt: skip
    said = [json.loads(line) for line in capsys.readouterr().out.splitlines()]

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    meta = {k: json.loads(v) for k, v in session.get_modelmeta().custom_metadata_map.items()}
    S, crop = meta["input_size"][-1], meta["crop_pct"]
    resample = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[meta["interpolation"]]
    for path, result in zip(images, said):
        img = Image.open(path).convert("RGB")
        w, h = img.size
        short = math.floor(S / crop)
        size = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
        img = img.resize(size, resample)
        left, top = round((size[0] - S) / 2), round((size[1] - S) / 2)
        x = np.asarray(img.crop((left, top, left + S, top + S)), dtype=np.float32) / 255
        x = (x - np.array(meta["mean"])) / np.array(meta["std"])
        logits = session.run(None, {"images": x.transpose(2, 0, 1)[None].astype(np.float32)})[0]
        probs = np.exp(logits[0] - logits[0].max())
        probs /= probs.sum()
        for p in result["predictions"]:
            assert meta["class_names"][p["index"]] == p["label"]
            assert abs(probs[p["index"]] - p["probability"]) < 1e-5, (path, p, probs)


def test_a_full_disk_is_said_with_the_file_and_what_to_do(tmp_path, monkeypatch):
    """export ended in '[Errno 28] No space left on device', naming no file, where every
    other command says which file and what to do."""
    import errno

    import sparseformer.export as export

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export, "_write", full)
    target = tmp_path / "nano.onnx"
    said = f"could not write {str(target)!r}: no space left on the device; free some space"
    with pytest.raises(OSError, match=re.escape(said)):
        export_onnx(create_model("sparseformer_v1_nano"), target, img_size=32)
    assert list(tmp_path.iterdir()) == []  # no temporary left behind


def test_a_graph_of_features_names_no_classes():
    """A model whose classifier was removed (``reset_classifier(0)``) outputs features; its
    run's class names were still written as the graph's."""
    from sparseformer.export import _preprocessing_metadata

    model = create_model("sparseformer_v1_nano", num_classes=2)
    model.pretrained_cfg["label_names"] = ("cat", "dog")
    example = torch.randn(1, 3, 32, 32)
    assert json.loads(_preprocessing_metadata(model, example, True)["class_names"]) == [
        "cat",
        "dog",
    ]
    model.reset_classifier(0)
    assert "class_names" not in _preprocessing_metadata(model, example, True)
