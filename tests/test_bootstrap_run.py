"""``sparseformer bootstrap`` as a training run: a CLIP tower (whose head is an embedding) trains on
a labelled folder without reporting accuracy, two torchrun processes (gloo, CPU) end with the
same student, and bf16 autocast trains a loadable student.

The teachers and the folder are those of ``tests/test_bootstrap.py``: runs of seconds.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from sparseformer import create_model
from sparseformer.bootstrap import teacher as teacher_module
from sparseformer.bootstrap.derive import CLIP_TEMPLATE, TEMPLATE
from sparseformer.bootstrap.objective import AlignmentObjective
from sparseformer.bootstrap.run import accuracy_defined
from sparseformer.bootstrap.teacher import Teacher
from sparseformer.cli import main
from sparseformer.data.datasets import DatasetBundle
from sparseformer.weights.convert import CheckpointError
from sparseformer.weights.registry import MODELS
from tests.test_bootstrap import RUN, SMALL, _args, _records, _threads, make_folder  # noqa: F401
from tests.test_distributed import SCRIPT


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("bootstrap"))


def _clip_teacher() -> torch.nn.Module:
    """An OpenAI-CLIP-style ViT (pre-norm, QuickGELU, a 16-d projection with timm's zero bias),
    shrunk to 3 blocks of width 64 at 32 px, without weights."""
    torch.manual_seed(0)
    return timm.create_model(
        "vit_base_patch16_clip_quickgelu_224", img_size=32, patch_size=8, embed_dim=64,
        depth=3, num_heads=2, num_classes=16,
    ).eval()  # fmt: skip


def test_a_clip_teacher_trains_on_labelled_images_without_accuracy(
    folder, tmp_path, monkeypatch, caplog, capsys
):
    clip, load = _clip_teacher(), teacher_module.load_teacher
    monkeypatch.setattr(teacher_module, "load_teacher", lambda *args, **kwargs: load(clip))
    caplog.set_level(logging.INFO, logger="sparseformer.bootstrap.run")
    out = tmp_path / "clip"
    assert main(["bootstrap", "--teacher", "vit_base_patch16_clip_quickgelu_224",
                 "--random-teacher", "--data-dir",
                 str(folder / "data"), "--output", str(out), *SMALL, *RUN,
                 "--epochs", "1"]) == 0  # fmt: skip
    why = [r.message for r in caplog.records if "no accuracy" in r.message]
    assert len(why) == 1 and "16-d projection (a CLIP embedding)" in why[0]
    assert "no accuracy" in capsys.readouterr().out
    (record,) = _records(out)
    assert record["val_acc1"] is None and record["teacher_val_acc1"] is None
    assert math.isfinite(record["train_loss"]) and math.isfinite(record["val_loss"])
    assert (out / "last.pt").is_file() and not (out / "best.pt").exists()  # best: by top-1
    assert json.loads((out / "summary.json").read_text())["best_val_acc1"] is None
    # named as the CLIP towers (it was the AugReg template, which the CLIP name refused)
    assert torch.load(out / "last.pt", weights_only=True)["model_name"] == CLIP_TEMPLATE
    student = create_model(CLIP_TEMPLATE, checkpoint_path=out / "last.pt").eval()
    assert student.head.bias is None and student.config.stages[-1].mlp_activation == "quick_gelu"
    assert student(torch.randn(1, 3, 32, 32)).shape == (1, 16)  # the CLIP embedding
    with pytest.raises(CheckpointError, match=f"create it as '{CLIP_TEMPLATE}'"):
        create_model(TEMPLATE, checkpoint_path=out / "last.pt")


def _bundle(*names: str) -> DatasetBundle:
    return DatasetBundle(train=None, val=[], class_names=list(names))


@pytest.mark.parametrize(
    ("outputs", "bias", "teacher_names", "why"),
    [
        (2, True, None, None),
        (2, True, ("dark", "light"), None),
        (2, True, ("light", "dark"), "are not the data's"),
        (1, True, None, "1 outputs and the data 2 classes"),  # was refused: now trains
        (3, True, None, "3 outputs and the data 2 classes"),
        (16, False, None, "16-d projection"),
    ],
)
def test_accuracy_only_where_the_teachers_outputs_are_the_classes(
    outputs, bias, teacher_names, why, caplog
):
    caplog.set_level(logging.INFO, logger="sparseformer.bootstrap.run")
    config = dataclasses.replace(MODELS[TEMPLATE].config, num_classes=outputs, head_bias=bias)
    teacher = Teacher(torch.nn.Identity(), "t", None, teacher_names)
    assert accuracy_defined(teacher, config, _bundle("dark", "light")) == (why is None)
    said = [r.message for r in caplog.records]
    assert len(said) == (why is not None) and all(why in m for m in said)


def test_two_processes_bootstrap_as_one(folder, tmp_path):
    script = tmp_path / "ddp_run.py"
    script.write_text(SCRIPT)  # the real CLI; every rank saves the weights it ends with
    dump, out = tmp_path / "weights", tmp_path / "run"
    dump.mkdir()
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    run = _args(folder, out, "--epochs", "1", "--device", "cpu")
    cmd = [*torchrun, str(script), str(dump), *run]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(dump / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    saved = torch.load(out / "last.pt", weights_only=True)
    for key, value in ranks[0].items():
        assert torch.equal(value, ranks[1][key]) and torch.equal(value, saved["model"][key]), key
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["ranks_in_sync"] is True
    (record,) = _records(out)
    assert record["step"] == 3  # 24 images / (2 ranks x 4) per step
    assert record["val_images"] == 12  # each rank scored its half, summed
    assert record["val_acc1"] is not None and record["teacher_val_acc1"] is not None


def test_a_bf16_run_trains_under_autocast_and_loads(folder, tmp_path, monkeypatch):
    seen, align = [], AlignmentObjective.__call__

    def spy(self, student, images, targets):
        seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return align(self, student, images, targets)

    monkeypatch.setattr(AlignmentObjective, "__call__", spy)
    out = tmp_path / "bf16"
    assert main(_args(folder, out, "--precision", "bf16", "--epochs", "1")) == 0
    assert seen and set(seen) == {torch.bfloat16}
    (record,) = _records(out)
    assert math.isfinite(record["train_loss"]) and math.isfinite(record["val_loss"])
    student = create_model(TEMPLATE, checkpoint_path=out / "last.pt").eval()
    with torch.no_grad():
        assert torch.isfinite(student(torch.randn(2, 3, 32, 32))).all()


def test_a_student_fine_tunes_with_train_and_its_run_loads_as_the_student(folder, tmp_path, capsys):
    from sparseformer.data.datasets import DataSource
    from sparseformer.engine.inputs import training_preprocessing
    from sparseformer.engine.recipe import load_recipe

    student = tmp_path / "student"
    assert main(_args(folder, student, "--epochs", "1")) == 0
    tuned = tmp_path / "tuned"
    argv = ["train", "--checkpoint", str(student / "last.pt"), "--data-dir",
            str(folder / "data"), "--output", str(tuned), "--epochs", "1", "--img-size", "32",
            *RUN[:-2]]  # fmt: skip
    assert main(argv) == 0  # the model the checkpoint names, as the student it records
    # another model's name built that model's config under the student's fields, in silence
    other = [str(tmp_path / "other") if a == str(tuned) else a for a in argv]
    assert main([*other, "--model", CLIP_TEMPLATE]) == 1
    assert f"pass --model {TEMPLATE}" in capsys.readouterr().err
    assert main([*argv, "--resume", "auto", "--epochs", "2"]) == 0  # the run's model, resumed
    argv[1:1] = ["--model", TEMPLATE]
    argv[argv.index("--checkpoint") + 1] = str(tmp_path / "moved.pt")  # resuming: not read
    saved = torch.load(tuned / "last.pt", weights_only=True)
    assert saved["architecture"]["num_tokens"] == 4
    model = create_model(TEMPLATE, checkpoint_path=tuned / "last.pt").eval()
    assert model.config.num_tokens == 4 and model.num_classes == 2
    assert main([*argv, "--resume", "auto", "--epochs", "3"]) == 0  # and resumes as one
    assert torch.load(tuned / "last.pt", weights_only=True)["epoch"] == 3
    # the normalisation the fine-tuned weights were trained with, over the template's
    recipe = load_recipe("fashion-mnist-cpu")
    source = DataSource(data_dir=folder / "data")
    pre = training_preprocessing(source, TEMPLATE, recipe, None, {"mean": (0.1,) * 3,
                                                                  "std": (0.2,) * 3})  # fmt: skip
    assert pre.mean == (0.1,) * 3 and pre.std == (0.2,) * 3


def test_fine_tuning_a_run_trains_at_its_size_unless_told(tmp_path, caplog):
    import dataclasses

    from sparseformer.data.datasets import DataSource
    from sparseformer.engine.inputs import training_preprocessing
    from sparseformer.engine.own_folder import own_folder_recipe

    recipe, source = own_folder_recipe(100), DataSource(data_dir=tmp_path)
    run = {"img_size": 48, "mean": (0.5,) * 3, "std": (0.5,) * 3}
    with caplog.at_level(logging.INFO):
        pre = training_preprocessing(source, "sparseformer_v1_nano", recipe, None, run)
    assert pre.img_size == 48 and "at 48px, the checkpoint's size" in caplog.text
    told = dataclasses.replace(recipe, img_size=64)  # --img-size 64
    assert training_preprocessing(source, "sparseformer_v1_nano", told, None, run).img_size == 64
    official = training_preprocessing(source, "sparseformer_v1_nano", recipe, None, None)
    assert official.img_size == 224  # a file that records no size: the model's


def test_a_teacher_at_chance_whose_weights_name_no_classes_is_doubted(caplog):
    from sparseformer.bootstrap.run import _doubt_a_chance_teacher

    with caplog.at_level(logging.WARNING):
        _doubt_a_chance_teacher(50.0, 3, None)  # better than chance: nothing to say
        _doubt_a_chance_teacher(0.0, 3, ("red", "green", "blue"))  # its classes named, matched
        _doubt_a_chance_teacher(None, 3, None)  # no accuracy (a CLIP tower)
        assert not caplog.text
        _doubt_a_chance_teacher(33.0, 3, None)
    assert "no better than chance (33.33%)" in caplog.text and "by count" in caplog.text


def test_a_run_of_an_earlier_version_resumes_under_its_own_name(tmp_path):
    # runs written before students were named by kind name the AugReg template whatever the
    # student: bootstrap() from Python resumes them under that name, not the CLIP one
    from sparseformer.bootstrap.run import BootstrapSettings, _run_name
    from sparseformer.engine.trainer import RunOptions

    clip = dataclasses.replace(MODELS[CLIP_TEMPLATE].config, num_classes=16)
    old = tmp_path / "last.pt"
    torch.save(
        {"model": {}, "step": 3, "epoch": 1, "model_name": TEMPLATE, "bootstrap": {}}, old
    )  # every bootstrap run's checkpoint records its settings
    settings = BootstrapSettings()
    fresh = RunOptions(output=tmp_path, model_name="")
    assert _run_name(fresh, clip, settings) == CLIP_TEMPLATE  # a new run: named by kind
    resumed = dataclasses.replace(fresh, resume=old)
    assert _run_name(resumed, clip, settings) == TEMPLATE
    asked = dataclasses.replace(fresh, model_name=TEMPLATE)  # what the command passes
    assert _run_name(asked, clip, settings) == TEMPLATE
