"""Options that would fail late or silently are checked up front: devices, output paths,
augmentation policies, viz inputs; and what a checkpoint says about itself survives `convert`
and `export`."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from sparseformer import create_model
from sparseformer.cli import main
from sparseformer.engine.device import pick_device
from sparseformer.weights.checkpoint import read_checkpoint

from .test_data import make_folder
from .test_train_errors import NANO, one_line_error, run_cli


@pytest.fixture
def folder(tmp_path):
    return make_folder(tmp_path / "data", classes=("cat", "dog", "emu"), per_class=4)


def test_device_names_are_checked_before_any_work():
    assert pick_device("cpu") == "cpu"
    assert pick_device("cpu:0") == "cpu"  # torch refuses "cpu:0" with an explicit index later
    assert pick_device("auto") in ("cpu", "cuda")
    with pytest.raises(ValueError, match="unknown --device 'gpu'; use auto, cpu, cuda or cuda:N"):
        pick_device("gpu")
    with pytest.raises(ValueError, match="--device mps is not supported"):
        pick_device("mps")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        with pytest.raises(ValueError, match="no CUDA GPU is visible; use --device cpu"):
            pick_device("cuda:0")
    else:  # the index is kept, not dropped to GPU 0
        assert pick_device(f"cuda:{count - 1}") == f"cuda:{count - 1}"
        with pytest.raises(ValueError, match=f"{count} CUDA GPU"):
            pick_device(f"cuda:{count}")


def test_a_bad_device_is_one_line_in_every_command(tmp_path, folder, capsys):
    image = next((folder / "val" / "cat").iterdir())
    ckpt = str(_training_checkpoint(tmp_path / "best.pt"))
    for argv in (
        ["train", "--model", NANO, "--data-dir", str(folder), "--output", str(tmp_path / "r")],
        ["eval", "--model", NANO, "--checkpoint", ckpt, "--data-dir", str(folder)],
        ["predict", "--model", NANO, "--checkpoint", ckpt, str(image)],
        ["viz", "--model", NANO, "--out", str(tmp_path / "v"), str(image)],
    ):
        err = one_line_error(capsys, *argv, "--device", "gpu")
        assert "unknown --device 'gpu'" in err, argv
    assert not (tmp_path / "r").exists()  # refused before the run folder was made


def test_output_paths_that_cannot_be_written_fail_before_the_work(tmp_path, folder, capsys):
    blocker = tmp_path / "file.jpg"
    blocker.write_text("a file where a folder would have to be")
    image = next((folder / "val" / "cat").iterdir())
    err = one_line_error(capsys, "bench", "--models", NANO, "--img-size", "32",
                         "--json", str(blocker / "o.json"))  # fmt: skip
    assert "--json" in err and "is a file, not a folder" in err
    err = one_line_error(capsys, "viz", "--model", NANO, "--out", str(blocker), str(image))
    assert "--out" in err and "is a file; give a folder" in err
    err = one_line_error(capsys, "export", "--model", NANO, "--out", str(tmp_path))
    assert "is a folder; give a file path" in err
    err = one_line_error(capsys, "train", "--model", NANO, "--data-dir", str(folder),
                         "--output", str(blocker / "run"))  # fmt: skip
    assert "--output" in err and "is a file, not a folder" in err


def test_viz_draws_a_folders_images_and_names_models_without_rois(tmp_path, folder, capsys):
    # a folder was refused ("viz draws single files, not folders"), where predict takes one
    argv = ["viz", "--model", NANO, "--out", str(tmp_path / "v"), "--no-gif"]
    assert main([*argv, str(folder / "val" / "cat")]) == 0
    drawn = sorted(p.name for p in (tmp_path / "v").glob("*_rois.png"))
    assert drawn == sorted(f"{p.stem}_rois.png" for p in (folder / "val" / "cat").iterdir())
    capsys.readouterr()
    (tmp_path / "empty").mkdir()
    err = one_line_error(capsys, *argv, str(tmp_path / "empty"))
    assert "holds no image files" in err
    ckpt = tmp_path / "resnet.pt"
    torch.save({"model": {}, "model_name": "resnet18", "num_classes": 3}, ckpt)
    image = next((folder / "val" / "cat").iterdir())
    err = one_line_error(capsys, "viz", "--checkpoint", str(ckpt), "--out", str(tmp_path / "v"),
                         str(image))  # fmt: skip
    assert "'resnet18', which has no RoIs to draw" in err


def test_a_policy_section_timm_would_skip_is_refused(tmp_path, folder, capsys):
    err = one_line_error(capsys, "train", "--model", NANO, "--data-dir", str(folder),
                         "--output", str(tmp_path / "r"), "--set",
                         "auto_augment=rand-zz-m9")  # fmt: skip
    assert "section 'zz' has no value" in err
    assert not (tmp_path / "r").exists()


def test_unknown_model_suggestions_are_not_repeated(capsys):
    err = one_line_error(capsys, "train", "--model", "sparseformer_v1_mirco", "--dataset",
                         "fashion-mnist", "--output", "unused")  # fmt: skip
    names = err.split("did you mean ")[1].split("?")[0].split(", ")
    assert "sparseformer_v1_micro" in names and len(names) == len(set(names))


def _training_checkpoint(path, img_size=40):
    """What `sparseformer train` writes, reduced to what describes the run."""
    torch.manual_seed(0)
    torch.save(
        {
            "model": create_model(NANO, num_classes=3).state_dict(),
            "model_name": NANO,
            "num_classes": 3,
            "class_names": ["cat", "dog", "emu"],
            "preprocessing": {
                "img_size": img_size,
                "mean": [0.5] * 3,
                "std": [0.25] * 3,
                "crop_pct": 1.0,
                "interpolation": "bilinear",
            },  # fmt: skip
            "epoch": 2,
        },
        path,
    )
    return path


def test_convert_keeps_what_a_training_checkpoint_says_about_itself(tmp_path, folder, capsys):
    pt = _training_checkpoint(tmp_path / "best.pt")
    out = tmp_path / "model.safetensors"
    code, _, err = run_cli(capsys, "convert", str(pt), str(out))
    assert code == 0, err
    back = read_checkpoint(out)
    assert back.class_names == ("cat", "dog", "emu") and back.model_name == NANO
    assert back.img_size == 40
    original = torch.load(pt, weights_only=True)["model"]
    assert back.state_dict.keys() == original.keys()
    assert all(torch.equal(back.state_dict[k], v) for k, v in original.items())
    image = str(next((folder / "val" / "dog").iterdir()))
    results = []
    for ckpt in (pt, out):  # the same names and preprocessing, so the same answer
        code, printed, err = run_cli(capsys, "predict", "--model", NANO, "--checkpoint",
                                     str(ckpt), "--json", image)  # fmt: skip
        assert code == 0, err
        results.append(json.loads(printed.strip().splitlines()[-1]))
    assert results[0] == {**results[1], "image": results[0]["image"]}
    assert results[0]["predictions"][0]["label"] in ("cat", "dog", "emu")


def test_export_takes_the_input_size_a_checkpoint_stores(tmp_path, capsys):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import onnx

    pt = _training_checkpoint(tmp_path / "best.pt", img_size=40)
    out = tmp_path / "m.onnx"
    code, printed, err = run_cli(capsys, "export", "--model", NANO, "--checkpoint", str(pt),
                                 "--out", str(out), "--check-batch-sizes", "1")  # fmt: skip
    assert code == 0, err
    dims = onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim
    assert dims[1].dim_value == 3 and not dims[2].dim_value  # any size, checked at 40 + 16
    assert "56 x 32: max" in printed


def test_exif_orientation_is_applied_wherever_images_are_read(tmp_path):
    from sparseformer.data.images import open_rgb
    from sparseformer.viz.inputs import load_image

    pixels = torch.zeros(20, 60, 3, dtype=torch.uint8)
    pixels[:, :10] = 255  # a white band on the left of a wide, upright picture
    upright = Image.fromarray(pixels.numpy())
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what a sideways camera stores
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view"
    path = tmp_path / "phone.jpg"
    stored.save(path, "JPEG", exif=exif, quality=95)
    for img in (open_rgb(path), load_image(path)):
        assert img.size == (60, 20)
        band = np.asarray(img)[:, :, 0].mean(axis=0)  # column means: white on the left only
        assert band[:8].min() > 200 and band[12:].max() < 50
    plain = tmp_path / "plain.png"
    stored.save(plain)  # no tag: as stored
    assert open_rgb(plain).size == (20, 60)


def test_train_runs_on_an_indexed_device(tmp_path, folder, capsys, monkeypatch):
    # "cuda:N" must reach the trainer with its index; on a machine without GPUs the same code
    # path is taken by the one indexed device it has, spelled as torch spells CUDA's
    from sparseformer.engine import device as session

    monkeypatch.setattr(session, "pick_device", lambda requested, **_: "cpu:0")
    code, _, err = run_cli(capsys, "train", "--model", NANO, "--data-dir", str(folder),
                           "--output", str(tmp_path / "r"), "--epochs", "1", "--batch-size",
                           "4", "--img-size", "32", "--quiet", "--recipe", "fashion-mnist-cpu",
                           "--device", "cuda:0")  # fmt: skip
    assert code == 0, err
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets them
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(session, "pick_device", lambda requested, **_: "cuda:1")
    err = one_line_error(capsys, "train", "--model", NANO, "--data-dir", str(folder),
                         "--output", str(tmp_path / "r2"), "--device", "cuda:1")  # fmt: skip
    assert "under torchrun" in err and "CUDA_VISIBLE_DEVICES" in err


def test_a_closed_stdout_pipe_ends_quietly_but_other_broken_pipes_are_errors(capsys, monkeypatch):
    import sparseformer.cli as cli
    import sparseformer.cli.models as models_cli

    def broken(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(models_cli, "run", broken)  # registered afresh by main()
    monkeypatch.setattr(cli, "_stdout_closed", lambda: False)
    assert cli.main(["models"]) == 1
    assert "error: [Errno 32] Broken pipe" in capsys.readouterr().err
    monkeypatch.setattr(cli, "_stdout_closed", lambda: True)
    assert cli.main(["models"]) == 1
    assert capsys.readouterr().err == ""


def test_a_pipe_whose_reader_left_is_told_from_one_that_is_open(monkeypatch):
    """`sparseformer predict --json | head -5`: the failed write drops its buffer, so the
    flush that follows passes; the pipe itself says that its reader has gone."""
    import sparseformer.cli as cli

    for reader_left in (False, True):
        r, w = os.pipe()
        stream = open(w, "w", buffering=1 << 16)
        monkeypatch.setattr(sys, "stdout", stream)
        if reader_left:
            os.close(r)
            with pytest.raises(BrokenPipeError):
                stream.write("x" * (1 << 17))  # more than the pipe and the buffer hold
        assert cli._stdout_closed() is reader_left
        if not reader_left:
            os.close(r)
        monkeypatch.undo()
        stream.close()


def test_a_single_process_command_under_torchrun_is_one_line_from_rank_0(monkeypatch, capsys):
    """eval, predict, ... run in one process: under torchrun each process would print its
    own results (eval --json once per rank)."""
    from sparseformer.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, said in (("0", 1), ("1", 0)):
        monkeypatch.setenv("RANK", rank)
        assert main(["models"]) == 1
        err = capsys.readouterr().err.splitlines()
        assert len(err) == said and all("run it without torchrun" in line for line in err)


def test_launcher_variables_that_are_not_numbers_are_no_launch(monkeypatch, capsys):
    from sparseformer.cli import main
    from sparseformer.engine.distributed import launched_rank

    monkeypatch.setenv("RANK", "")
    monkeypatch.setenv("WORLD_SIZE", "x")
    assert launched_rank() == (0, 1)
    assert main(["models", "sparseformer_v1_nano"]) == 0
    monkeypatch.delenv("RANK")
    monkeypatch.setenv("WORLD_SIZE", "8")  # without RANK: not torchrun's
    assert launched_rank() == (0, 1)


def test_command_help_shows_plain_text_not_rest():
    from sparseformer.cli import COMMANDS, build_parser

    parser = build_parser()
    for name in COMMANDS:
        text = parser._subparsers._group_actions[0].choices[name].format_help()
        assert "``" not in text and ":func:" not in text and ":class:" not in text, name


def test_only_commands_that_take_videos_list_the_clip_flags():
    from sparseformer.cli import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices
    assert "--frames" in commands["train"].format_help()
    assert "--frames" in commands["eval"].format_help()
    assert "--frames" not in commands["bootstrap"].format_help()  # its teachers are image ViTs


def test_counts_and_lists_in_messages_read_as_written():
    from sparseformer.cli.common import nothing_to_do
    from sparseformer.data.scan import first_names

    assert "already has 1 epoch (give" in nothing_to_do(1)
    assert "the run in r/last.pt already has 3 epochs" in nothing_to_do(3, "r/last.pt")
    assert first_names(["a", "b"]) == "'a', 'b'"  # complete: no "..."
    assert first_names("abcdef", 3, quote=False) == "a, b, c, ..."
    from sparseformer.cli.common import epochs_and_time
    from sparseformer.data.scan import counted  # the run's first line said "1 epoch(s)"

    assert epochs_and_time(1, 0.43) == "1 epoch in 0.4 s"  # was "in 0 s"
    assert epochs_and_time(2, 12.4) == "2 epochs in 12 s"

    assert [counted(1, "class"), counted(2, "class"), counted(4, "process")] == [
        "1 class", "2 classes", "4 processes"]  # fmt: skip


def test_a_process_of_the_run_gone_is_one_line(monkeypatch, capsys, tmp_path):
    from sparseformer.cli import main
    from sparseformer.cli import models as models_cli

    def lost(args):  # what gloo raises in a collective when a peer has died
        raise RuntimeError(
            "[gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:42184."
        )

    monkeypatch.setattr(models_cli, "run", lost)
    with pytest.raises(RuntimeError, match="Connection closed"):  # no process group: traced
        main(["models"])
    # torchrun's processes, their group destroyed by the command on its way out (the error
    # had been traced when a rank died: the check asked the group, already gone)
    from sparseformer.cli import train as train_cli

    monkeypatch.setattr(train_cli, "run", lost)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert not torch.distributed.is_initialized()
    argv = ["--model", "sparseformer_v1_nano", "--dataset", "fashion-mnist", "--output"]
    assert main(["train", *argv, str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "the processes of the run lost each other" in err

    def bug(args):
        raise RuntimeError("a bug of ours")

    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setattr(models_cli, "run", bug)
    with pytest.raises(RuntimeError, match="a bug of ours"):  # still traced
        main(["models"])


def test_memory_running_out_and_deep_input_are_said_in_one_line(monkeypatch, capsys):
    """A checkpoint asking for a 25 GB classifier, a recipe nested thousands deep: a MemoryError,
    torch's allocator error, a RecursionError or an OverflowError came out as a traceback."""
    from sparseformer.cli import models as models_cli

    for raised, said in (
        (MemoryError(), "out of memory (MemoryError); lower --batch-size"),
        (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate "
                      "25600000000 bytes."), "out of memory (DefaultCPUAllocator: can't"),
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
         "out of memory (CUDA out of memory"),
        (RecursionError("maximum recursion depth exceeded"), "the input nests too deeply"),
        (OverflowError("cannot convert float infinity to integer"), "cannot convert float"),
    ):  # fmt: skip

        def fail(args, raised=raised):
            raise raised

        monkeypatch.setattr(models_cli, "run", fail)
        assert main(["models"]) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and said in err, err


def test_a_misplaced_or_unknown_option_is_named_by_its_command(capsys):
    """argparse's own message came from the program's parser, with the program's usage."""
    for argv, said in (
        (["predict", "--checkpoint", "x.pt", "--img-size", "64", "a.png"], "--img-size"),
        (["predict", "-v", "--checkpoint", "x.pt", "a.png"], "-v (-v goes before the command"),
        (["eval", "--checkpoint", "x.pt", "--dataset", "fashion-mnist", "--bogus"], "--bogus"),
    ):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2
        assert f"usage: sparseformer {argv[0]}" in err
        assert f"sparseformer {argv[0]}: error: unrecognized arguments: {said}" in err


def test_flag_names_of_other_commands_are_taken_and_sizes_are_bounded_everywhere(capsys):
    from sparseformer.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["viz", "--output", "o", "--model", NANO, "a.png"]).out == "o"
    assert parser.parse_args(["export", "--output", "o.onnx", "--model", NANO]).out == "o.onnx"
    clip = ["eval", "--checkpoint", "c.pt", "--data-dir", "d", "--num-frames", "4"]
    assert parser.parse_args(clip).frames == 4
    for argv in (["info", NANO, "--img-size", "20000"],
                 ["bench", "--models", NANO, "--img-size", "3"]):  # fmt: skip
        with pytest.raises(SystemExit):
            main(argv)
        assert "--img-size: give 4 to 16384 pixels" in capsys.readouterr().err


def test_verbose_logging_is_ours_not_a_line_per_png_chunk():
    import logging

    from sparseformer.cli import setup_logging

    loggers = {name: logging.getLogger(name) for name in ("", "PIL", "matplotlib")}
    levels = {name: logger.level for name, logger in loggers.items()}
    try:
        for name, logger in loggers.items():  # as a fresh process has them, debug from -v
            logger.setLevel(logging.DEBUG if name == "" else logging.NOTSET)
        setup_logging(verbose=True)
        assert logging.getLogger("sparseformer.data").isEnabledFor(logging.DEBUG)
        assert not logging.getLogger("PIL.PngImagePlugin").isEnabledFor(logging.DEBUG)
        assert not logging.getLogger("matplotlib.font_manager").isEnabledFor(logging.DEBUG)
    finally:
        for name, logger in loggers.items():
            logger.setLevel(levels[name])


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["predict", "--checkpoint", "c.pth", ""], "an empty argument"),
        (["train", "--model", NANO, "--data-dir", "d", "--output", ""], "--output is given an"),
        (["train", "--model", NANO, "--data-dir", "d", "--output="], "--output is given an"),
        (["train", "--model", NANO, "--data-dir", "d", "--outp", ""], "--output is given an"),
        (["eval", "--checkpoint", "", "--data-dir", "d"], "--checkpoint is given an"),
        (["predict", "--checkpoint", "c.pth", "--json", ""], "an empty argument"),  # a switch
        (["predict", "--checkpoint", "c.pth", "a.png", "--topk", "3", ""], "an empty arg"),
    ],
)
def test_an_empty_argument_is_refused_before_it_becomes_the_working_folder(
    tmp_path, monkeypatch, capsys, argv, said
):
    """pathlib reads "" as ".": `predict "$IMG"` with IMG unset classified every file under the
    working folder, and an empty --output made it the run folder."""
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (8, 8)).save(tmp_path / "stray.png")
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and f"error: {said}" in err and "unset shell variable" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stray.png"]  # nothing written


def test_a_value_ending_in_an_equals_sign_is_not_an_empty_one():
    from sparseformer.cli import _empty_argument, build_parser

    train = build_parser().parse_known_args(["models"])[0].commands["train"]
    assert _empty_argument(["train", "--output=run="], train) is None  # a folder "run="
    assert _empty_argument(["train", "--output="], train) == "--output is given an empty value"


def test_models_lists_the_tags_and_takes_a_tagged_name(capsys):
    """The docs write names with their weights' tag; `models` matched none of them and had no
    way to show the tags."""
    from sparseformer.cli import main

    assert main(["models", "sparseformer_v1_tiny.in1k_v2"]) == 0
    (line,) = capsys.readouterr().out.strip().splitlines()
    assert line.startswith("sparseformer_v1_tiny ") and line.endswith("[weights: in1k, in1k_v2]")
    assert main(["models", "sparseformer_v1_tiny.in22k"]) == 1
    assert "no pretrained tag 'in22k' (its tags: in1k, in1k_v2)" in capsys.readouterr().err


def test_a_number_flag_given_words_says_to_give_a_whole_number(capsys):
    from sparseformer.cli import main

    with pytest.raises(SystemExit):
        main(["bench", "--img-size", "abc"])
    assert "argument --img-size: give a whole number, got 'abc'" in capsys.readouterr().err
    argv = ["bench", "--models", "sparseformer_v1_nano", "--baseline", "resnet18", "--no-train"]
    assert main(argv) == 1
    assert "not among the models (sparseformer_v1_nano); add it" in capsys.readouterr().err
