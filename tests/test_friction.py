"""Small frictions a user met, each pinned: viz goes on past unreadable files as predict does,
convert does not replace a file unasked, torch's reason for refusing a pickle is kept whole,
a non-finite loss does not advise the precision a run already has, and top-5 (always 100%)
is not reported for 5 classes or fewer."""

from __future__ import annotations

import json
from unittest.mock import patch

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


def test_viz_and_predict_skip_an_input_whose_outputs_are_not_numbers(tmp_path, capsys):
    """Weights of a diverged run: viz wrote NaN into its statistics (not JSON) and said
    "class 0 (nan%)"; now it skips the file with predict's words."""
    model = create_model(NANO)
    with torch.no_grad():
        model.head.weight.fill_(float("nan"))
    ckpt = tmp_path / "diverged.pth"
    torch.save(model.state_dict(), ckpt)
    image, out = str(DATA / "tench.jpeg"), tmp_path / "o"
    argv = ["--model", NANO, "--checkpoint", str(ckpt)]
    assert main(["viz", *argv, "--img-size", "32", "--no-gif", "--out", str(out), image]) == 1
    viz_line = capsys.readouterr().err.strip()
    assert "NaN or infinite" in viz_line and not out.exists()  # nothing written, no folder
    assert main(["predict", *argv, image]) == 1
    assert viz_line == capsys.readouterr().err.strip()


def test_a_path_too_long_is_named_with_what_to_do(tmp_path, capsys):
    """The system's "[Errno 36] File name too long" names the path but not the limit."""
    too_long, weights = tmp_path / ("a" * 300 + ".jpg"), tmp_path / "w.pt"
    torch.save(create_model(NANO).state_dict(), weights)
    argv = ["predict", "--model", NANO, "--checkpoint", str(weights)]
    assert main([*argv, str(too_long)]) == 1
    err = capsys.readouterr().err
    said = f"{str(too_long)!r}: a file or folder name in it is 304 bytes, over most file systems'"
    assert said in err and "shorten it" in err and "Errno" not in err
    assert len(err.strip().splitlines()) == 1
    out = tmp_path / ("b" * 300)  # an output folder too (viz's error carries the OSError)
    assert (
        main(
            [
                "viz",
                "--model",
                NANO,
                "--img-size",
                "32",
                "--out",
                str(out),
                str(DATA / "tench.jpeg"),
            ]
        )
        == 1
    )
    assert f"{str(out)!r}: a file or folder name in it is 300 bytes" in capsys.readouterr().err


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
    assert "add_safe_globals" not in message  # torch's way to run the file's code: not ours


def test_a_plain_pickle_is_named_without_torchs_advice(tmp_path, recwarn):
    """pickle.dump's file is not torch.save's: say so, without torch's suggestion to load it
    with weights_only=False or its note on pickle protocols."""
    import pickle

    path = tmp_path / "weights.pth"
    with open(path, "wb") as f:
        pickle.dump({"w": torch.zeros(2)}, f, protocol=4)
    with pytest.raises(CheckpointError) as caught:
        read_checkpoint(path)
    message = str(caught.value)
    assert "is a plain pickle (pickle.dump), not a torch.save or safetensors file" in message
    assert "weights_only` set to `False`" not in message and "\n" not in message
    assert not [w for w in recwarn if "pickle protocol" in str(w.message)]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_non_finite_loss_advice_suggests_only_a_wider_precision(tmp_path, precision):
    from sparseformer.engine.trainer import TrainingError

    from .test_engine import BreaksLater, tiny_run

    with pytest.raises(TrainingError, match="loss is nan") as caught:
        tiny_run(tmp_path, BreaksLater(good_calls=2), precision=precision)
    advice = str(caught.value).rpartition(". ")[2]
    assert "--lr" in advice
    if precision == "fp32":
        assert "precision" not in advice  # the run is fp32 already
    else:
        assert advice.endswith("--precision fp32") and "bf16" not in advice


def test_top5_is_left_out_for_five_classes_or_fewer(tmp_path, capsys):
    from sparseformer.engine.metrics import format_accuracy, top5_or_none

    from .test_engine import BreaksLater, tiny_run

    assert top5_or_none(100.0, 5) is None and top5_or_none(91.0, 6) == 91.0
    assert format_accuracy(80.0, None) == "top-1 80.00%"
    assert format_accuracy(80.0, 95.5) == "top-1 80.00%, top-5 95.50%"
    tiny_run(tmp_path, BreaksLater(good_calls=10**9))  # 4 classes
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all("val_acc5" in r and r["val_acc5"] is None for r in records)  # key kept: null
    assert all(isinstance(r["val_acc1"], float) for r in records)
    assert "top-1" in _curves(records, tmp_path) and "top-5" not in _curves(records, tmp_path)
    assert "top-5" in _curves([{**r, "val_acc5": 99.0} for r in records], tmp_path)


def _curves(records, tmp_path) -> list[str]:
    """The labels of the curves metrics.png draws."""
    from matplotlib.axes import Axes

    from sparseformer.engine.metrics import plot_metrics

    labels, plot = [], Axes.plot

    def spy(ax, *args, **kwargs):
        labels.append(kwargs.get("label"))
        return plot(ax, *args, **kwargs)

    with patch.object(Axes, "plot", spy):
        plot_metrics(records, tmp_path / "metrics.png")
    return labels


def test_eval_reports_top5_only_with_more_than_five_classes(tmp_path, capsys):
    from .test_data import make_folder
    from .test_train_errors import run_cli

    ckpt = tmp_path / "nano.pth"
    torch.save(create_model(NANO, num_classes=2).state_dict(), ckpt)
    argv = ["eval", "--model", NANO, "--checkpoint", str(ckpt), "--img-size", "32", "--quiet"]
    argv += ["--data-dir", str(make_folder(tmp_path / "data"))]  # 2 classes
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert "top-1 " in out and "top-5" not in out
    code, out, err = run_cli(capsys, *argv, "--json")
    result = json.loads(out.strip().splitlines()[-1])
    assert "acc5" in result and result["acc5"] is None and result["acc1"] is not None


def test_metrics_png_marks_whole_epochs_only(tmp_path):
    """Two epochs were marked 1.0, 1.2, ..., 2.0."""
    from matplotlib.figure import Figure

    from sparseformer.engine.metrics import plot_metrics

    figures, savefig = [], Figure.savefig
    records = [{"epoch": e, "train_loss": 1 / e, "val_loss": 1 / e, "val_acc1": 10 * e}
               for e in (1, 2)]  # fmt: skip
    with patch.object(Figure, "savefig", lambda fig, *a, **k: figures.append(fig) or savefig(
            fig, *a, **k)):  # fmt: skip
        plot_metrics(records, tmp_path / "metrics.png")
    for ax in figures[0].axes:
        shown = [t for t in ax.get_xticks() if 1 <= t <= 2]
        assert shown and all(float(t).is_integer() for t in shown)


def test_plots_leave_the_callers_matplotlib_backend_alone(tmp_path):
    """The training curves (reached through the engine's fit), the per-class picture and the
    bench's plots switched the process to Agg: a notebook's inline figures stopped showing."""
    import matplotlib

    from sparseformer.bench.report import plot_result
    from sparseformer.bench.results import BenchResult, BenchRow, Spread
    from sparseformer.bench.sweep import plot_throughput, plot_top1
    from sparseformer.engine.metrics import plot_metrics
    from sparseformer.engine.per_class import per_class_report, write_per_class

    rows = [BenchRow(name, size, 2, 1, 1.0, 1.0, Spread.of([10.0]), Spread.of([1.0]), None, 0.0)
            for name in ("a", "b") for size in (32, 64)]  # fmt: skip
    env = {"device_name": "cpu", "threads": 2, "dtype": "fp32"}
    result = BenchResult(env, {}, Spread.of([1.0]), rows)
    records = [{"epoch": 1, "train_loss": 1.0, "val_loss": 1.0, "val_acc1": 50.0}]
    import matplotlib.pyplot as plt

    figures = plt.get_fignums()
    with patch.object(matplotlib, "use", side_effect=AssertionError("the backend switched")):
        plot_metrics(records, tmp_path / "metrics.png")
        write_per_class(per_class_report(torch.eye(2), ["a", "b"]), tmp_path / "per_class")
        plot_result(result, tmp_path / "bench.png")
        plot_throughput(result, "a", tmp_path / "sweep.png")
        plot_top1(result, tmp_path / "top1.png")
    assert plt.get_fignums() == figures  # none left open in pyplot either
    for name in ("metrics.png", "per_class/confusion.png", "bench.png", "sweep.png", "top1.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def test_info_of_a_run_folder_names_the_checkpoints_in_it(tmp_path, capsys, monkeypatch):
    """As predict, export and convert say it; info said "unknown model 'run1'"."""
    run = tmp_path / "run1"
    run.mkdir()
    torch.save(create_model(NANO).state_dict(), run / "best.pt")
    assert main(["info", str(run)]) == 1
    err = capsys.readouterr().err
    assert f"is a folder; give a checkpoint file in it: {run / 'best.pt'}" in err
    monkeypatch.chdir(tmp_path)
    (tmp_path / NANO).mkdir()  # a folder named as a model: the model is meant
    assert main(["info", NANO]) == 0
