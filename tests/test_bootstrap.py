"""``sparseformer bootstrap``: a SparseFormer derived from a timm ViT holds the ViT's cortex,
final norm and head bit for bit; the released bootstrapped configurations come out of the
derivation from weightless teachers; the run trains only what it should, resumes on the same
trajectory after a kill, and its output loads everywhere a checkpoint does.

Teachers are timm's ``test_vit`` (64 wide, 6 blocks) at 32 px, on a 2-class folder of 36
generated images: every run takes seconds.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from sparseformer import create_model
from sparseformer.bootstrap.derive import (
    TEMPLATE,
    BootstrapError,
    bootstrap_config,
    build_student,
    inherited_tensors,
)
from sparseformer.bootstrap.objective import AlignmentObjective, freeze_for_bootstrap
from sparseformer.bootstrap.teacher import load_teacher
from sparseformer.cli import main
from sparseformer.engine.loop import BatchPrep, StepTools, train_one_epoch
from sparseformer.engine.optim import LRSchedule, build_optimizer
from sparseformer.models import SparseFormer
from sparseformer.weights.registry import MODELS

RELEASED = [  # teacher, registered student, tokens
    ("vit_base_patch16_224", "sparseformer_btsp_augreg_base", 48),
    ("vit_large_patch16_224", "sparseformer_btsp_augreg_large", 48),
    ("vit_base_patch16_clip_quickgelu_224", "sparseformer_btsp_openai_clip_base", 48),
    ("vit_large_patch14_clip_quickgelu_224", "sparseformer_btsp_openai_clip_large", 63),
]
SMALL = ["--tokens", "4", "--points", "4", "--inherit", "2", "--finetune", "1"]
RUN = ["--batch-size", "4", "--workers", "0", "--threads", "1", "--quiet", "--lr", "1e-2",
       "--warmup-epochs", "0"]  # fmt: skip


@pytest.fixture(autouse=True)
def _threads():
    """Commands run here set torch's threads (--threads 1): give later tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _teacher(bias: bool = True) -> torch.nn.Module:
    teacher = timm.create_model("test_vit", img_size=32, num_classes=2)
    if bias:  # a trained head's bias, not timm's zeros
        torch.nn.init.normal_(teacher.head.bias)
    return teacher.eval()


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("bootstrap"))


def make_folder(root: Path) -> Path:
    """A 2-class image folder in ``root/data`` and a `sparseformer train`-style checkpoint of
    a test_vit, ``root/teacher.pt``."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("val", 6)):
        for c, name in enumerate(("dark", "light")):
            d = root / "data" / split / name
            d.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(10 + 130 * c, 110 + 130 * c, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(d / f"{i}.png")
    torch.manual_seed(0)
    pre = {"img_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 1.0,
           "interpolation": "bilinear"}  # fmt: skip
    torch.save({"model_name": "test_vit", "model": _teacher().state_dict(), "num_classes": 2,
                "class_names": ["dark", "light"], "preprocessing": pre},
               root / "teacher.pt")  # fmt: skip
    return root


@pytest.mark.parametrize(("teacher", "student", "tokens"), RELEASED)
def test_derivation_gives_the_released_configurations(teacher, student, tokens):
    with torch.device("meta"):
        vit = timm.create_model(teacher)  # no weights: only the architecture is read
    derived = bootstrap_config(vit, tokens=tokens)
    released = MODELS[student].config
    # AugReg ViTs use LayerNorm eps 1e-6, which the student keeps; the authors' config 1e-5
    assert dataclasses.replace(derived, ln_eps=released.ln_eps) == released
    assert derived.ln_eps == vit.norm.eps
    with torch.device("meta"):
        ours, theirs = SparseFormer(derived).state_dict(), SparseFormer(released).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


def test_a_student_prepares_images_as_its_teacher():
    """build_student() gave no pretrained_cfg, so timm fell back to ImageNet's mean and std
    and 224 px where the teacher takes 0.5 and 32 px."""
    from timm.data import resolve_data_config

    teacher = _teacher()
    student = build_student(teacher, bootstrap_config(teacher, tokens=4, points=4))
    theirs, ours = resolve_data_config({}, model=teacher), resolve_data_config({}, model=student)
    assert ours["mean"] == theirs["mean"] == (0.5,) * 3 and ours["std"] == theirs["std"]
    assert ours["crop_pct"] == theirs["crop_pct"]
    assert ours["interpolation"] == theirs["interpolation"]
    assert ours["input_size"] == (3, 32, 32)  # the size it is built for (timm's cfg keeps 160)
    assert student.pretrained_cfg["url"] == "" and student.pretrained_cfg["num_classes"] == 2


def test_a_student_prepares_images_as_its_teachers_run_did():
    """A teacher from a run's checkpoint: its run's preprocessing (crop 1.0 here), not the
    timm name's registered one (0.9), is the student's."""
    import dataclasses

    from sparseformer.bootstrap.facts import teacher_preprocessing
    from sparseformer.bootstrap.run import BootstrapSettings, make_student
    from sparseformer.bootstrap.teacher import Teacher

    model = _teacher()
    pre = dataclasses.replace(teacher_preprocessing(model), crop_pct=1.0, interpolation="bilinear")
    assert teacher_preprocessing(model).crop_pct != 1.0
    student = make_student(Teacher(model, "test_vit", pre), BootstrapSettings(tokens=4, points=4))
    assert student.pretrained_cfg["crop_pct"] == 1.0
    assert student.pretrained_cfg["interpolation"] == "bilinear"


def test_a_one_block_teacher_gives_its_block():
    """Two thirds of one block rounded to none: "--inherit 0", which nobody had given."""
    from timm.models.vision_transformer import VisionTransformer

    with torch.device("meta"):
        vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=2)
    assert bootstrap_config(vit).stages[-1].depth == 2  # the sample+mix unit and the block
    for zero in ({"tokens": 0}, {"points": 0}):  # refused, not taken for the default
        with pytest.raises(ValueError, match="must be an integer >= 1, got 0"):
            bootstrap_config(vit, **zero)


def test_default_focusing_width_is_half_the_teacher_in_whole_heads():
    with torch.device("meta"):
        vit = timm.create_model("vit_tiny_patch16_224")  # 192 wide, heads of 64
    assert bootstrap_config(vit).stages[0].width == 64


@pytest.mark.parametrize("finetune", [0, 1])
def test_student_holds_the_teachers_tensors_bit_for_bit(finetune):
    teacher = _teacher()
    config = bootstrap_config(teacher, tokens=4, points=4, inherit=3)
    student = build_student(teacher, config)
    state, vit = student.state_dict(), teacher.state_dict()
    taken = inherited_tensors(teacher, config)
    assert len(taken) == 3 * 12 + 2 + 2  # 3 blocks of 12 tensors, final norm, head with bias
    for key, value in taken.items():
        assert torch.equal(state[key], value), key
    assert torch.equal(state["stages.1.units.1.attn.qkv.weight"], vit["blocks.3.attn.qkv.weight"])
    assert torch.equal(state["stages.1.units.3.mlp.norm.bias"], vit["blocks.5.norm2.bias"])
    assert torch.equal(state["fc_norm.weight"], vit["norm.weight"])
    assert torch.equal(state["head.bias"], vit["head.bias"])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # the student's head on the teacher's features: the teacher's logits
        assert torch.allclose(student.head(vit_features(teacher, x)), teacher(x), atol=1e-5)
    frozen, trained = freeze_for_bootstrap(student, finetune)
    grads = {k for k, p in student.named_parameters() if p.requires_grad}
    assert ("stages.1.units.1.attn.qkv.weight" in grads) == (finetune == 1)
    assert "stages.1.units.2.attn.qkv.weight" not in grads and "head.weight" not in grads
    assert "stem.conv.weight" in grads and "stages.1.units.0.sample_mix.offset_bias" in grads
    assert frozen + trained == sum(p.numel() for p in student.parameters())


def vit_features(teacher, x):
    return teacher.forward_head(teacher.forward_features(x), pre_logits=True)


def test_training_steps_change_the_new_parts_and_leave_the_frozen_ones():
    teacher = _teacher()
    student = build_student(teacher, bootstrap_config(teacher, tokens=4, points=4, inherit=3))
    freeze_for_bootstrap(student, 1)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    vit_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    objective = AlignmentObjective(teacher)
    tools = StepTools(
        torch.nn.CrossEntropyLoss(), LRSchedule(1e-2, 1e-2, 1e-2, 0, 10),
        BatchPrep((0.5,) * 3, (0.5,) * 3, torch.device("cpu")), objective=objective,
    )  # fmt: skip
    optimizer = build_optimizer(student, 1e-2, 0.05)
    batches = [(torch.randn(4, 3, 32, 32), torch.zeros(4, dtype=torch.long)) for _ in range(3)]
    x = batches[0][0]
    first = objective(student, x, None).item()
    stats = train_one_epoch(student, batches, optimizer, tools, 0, _one_process())
    assert stats["steps"] == 3 and objective(student, x, None).item() < first
    after = student.state_dict()
    trained = {k for k, p in student.named_parameters() if p.requires_grad}
    for key, value in after.items():
        if key in trained and key.endswith("weight") and "norm" not in key:
            assert not torch.equal(value, before[key]), f"{key} did not train"
        elif key not in trained and key != "initial_rois":
            assert torch.equal(value, before[key]), f"{key} changed but is frozen"
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(v, vit_before[k]) for k, v in teacher.state_dict().items())


def test_a_validation_with_nothing_decoded_scores_nothing():
    """Batches that lost every image (they failed to decode): no loss and no accuracy, not 0."""
    from sparseformer.bootstrap.validation import AlignmentValidation

    teacher = _teacher()
    student = build_student(teacher, bootstrap_config(teacher, tokens=4, points=4, inherit=3))
    validate = AlignmentValidation(AlignmentObjective(teacher), labels=True)
    prep = BatchPrep((0.5,) * 3, (0.5,) * 3, torch.device("cpu"))
    empty = [(torch.zeros(0, 3, 32, 32), torch.zeros(0, dtype=torch.long))]
    result = validate(student, empty, prep, _one_process())
    assert result["images"] == 0 and result["loss"] is None
    assert result["acc1"] is result["teacher_val_acc1"] is None
    one = [(torch.randn(2, 3, 32, 32), torch.zeros(2, dtype=torch.long))]
    result = validate(student, one, prep, _one_process())
    assert result["images"] == 2 and result["loss"] > 0 and result["acc1"] is not None
    # 2 classes: top-5 is 100% by construction, so none is given, as train's validation does
    assert result["acc5"] is result["teacher_val_acc5"] is None
    wide = _teacher()  # 6 classes: top-5 means something
    wide.reset_classifier(6)
    student = build_student(wide, bootstrap_config(wide, tokens=4, points=4, inherit=3))
    validate = AlignmentValidation(AlignmentObjective(wide), labels=True)
    result = validate(student, one, prep, _one_process())
    assert result["acc5"] is not None and result["teacher_val_acc5"] is not None


def _one_process():
    from sparseformer.engine.distributed import DistInfo

    return DistInfo()


def test_errors_name_the_problem(folder, tmp_path, capsys):
    with pytest.raises(BootstrapError, match="not a ViT"):
        bootstrap_config(timm.create_model("test_resnet"))
    with pytest.raises(BootstrapError, match="LayerScale"):
        bootstrap_config(timm.create_model("test_vit2"))
    with torch.device("meta"):  # its second head was dropped, and its top-1 misreported
        distilled = timm.create_model("deit_tiny_distilled_patch16_224")
    with pytest.raises(BootstrapError, match="is a distilled ViT: its output averages two"):
        bootstrap_config(distilled)
    with pytest.raises(BootstrapError, match="cortex width 768 does not match the teacher's 64"):
        bootstrap_config(_teacher(), student="sparseformer_btsp_augreg_base")
    other = tmp_path / "vit3.pt"
    torch.save(timm.create_model("test_vit3", img_size=32).state_dict(), other)
    with pytest.raises(BootstrapError, match="does not match the teacher test_vit: .*shapes"):
        load_teacher("test_vit", other, img_size=32)
    with pytest.raises(
        BootstrapError, match="of 'test_vit', not the teacher .*; pass --teacher .*teacher.pt"
    ):
        load_teacher("vit_tiny_patch16_224", folder / "teacher.pt", img_size=32)
    with pytest.raises(BootstrapError, match=r"leave the size out \(--img-size, or img_size in"):
        load_teacher(folder / "teacher.pt", img_size=48)  # asked by --set too: not named so
    with pytest.raises(BootstrapError, match="give the timm name and the file: --teacher NAME"):
        load_teacher(other, img_size=32)  # a state dict alone names no model
    with pytest.raises(BootstrapError, match="is a run of test_vit, which records the size and"):
        load_teacher("test_vit", folder / "teacher.pt")  # its name's weights: its 32px lost
    with pytest.raises(BootstrapError, match="the input size 8 is smaller than the teacher's 16px"):
        load_teacher("test_vit", img_size=8)
    # before, 30 px trained the student on the teacher's view of the top-left 16 x 16 pixels
    unseen = (
        "the input size 30 does not fit the teacher's 16px patches: the last 14 pixels of a side"
    )
    with pytest.raises(BootstrapError, match=unseen + " would go unseen; use 16 or 32"):
        load_teacher("test_vit", img_size=30)
    from sparseformer.weights.build import build_model, patch_grid_problem

    # `train --model test_vit`: refused for a new run; an old run of that size still loads
    vit = build_model("test_vit", num_classes=3, img_size=200)
    from sparseformer.weights.build import model_from_checkpoint

    old = {"model": vit.state_dict(), "model_name": "test_vit", "num_classes": 3,
           "preprocessing": {"img_size": 200}}  # fmt: skip
    torch.save(old, tmp_path / "old_run.pt")
    loaded, _ = model_from_checkpoint(None, tmp_path / "old_run.pt")
    assert loaded.patch_embed.img_size == (200, 200)
    code = main(["train", "--model", "test_vit", "--data-dir", str(folder / "data"), "--output",
                 str(tmp_path / "v30"), "--img-size", "30", "--epochs", "1", *RUN])  # fmt: skip
    assert code == 1 and "use 16 or 32" in capsys.readouterr().err
    assert "use 192 or 208" in patch_grid_problem(vit, 200)
    assert patch_grid_problem(build_model("test_vit", num_classes=3, img_size=208), 208) is None
    pit = timm.create_model("pit_ti_224", img_size=232)  # 16 px windows 8 apart: 232 is tiled
    assert patch_grid_problem(pit, 232) is None and "use 224 or 232" in patch_grid_problem(
        timm.create_model("pit_ti_224", img_size=230), 230
    )
    with pytest.raises(BootstrapError, match="a name without weights"):
        load_teacher("test_vit", img_size=32, random_ok=False)
    with pytest.raises(BootstrapError, match="timm model name .*; did you mean .*test_vit"):
        load_teacher("test_vitt", img_size=32, random_ok=True)
    from sparseformer.bootstrap.teacher import check_teacher_weights

    check_teacher_weights("vit_tiny_patch16_22", None, False)  # not a name: load_teacher says
    check_teacher_weights(folder / "teacher.pt", None, False)  # a run's checkpoint: weights
    with pytest.raises(BootstrapError, match="a name without weights"):
        check_teacher_weights("test_vit", None, False)
    # a ViT fine-tuned on one's own classes: built with its checkpoint's head
    own = timm.create_model("test_vit", img_size=32, num_classes=3)
    torch.save(own.state_dict(), tmp_path / "own.pt")
    loaded = load_teacher("test_vit", tmp_path / "own.pt", img_size=32).model
    assert loaded.head.out_features == 3
    assert torch.equal(loaded.head.weight, own.head.weight)
    trained = tmp_path / "trained.pt"
    nano = create_model("sparseformer_v1_nano")
    torch.save({"model": nano.state_dict(), "model_name": "sparseformer_v1_nano", "step": 1,
                "epoch": 1}, trained)  # fmt: skip
    for bad, why in (  # the command: status 1 and one line saying why
        (["--teacher", "test_resnet", "--random-teacher"], "not a ViT"),
        (
            ["--teacher", "test_vit", "--random-teacher", "--teacher-checkpoint", str(other)],
            "--random-teacher asks for an untrained teacher",
        ),
        (["--teacher", "test_vit", "--teacher-checkpoint", str(other)], "does not match the"),
        (["--teacher", "test_vit"], "a name without weights, and an untrained teacher"),
        (
            ["--teacher", "test_vit", "--random-teacher", "--student", TEMPLATE],
            "cortex width 768 does not match",
        ),
        (["--teacher", str(folder / "teacher.pt"), "--img-size", "48"], "trained at 32px"),
        (["--teacher", "test_vit", "--random-teacher", "--inherit", "9"], "has 6 blocks"),
        (
            ["--teacher", "test_vit", "--random-teacher", "--inherit", "2", "--finetune", "3"],
            "the student inherits 2 blocks; pick 0 to 2",
        ),
        (  # a train run's checkpoint: not a student to go on with
            ["--teacher", "test_vit", "--random-teacher", "--resume", str(trained)],
            "is a checkpoint of sparseformer_v1_nano, not of a bootstrap run; continue it with "
            "sparseformer train --resume",
        ),
    ):
        code = main(["bootstrap", "--data-dir", str(folder / "data"), "--output",
                     str(tmp_path / "x"), "--img-size", "32", *RUN, *bad])  # fmt: skip
        out, err = capsys.readouterr()
        assert "bootstrapping from" not in out  # said before the data is read
        err = err.splitlines()
        said = [line for line in err if line.startswith("sparseformer bootstrap: error:")]
        assert code == 1 and len(said) == 1 and why in said[0], err
        assert not any(line.startswith("Traceback") for line in err)
    student = tmp_path / "student.pt"  # the other way: torch said a parameter group differs
    torch.save({"model": nano.state_dict(), "model_name": "sparseformer_v1_nano", "step": 1,
                "epoch": 1, "bootstrap": {"tokens": 4}}, student)  # fmt: skip
    for model in ([], ["--model", "sparseformer_v1_nano"]):
        code = main(["train", "--data-dir", str(folder / "data"), "--output", str(tmp_path / "y"),
                     "--resume", str(student), *model])  # fmt: skip
        err = capsys.readouterr().err
        assert code == 1 and "is a checkpoint of a bootstrap run; continue it with" in err
        assert f"bootstrap --resume, or fine-tune its student with --checkpoint {student}" in err
    clips = tmp_path / "clips"  # was "... is an image model; use a video model"
    for split in ("train", "val"):
        (clips / split / "a").mkdir(parents=True)
        (clips / split / "a" / "0.mp4").write_bytes(b"")
    code = main(["bootstrap", "--data-dir", str(clips), "--output", str(tmp_path / "x"),
                 "--teacher", "test_vit", "--random-teacher", *RUN])  # fmt: skip
    assert code == 1 and "holds videos; bootstrap takes image folders" in capsys.readouterr().err


def _args(folder: Path, out: Path, *extra: str) -> list[str]:
    return ["bootstrap", "--teacher", str(folder / "teacher.pt"), "--data-dir",
            str(folder / "data"), "--output", str(out), *SMALL, *RUN, "--epochs", "3",
            *extra]  # fmt: skip


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def alone(folder, tmp_path_factory) -> Path:
    """A run of 3 epochs left alone (in this process: no start-up to wait for)."""
    out = tmp_path_factory.mktemp("runs") / "alone"
    threads = torch.get_num_threads()
    assert main(_args(folder, out)) == 0
    torch.set_num_threads(threads)
    return out


def test_resuming_with_a_teacher_of_another_head_is_one_line(alone, folder, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(alone, run)
    other = tmp_path / "thousand.pt"  # test_vit with timm's 1000 classes, the run's has 2
    torch.save(timm.create_model("test_vit", img_size=32).state_dict(), other)
    code = main(["bootstrap", "--teacher", "test_vit", "--teacher-checkpoint", str(other),
                 "--img-size", "32", "--data-dir", str(folder / "data"), "--output", str(run),
                 *SMALL, *RUN, "--epochs", "4", "--resume", "auto"])  # fmt: skip
    err = capsys.readouterr().err.splitlines()
    said = [line for line in err if line.startswith("sparseformer bootstrap: error:")]
    assert code == 1 and len(said) == 1 and "bootstrapped from another teacher" in said[0], err
    # a checkpoint that records no teacher fingerprint: the model's own check, in one line
    saved = torch.load(run / "last.pt", weights_only=True)
    del saved["teacher"]["fingerprint"]
    torch.save(saved, run / "last.pt")
    code = main(["bootstrap", "--teacher", "test_vit", "--teacher-checkpoint", str(other),
                 "--img-size", "32", "--data-dir", str(folder / "data"), "--output", str(run),
                 *SMALL, *RUN, "--epochs", "4", "--resume", "auto"])  # fmt: skip
    err = capsys.readouterr().err.splitlines()
    said = [line for line in err if line.startswith("sparseformer bootstrap: error:")]
    assert code == 1 and len(said) == 1 and "does not fit the model" in said[0], err
    assert "head.weight" in said[0] and not any(x.startswith("Traceback") for x in err)


def test_resuming_with_another_teacher_of_the_same_shape_is_refused(
    alone, folder, tmp_path, capsys, caplog
):
    """The run's teacher, by name and checkpoint, resumes; another one of its shape does not
    (its student would be aligned to two teachers)."""
    import shutil

    saved = torch.load(folder / "teacher.pt", weights_only=True)
    same, other = tmp_path / "same.pt", tmp_path / "other.pt"
    torch.save(saved["model"], same)
    torch.save({k: v + 0.01 for k, v in saved["model"].items()}, other)
    for weights, epochs in ((other, "4"), (same, "4")):
        run = tmp_path / f"run-{weights.stem}"
        shutil.copytree(alone, run)
        code = main(["bootstrap", "--teacher", "test_vit", "--teacher-checkpoint", str(weights),
                     "--img-size", "32", "--data-dir", str(folder / "data"), "--output",
                     str(run), *SMALL, *RUN, "--epochs", epochs, "--resume", "auto"])  # fmt: skip
        err = capsys.readouterr().err.splitlines()
        said = [line for line in err if line.startswith("sparseformer bootstrap: error:")]
        if weights == other:
            assert code == 1 and len(said) == 1, err
            assert "bootstrapped from another teacher" in said[0], said
            assert [r["epoch"] for r in _records(run)] == [1, 2, 3]
        else:  # --img-size 32 is the run's own: nothing said to be ignored
            assert code == 0 and not said, err
            assert [r["epoch"] for r in _records(run)] == [1, 2, 3, 4]
            assert not [r for r in caplog.records if "ignored" in r.getMessage()]


def test_set_img_size_sizes_the_teacher(folder, tmp_path, capsys):
    """--set img_size=N asks what --img-size N does (the recipe's own size does not)."""
    out = tmp_path / "run"
    assert main(["bootstrap", "--teacher", "test_vit", "--random-teacher", "--data-dir",
                 str(folder / "data"), "--output", str(out), *SMALL, *RUN, "--epochs", "1",
                 "--set", "img_size=48", "crop_pct=0.5",
                 "interpolation=bilinear"]) == 0  # fmt: skip
    assert "48px" in capsys.readouterr().out
    saved = torch.load(out / "last.pt", weights_only=True)
    assert saved["preprocessing"]["img_size"] == 48
    # the crop and interpolation asked for are the ones used (and recorded), over the teacher's
    assert saved["preprocessing"]["crop_pct"] == 0.5
    assert saved["preprocessing"]["interpolation"] == "bilinear"


def test_a_folder_without_recipe_gets_trains_own_folder_recipe(folder, tmp_path, capsys):
    """As train: scaled to the folder and the device (fp32 on a CPU), not ImageNet's."""
    argv = _args(folder, tmp_path / "run")
    argv[argv.index("--epochs") + 1] = "1"
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "recipe own-folder-small" in out and "cpu, fp32" in out, out


def test_a_run_at_another_size_resumes_without_repeating_img_size(folder, tmp_path, caplog):
    """The teacher is rebuilt at the size the run trained at (vit_tiny takes 224 px only)."""
    vit = tmp_path / "vit_tiny.pt"
    torch.save(timm.create_model("vit_tiny_patch16_224").state_dict(), vit)
    out = tmp_path / "run"
    common = ["bootstrap", "--teacher", "vit_tiny_patch16_224", "--teacher-checkpoint",
              str(vit), "--data-dir", str(folder / "data"), "--output", str(out), *RUN]  # fmt: skip
    assert main([*common, "--img-size", "32", *SMALL, "--epochs", "1"]) == 0
    with caplog.at_level(logging.WARNING):
        code = main([*common, "--epochs", "2", "--resume", "auto", "--tokens", "9", "--loss",
                     "smooth_l1", "--points", "4"])  # fmt: skip
    assert code == 0
    assert [r["epoch"] for r in _records(out)] == [1, 2]
    # another student asked of a resumed run: kept as the run's, and said (--points 4 is its own)
    said = caplog.text
    assert "ignored: tokens (asked 9, the run's 4); loss (asked 'smooth_l1', the run's " in said
    assert "points (" not in said
    from sparseformer.bootstrap.run import BootstrapSettings  # a derived count: not "None"

    assert BootstrapSettings(inherit=6).changes_from(BootstrapSettings()) == [
        "inherit (asked 6, the run's default)"]  # fmt: skip


def test_run_trains_the_new_parts_and_keeps_the_frozen_tensors(alone, folder):
    saved = torch.load(alone / "last.pt", weights_only=True)
    teacher = torch.load(folder / "teacher.pt", weights_only=True)["model"]
    model = saved["model"]  # --inherit 2 --finetune 1: blocks 4 (trained) and 5 (frozen)
    pairs = (("stages.1.units.2.attn.qkv.weight", "blocks.5.attn.qkv.weight"),
             ("stages.1.units.2.mlp.norm.bias", "blocks.5.norm2.bias"),
             ("fc_norm.weight", "norm.weight"), ("head.bias", "head.bias"))  # fmt: skip
    for ours, theirs in pairs:
        assert torch.equal(model[ours], teacher[theirs]), ours
    assert not torch.equal(
        model["stages.1.units.1.mlp.fc1.weight"], teacher["blocks.4.mlp.fc1.weight"]
    )
    recs = _records(alone)
    assert [r["epoch"] for r in recs] == [1, 2, 3] and recs[-1]["train_loss"] < recs[0][
        "train_loss"
    ]
    assert saved["teacher"]["name"] == "test_vit" and saved["model_name"] == TEMPLATE


def test_each_epoch_shows_the_teacher_beside_the_student(alone, folder, capsys):
    recs = _records(alone)
    (teacher,) = {r["teacher_val_acc1"] for r in recs}  # frozen: the same on every line
    assert all(r["val_acc1"] is not None for r in recs)
    assert main(["eval", "--checkpoint", str(folder / "teacher.pt"), "--data-dir",
                 str(folder / "data"), "--json", "--quiet", "--threads", "1"]) == 0  # fmt: skip
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert teacher == pytest.approx(result["acc1"])  # what eval says of the teacher itself
    summary = json.loads((alone / "summary.json").read_text())
    assert summary["final"]["teacher_val_acc1"] == recs[-1]["teacher_val_acc1"]


def test_the_student_loads_in_every_command(alone, folder, tmp_path, capsys):
    student = create_model(TEMPLATE, checkpoint_path=alone / "last.pt").eval()
    assert student.config.num_tokens == 4 and student.config.width == 64
    assert student.config.ln_eps == 1e-6  # the teacher's, recorded with the architecture
    ckpt = str(alone / "last.pt")
    image = str(folder / "data" / "val" / "dark" / "0.png")
    assert main(["eval", "--model", TEMPLATE, "--checkpoint", ckpt, "--data-dir",
                 str(folder / "data"), "--json", "--quiet", "--threads", "1"]) == 0  # fmt: skip
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["acc1"] == pytest.approx(_records(alone)[-1]["val_acc1"])
    assert main(["predict", "--model", TEMPLATE, "--checkpoint", ckpt, image, "--json"]) == 0
    assert main(["viz", "--model", TEMPLATE, "--checkpoint", ckpt, image, "--out",
                 str(tmp_path / "pics")]) == 0  # fmt: skip
    assert any((tmp_path / "pics").iterdir())
    converted = str(tmp_path / "student.safetensors")  # the architecture travels in metadata
    assert main(["convert", ckpt, converted, "--model", TEMPLATE]) == 0
    again = create_model(TEMPLATE, checkpoint_path=converted).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(again(x), student(x))


@pytest.mark.slow
def test_the_student_exports(alone, tmp_path):
    assert main(["export", "--model", TEMPLATE, "--checkpoint", str(alone / "last.pt"),
                 "--out", str(tmp_path / "s.onnx"), "--check-batch-sizes", "2"]) == 0  # fmt: skip


def test_killed_run_resumes_on_the_same_trajectory(alone, folder, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "sparseformer", *_args(folder, out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "last.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)  # no chance to clean up: as a power cut
    proc.wait()
    done = torch.load(out / "last.pt", weights_only=True)["epoch"]
    assert done < 3, "the run finished before it could be killed"
    assert main(_args(folder, out, "--resume", "auto")) == 0
    first, resumed = _records(alone), _records(out)
    assert [r["epoch"] for r in resumed] == [1, 2, 3]
    for a, b in zip(first, resumed):
        for key in ("train_loss", "val_loss", "val_acc1", "teacher_val_acc1", "lr"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (key, a, b)


def test_bootstrap_saves_within_epochs_and_on_signal_as_train_does(folder, tmp_path, monkeypatch):
    import sparseformer.bootstrap.run as run_module

    seen, fit = [], run_module.fit

    def spy(model, data, recipe, pre, options, dist=None):
        seen.append(options)
        return fit(model, data, recipe, pre, options, dist)

    monkeypatch.setattr(run_module, "fit", spy)
    argv = _args(folder, tmp_path / "run", "--checkpoint-every", "2", "--no-save-on-signal")
    argv[argv.index("--epochs") + 1] = "1"
    assert main(argv) == 0
    assert seen[0].checkpoint_every.steps == 2 and seen[0].save_on_signal is False
    bad = _args(folder, tmp_path / "bad", "--checkpoint-every", "10 min")
    assert main(bad) == 1 and not (tmp_path / "bad").exists()  # refused before any work


def test_an_openclip_image_tower_alone_loads_as_its_whole_models_does(tmp_path):
    # before, OpenCLIP's model.visual.state_dict() was "153 missing; 152 unexpected; pass the
    # --teacher it was trained as" although the name was right (its whole model's loaded)
    open_clip = pytest.importorskip("open_clip")
    from functools import partial

    from timm.models.vision_transformer import VisionTransformer

    from sparseformer.bootstrap.teacher import _load_into
    from sparseformer.weights.checkpoint import read_checkpoint

    tower = open_clip.transformer.VisionTransformer(
        image_size=32, patch_size=16, width=64, layers=2, heads=2, mlp_ratio=4.0, output_dim=16
    ).eval()
    torch.save(tower.state_dict(), tmp_path / "visual.pt")
    torch.save({f"visual.{k}": v for k, v in tower.state_dict().items()}, tmp_path / "whole.pt")
    x = torch.randn(1, 3, 32, 32)
    for name in ("visual.pt", "whole.pt"):
        norm = partial(torch.nn.LayerNorm, eps=1e-5)  # timm's CLIP towers: the projection
        vit = VisionTransformer(img_size=32, patch_size=16, embed_dim=64, depth=2, num_heads=2,
                                pre_norm=True, num_classes=16, norm_layer=norm).eval()  # fmt: skip
        _load_into(vit, "a_clip_tower", read_checkpoint(tmp_path / name), tmp_path / name)
        torch.testing.assert_close(vit(x), tower(x), atol=1e-5, rtol=1e-4)
