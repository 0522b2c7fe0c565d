"""Small frictions a user met, each pinned: viz goes on past unreadable files as predict does,
convert does not replace a file unasked, torch's reason for refusing a pickle is kept whole."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from sparseformer import create_model
from sparseformer.cli import main
from sparseformer.weights.checkpoint import read_checkpoint
from sparseformer.weights.convert import CheckpointError

from .conftest import DATA

NANO = "sparseformer_v1_nano"


def test_viz_draws_the_readable_files_and_lists_the_others(tmp_path, capsys):
    junk, cut = tmp_path / "junk.jpg", tmp_path / "cut.jpg"
    junk.write_text("not an image")
    Image.open(DATA / "tench.jpeg").save(cut)
    cut.write_bytes(cut.read_bytes()[:2000])
    out = tmp_path / "out"
    argv = ["viz", "--model", NANO, "--img-size", "32", "--no-gif", "--out", str(out)]
    assert main([*argv, str(junk), str(DATA / "tench.jpeg"), str(cut)]) == 0
    captured = capsys.readouterr()
    assert (out / "tench_rois.png").is_file()  # drawn, though a file before it was junk
    skipped = captured.err.strip().splitlines()
    assert len(skipped) == 2 and all(line.endswith("; skipped") for line in skipped)
    assert skipped[0].startswith(f"{junk}: not a readable image")
    assert skipped[1].startswith(f"{cut}: could not be decoded")
    assert main([*argv, str(junk), str(cut)]) == 1  # nothing drawn: the one failure status
    assert len(capsys.readouterr().err.strip().splitlines()) == 2


def test_viz_and_predict_share_the_rule_for_files_of_the_wrong_kind(tmp_path, capsys):
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"\0")
    argv = ["viz", "--model", NANO, "--img-size", "32", "--no-gif", "--out", str(tmp_path / "o")]
    assert main([*argv, str(clip), str(DATA / "tench.jpeg")]) == 0
    viz_line = capsys.readouterr().err.strip()
    ckpt = tmp_path / "nano.pth"
    torch.save(create_model(NANO).state_dict(), ckpt)
    assert main(["predict", "--model", NANO, "--checkpoint", str(ckpt), str(clip)]) == 1
    assert viz_line == capsys.readouterr().err.strip()
    assert viz_line.startswith(f"{clip}: a video, but {NANO} is an image model")


def test_convert_refuses_to_replace_a_file_unless_told(tmp_path, capsys):
    src = tmp_path / "w.pth"
    torch.save(create_model(NANO).state_dict(), src)
    out = tmp_path / "w.safetensors"
    out.write_text("the user's file")
    assert main(["convert", str(src), str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (
        f"sparseformer convert: error: OUT {str(out)!r} already exists; replace it with "
        "--overwrite, or give another path"
    )
    assert out.read_text() == "the user's file"
    assert main(["convert", str(src), str(out), "--overwrite"]) == 0
    assert read_checkpoint(out).state_dict.keys() == torch.load(src).keys()


@pytest.mark.parametrize("what", ["model", "blocked"])
def test_an_unsafe_pickle_keeps_torchs_reason_whole(tmp_path, what):
    import os

    path = tmp_path / "bad.pth"
    if what == "model":  # a pickled model object
        torch.save(torch.nn.Linear(2, 2), path)
        named = "GLOBAL torch.nn.modules.linear.Linear was not an allowed global by default"
    else:  # a global on torch's block list
        torch.save({"fn": os.getcwd}, path)
        named = "unsupported GLOBAL posix.getcwd whose module posix is blocked"
    with pytest.raises(CheckpointError) as caught:
        read_checkpoint(path)
    message = str(caught.value)
    assert named in message and "\n" not in message and "\x1b" not in message
    assert message.endswith("torch.save(model.state_dict(), path)")
