"""`sparseformer viz` and its image inputs: any PIL mode, huge and tiny images, clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from sparseformer import create_model
from sparseformer.cli import main
from sparseformer.engine.atomic import temporary_for
from sparseformer.viz.inputs import (
    display_image,
    load_image,
    load_model_for_viz,
    preprocess,
)
from sparseformer.weights.checkpoint import read_checkpoint

from .conftest import DATA

TENCH = DATA / "tench.jpeg"


def _gradient(h: int, w: int) -> np.ndarray:
    return np.tile(np.linspace(0, 1, w), (h, 1))


@pytest.mark.parametrize(
    "mode, make",
    [
        ("L", lambda: Image.fromarray((_gradient(20, 30) * 255).astype(np.uint8))),
        ("1", lambda: Image.fromarray(_gradient(20, 30) > 0.5)),
        ("P", lambda: Image.open(DATA / "tench.jpeg").convert("P")),
        ("RGBA", lambda: Image.open(DATA / "tench.jpeg").convert("RGBA")),
        ("LA", lambda: Image.fromarray((_gradient(20, 30) * 255).astype(np.uint8)).convert("LA")),
        ("CMYK", lambda: Image.open(DATA / "tench.jpeg").convert("CMYK")),
        ("I;16", lambda: Image.fromarray((_gradient(20, 30) * 65535).astype(np.uint16))),
        ("F", lambda: Image.fromarray((_gradient(20, 30) * 1000).astype(np.float32))),
    ],
)
def test_any_pil_mode_becomes_8bit_rgb(tmp_path, mode, make):
    img = make()
    assert img.mode == mode
    path = tmp_path / ("x.tiff" if mode in ("CMYK", "F") else "x.png")
    img.save(path)
    rgb = load_image(path)
    assert rgb.mode == "RGB" and rgb.size == img.size
    arr = np.asarray(rgb)
    if mode in ("L", "I;16", "F", "LA"):
        # a full-range gradient stays full range (16-bit is scaled, not clipped to white)
        assert arr.min() <= 1 and arr.max() >= 254
        assert 100 < arr[:, 15].mean() < 155
    x = preprocess(rgb, 32)
    assert x.shape == (1, 3, 32, 32) and torch.isfinite(x).all()


def test_transparent_pixels_are_composited_over_white(tmp_path):
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)  # black, fully transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "t.png")
    assert np.asarray(load_image(tmp_path / "t.png")).min() == 255


def test_huge_and_tiny_images(tmp_path, capsys):
    huge = tmp_path / "huge.jpg"
    rng = np.random.default_rng(0)
    small = rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)
    Image.fromarray(small).resize((6000, 4000)).save(huge, quality=70)
    img = load_image(huge, max_side=256)  # JPEG draft decoding: no 24-megapixel buffer
    assert img.size[0] * 2 <= 6000 and abs(img.size[0] / img.size[1] - 1.5) < 0.01
    shown = display_image(img)
    assert max(shown.shape[:2]) == 448
    tiny = tmp_path / "tiny.png"
    Image.fromarray(small[:16, :16]).save(tiny)
    shown = display_image(load_image(tiny))
    assert shown.shape == (112, 112, 3)  # enlarged for display, nearest neighbour
    out = tmp_path / "out"
    assert main(["viz", "--model", "sparseformer_v1_nano", str(huge), str(tiny), "--out", str(out),
                 "--img-size", "64"]) == 0  # fmt: skip
    assert "no --checkpoint: sparseformer_v1_nano draws with untrained" in capsys.readouterr().out
    for stem in ("huge", "tiny"):
        assert (out / f"{stem}_rois.png").stat().st_size > 1000
        with Image.open(out / f"{stem}_stages.gif") as gif:
            assert gif.n_frames == 3  # the nano model samples 3 times
        stats = json.loads((out / f"{stem}_roi_stats.json").read_text())
        assert stats["roi/area_final"] == pytest.approx(0.25)


def test_a_quoted_folder_pattern_draws_the_folders_images(tmp_path, capsys):
    """As predict takes it, and as the shell would have given it."""
    for name in ("val/cat/a.png", "val/dog/b.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / name)
    (tmp_path / "val" / "empty").mkdir()  # matched, no images: passed over, as predict does
    out = tmp_path / "out"
    assert main(["viz", "--model", "sparseformer_v1_nano", str(tmp_path / "val" / "*"), "--out",
                 str(out), "--img-size", "32", "--no-gif"]) == 0  # fmt: skip
    assert {p.name for p in out.glob("*_rois.png")} == {"a_rois.png", "b_rois.png"}


def test_a_file_name_with_control_characters_is_printed_escaped(tmp_path, capsys):
    """As predict prints names: a name cannot clear the screen or print a line of its own."""
    path = tmp_path / "\x1b[2Jcat\nx.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(path)
    out = tmp_path / "out"
    assert main(["viz", "--model", "sparseformer_v1_nano", str(path), "--out", str(out),
                 "--img-size", "32", "--no-gif"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "\x1b" not in printed and "\\x1b[2Jcat\\nx" in printed


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "not found"),
        (b"hello, I am text", "not a readable image"),
        (b"", "an empty file (0 bytes)"),
        ("truncated", "could not be decoded"),
    ],
)
def test_bad_images_give_one_line_errors(tmp_path, capsys, content, message):
    path = tmp_path / "bad.jpg"
    if content == "truncated":
        Image.open(TENCH).save(path)
        path.write_bytes(path.read_bytes()[:2000])
    elif content is not None:
        path.write_bytes(content)
    code = main(["viz", "--model", "sparseformer_v1_nano", str(path), "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert message in err and str(path) in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_bad_options_give_one_line_errors(tmp_path, capsys):
    args = ["viz", "--model", "sparseformer_v1_nano", str(TENCH), "--out", str(tmp_path)]
    assert main(args + ["--stages", "7"]) == 1
    assert "sampling stages 1..3" in capsys.readouterr().err
    assert main(args[:2] + ["sparseformer_v1_nan"] + args[3:]) == 1
    assert "did you mean" in capsys.readouterr().err
    assert main(args + ["--checkpoint", str(tmp_path / "none.pth")]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert main(["viz", "--model", "resnet18", *args[3:]]) == 1  # was "unknown model"
    assert "viz handles SparseFormer models only" in capsys.readouterr().err
    assert main([*args[:-1], str(tmp_path / "pic.png")]) == 1  # made a folder pic.png
    assert "names a file, but --out is the folder the files go in" in capsys.readouterr().err
    assert not (tmp_path / "pic.png").exists()
    assert main(["info", str(tmp_path / "missing.pt")]) == 1  # was "unknown model"
    assert "no such file" in capsys.readouterr().err
    pattern = ["viz", "--model", "sparseformer_v1_nano", "--out", str(tmp_path), "--no-gif"]
    assert main([*pattern, str(tmp_path / "*.png")]) == 1  # a pattern no shell expanded
    assert "the pattern" in capsys.readouterr().err
    Image.open(TENCH).save(tmp_path / "tench.png")
    assert main([*pattern, str(tmp_path / "t*.png")]) == 0
    assert "tench.png" in capsys.readouterr().out


def test_threads_are_taken_as_the_other_commands_take_them(tmp_path):
    """It was refused ("unrecognized arguments") where train, eval, predict and export take it."""
    before = torch.get_num_threads()
    try:
        argv = ["viz", "--model", "sparseformer_v1_nano", str(TENCH), "--out", str(tmp_path)]
        assert main([*argv, "--no-gif", "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert list(tmp_path.glob("*.png"))


def test_checkpoint_labels_and_preprocessing_are_used(tmp_path, capsys):
    model = create_model("sparseformer_v1_nano", num_classes=3).eval()
    with torch.no_grad():
        model.head.bias.copy_(torch.tensor([0.0, 0.0, 50.0]))  # always predicts class 2
    names = ["ankle boot", "bag", "sneaker"]
    ckpt = {
        "model": model.state_dict(),
        "epoch": 3,
        "meta": {"class_names": names, "mean": [0.5] * 3, "std": [0.25] * 3, "img_size": 40},
    }
    path = tmp_path / "ckpt.pth"
    torch.save(ckpt, path)
    meta = read_checkpoint(path)
    assert meta.class_names == tuple(names) and meta.img_size == 40
    assert meta.preprocessing == {"mean": (0.5,) * 3, "std": (0.25,) * 3, "img_size": 40}
    loaded, info = load_model_for_viz("sparseformer_v1_nano", path)
    assert loaded.num_classes == 3 and not loaded.training
    assert info.class_names == names and info.input_size == 40
    out = tmp_path / "out"
    argv = ["viz", "--model", "sparseformer_v1_nano", "--checkpoint", str(path), str(TENCH)]
    assert main(argv + ["--out", str(out), "--tokens", "2", "--stages", "1", "3", "--no-gif"]) == 0
    printed = capsys.readouterr().out
    assert "sneaker (100.0%)" in printed and "mean RoI area per stage" in printed
    assert (out / "tench_rois.png").exists() and not (out / "tench_stages.gif").exists()
    # in Python, visualize() takes the same from the model create_model loads from the run
    from unittest import mock

    import sparseformer.viz.figures as figures

    run_model = create_model("sparseformer_v1_nano", checkpoint_path=path).eval()
    with mock.patch.object(figures, "preprocess", wraps=figures.preprocess) as prep:
        fig = figures.visualize(run_model, Image.open(TENCH))  # a PIL image, or a path
    (_, size, mean, std, _), _ = prep.call_args
    assert (size, tuple(mean), tuple(std)) == (40, (0.5,) * 3, (0.25,) * 3)
    assert "sneaker" in fig._suptitle.get_text()


def test_imagenet_models_show_imagenet_names(tmp_path):
    torch.save(create_model("sparseformer_v1_nano").state_dict(), tmp_path / "in1k.pth")
    model, info = load_model_for_viz("sparseformer_v1_nano", tmp_path / "in1k.pth")
    assert model.num_classes == 1000
    assert info.class_names[0] == "tench" and len(info.class_names) == 1000
    # untrained weights name no class: their top class was shown as an ImageNet label
    assert load_model_for_viz("sparseformer_v1_nano")[1].class_names is None


def test_importing_visualize_does_not_import_matplotlib():
    code = "import sys, sparseformer.viz.figures; print('matplotlib' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "False", result.stderr


def test_video_model_draws_rois_on_the_frames_of_a_real_clip(tmp_path, capsys):
    pytest.importorskip("av")
    clip = DATA / "carphone-16f.mp4"
    out = tmp_path / "out"
    argv = ["viz", "--model", "video_sparseformer_v1_micro", str(clip), "--out", str(out)]
    # clips are sampled as predict samples them: 8 frames 4 apart need 29, the clip has 16
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "16 frame(s), a clip needs at least 29; lower --frames or --frame-stride" in err, err
    assert main(argv + ["--img-size", "32", "--tokens", "3", "--frame-stride", "2"]) == 0
    assert "wrote" in capsys.readouterr().out
    with Image.open(out / "carphone-16f_frames.gif") as gif:
        assert gif.n_frames == 8  # the model's clip length
    stats = json.loads((out / "carphone-16f_roi_stats.json").read_text())
    assert stats["roi/area_final"] == pytest.approx(0.25 * 0.25)  # half boxes x quarter clips
    assert (out / "carphone-16f_frames.png").stat().st_size > 1000
    assert main(argv + ["--img-size", "32", "--tokens", "3", "--frame-stride", "2",
                        "--stages", "0", "-1", "--no-gif"]) == 0  # fmt: skip
    assert "wrote" in capsys.readouterr().out
    assert (out / "carphone-16f_stage0_frames.png").is_file()
    assert (out / "carphone-16f_final_frames.png").is_file()  # not "stage-1"
    bad = tmp_path / "bad.mp4"
    bad.write_text("not a video")
    assert main(["viz", "--model", "video_sparseformer_v1_micro", str(bad), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert str(bad) in err and len(err.splitlines()) == 1
    photo = tmp_path / "photo.png"
    Image.new("RGB", (40, 40), "red").save(photo)  # not drawn as an 8-frame still "clip"
    video_model = ["viz", "--model", "video_sparseformer_v1_micro", "--out", str(out)]
    assert main([*video_model, str(photo)]) == 1
    assert "an image, but video_sparseformer_v1_micro is a video model" in capsys.readouterr().err
    assert main(["viz", "--model", "sparseformer_v1_micro", str(clip), "--out", str(out)]) == 1
    assert "a video, but sparseformer_v1_micro is an image model" in capsys.readouterr().err
    assert main(["viz", "--model", "sparseformer_v1_micro", str(photo), "--out", str(out),
                 "--frames", "4"]) == 1  # fmt: skip
    assert "--frames applies to videos only; sparseformer_v1_micro takes images" in (
        capsys.readouterr().err
    )


def test_a_training_checkpoint_names_its_model_classes_and_preprocessing(tmp_path, capsys):
    """The layout `sparseformer train` writes: model_name, class_names, preprocessing at the top."""
    model = create_model("sparseformer_v1_nano", num_classes=2).eval()
    with torch.no_grad():
        model.head.bias.copy_(torch.tensor([30.0, 0.0]))
    ckpt = {
        "model_name": "sparseformer_v1_nano",
        "num_classes": 2,
        "class_names": ["T-shirt/top", "trouser"],
        "preprocessing": {
            "img_size": 36,
            "mean": (0.3, 0.3, 0.3),
            "std": (0.3, 0.3, 0.3),
            "crop_pct": 1.0,
            "interpolation": "bilinear",
        },
        "model": model.state_dict(),
        "model_ema": None,
        "step": 10,
    }
    path = tmp_path / "last.pt"
    torch.save(ckpt, path)
    loaded, info = load_model_for_viz(None, path)
    assert loaded.num_classes == 2 and info.input_size == 36 and info.mean == (0.3, 0.3, 0.3)
    assert info.interpolation == "bilinear"
    out = tmp_path / "out"
    assert main(["viz", "--checkpoint", str(path), str(TENCH), "--out", str(out), "--no-gif"]) == 0
    assert "T-shirt/top (100.0%)" in capsys.readouterr().out
    argv = ["viz", "--model", "sparseformer_v1_micro", "--checkpoint", str(path), str(TENCH)]
    assert main(argv + ["--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "checkpoint of 'sparseformer_v1_nano'" in err and "--model sparseformer_v1_nano" in err
    assert main(["viz", str(TENCH), "--out", str(out)]) == 1
    assert "pass --model NAME" in capsys.readouterr().err


def test_demo_pictures_of_fashion_mnist_test_images(tmp_path, capsys):
    from sparseformer.cli.demo import demo_pictures
    from sparseformer.data.folder import DataError

    model = create_model("sparseformer_v1_nano", num_classes=10).eval()
    path = tmp_path / "best.pt"
    torch.save({"model": model.state_dict(), "class_names": [f"c{i}" for i in range(10)]}, path)
    try:
        assert demo_pictures("sparseformer_v1_nano", path, tmp_path / "pictures", count=2) == 0
    except DataError as exc:  # Fashion-MNIST is installed by `make test`'s data step
        pytest.skip(str(exc))
    printed = capsys.readouterr().out
    assert "(T-shirt/top): predicted c" in printed and "(Trouser): predicted c" in printed
    pngs = sorted(p.name for p in (tmp_path / "pictures").glob("*_rois.png"))
    assert len(pngs) == 2 and len(list((tmp_path / "pictures").glob("*_stages.gif"))) == 2


def test_demo_gives_its_threads_and_device_to_every_step(tmp_path, monkeypatch, capsys):
    from sparseformer.cli import eval as eval_cli
    from sparseformer.cli import train as train_cli

    seen, out = {}, tmp_path / "demo"

    def train(args):
        seen["train"] = (args.threads, args.device)
        seen["batch"] = args.batch_size  # its error on a small --limit-train names this flag
        out.mkdir()
        (out / "summary.json").write_text(json.dumps({"train_seconds": 1.0}))
        return 0

    def evaluate(args):
        seen["eval"] = (args.threads, args.device)
        return 1  # no pictures: the steps' flags are what is checked

    monkeypatch.setattr(train_cli, "run", train)
    monkeypatch.setattr(eval_cli, "run", evaluate)
    argv = ["demo", "--output", str(out), "--threads", "1", "--quiet", "--batch-size", "16"]
    assert main(argv) == 1
    assert seen == {"train": (1, "cpu"), "eval": (1, "cpu"), "batch": 16}


def test_an_image_with_a_long_legal_name_is_drawn_under_a_shorter_one(
    tmp_path, capsys, monkeypatch
):
    """A 245-byte name is legal, but with _roi_stats.json it is not: viz stopped there with
    'File name too long', and drew none of the other images. The same long name in a second
    folder takes a _2, and still fits, under the longest temporary's name (a 7-digit PID)."""
    monkeypatch.setattr(os, "getpid", lambda: 4194303)  # the largest Linux allows
    folders = [tmp_path / "in", tmp_path / "again"]
    long, other = "b" * 240 + "é", "b" * 240 + "è"  # two long names with one start
    for folder in folders:
        folder.mkdir()
        Image.new("RGB", (40, 40), (200, 30, 30)).save(folder / f"{long}.png")
    for name in (other, "z"):
        Image.new("RGB", (40, 40), (200, 30, 30)).save(folders[0] / f"{name}.png")
    out = tmp_path / "out"
    code = main(["viz", "--model", "sparseformer_v1_nano", *map(str, folders), "--out", str(out),
                 "--img-size", "32", "--no-gif"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    names = sorted(p.name for p in out.iterdir())
    assert len(names) == 8 and "z_rois.png" in names  # two files each, none in the way
    assert max(len(os.fsencode(temporary_for(out / n).name)) for n in names) <= 255
    assert len({n.rsplit("_roi", 1)[0] for n in names}) == 4  # the long ones kept apart


def test_a_clip_with_a_long_legal_name_is_drawn_under_a_shorter_one(tmp_path, capsys, monkeypatch):
    """A video model's pictures have longer ends (_stage1_frames.png) than an image's."""
    monkeypatch.setattr(os, "getpid", lambda: 4194303)
    pytest.importorskip("av")
    clip = tmp_path / ("c" * 236 + ".mp4")
    clip.write_bytes((DATA / "carphone-16f.mp4").read_bytes())
    out = tmp_path / "out"
    argv = ["viz", "--model", "video_sparseformer_v1_micro", str(clip), "--out", str(out),
            "--img-size", "32", "--frame-stride", "2", "--stages", "0", "1"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    names = sorted(p.name for p in out.iterdir())
    assert len(names) == 4 and any(n.endswith("_stage1_frames.png") for n in names)
    assert max(len(os.fsencode(temporary_for(out / n).name)) for n in names) <= 255


def test_viz_reads_images_as_training_does(tmp_path, monkeypatch):
    """One image reader: viz's says of a decompression bomb what training's does (how to get
    past it), and its reduced JPEG decoding is training's reader's too."""
    from PIL import Image

    from sparseformer.data.images import open_rgb

    Image.new("RGB", (100, 100)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # over twice: refused
    with pytest.raises(ValueError, match="downsize it, or raise PIL.Image.MAX_IMAGE_PIXELS"):
        load_image(tmp_path / "big.png")
    monkeypatch.undo()
    Image.new("RGB", (800, 600)).save(tmp_path / "photo.jpg")
    assert open_rgb(tmp_path / "photo.jpg", max_side=100).size == (200, 150)  # 1/4 scale
    assert load_image(tmp_path / "photo.jpg", max_side=100).size == (200, 150)
