"""Every way in for weights reads both official layouts and our own training checkpoints, through
the one checkpoint module (:mod:`sparseformer.weights.checkpoint`); and the release addresses
are the authors'."""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image

import sparseformer
from sparseformer import create_model, inflate_image_state_dict
from sparseformer.cli import main
from sparseformer.weights.checkpoint import check_model, read_checkpoint
from sparseformer.weights.convert import CheckpointError
from sparseformer.weights.registry import MODELS

from .test_data import make_folder
from .test_train_errors import NANO, to_official

SOURCES = ["imagenet", "v2", "ours"]
CLASSES = ("cat", "dog", "emu")
MICRO = "sparseformer_v1_micro"


def write_checkpoint(path, source: str, model_name: str = NANO):
    """A 3-class ``model_name`` in the ImageNet release's layout (wrapped, with the release's
    extras), the authors' library's (bare), or as `sparseformer train` writes it."""
    torch.manual_seed(0)
    state = create_model(model_name, num_classes=3).state_dict()
    if source == "ours":
        pre = {"img_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3, "crop_pct": 1.0,
               "interpolation": "bilinear"}  # fmt: skip
        saved = {"model": state, "model_name": model_name, "num_classes": 3, "epoch": 1,
                 "step": 3, "class_names": list(CLASSES), "preprocessing": pre}  # fmt: skip
    elif source == "imagenet":
        saved = {"model": to_official(state, "imagenet"), "epoch": 299}
    else:
        saved = to_official(state, "v2")
    torch.save(saved, path)
    return path, state


def same_weights(model, state) -> bool:
    own = model.state_dict()
    return own.keys() == state.keys() and all(torch.equal(own[k], v) for k, v in state.items())


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("routes")
    return make_folder(root / "data", classes=CLASSES, per_class=1)


@pytest.mark.parametrize("source", SOURCES)
def test_read_checkpoint_says_what_the_file_says(tmp_path, source):
    path, state = write_checkpoint(tmp_path / "w.pth", source)
    ckpt = read_checkpoint(path)
    assert ckpt.source_format == ("sparseformer" if source == "ours" else source)
    assert ckpt.state_dict.keys() == state.keys() and ckpt.num_classes == 3
    assert ckpt.model_name == (NANO if source == "ours" else None)
    assert ckpt.class_names == (CLASSES if source == "ours" else None)
    assert ckpt.img_size == (32 if source == "ours" else None)
    assert read_checkpoint(ckpt) is ckpt  # read once, passed on


@pytest.mark.parametrize("source", SOURCES)
def test_create_model_and_timm_and_load_state_dict(tmp_path, source):
    import timm

    path, state = write_checkpoint(tmp_path / "w.pth", source)
    assert same_weights(create_model(NANO, checkpoint_path=path), state)
    # timm's checkpoint_path goes through load_state_dict, whose pre-hook converts
    assert same_weights(timm.create_model(NANO, num_classes=3, checkpoint_path=str(path)), state)
    raw = torch.load(path, weights_only=True)
    model = create_model(NANO, num_classes=3)
    model.load_state_dict(raw.get("model", raw))
    assert same_weights(model, state)


@pytest.mark.parametrize("source", SOURCES)
def test_video_inflation(tmp_path, source):
    path, state = write_checkpoint(tmp_path / "w.pth", source, MICRO)
    video = create_model(f"video_{MICRO}", checkpoint_path=path)
    config = video.config
    inflated = inflate_image_state_dict(torch.load(path, weights_only=True), config)
    assert same_weights(video, inflated) and video.num_classes == 3
    assert torch.equal(inflated["initial_tokens"], state["initial_tokens"].repeat(4, 1))
    given_the_model = inflate_image_state_dict(torch.load(path, weights_only=True), video)
    assert given_the_model.keys() == inflated.keys()  # its config is read


@pytest.mark.parametrize("source", SOURCES)
def test_convert_and_info(tmp_path, source, capsys):
    path, state = write_checkpoint(tmp_path / "w.pth", source)
    out = tmp_path / "w.safetensors"
    assert main(["convert", str(path), str(out), "--model", NANO]) == 0
    back = read_checkpoint(out)
    assert back.source_format == "sparseformer" and back.state_dict.keys() == state.keys()
    assert back.class_names == (CLASSES if source == "ours" else None)
    lines = capsys.readouterr().out.splitlines()  # one line; each renamed key with -v
    renamed = source != "ours"
    assert len(lines) == 1 and ("-v convert ... lists them" in lines[0]) == renamed
    assert main(["-v", "convert", str(path), str(tmp_path / "v.safetensors")]) == 0
    assert (" -> stages." in capsys.readouterr().out) == renamed
    assert main(["info", NANO, "--checkpoint", str(path), "--img-size", "32"]) == 0
    printed = capsys.readouterr().out
    fmt = "sparseformer" if source == "ours" else source
    assert f"format {fmt!r}" in printed and "3 classes" in printed
    named = f"3 classes ({', '.join(CLASSES)})" in printed  # a run's classes are named
    assert named == (source == "ours")
    if source == "ours":  # without --img-size: the size the run trained at, as export takes
        size = read_checkpoint(path).img_size
        assert main(["info", NANO, "--checkpoint", str(path)]) == 0
        assert f"input 3x{size}x{size}" in capsys.readouterr().out
        # the model a run names is taken from it, or given by --model as other commands do
        assert main(["info", "--checkpoint", str(path)]) == 0
        assert capsys.readouterr().out.startswith(f"{NANO}:")
        assert main(["info", "--model", NANO, "--checkpoint", str(path)]) == 0
        assert capsys.readouterr().out.startswith(f"{NANO}:")
        assert main(["info", "sparseformer_v1_micro", "--model", NANO]) == 1
        assert "two models given" in capsys.readouterr().err
        # counted for other classes: not the run's names beside another number of classes
        assert main(["info", "--checkpoint", str(path), "--num-classes", "10"]) == 0
        printed = capsys.readouterr().out
        assert "10 classes (a fresh classifier: the checkpoint's has 3 classes)" in printed
    else:  # an official file names no model; converted with --model, it names that one
        assert main(["info", "--checkpoint", str(path)]) == 1
        assert (
            "does not name its model (its weights are those of sparseformer_v1_nano); pass "
            "--model sparseformer_v1_nano" in capsys.readouterr().err
        )
        assert main(["info", "--checkpoint", str(out)]) == 0
        assert capsys.readouterr().out.startswith(f"{NANO}:")
        assert read_checkpoint(tmp_path / "v.safetensors").model_name is None  # no --model


@pytest.mark.parametrize("source", SOURCES)
def test_eval_predict_and_viz(tmp_path, source, folder, capsys):
    from sparseformer.viz.inputs import load_model_for_viz

    path, state = write_checkpoint(tmp_path / "w.pth", source)
    argv = ["--model", NANO, "--checkpoint", str(path), "--device", "cpu", "--threads", "1"]
    assert main(["eval", *argv, "--data-dir", str(folder), "--json", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 3
    image = next((folder / "val" / "dog").iterdir())
    assert main(["predict", *argv, "--json", str(image)]) == 0
    labels = {p["label"] for p in json.loads(capsys.readouterr().out)["predictions"]}
    assert labels <= (set(CLASSES) if source == "ours" else {f"class {i}" for i in range(3)})
    model, info = load_model_for_viz(NANO if source != "ours" else None, path)
    assert same_weights(model, state) and info.input_size == (32 if source == "ours" else 224)


@pytest.mark.parametrize("source", SOURCES)
def test_train_starts_from_any_layout(tmp_path, source, folder, capsys):
    path, state = write_checkpoint(tmp_path / "w.pth", source)
    run = tmp_path / "run"
    code = main(["train", "--model", NANO, "--data-dir", str(folder), "--output", str(run),
                 "--checkpoint", str(path), "--epochs", "1", "--batch-size", "3", "--img-size",
                 "32", "--recipe", "fashion-mnist-cpu", "--set", "lr=0", "warmup_lr=0",
                 "min_lr=0", "--quiet", "--threads", "1"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    trained = torch.load(run / "last.pt", weights_only=True)["model"]  # lr 0: as it started
    model = create_model(NANO, num_classes=3)
    model.load_state_dict(trained)
    assert same_weights(model, state)


@pytest.mark.parametrize("source", SOURCES)
def test_export(tmp_path, source, capsys, monkeypatch):
    import sparseformer.export as export

    path, state = write_checkpoint(tmp_path / "w.pth", source)
    exported = []  # the ONNX export itself is tested in test_export.py: only its model here

    def export_onnx(model, out, check=None, **kw):  # the CLI's check runs on the written file
        exported.append(kw)
        check(out)
        return out

    monkeypatch.setattr(export, "export_onnx", export_onnx)
    monkeypatch.setattr(
        export, "onnx_max_difference", lambda path, model, x: exported.append(model) or 0.0
    )
    argv = ["export", "--model", NANO, "--checkpoint", str(path), "--out", str(tmp_path / "x.onnx")]
    assert main([*argv, "--check-batch-sizes", "1"]) == 0, capsys.readouterr().err
    assert exported[0]["img_size"] == (32 if source == "ours" else 224)  # the run's own size
    assert same_weights(exported[1], state)


def test_resume_takes_only_a_run_of_the_same_model(tmp_path):
    from sparseformer.engine.checkpoint import read_training_checkpoint

    path, _ = write_checkpoint(tmp_path / "last.pt", "ours")
    assert read_training_checkpoint(path, NANO)["step"] == 3
    with pytest.raises(CheckpointError, match="is a checkpoint of 'sparseformer_v1_nano', not"):
        read_training_checkpoint(path, MICRO)
    official, _ = write_checkpoint(tmp_path / "official.pth", "imagenet")
    with pytest.raises(CheckpointError, match="not a sparseformer training checkpoint"):
        read_training_checkpoint(official, NANO)


def test_one_check_of_model_against_checkpoint(tmp_path):
    path, _ = write_checkpoint(tmp_path / "w.pth", "ours", MICRO)
    ckpt = read_checkpoint(path)
    assert check_model(ckpt, None) == MICRO
    assert check_model(ckpt, f"video_{MICRO}") == f"video_{MICRO}"  # inflated on loading
    with pytest.raises(CheckpointError, match=f"is a checkpoint of '{MICRO}', not '{NANO}'; "
                       f"pass --model {MICRO}$"):  # fmt: skip
        check_model(ckpt, NANO)
    with pytest.raises(CheckpointError, match="to resume it"):
        check_model(ckpt, f"video_{MICRO}", resume=True)


RELEASES = {
    "sparseformer_v1_tiny": ("t", "tiny"),
    "sparseformer_v1_small": ("s", "small"),
    "sparseformer_v1_base": ("b", "base"),
}


def test_every_release_address_is_the_authors():
    import timm

    base = "https://github.com/showlab/sparseformer/releases/download/"
    for name, (letter, size) in RELEASES.items():
        spec = MODELS[name]
        assert spec.tags == ("in1k", "in1k_v2")
        default, library = spec.weights_for("in1k"), spec.weights_for("in1k_v2")
        assert default is spec.weights
        assert default.url == f"{base}v1.0.0-imagenet/sparseformer_{letter}_imagenet1k.pth"
        assert library.url == f"{base}v2.0.0-refactor/sparseformer_v1_{size}_converted.pth"
        assert (default.source_format, library.source_format) == ("imagenet", "v2")
        assert default.sha256 is None and library.sha256 is None  # none published
        for tag, weights in (("in1k", default), ("in1k_v2", library)):
            assert timm.models.get_pretrained_cfg(f"{name}.{tag}").url == weights.url
    released = {name for name, spec in MODELS.items() if spec.weights is not None}
    assert {n for n in released if n.startswith("sparseformer_v1")} == set(RELEASES)


@pytest.mark.parametrize("tag", ["in1k", "in1k_v2"])
def test_a_tag_picks_its_release_by_both_create_models(tmp_path, monkeypatch, tag):
    import timm

    import sparseformer.weights.factory as factory

    path, state = write_checkpoint(tmp_path / "w.pth", "imagenet" if tag == "in1k" else "v2")
    tiny = MODELS["sparseformer_v1_tiny"]
    monkeypatch.setattr(factory, "MODELS", {**MODELS, "sparseformer_v1_tiny": type(tiny)(
        MODELS[NANO].config, tiny.weights, other_weights=tiny.other_weights)})  # fmt: skip
    fetched = []
    monkeypatch.setattr(
        factory, "download_weights", lambda url, sha256, directory=None: fetched.append(url) or path
    )
    name = f"sparseformer_v1_tiny.{tag}"
    for build in (create_model, timm.create_model):
        assert same_weights(build(name, pretrained=True), state)
    assert fetched == [MODELS["sparseformer_v1_tiny"].weights_for(tag).url] * 2
    with pytest.raises(ValueError, match="no pretrained tag 'in22k'.*in1k, in1k_v2"):
        create_model("sparseformer_v1_tiny.in22k")


def _released_like(tmp_path, predicts: int):
    """A 1000-class classifier that names no classes (as a release) and answers ``predicts``."""
    model = create_model(NANO, num_classes=1000)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.zero_()
        model.head.bias[predicts] = 10.0
    path = tmp_path / f"released_{predicts}.pth"
    torch.save({"model": model.state_dict()}, path)
    return path


def test_eval_says_the_preprocessing_it_used(tmp_path, capsys, caplog):
    """Reproducing a paper's number needs its protocol: eval says its resize, interpolation,
    crop and normalisation (the log, and --json), not only the input size."""
    import logging

    data = make_folder(tmp_path / "wnids", ("n01440764", "n01443537"), 1, ("val",))
    argv = ["eval", "--checkpoint", str(_released_like(tmp_path, 1)), "--data-dir", str(data)]
    with caplog.at_level(logging.INFO, logger="sparseformer"):
        assert main([*argv, "--model", NANO, "--img-size", "32", "--quiet", "--json"]) == 0
    said = json.loads(capsys.readouterr().out)["preprocessing"]
    assert said["img_size"] == 32 and said["interpolation"] == "bicubic"
    resize = math.floor(32 / said["crop_pct"])
    assert f"short side resized to {resize} px (bicubic; crop_pct {said['crop_pct']:g})" in (
        caplog.text
    )
    assert "centre crop 32, mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225)" in caplog.text


def test_per_class_of_a_released_classifier_on_a_few_classes_holds_those_and_the_predicted(
    tmp_path, capsys
):
    """Three ImageNet classes under a 1000-class classifier: the report held 1000 rows and a
    1000 x 1000 matrix (6 MB of zeros, a 40-inch picture of overlapping names)."""
    data = make_folder(tmp_path / "wnids", ("n01440764", "n01443537", "n01484850"), 2, ("val",))
    ckpt = _released_like(tmp_path, 5)  # says class 5 (n01496331, not in the folder) every time
    argv = ["eval", "--checkpoint", str(ckpt), "--data-dir", str(data), "--model", NANO]
    assert main([*argv, "--img-size", "32", "--quiet", "--per-class", str(tmp_path / "r")]) == 0
    report = json.loads((tmp_path / "r" / "per_class.json").read_text())
    assert report["class_names"] == ["n01440764", "n01443537", "n01484850", "n01496331"]
    assert [row["images"] for row in report["classes"]] == [2, 2, 2, 0]
    assert report["confusion"] == [[0, 0, 0, 2], [0, 0, 0, 2], [0, 0, 0, 2], [0, 0, 0, 0]]
    assert report["left_out"] == 996


def test_a_released_imagenet_classifier_reads_synset_and_numbered_folders_by_name(tmp_path, capsys):
    # before, any folders were taken by position: 3 synsets were refused ("classifies 1000
    # classes but the data has 3") and ImageNetV2's 0..999 were matched in string order
    wnids = make_folder(tmp_path / "wnids", ("n01440764", "n01443537", "n01484850"), 2, ("val",))
    numbered = tmp_path / "numbered"  # ImageNetV2: 0 ... 999, listed 0, 1, 10, 100, ...
    for i in range(1000):
        (numbered / "val" / str(i)).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(numbered / "val" / str(i) / "a.png")
    common = ["--model", NANO, "--img-size", "32", "--threads", "1", "--quiet", "--json"]
    for data, index, right in ((wnids, 1, 100 / 3), (numbered, 10, 0.1)):  # its folder's
        ckpt = _released_like(tmp_path, index)
        assert main(["eval", "--checkpoint", str(ckpt), "--data-dir", str(data), *common]) == 0
        assert json.loads(capsys.readouterr().out)["acc1"] == pytest.approx(right)
    report = tmp_path / "report"  # the per-class rows name the folders in the model's order
    argv = ["eval", "--checkpoint", str(ckpt), "--data-dir", str(numbered), *common]
    assert main([*argv, "--per-class", str(report)]) == 0
    said = json.loads(capsys.readouterr().out)["per_class"]  # --json names what it wrote
    assert said == [str(report / "per_class.json"), str(report / "confusion.png")]
    rows = json.loads((report / "per_class.json").read_text())["classes"]
    assert [r["class"] for r in rows if r["acc1"] == 100.0] == ["10"]
    human = make_folder(tmp_path / "human", ("goldfish", "tench"), 1, ("val",))
    digits = make_folder(tmp_path / "digits", tuple("0123456789"), 1, ("val",))  # not ImageNet
    for data in (human, digits):
        assert main(["eval", "--checkpoint", str(ckpt), "--data-dir", str(data), *common]) == 1
        said = capsys.readouterr().err
        assert "an ImageNet-1K classifier's classes are ImageNet's synset ids" in said
        assert "all 1000 of 0 ... 999" in said  # ten numbered folders are not ImageNetV2's


def test_fine_tuning_a_released_classifier_orders_its_rows_by_imagenet_class(tmp_path):
    from sparseformer.weights.loading import load_weights

    released = create_model(NANO, num_classes=1000)
    torch.save({"model": released.state_dict()}, tmp_path / "r.pth")
    numbered = sorted(f"{i:03d}" if i % 2 else str(i) for i in range(1000))  # padded or not
    model = create_model(NANO, num_classes=1000)
    load_weights(model, tmp_path / "r.pth", class_names=numbered)
    rows = [int(name) for name in numbered]  # each folder's row is its class's
    torch.testing.assert_close(model.head.bias, released.head.bias[rows])
    model = create_model(NANO, num_classes=1000)  # synset folders: in order already
    from sparseformer.weights.registry import imagenet_class_ids

    load_weights(model, tmp_path / "r.pth", class_names=imagenet_class_ids())
    torch.testing.assert_close(model.head.weight, released.head.weight)


def test_a_run_on_imagenet_folders_predicts_imagenet_names():
    from sparseformer.engine.inputs import class_names

    # before: "n01440764" itself, where the released weights print "tench"
    named = class_names({"class_names": ["n01440764", "n01443537"]}, 2)
    assert named == ["tench (n01440764)", "goldfish (n01443537)"]
    assert class_names({"class_names": ["n0", "cat"]}, 2) == ["n0", "cat"]  # not synset ids


def test_a_missing_file_named_as_a_release_says_where_to_download_it(tmp_path):
    """The README's commands name sparseformer_t_imagenet1k.pth; without it the error said
    only that the file does not exist."""
    with pytest.raises(CheckpointError, match=r"sparseformer_v1_tiny.in1k's released weights: "
                       r"download https://\S+/sparseformer_t_imagenet1k.pth$"):  # fmt: skip
        read_checkpoint(tmp_path / "sparseformer_t_imagenet1k.pth")
    with pytest.raises(CheckpointError, match=r"does not exist or is not a file$"):
        read_checkpoint(tmp_path / "mine.pth")


def test_a_run_folder_given_as_the_checkpoint_names_the_files_in_it(tmp_path):
    """It said the folder "does not exist or is not a file"."""
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(CheckpointError, match=r"is a folder with no checkpoint file in it"):
        read_checkpoint(run)
    for name in ("last.pt", "best.pt"):
        torch.save(create_model(NANO).state_dict(), run / name)
    with pytest.raises(
        CheckpointError, match=r"is a folder; give a checkpoint file in it: .*best.pt or .*last.pt"
    ):
        read_checkpoint(run)


def test_a_run_holds_no_second_copy_of_the_weights_it_starts_from(tmp_path, folder, monkeypatch):
    """A resumed run held its checkpoint's weights, EMA and AdamW state for its whole length,
    and a run fine-tuned from a run's last.pt its weights and that run's state (SparseFormer-T:
    about 310 and 370 MB more at the peak): once the model is built, only the record stays."""
    import inspect

    from sparseformer.engine import trainer
    from sparseformer.weights.checkpoint import holds_tensors

    run = tmp_path / "run"
    argv = ["train", "--model", NANO, "--data-dir", str(folder), "--batch-size", "3",
            "--img-size", "32", "--recipe", "fashion-mnist-cpu", "--quiet",
            "--threads", "1"]  # fmt: skip
    assert main([*argv, "--output", str(run), "--epochs", "1"]) == 0
    plans = []
    real_fit = trainer.fit

    def fit(*args, **kwargs):  # the plan of the command, as the run starts
        plans.append(inspect.currentframe().f_back.f_locals["plan"])
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(trainer, "fit", fit)
    assert main([*argv, "--output", str(run), "--epochs", "2", "--resume", "auto"]) == 0
    assert main([*argv, "--output", str(tmp_path / "ft"), "--epochs", "1",
                 "--checkpoint", str(run / "last.pt")]) == 0  # fmt: skip
    resumed, tuned = plans
    assert resumed.saved["epoch"] == 1 and not holds_tensors(resumed.saved)
    assert tuned.start.class_names == tuple(CLASSES) and tuned.start.extras["epoch"] == 2
    assert not tuned.start.state_dict and not holds_tensors(tuned.start.extras)
    last = torch.load(tmp_path / "ft" / "last.pt", weights_only=True)
    assert last["epoch"] == 1 and holds_tensors(last["optimizer"])  # what a resume reads
    # the code that trained it, in each checkpoint and the summary
    summary = json.loads((tmp_path / "ft" / "summary.json").read_text())
    assert last["sparseformer"] == summary["sparseformer"] == sparseformer.__version__ != "0.1.0"


def test_weights_of_another_size_are_named_by_their_model(tmp_path):
    """A file of another size listed 8 of its mismatches and asked 'another model size?';
    it now says which model the weights are (the authors' files name none)."""
    from sparseformer.weights.build import model_from_checkpoint

    path = tmp_path / "micro.pth"
    torch.save({"model": create_model("sparseformer_v1_micro", num_classes=3).state_dict()}, path)
    with pytest.raises(CheckpointError, match=r"\(\+\d+ more\); its weights are those of "
                       r"sparseformer_v1_micro: pass --model sparseformer_v1_micro$"):  # fmt: skip
        model_from_checkpoint(NANO, path)
    video = r"\(or video_sparseformer_v1_micro, which takes them\)"
    with pytest.raises(CheckpointError, match=r"those of sparseformer_v1_micro: pass --model "
                       rf"sparseformer_v1_micro {video}"):  # fmt: skip
        model_from_checkpoint("video_sparseformer_v1_tiny", path)
    torch.save({"model": {"not": torch.zeros(2)}}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError) as other:
        model_from_checkpoint(NANO, tmp_path / "other.pth")
    assert "its weights are those of" not in str(other.value)


def test_predict_prints_names_with_their_control_characters_escaped(tmp_path, capsys):
    """Class and file names are data: a name with an escape sequence cleared the terminal, and
    one with a line break printed a result line of its own."""
    model = create_model(NANO, num_classes=2)
    with torch.no_grad():
        model.head.bias.copy_(torch.tensor([10.0, 0.0]))
    names = ["dog\n 99.99%  everything is fine", "cat\x1b[2J"]
    path = tmp_path / "named.pt"
    torch.save({"model": model.state_dict(), "model_name": NANO, "class_names": names}, path)
    image = tmp_path / "photo\x1b[1m.png"
    Image.new("RGB", (40, 40), (90, 40, 10)).save(image)
    assert main(["predict", "--checkpoint", str(path), str(image), "--topk", "2"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and len(out.splitlines()) == 3
    assert "dog\\n 99.99%  everything is fine" in out and "cat\\x1b[2J" in out
    assert "photo\\x1b[1m.png:" in out


@pytest.mark.parametrize("command", ["info", "export", "train", "convert"])
def test_info_export_and_fine_tuning_name_the_model_of_other_weights(tmp_path, capsys, command):
    """info, export and train --checkpoint asked 'another model size?' where predict, eval and
    viz name the model the weights are."""
    from .test_train_errors import one_line_error, tiny_train

    path = tmp_path / "micro.pth"
    torch.save({"model": create_model("sparseformer_v1_micro", num_classes=3).state_dict()}, path)
    argv = [command, "--model", NANO, "--checkpoint", str(path)]
    if command == "export":
        argv += ["--out", str(tmp_path / "m.onnx")]
    if command == "convert":
        argv = [command, str(path), str(tmp_path / "m.safetensors"), "--model", NANO]
    if command == "train":
        data = make_folder(tmp_path / "data", classes=("a", "b", "c"), per_class=1)
        argv = [*tiny_train(data, tmp_path / "run"), "--checkpoint", str(path)]
    err = one_line_error(capsys, *argv)
    assert err.endswith("its weights are those of sparseformer_v1_micro: pass --model "
                        "sparseformer_v1_micro")  # fmt: skip
    assert not (tmp_path / "m.onnx").exists()


def test_naming_their_model_keeps_an_error_it_has_nothing_to_add_to():
    from sparseformer.weights.build import naming_their_model
    from sparseformer.weights.checkpoint import Checkpoint
    from sparseformer.weights.convert import NotASparseFormerCheckpoint

    ckpt = read_checkpoint({"model": {"fc.weight": torch.zeros(2, 2)}})
    assert isinstance(ckpt, Checkpoint)
    with pytest.raises(NotASparseFormerCheckpoint), naming_their_model(ckpt, NANO):
        raise NotASparseFormerCheckpoint("a ResNet's weights")


def test_fine_tuning_without_model_reads_its_checkpoint_once(tmp_path, capsys, monkeypatch):
    """train --checkpoint without --model read the file to name the model, then again."""
    import sparseformer.weights.checkpoint as checkpoint

    from .test_train_errors import run_cli, tiny_train

    path = tmp_path / "nano.pt"
    write_checkpoint(path, "ours")  # a run's file: it names its model
    reads, read_file = [], checkpoint.read_file
    monkeypatch.setattr(checkpoint, "read_file", lambda p: reads.append(p) or read_file(p))
    data = make_folder(tmp_path / "data", classes=CLASSES, per_class=2)
    argv = [a for a in tiny_train(data, tmp_path / "run", "--epochs", "1") if a != NANO]
    argv.remove("--model")
    code, _, err = run_cli(capsys, *argv, "--checkpoint", str(path))
    assert code == 0, err
    assert [str(p) for p in reads] == [str(path)]
