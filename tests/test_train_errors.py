"""Every bad input to train / eval / predict gets one line that says what to do, and official
checkpoints in either layout evaluate through --checkpoint."""

from __future__ import annotations

import json
import logging
import re
import signal
from pathlib import Path

import pytest
import torch
from PIL import Image

from sparseformer import create_model
from sparseformer.cli import main
from sparseformer.weights.convert import TOP_LEVEL, TRANSITION, UNIT, convert_state_dict

from .test_data import make_folder

NANO = "sparseformer_v1_nano"


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip()


def one_line_error(capsys, *argv: str) -> str:
    code, _, err = run_cli(capsys, *argv)
    assert code == 1 and err.count("\n") == 0, err
    assert err.startswith(f"sparseformer {argv[0]}: error: ")
    return err


def tiny_train(data: Path, out: Path, *extra: str) -> list[str]:
    """A `sparseformer train` command for the nano model on ``data``: batches of 4 images at
    32 px, the CPU recipe, no progress bars."""
    return ["train", "--model", NANO, "--data-dir", str(data), "--output", str(out),
            "--batch-size", "4", "--img-size", "32", "--quiet", "--recipe", "fashion-mnist-cpu",
            *extra]  # fmt: skip


def to_official(state: dict[str, torch.Tensor], fmt: str) -> dict[str, torch.Tensor]:
    """Our state dict in an official layout: the converter's tables read backwards."""
    top = {ours: theirs for theirs, ours in TOP_LEVEL[fmt].items()}
    unit = {ours: theirs for theirs, ours in UNIT[fmt].items()}
    transition = {ours: theirs for theirs, ours in TRANSITION.items()}
    index: dict[str, int] = {}  # "stages.S.units.U." or "stages.S." (transition) -> flat K
    for key in state:  # state-dict order is module order: stage by stage, transition first
        if key.startswith("stages."):
            parts = key.split(".")
            prefix = ".".join(parts[:4]) + "." if parts[2] == "units" else ".".join(parts[:2]) + "."
            index.setdefault(prefix, len(index))
    out = {}
    for key, value in state.items():
        if key in top:
            out[top[key]] = value
            continue
        prefix = next(p for p in sorted(index, key=len, reverse=True) if key.startswith(p))
        rest = key[len(prefix) :]
        table = unit if ".units." in prefix else transition
        ours = max((o for o in table if rest.startswith(o) or rest == o), key=len)
        out[f"layers.{index[prefix]}.{table[ours]}{rest[len(ours) :]}"] = value
    return out


def cut_jpeg(path: Path) -> Path:
    """A JPEG of noise at ``path`` with its body cut short: its header passes the folder scan,
    and it fails to decode."""
    noise = Image.fromarray(torch.randint(0, 256, (64, 64, 3), dtype=torch.uint8).numpy())
    noise.save(path, "JPEG")
    path.write_bytes(path.read_bytes()[:-400])
    return path


def cut_every_image(split: Path) -> None:
    """Replace every image under ``split`` with a cut-short JPEG of the same name."""
    for image in split.rglob("*.*"):
        image.unlink()
        cut_jpeg(image.with_suffix(".jpg"))


@pytest.fixture
def folder(tmp_path):
    return make_folder(tmp_path / "data", classes=("cat", "dog", "emu"), per_class=4)


@pytest.mark.parametrize("fmt", ["imagenet", "v2"])
def test_eval_accepts_official_checkpoints(tmp_path, folder, capsys, fmt):
    model = create_model(NANO, num_classes=3).eval()
    ours = model.state_dict()
    official = to_official(ours, fmt)
    converted, report = convert_state_dict(official)
    assert report.source_format == fmt and converted.keys() == ours.keys()  # inverse is exact
    torch.save(ours, tmp_path / "ours.pth")
    torch.save({"model": official, "epoch": 299}, tmp_path / f"{fmt}.pth")
    results = []
    for name in ("ours.pth", f"{fmt}.pth"):
        code, out, err = run_cli(capsys, "eval", "--model", NANO, "--checkpoint",
                                 str(tmp_path / name), "--data-dir", str(folder), "--img-size",
                                 "32", "--json", "--quiet")  # fmt: skip
        assert code == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert results[0]["images"] == 12
    for key in ("acc1", "loss"):
        assert results[1][key] == pytest.approx(results[0][key], rel=1e-6)
    assert results[0]["acc5"] is results[1]["acc5"] is None  # 3 classes: top-5 is always 100%


@pytest.mark.parametrize("classes", [3, 1000])  # the data's 3, or others: the model is named
def test_official_checkpoint_of_another_size_is_one_line(tmp_path, folder, capsys, classes):
    micro = create_model("sparseformer_v1_micro", num_classes=classes)
    torch.save({"model": to_official(micro.state_dict(), "imagenet")}, tmp_path / "m.pth")
    err = one_line_error(capsys, "eval", "--model", NANO, "--checkpoint", str(tmp_path / "m.pth"),
                         "--data-dir", str(folder))  # fmt: skip
    assert "does not fit this model" in err
    assert err.endswith("its weights are those of sparseformer_v1_micro: pass --model "
                        "sparseformer_v1_micro")  # fmt: skip


def test_checkpoint_with_other_classes_is_one_line(tmp_path, folder, capsys):
    torch.save({"model": create_model(NANO, num_classes=7).state_dict()}, tmp_path / "c.pth")
    err = one_line_error(capsys, "eval", "--model", NANO, "--checkpoint", str(tmp_path / "c.pth"),
                         "--data-dir", str(folder))  # fmt: skip
    assert "classifies 7 classes but the data has 3" in err


def test_unknown_model_lists_close_names(tmp_path, folder, capsys):
    for command in ("train", "eval"):
        extra = ["--output", str(tmp_path / "o")] if command == "train" else ["--checkpoint", "x"]
        err = one_line_error(capsys, command, "--model", "sparseformer_v1_mikro", "--data-dir",
                             str(folder), *extra)  # fmt: skip
        assert "unknown model 'sparseformer_v1_mikro'" in err
        assert "did you mean sparseformer_v1_micro" in err
    assert not (tmp_path / "o").exists()


def test_a_timm_name_timm_cannot_build_is_one_line(tmp_path, folder, capsys):
    """An unknown pretrained tag, and a hybrid ViT at a size its backbone cannot take, were
    tracebacks from deep in timm (a bare AssertionError for the second)."""
    where = ["--data-dir", str(folder), "--output", str(tmp_path / "o")]
    err = one_line_error(capsys, "train", "--model", "vit_tiny_patch16_224.bogus_tag", *where)
    assert "vit_tiny_patch16_224 has no pretrained tag 'bogus_tag' (timm's tags: augreg" in err
    err = one_line_error(capsys, "train", "--model", "vit_tiny_r_s16_p8_224", "--img-size", "40",
                         *where)  # fmt: skip
    assert "timm cannot build vit_tiny_r_s16_p8_224 for 40 px inputs" in err
    assert not (tmp_path / "o").exists()
    from sparseformer.weights.build import check_model_name

    assert check_model_name("coatnet_0_224.untrained") == "timm"  # a tag without weights


@pytest.mark.parametrize(
    "layout, expected",
    [("missing", "does not exist"), ("empty", "is empty"), ("empty_class", "have no images")],
)
def test_bad_data_dir_is_one_line(tmp_path, capsys, layout, expected):
    root = tmp_path / "d"
    if layout == "empty":
        root.mkdir()
    elif layout == "empty_class":
        make_folder(root)
        for p in (root / "train" / "dog").iterdir():
            p.unlink()
    err = one_line_error(capsys, "train", "--model", NANO, "--data-dir", str(root), "--output",
                         str(tmp_path / "o"))  # fmt: skip
    assert expected in err


def test_resuming_with_an_edited_recipe_file_names_its_changes(tmp_path, folder, capsys, caplog):
    from sparseformer.engine.recipe import load_recipe

    recipe = load_recipe("fashion-mnist-cpu").to_dict()
    del recipe["name"]  # named after its file, as a user's recipe usually is
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(recipe))
    argv = ["--model", NANO, "--data-dir", str(folder), "--output", str(tmp_path / "o"),
            "--recipe", str(path), "--batch-size", "4", "--img-size", "32", "--quiet"]  # fmt: skip
    assert run_cli(capsys, "train", *argv, "--epochs", "1")[0] == 0
    path.write_text(json.dumps({**recipe, "weight_decay": 0.5}))
    with caplog.at_level("WARNING"):
        assert run_cli(capsys, "train", *argv, "--epochs", "2", "--resume", "auto")[0] == 0
    assert "weight_decay (asked 0.5, the run's " in caplog.text


def test_an_interrupted_run_says_how_to_continue(tmp_path, folder, capsys, monkeypatch):
    import sparseformer.engine.trainer as trainer

    out = tmp_path / "o"

    def interrupt(*args, **kwargs):  # a stop during the second epoch: the first is saved
        out.mkdir(exist_ok=True)
        (out / "last.pt").write_bytes(b"epoch 1")
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "fit", interrupt)
    argv = ["--model", NANO, "--data-dir", str(folder), "--output", str(out)]
    code, _, err = run_cli(capsys, "train", *argv, "--recipe", "fashion-mnist-cpu")
    assert code == 130 and "interrupted; to continue" in err and "--resume auto" in err
    # starting over: --resume auto would continue the run that was to be replaced
    code, _, err = run_cli(capsys, "train", *argv, "--recipe", "fashion-mnist-cpu", "--overwrite")
    assert code == 130 and err.strip().endswith("interrupted")


def test_unreadable_images_are_skipped_and_reported(tmp_path, folder, capsys, caplog):
    (folder / "val" / "cat" / "broken.jpg").write_text("not an image")
    (folder / "train" / "dog" / "empty.png").write_bytes(b"")
    torch.save({"model": create_model(NANO, num_classes=3).state_dict()}, tmp_path / "c.pth")
    ckpt = str(tmp_path / "c.pth")
    code, out, err = run_cli(capsys, "eval", "--model", NANO, "--checkpoint", ckpt,
                             "--data-dir", str(folder), "--quiet")  # fmt: skip
    assert code == 0, err
    assert "12 images (1 unreadable file(s) skipped)" in out
    # a truncated JPEG passes the header check and fails to decode: left out, not replaced
    truncated = cut_jpeg(folder / "val" / "dog" / "truncated.jpg")
    code, out, err = run_cli(capsys, "eval", "--model", NANO, "--checkpoint", ckpt,
                             "--data-dir", str(folder), "--quiet", "--json")  # fmt: skip
    result = json.loads(out.strip().splitlines()[-1])
    counts = (result["images"], result["skipped_files"], result["left_out"])
    assert code == 0 and counts == (12, 1, 1), err  # as a run's skipped_files and val_left_out
    truncated.unlink()
    out_dir = tmp_path / "run"
    code, out, err = run_cli(capsys, "train", "--model", NANO, "--data-dir", str(folder),
                             "--output", str(out_dir), "--epochs", "1", "--batch-size", "4",
                             "--img-size", "32", "--quiet", "--recipe",
                             "fashion-mnist-cpu")  # fmt: skip
    assert code == 0, err
    assert "skipped 2 unreadable image file(s)" in out
    assert (out_dir / "last.pt").exists()
    # macOS resource forks (._name.jpg) are hidden files, not unreadable images
    (folder / "train" / "dog" / "._photo.jpg").write_bytes(b"\x00\x05\x16\x07")
    code, out, err = run_cli(capsys, "train", "--model", NANO, "--data-dir", str(folder),
                             "--output", str(out_dir), "--epochs", "1", "--batch-size", "4",
                             "--img-size", "32", "--quiet", "--recipe", "fashion-mnist-cpu",
                             "--overwrite")  # fmt: skip
    assert code == 0 and "skipped 2 unreadable image file(s)" in out, err
    # files that pass the scan but fail to decode: replaced in training, left out of the
    # validation scores, and both counted at the end (with data-loading workers too)
    for split in ("train", "val"):
        cut_jpeg(folder / split / "dog" / "cut.jpg")
    code, out, err = run_cli(capsys, "train", "--model", NANO, "--data-dir", str(folder),
                             "--output", str(out_dir), "--epochs", "1", "--batch-size", "4",
                             "--img-size", "32", "--quiet", "--recipe", "fashion-mnist-cpu",
                             "--overwrite", "--workers", "1")  # fmt: skip
    summary = json.loads((out_dir / "summary.json").read_text())
    assert code == 0 and summary["val_left_out"] == 1 and summary["skipped_files"] == 2, err
    assert summary["train_loads_replaced"] == 1 and summary["final"]["val_images"] == 12
    assert "1 training image load(s) failed to decode and were replaced" in out
    assert "1 validation image(s) failed to decode and were left out" in out
    # a val class whose every file is unreadable is not scored, as in training's validation
    # (eval refused it; removing the folder, as it advised, leaves a bare checkpoint's
    # outputs one class more than the folders, which eval refuses as well)
    for image in (folder / "val" / "emu").iterdir():
        image.write_text("junk")
    with caplog.at_level("WARNING", logger="sparseformer"):
        code, out, err = run_cli(capsys, "eval", "--model", NANO, "--checkpoint", ckpt,
                                 "--data-dir", str(folder), "--json")  # fmt: skip
    assert code == 0 and json.loads(out)["images"] == 8, err  # cat's and dog's, scored
    assert "class folder(s) emu have no readable images; those classes are not scored" in (
        caplog.text
    )
    for image in (folder / "train" / "emu").iterdir():
        image.write_text("junk")  # in training: a class it could not learn, an error
    err = one_line_error(capsys, "train", "--model", NANO, "--data-dir", str(folder),
                         "--output", str(tmp_path / "o2"))  # fmt: skip
    assert "emu" in err and "have no readable images" in err


def test_validation_files_that_all_fail_to_decode_score_nothing(tmp_path, folder, capsys):
    """Files that pass the scan and fail to decode: with none left, no 0% accuracy and no
    zero loss. Training goes on and says so (no best checkpoint); eval is one-line error."""
    cut_every_image(folder / "val")
    out_dir = tmp_path / "run"
    code, out, err = run_cli(capsys, "train", "--model", NANO, "--data-dir", str(folder),
                             "--output", str(out_dir), "--epochs", "1", "--batch-size", "4",
                             "--img-size", "32", "--quiet", "--recipe",
                             "fashion-mnist-cpu")  # fmt: skip
    assert code == 0, err
    assert "val nothing scored; no best" in out
    record = json.loads((out_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["val_images"] == 0
    assert record["val_loss"] is record["val_acc1"] is record["val_acc5"] is None
    assert (out_dir / "last.pt").exists() and not (out_dir / "best.pt").exists()
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["best_val_acc1"] is summary["best_epoch"] is None  # the epoch was 0
    err = one_line_error(capsys, "eval", "--checkpoint", str(out_dir / "last.pt"),
                         "--data-dir", str(folder), "--quiet")  # fmt: skip
    assert "none of the 12 images" in err and "could be decoded" in err


def test_an_error_in_a_data_loading_worker_is_one_line_and_the_program_exits(tmp_path, folder):
    """A worker's error comes back with the worker's traceback in its message, and the
    workers (which leave SIGTERM to the main process) kept Python's exit waiting forever."""
    import subprocess
    import sys

    cut_every_image(folder / "train")  # every training file fails to decode
    proc = subprocess.run(
        [sys.executable, "-m", "sparseformer", "train", "--model", NANO, "--data-dir",
         str(folder), "--output", str(tmp_path / "run"), "--epochs", "1", "--batch-size", "4",
         "--img-size", "32", "--quiet", "--workers", "1"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    said = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert proc.returncode == 1 and len(said) == 1, proc.stderr
    assert "could be decoded" in said[0] and "Traceback" not in proc.stderr


@pytest.mark.skipif(not hasattr(signal, "SIGCHLD"), reason="POSIX signals")
def test_ending_the_workers_outlasts_pytorchs_sigchld_handler():
    """A full disk ended a run with workers: killing the first fired PyTorch's SIGCHLD
    handler, which raised inside its join, and the workers left kept the exit waiting forever."""
    import multiprocessing
    import time

    from sparseformer.cli import _end_data_workers

    children = [multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,))
                for _ in range(3)]  # fmt: skip
    for child in children:
        child.start()

    def like_pytorchs(signum, frame):
        raise RuntimeError("DataLoader worker (pid 1) is killed by signal: Killed.")

    previous = signal.signal(signal.SIGCHLD, like_pytorchs)
    try:
        _end_data_workers()
        assert not any(child.is_alive() for child in children)
    finally:
        signal.signal(signal.SIGCHLD, previous)
        for child in children:
            child.kill()
            child.join()


def test_eval_says_its_scores_when_the_per_class_files_cannot_be_written(
    tmp_path, folder, capsys, monkeypatch
):
    """A full disk under --per-class ended eval with the write's error alone: the accuracy,
    computed already, was never said."""
    import errno

    import sparseformer.engine.per_class as per_class

    def full(report, where):
        raise OSError(errno.ENOSPC, "No space left on device", str(where))

    monkeypatch.setattr(per_class, "write_per_class", full)
    torch.save({"model": create_model(NANO, num_classes=3).state_dict()}, tmp_path / "c.pth")
    code, out, err = run_cli(capsys, "eval", "--model", NANO, "--checkpoint",
                             str(tmp_path / "c.pth"), "--data-dir", str(folder), "--quiet",
                             "--per-class", str(tmp_path / "pc"))  # fmt: skip
    assert code == 1 and "top-1" in out and "No space left on device" in err


def test_eval_checks_the_per_class_folder_before_evaluating(tmp_path, folder, capsys):
    (tmp_path / "afile").write_text("x")
    torch.save({"model": create_model(NANO, num_classes=3).state_dict()}, tmp_path / "c.pth")
    evaluated = []
    import sparseformer.cli.eval as eval_cli

    real = eval_cli._evaluate
    eval_cli._evaluate = lambda *a, **k: evaluated.append(1) or real(*a, **k)
    try:
        err = one_line_error(capsys, "eval", "--model", NANO, "--checkpoint",
                             str(tmp_path / "c.pth"), "--data-dir", str(folder),
                             "--per-class", str(tmp_path / "afile"))  # fmt: skip
    finally:
        eval_cli._evaluate = real
    assert "--per-class" in err and "is a file" in err and not evaluated


def test_predict_names_imagenet_classes_and_rejects_bad_files(tmp_path, capsys):
    torch.save(create_model(NANO).state_dict(), tmp_path / "in1k.pth")  # 1000 classes, bare
    img = tmp_path / "x.png"
    Image.new("RGBA", (40, 30), (200, 10, 10, 255)).save(img)
    code, out, err = run_cli(capsys, "predict", "--model", NANO, "--checkpoint",
                             str(tmp_path / "in1k.pth"), str(img), "--json")  # fmt: skip
    assert code == 0, err
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    names = {info.index_to_description(i) for i in range(1000)}
    preds = json.loads(out.strip())["predictions"]
    assert len(preds) == 5 and all(p["label"] in names for p in preds)
    err = one_line_error(capsys, "predict", "--model", NANO, "--checkpoint",
                         str(tmp_path / "in1k.pth"), str(tmp_path / "nope.png"))  # fmt: skip
    assert "does not exist" in err


def test_predict_with_a_headless_checkpoint_is_one_line(tmp_path, capsys):
    headless = create_model(NANO, num_classes=0)
    torch.save(headless.state_dict(), tmp_path / "features.pth")
    Image.new("RGB", (40, 40), "red").save(tmp_path / "red.png")
    err = one_line_error(capsys, "predict", "--model", NANO, "--checkpoint",
                         str(tmp_path / "features.pth"), str(tmp_path / "red.png"))  # fmt: skip
    assert "has no classifier here (its outputs are features)" in err


def test_fine_tuning_starts_from_official_weights(tmp_path, folder, capsys):
    source = create_model(NANO)  # 1000 classes, as released weights
    torch.save({"model": to_official(source.state_dict(), "imagenet")}, tmp_path / "in1k.pth")
    out = tmp_path / "ft"
    code, _, err = run_cli(capsys, "train", "--model", NANO, "--data-dir", str(folder),
                           "--checkpoint", str(tmp_path / "in1k.pth"), "--output", str(out),
                           "--epochs", "1", "--batch-size", "4", "--img-size", "32", "--quiet",
                           "--recipe", "fashion-mnist-cpu", "--set", "lr=0", "warmup_lr=0",
                           "min_lr=0")  # fmt: skip
    assert code == 0, err
    trained = torch.load(out / "last.pt", weights_only=True)["model"]
    assert trained["head.weight"].shape == (3, source.head.weight.shape[1])  # a new classifier
    for key, value in source.state_dict().items():
        if not key.startswith("head."):  # with lr 0 the loaded weights are kept as they are
            assert torch.equal(trained[key], value), key


def test_a_finished_run_is_never_overwritten_by_accident(tmp_path, folder, capsys, caplog):
    out = tmp_path / "run"
    fast = [
        "--model", NANO, "--data-dir", str(folder), "--output", str(out), "--epochs", "1",
        "--batch-size", "4", "--img-size", "32", "--quiet", "--recipe", "fashion-mnist-cpu",
    ]  # fmt: skip
    assert run_cli(capsys, "train", *fast)[0] == 0
    before = (out / "last.pt").read_bytes()
    err = one_line_error(capsys, "train", *fast)
    assert "already holds a run" in err and "--resume auto" in err and "--overwrite" in err
    assert (out / "last.pt").read_bytes() == before
    # a kill while the metrics line is written leaves it torn: resume skips it
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 2, "tra')
    with caplog.at_level("WARNING"):
        code, _, err = run_cli(
            capsys, "train", *fast, "--resume", "auto", "--epochs", "2", "--lr", "0.5"
        )
    assert code == 0, err
    assert "these changes are ignored: lr (asked 0.5, the run's " in caplog.text
    assert "batch_size" not in caplog.text  # given again, unchanged: not named
    caplog.clear()
    with caplog.at_level("WARNING"):  # the run's own settings again: nothing to warn about
        assert run_cli(capsys, "train", *fast, "--resume", "auto", "--epochs", "2")[0] == 0
    assert "ignored" not in caplog.text
    # the recipe typed again without the flags that changed it asks for nothing either
    typed_again = [a for a in fast if a not in ("--batch-size", "4", "--img-size", "32")]
    with caplog.at_level("WARNING"):
        assert run_cli(capsys, "train", *typed_again, "--resume", "auto", "--epochs", "2")[0] == 0
    assert "ignored" not in caplog.text
    with caplog.at_level("WARNING"):  # another recipe asks for all of its fields
        another = [a if a != "fashion-mnist-cpu" else "imagenet1k" for a in typed_again]
        assert run_cli(capsys, "train", *another, "--resume", "auto", "--epochs", "2")[0] == 0
    assert "these changes are ignored: " in caplog.text and "batch_size (asked" in caplog.text
    epochs = [
        json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()
    ]
    assert epochs == [1, 2]
    # resuming on data with other classes says so instead of failing in load_state_dict
    other = make_folder(tmp_path / "other", classes=("ant", "bee"), per_class=4)
    resume_other = [a if a != str(folder) else str(other) for a in fast]
    err = one_line_error(capsys, "train", *resume_other, "--resume", "auto", "--epochs", "3")
    assert "was trained on classes" in err
    # --epochs is the total: fewer than the run has is refused; as many touches nothing
    err = one_line_error(capsys, "train", *fast, "--resume", "auto", "--epochs", "1")
    assert "already has 2 epochs" in err
    listing = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    code, printed, _ = run_cli(capsys, "train", *fast, "--resume", "auto", "--epochs", "2")
    assert code == 0 and "nothing to do" in printed
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == listing
    err = one_line_error(capsys, "train", *fast, "--resume", "auto", "--overwrite")
    assert "give one of them" in err
    # resumed into another folder: the summary names only the files that folder holds
    moved = tmp_path / "moved"
    elsewhere = [a if a != str(out) else str(moved) for a in fast]
    code, printed, err = run_cli(
        capsys, "train", *elsewhere, "--resume", str(out / "last.pt"), "--epochs", "3"
    )
    assert code == 0, err
    # seconds, not "0.0 min"
    assert re.search(r"^done: 3 epochs in \d+(\.\d)? s of training;", printed, re.M)
    named = printed.split("checkpoints: ")[1].splitlines()[0].split(", ")
    assert named and all(Path(p).is_file() for p in named)
    summary = json.loads((moved / "summary.json").read_text())
    assert summary["best_checkpoint"] is None or Path(summary["best_checkpoint"]).is_file()
    # starting over with a setting that does not fit the data keeps the old run
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    big = [a if a != "4" else "4096" for a in fast]  # --batch-size 4096: more than the data
    err = one_line_error(capsys, "train", *big, "--overwrite")
    assert "fewer than one batch" in err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    # starting over: a stop in the first epoch leaves nothing of the old run to pass as its own
    code, _, err = run_cli(
        capsys, "train", *fast, "--overwrite", "--lr", "1e30", "--set", "clip_grad=null"
    )
    assert code == 1 and "no checkpoint" in err
    assert not (out / "last.pt").exists() and not (out / "best.pt").exists()
    # without --overwrite nothing is removed: a folder holding only a best.pt is a run too
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "best.pt").write_bytes(b"the user's weights")
    elsewhere = [a if a != str(out) else str(keep) for a in fast]
    err = one_line_error(capsys, "train", *elsewhere)
    assert "already holds a run (best.pt)" in err
    assert (keep / "best.pt").read_bytes() == b"the user's weights"
    # resuming another run's checkpoint there would overwrite it: refused as well
    err = one_line_error(
        capsys, "train", *elsewhere, "--resume", str(moved / "last.pt"), "--epochs", "4"
    )
    assert "already holds another run (best.pt)" in err and "--resume auto" in err
    assert (keep / "best.pt").read_bytes() == b"the user's weights"
    assert run_cli(capsys, "train", *resume_other, "--overwrite")[0] == 0


def test_a_resumed_run_keeps_its_own_seed(tmp_path, folder, capsys, caplog):
    """The seed draws the data order and the augmentations: a resumed run goes on with its
    own, and a different --seed is named as ignored."""
    out = tmp_path / "run"
    fast = tiny_train(folder, out)
    assert run_cli(capsys, *fast, "--epochs", "1", "--seed", "7")[0] == 0
    with caplog.at_level("WARNING"):
        assert run_cli(capsys, *fast, "--epochs", "2", "--resume", "auto")[0] == 0
    assert "seed" not in caplog.text  # but the longer schedule is said
    assert "schedule now spans 2 epochs where the run's spanned 1: from epoch 2" in caplog.text
    assert torch.load(out / "last.pt", weights_only=True)["seed"] == 7
    with caplog.at_level("WARNING"):
        code = run_cli(capsys, *fast, "--epochs", "3", "--resume", "auto", "--seed", "3")
    assert code[0] == 0 and "own seed 7, so --seed 3 is ignored" in caplog.text
    assert torch.load(out / "last.pt", weights_only=True)["seed"] == 7
    # a job script's --checkpoint, which started the run, is said to be unused on resuming
    start = tmp_path / "start.pt"
    torch.save(torch.load(out / "last.pt", weights_only=True)["model"], start)
    caplog.clear()
    with caplog.at_level("WARNING"):
        argv = [*fast, "--epochs", "4", "--resume", "auto", "--checkpoint", str(start)]
        assert run_cli(capsys, *argv)[0] == 0
    assert "start.pt is not used (it only starts a run)" in caplog.text
    # the same job script without --model: its first start takes the model the file names
    # (it asked for --model); start.pt is a bare state dict, so a run's checkpoint serves
    fresh = tmp_path / "fresh"
    argv = ["train", *fast[3:], "--epochs", "1", "--resume", "auto"]
    argv[argv.index("--output") + 1] = str(fresh)
    assert run_cli(capsys, *argv, "--checkpoint", str(out / "best.pt"))[0] == 0
    assert (fresh / "last.pt").is_file()
    # a broken last.pt: the best.pt beside it is offered
    (out / "last.pt").unlink()
    (out / "last.pt").write_bytes(b"PK\x03\x04 cut short")
    err = one_line_error(capsys, *fast, "--epochs", "5", "--resume", "auto")
    assert f"--resume {out / 'best.pt'} continues from the run's best epoch instead" in err
    # a readable last.pt of another model: its best.pt is of that model too, not offered
    from sparseformer.engine.resume import ResumeError, read_resume_checkpoint

    (out / "last.pt").unlink()
    (out / "last.pt").write_bytes((out / "best.pt").read_bytes())
    with pytest.raises(ResumeError, match="is a checkpoint of") as caught:
        read_resume_checkpoint(out / "last.pt", "sparseformer_v1_micro")
    assert "best epoch" not in str(caught.value)


def test_an_image_run_records_its_recipes_interpolation(tmp_path, folder, capsys):
    """Clips are resized bilinearly whatever the recipe says; images as the recipe says."""
    out = tmp_path / "run"
    argv = tiny_train(folder, out, "--epochs", "1", "--set", "interpolation=lanczos")
    assert run_cli(capsys, *argv)[0] == 0
    saved = torch.load(out / "last.pt", weights_only=True)
    assert saved["preprocessing"]["interpolation"] == "lanczos"


def test_bad_numbers_and_predict_paths_are_one_line(tmp_path, folder, capsys):
    for flag, value in (("--batch-size", "0"), ("--workers", "-1"), ("--limit-val", "0")):
        with pytest.raises(SystemExit):  # argparse: usage and the reason, exit code 2
            main(["train", "--model", NANO, "--data-dir", str(folder), "--output",
                  str(tmp_path / "o"), flag, value])  # fmt: skip
        assert "must be at least" in capsys.readouterr().err
    # demo took 0 as "not given" and started the full run; --img-size had no upper bound
    # (100,000 px: killed for memory in viz, a MemoryError deep in PIL in eval and train)
    for argv, said in (
        (["demo", "--epochs", "0"], "sparseformer demo: error: argument --epochs: must be at"),
        (["demo", "--limit-train", "-1"], "sparseformer demo: error: argument --limit-train"),
        (["train", "--model", NANO, "--output", "o", "--img-size", "100000"], "give 4 to 16384"),
        (["eval", "--model", NANO, "--img-size", "2"], "--img-size: give 4 to 16384 pixels, got 2"),
        (["viz", "--model", NANO, "x.png", "--img-size", "99999"], "give 4 to 16384 pixels"),
        (["export", "--model", NANO, "--out", "m.onnx", "--img-size", "20000"], "give 4 to"),
    ):
        with pytest.raises(SystemExit):
            main(argv)
        assert said in capsys.readouterr().err
    torch.save(create_model(NANO, num_classes=3).state_dict(), tmp_path / "c.pth")
    ckpt = str(tmp_path / "c.pth")
    good = folder / "val" / "cat" / "0.jpg"
    err = one_line_error(capsys, "predict", "--model", NANO, "--checkpoint", ckpt, str(good),
                         str(tmp_path / "nope.png"))  # fmt: skip
    assert "nope.png' does not exist" in err  # before any image is classified
    (folder / "val" / "cat" / "broken.jpg").write_text("not an image")
    (folder / "val" / "cat" / "gone.jpg").symlink_to(tmp_path / "moved-away.jpg")
    code, out, err = run_cli(capsys, "predict", "--model", NANO, "--checkpoint", ckpt,
                             str(folder / "val" / "cat"), "--json")  # fmt: skip
    assert code == 1 and "broken.jpg: cannot read this image" in err  # 1: not all were used
    assert "gone.jpg: a broken symbolic link" in err
    lines = [json.loads(line) for line in out.splitlines()]  # stdout stays JSON lines
    assert len(lines) == 6 and sum(len(r.get("predictions", [])) == 3 for r in lines) == 4
    failed = [r for r in lines if "error" in r]  # every input has its record
    assert sorted(Path(r["image"]).name for r in failed) == ["broken.jpg", "gone.jpg"]


def test_eval_matches_class_folders_by_name(tmp_path, folder, capsys):
    import shutil

    out = tmp_path / "run"
    code, _, err = run_cli(capsys, *tiny_train(folder, out, "--epochs", "1"))
    assert code == 0, err
    ckpt = str(out / "last.pt")

    def eval_json(data) -> dict:
        code, stdout, err = run_cli(capsys, "eval", "--model", NANO, "--checkpoint", ckpt,
                                    "--data-dir", str(data), "--json", "--quiet")  # fmt: skip
        assert code == 0, err
        return json.loads(stdout.strip().splitlines()[-1])

    full = eval_json(folder)
    # class names the checkpoint does not know are refused, not matched by position
    mirrored = tmp_path / "renamed"
    for name, new in (("cat", "z_cat"), ("dog", "y_dog"), ("emu", "x_emu")):
        shutil.copytree(folder / "val" / name, mirrored / "val" / new)
    code, _, err = run_cli(capsys, "eval", "--model", NANO, "--checkpoint", ckpt,
                           "--data-dir", str(mirrored), "--quiet")  # fmt: skip
    assert code == 1 and "not among the checkpoint's classes" in err
    # a subset of the classes in another order is scored by name: the same hits as in full
    subset = tmp_path / "subset"
    shutil.copytree(folder / "val" / "emu", subset / "val" / "emu")
    shutil.copytree(folder / "val" / "dog", subset / "val" / "dog")
    only_dog_emu = eval_json(subset)
    without_cat = tmp_path / "without_cat"
    shutil.copytree(folder / "val" / "cat", without_cat / "val" / "cat")
    only_cat = eval_json(without_cat)
    hits = lambda r: round(r["acc1"] * r["images"] / 100)  # noqa: E731
    assert (only_dog_emu["images"], only_cat["images"]) == (8, 4)
    assert hits(only_dog_emu) + hits(only_cat) == hits(full)


def test_class_names_that_differ_in_unicode_form_or_are_not_utf8(tmp_path, capsys, monkeypatch):
    """A folder name copied from macOS (NFD) beside one typed elsewhere (NFC) looks the same:
    the error says why they differ. A name that is not UTF-8 (a Windows zip) trains, is
    plotted and drawn with a replacement character, and printed as the disk holds it."""
    import io
    import os
    import unicodedata

    data = make_folder(tmp_path / "data", classes=("cat", "caf\u00e9"), per_class=4)
    nfd = unicodedata.normalize("NFD", "caf\u00e9")
    os.rename(data / "val" / "caf\u00e9", data / "val" / nfd)
    err = one_line_error(capsys, "train", "--model", NANO, "--data-dir", str(data),
                         "--output", str(tmp_path / "r"), "--epochs", "1")  # fmt: skip
    assert "only in Unicode normalisation" in err
    os.rename(data / "val" / nfd, data / "val" / "caf\u00e9")
    for split in ("train", "val"):  # b"pl\xe9in": Latin-1 bytes
        os.rename(os.fsencode(data / split / "caf\u00e9"), os.fsencode(data / split) + b"/pl\xe9in")
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, *tiny_train(data, out, "--epochs", "1"))
    assert code == 0, err
    code, _, err = run_cli(capsys, "eval", "--checkpoint", str(out / "last.pt"), "--data-dir",
                           str(data), "--per-class", str(tmp_path / "pc"), "--quiet")  # fmt: skip
    assert code == 0 and (tmp_path / "pc" / "confusion.png").exists(), err
    terminal = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")  # errors="strict", as a tty's
    monkeypatch.setattr("sys.stdout", terminal)
    image = next((data / "val").glob("pl*/*"))
    code = main(["viz", "--checkpoint", str(out / "last.pt"), str(image), "--out",
                 str(tmp_path / "viz")])  # fmt: skip
    terminal.flush()
    assert code == 0 and list((tmp_path / "viz").glob("*.png"))
    assert b"/pl\xe9in/" in terminal.buffer.getvalue()  # the path as on disk


def test_a_warm_up_longer_than_the_run_and_too_many_workers_are_named(
    tmp_path, folder, capsys, caplog
):
    argv = ["train", "--model", NANO, "--data-dir", str(folder), "--output", str(tmp_path / "r"),
            "--epochs", "1", "--batch-size", "4", "--img-size", "32", "--quiet",
            "--recipe", "fashion-mnist-cpu", "--warmup-epochs", "3",
            "--workers", "512"]  # fmt: skip
    with caplog.at_level("INFO"):
        code, _, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert "the warm-up (3 epochs) is as long as the run (1 epoch)" in caplog.text
    assert "512 data-loading processes (the recipe's num_workers, or --workers)" in caplog.text


def test_eval_of_a_fixed_size_timm_model_at_another_size_is_one_line(tmp_path, folder, capsys):
    out = tmp_path / "vit"
    code, _, err = run_cli(capsys, "train", "--model", "vit_tiny_patch16_224", "--data-dir",
                           str(folder), "--output", str(out), "--epochs", "1", "--batch-size",
                           "4", "--img-size", "32", "--quiet", "--recipe",
                           "fashion-mnist-cpu")  # fmt: skip
    assert code == 0, err
    evaluate = ["eval", "--model", "vit_tiny_patch16_224", "--checkpoint", str(out / "last.pt"),
                "--data-dir", str(folder), "--quiet"]  # fmt: skip
    assert run_cli(capsys, *evaluate)[0] == 0
    err = one_line_error(capsys, *evaluate, "--img-size", "64")
    assert "was trained at 32px and cannot take 64px inputs" in err


def test_resume_auto_falls_back_to_best_and_repairs_a_missing_summary(tmp_path, folder, capsys):
    out = tmp_path / "run"
    fast = ["train", "--model", NANO, "--data-dir", str(folder), "--output", str(out),
            "--epochs", "1", "--batch-size", "4", "--img-size", "32", "--quiet",
            "--recipe", "fashion-mnist-cpu"]  # fmt: skip
    assert run_cli(capsys, *fast)[0] == 0
    # a kill between best.pt and last.pt (written in that order), then one before the summary
    (out / "last.pt").unlink()
    (out / "summary.json").unlink()
    code, printed, err = run_cli(capsys, *fast, "--resume", "auto")
    assert code == 0 and "nothing to do" in printed, err
    assert json.loads((out / "summary.json").read_text())["epochs"] == 1
    # clip flags on image data are a mistake in eval as in train
    err = one_line_error(capsys, "eval", "--model", NANO, "--checkpoint", str(out / "best.pt"),
                         "--data-dir", str(folder), "--clips", "3")  # fmt: skip
    assert "--clips applies to videos only" in err


def test_resume_on_other_data_keeps_the_schedule_in_epochs(tmp_path, folder, capsys, caplog):
    out = tmp_path / "run"
    fast = ["train", "--model", NANO, "--data-dir", str(folder), "--output", str(out),
            "--batch-size", "4", "--img-size", "32", "--quiet",
            "--recipe", "fashion-mnist-cpu"]  # fmt: skip
    assert run_cli(capsys, *fast, "--epochs", "1", "--limit-train", "8")[0] == 0
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    # all 12 images now: more steps per epoch (as with fewer processes under torchrun)
    with caplog.at_level("WARNING"):
        code, _, err = run_cli(capsys, *fast, "--epochs", "2", "--resume", "auto")
    assert code == 0, err
    second = json.loads((out / "metrics.jsonl").read_text().splitlines()[1])
    # 8 then 12 images in batches of 4: epoch 2 ends at step 2 x 3 of the new schedule (it
    # ended at 2 + 3, and the cosine never reached its end, before the schedule kept epochs)
    assert (first["step"], second["step"]) == (2, 6)
    assert "steps per epoch" in caplog.text + err and "will not match" in caplog.text + err
    said = "saved with 1 process(es) and 2 steps per epoch, resumed with 1 and 3 steps per epoch"
    assert said in caplog.text and "continues from epoch 2 on the new steps" in caplog.text


def test_odd_batch_with_mixup_is_named_before_the_data_is_read(tmp_path, capsys):
    err = one_line_error(capsys, "train", "--model", NANO, "--data-dir", str(tmp_path / "none"),
                         "--batch-size", "3", "--recipe", "imagenet1k",
                         "--output", str(tmp_path / "r"))  # fmt: skip
    assert "batch_size must be even with Mixup or CutMix on" in err and "mixup=0" in err


def test_a_killed_loader_worker_is_one_line_with_what_to_do(tmp_path, capsys, monkeypatch):
    import sparseformer.cli.train as train_cli

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "last.pt").write_bytes(b"")  # a run with a checkpoint to continue

    def worker_killed(args):  # what the DataLoader raises when the OOM killer takes a worker
        raise RuntimeError("DataLoader worker (pid 4242) is killed by signal: Killed. ")

    monkeypatch.setattr(train_cli, "run", worker_killed)
    err = one_line_error(capsys, "train", "--model", NANO, "--data-dir", str(tmp_path),
                         "--output", str(tmp_path / "run"))  # fmt: skip
    assert "a data-loading worker died (DataLoader worker (pid 4242)" in err
    assert "lower --workers or --batch-size" in err and "--resume auto" in err

    def a_bug(args):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(train_cli, "run", a_bug)  # any other RuntimeError keeps its traceback
    with pytest.raises(RuntimeError, match="mat1"):
        main(["train", "--model", NANO, "--data-dir", str(tmp_path), "--output", str(tmp_path)])


def test_predict_on_a_folder_names_what_it_leaves_out(tmp_path, capsys, caplog):
    ckpt = tmp_path / "in1k.pth"
    torch.save(create_model(NANO).state_dict(), ckpt)
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / "clip.mp4").write_bytes(b"not decoded: the extension decides")
    err = one_line_error(capsys, "predict", "--model", NANO, "--checkpoint", str(ckpt),
                         str(videos))  # fmt: skip
    assert "holds no image files" in err and "it holds videos: use a video model" in err
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(mixed / "x.png")
    (mixed / "notes.txt").write_text("a note")
    with caplog.at_level("WARNING"):
        code, out, err = run_cli(capsys, "predict", "--model", NANO, "--checkpoint", str(ckpt),
                                 str(mixed))  # fmt: skip
    assert code == 0 and "x.png" in out, err
    assert "1 file(s) left out as not image files by their extension (.txt 1" in caplog.text


def test_a_run_resumes_as_the_model_it_names(tmp_path, folder, capsys):
    out = tmp_path / "run"
    assert main(tiny_train(folder, out, "--epochs", "1")) == 0
    resume = tiny_train(folder, out, "--epochs", "2", "--resume", "auto")
    del resume[1:3]  # no --model: the run names it
    assert main(resume) == 0
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 2
    fresh = [*resume[:-1], "auto"]
    fresh[fresh.index("--output") + 1] = str(tmp_path / "new")
    err = one_line_error(capsys, *fresh)
    assert "holds no run to resume yet; pass --model NAME to start one" in err
    err = one_line_error(capsys, *resume[:-1], "autp")  # a typo for auto
    assert "'autp' does not exist" in err
    cut = (out / "last.pt").read_bytes()[:5000]
    (out / "last.pt").unlink()  # (a hard link of best.pt: that stays whole)
    (out / "last.pt").write_bytes(cut)  # cut short
    err = one_line_error(capsys, *resume)
    assert "continues from the run's best epoch instead" in err  # the way, as with --model


def test_fp16_on_a_cpu_is_refused_before_the_data_is_read(tmp_path, folder, capsys):
    code, out, err = run_cli(capsys, *tiny_train(folder, tmp_path / "run", "--precision", "fp16",
                                                 "--device", "cpu"))  # fmt: skip
    assert code == 1 and "fp16 needs a CUDA GPU; use bf16 or fp32 on CPU" in err
    assert "training" not in out and not (tmp_path / "run").exists()


def test_a_run_without_a_progress_bar_logs_its_progress(tmp_path, folder, monkeypatch, caplog):
    from sparseformer.engine import step_saves

    monkeypatch.setattr(step_saves, "REPORT_SECONDS", 0.0)  # a line at every step, for the test
    with caplog.at_level(logging.INFO, logger="sparseformer.engine.epoch"):
        assert main(tiny_train(folder, tmp_path / "run", "--epochs", "1")) == 0  # --quiet
    lines = [r.getMessage() for r in caplog.records if "min left in the epoch" in r.getMessage()]
    assert lines and lines[0].startswith("epoch 1, step 1 of 3: train loss ")


def test_a_run_folder_inside_the_datas_splits_is_refused(tmp_path, folder, capsys):
    """A run in DIR/train trained once, then its own files made a class 'run' of the data: it
    could not be resumed, and every later run on the data had one class more."""
    from sparseformer.data import DataSource

    source = DataSource(data_dir=folder)
    assert source.split_holding(folder / "train" / "run") == folder / "train"
    assert source.split_holding(folder / "val") == folder / "val"
    assert source.split_holding(folder / "runs" / "a") is None  # beside the splits: fine
    assert source.split_holding(tmp_path / "trainer") is None
    inside = folder / "train" / "run"
    argv = ["--data-dir", str(folder), "--img-size", "32", "--epochs", "1"]
    commands = (
        ["train", "--model", "sparseformer_v1_nano"],
        ["bootstrap", "--teacher", "deit_tiny_patch16_224", "--random-teacher"],
    )
    for command in commands:
        assert main([*command, *argv, "--output", str(inside)]) == 1
        err = capsys.readouterr().err
        assert f"is inside the data's {str(folder / 'train')!r} folder" in err, err
        assert not inside.exists()


def test_resuming_without_data_names_the_runs_data(tmp_path, folder, capsys):
    run = tmp_path / "run"
    argv = ["train", "--model", "sparseformer_v1_nano", "--img-size", "32", "--output", str(run)]
    assert main([*argv, "--data-dir", str(folder), "--epochs", "1", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["train", "--output", str(run), "--resume", "auto", "--epochs", "2"]) == 1
    assert f"the run trained on {folder} (--data-dir {folder})" in capsys.readouterr().err
