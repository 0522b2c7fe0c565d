"""The rules the commands apply, called directly (no argparse): resuming, recipes from flags,
clip sampling, class matching, run folders. The commands' own tests cover their messages."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch

from sparseformer.data import DataError
from sparseformer.data.media import expand_media_paths
from sparseformer.data.relabel import RelabelledDataset, checkpoint_label_map
from sparseformer.engine.inputs import class_names
from sparseformer.engine.output_paths import check_output_path
from sparseformer.engine.recipe import (
    RecipeError,
    RecipeFlags,
    load_recipe,
    recipe_for_clips,
    recipe_from_flags,
)
from sparseformer.engine.resume import (
    ResumeError,
    check_same_classes,
    keep_run_clips,
    read_resume_checkpoint,
    resolve_resume,
    resumed_recipe,
    run_is_finished,
)
from sparseformer.engine.run_folder import (
    RUN_FILES,
    clear_old_run,
    prepare_output,
    summary_epochs,
)
from sparseformer.engine.video import check_model_fits_data, choose_clip_spec, is_video_model

VIDEO = "video_sparseformer_v1_tiny"


def test_resume_auto_takes_last_then_best_else_starts(tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        assert resolve_resume("auto", tmp_path) is None
    assert "no checkpoint in" in caplog.text
    (tmp_path / "best.pt").write_bytes(b"")
    assert resolve_resume("auto", tmp_path) == tmp_path / "best.pt"  # killed between saves
    (tmp_path / "last.pt").write_bytes(b"")
    assert resolve_resume("auto", tmp_path) == tmp_path / "last.pt"
    assert resolve_resume("elsewhere/last.pt", tmp_path) == Path("elsewhere/last.pt")
    assert resolve_resume(None, tmp_path) is None
    with pytest.raises(ResumeError, match="give one of them"):
        resolve_resume("auto", tmp_path, overwrite=True)


def _saved(tmp_path, **extra) -> Path:
    recipe = load_recipe("fashion-mnist-cpu").replace(epochs=4)
    state = {"model_name": "sparseformer_v1_nano", "epoch": 2, "step": 4, "model": {}}
    state["recipe"] = recipe.to_dict()
    path = tmp_path / "last.pt"
    torch.save({**state, **extra}, path)
    return path


def test_a_resume_checkpoint_of_another_model_names_it(tmp_path):
    path = _saved(tmp_path)
    assert read_resume_checkpoint(path, "sparseformer_v1_nano")["epoch"] == 2
    with pytest.raises(ResumeError, match="is a checkpoint of 'sparseformer_v1_nano', not"):
        read_resume_checkpoint(path, "sparseformer_v1_tiny")


def test_a_resumed_run_keeps_its_recipe_but_takes_epochs_and_workers(tmp_path, caplog):
    path = _saved(tmp_path)
    saved = torch.load(path, weights_only=True)
    flags = RecipeFlags(None, {"epochs": 6, "num_workers": 0, "lr": 1.0})
    asked = recipe_from_flags(flags, "fashion-mnist")
    with caplog.at_level(logging.WARNING):
        recipe = resumed_recipe(saved, path, asked, flags)
    assert recipe.epochs == 6 and recipe.num_workers == 0
    assert recipe.lr == load_recipe("fashion-mnist-cpu").lr
    assert "lr (asked 1.0" in caplog.text and "epochs" not in caplog.text.split("ignored")[1]
    with pytest.raises(ResumeError, match="already has 2 epochs"):
        resumed_recipe(saved, path, asked, RecipeFlags(None, {"epochs": 1}))


def test_a_run_is_finished_when_its_summary_says_so(tmp_path):
    saved = {"epoch": 3}
    recipe = load_recipe("fashion-mnist-cpu").replace(epochs=3)
    assert not run_is_finished(saved, recipe, tmp_path)  # no summary: stopped after saving
    (tmp_path / "summary.json").write_text(json.dumps({"epochs": 3}))
    assert summary_epochs(tmp_path) == 3 and run_is_finished(saved, recipe, tmp_path)
    assert not run_is_finished(saved, recipe.replace(epochs=5), tmp_path)


def test_resumed_clips_and_classes(caplog):
    clips = {"num_frames": 4, "stride": 2, "sampling": "dense"}
    with caplog.at_level(logging.WARNING):
        keep_run_clips({"frames": 4, "frame_stride": None, "sampling": None}, clips)
    assert not caplog.text
    with caplog.at_level(logging.WARNING):
        keep_run_clips({"frames": 8, "frame_stride": None, "sampling": None}, clips)
    assert "--frames (asked 8, the run's 4)" in caplog.text
    check_same_classes(None, ["a"], "r")  # not recorded: not checked
    check_same_classes(["a", "b"], ["a", "b"], "r")
    with pytest.raises(ResumeError, match="was trained on classes"):
        check_same_classes(["a", "b"], ["b", "a"], "r")


def test_recipes_from_flags_and_for_clips():
    recipe = recipe_from_flags(RecipeFlags(settings=("hflip=0", "augmentation.scale=[0.5,1]")))
    assert recipe.name == "imagenet1k"
    assert recipe.augmentation.hflip == 0 and recipe.augmentation.scale == (0.5, 1.0)
    recipe = recipe_from_flags(
        RecipeFlags(fields={"lr": 0.5}, settings=("mixup=0",)), "fashion-mnist"
    )
    assert recipe.name == "fashion-mnist-cpu" and recipe.lr == 0.5 and recipe.mixup == 0
    with pytest.raises(RecipeError, match="--set expects KEY=VALUE"):
        recipe_from_flags(RecipeFlags(settings=("mixup",)))
    for value in ("5", "[1]", "null"):  # not dataclasses' words; null was passed over
        said = f"augmentation must be an object .* got {re.escape(value)}$"
        with pytest.raises(RecipeError, match=said):
            recipe_from_flags(RecipeFlags(settings=(f"augmentation={value}",)))
    # a field set twice, by its flag and by --set: one was taken in silence
    with pytest.raises(RecipeError, match="--set img_size=32 and the flag of img_size 48 ask"):
        recipe_from_flags(RecipeFlags(fields={"img_size": 48}, settings=("img_size=32",)))
    from sparseformer.cli import build_parser
    from sparseformer.cli.common import recipe_flags

    args = build_parser().parse_args(
        ["train", "--output", "o", "--workers", "2", "--set", "num_workers=1"]
    )
    with pytest.raises(RecipeError, match="--set num_workers=1 and --workers 2 ask for two"):
        recipe_from_flags(recipe_flags(args))  # the command's own flag named
    same = RecipeFlags(fields={"img_size": 48}, settings=("img_size=48",))
    assert recipe_from_flags(same).img_size == 48  # the same value twice is no conflict
    clips = recipe_for_clips(load_recipe("imagenet1k").replace(cutmix=1.0))
    assert clips.cutmix == 0 and clips.mixup == load_recipe("imagenet1k").mixup


def test_clip_sampling_takes_flags_then_the_checkpoint_then_the_model():
    spec = choose_clip_spec(VIDEO, {"num_frames": None, "stride": None, "sampling": None})
    assert (spec.num_frames, spec.stride, spec.sampling) == (8, 4, "dense")
    saved = {"num_frames": 4, "stride": 2, "sampling": "uniform"}
    spec = choose_clip_spec(VIDEO, {"num_frames": 6}, saved, num_clips=2, num_crops=3)
    assert (spec.num_frames, spec.stride, spec.sampling, spec.num_views) == (6, 2, "uniform", 6)


def test_models_meet_data_of_their_kind():
    assert is_video_model(VIDEO) and not is_video_model("sparseformer_v1_tiny")
    assert not is_video_model("resnet50")
    assert check_model_fits_data("sparseformer_v1_tiny", None) is False  # built-in images
    with pytest.raises(DataError, match="is a video model but the data are images"):
        check_model_fits_data(VIDEO, None)


def test_checkpoint_classes_are_matched_by_name():
    assert checkpoint_label_map(None, ["a", "b"]) is None  # official: by position
    assert checkpoint_label_map(["a", "b"], ["a", "b"]) is None
    mapping = checkpoint_label_map(["a", "b", "c"], ["c", "a"])
    assert mapping == [2, 0]
    relabelled = RelabelledDataset([("x", 0), ("y", 1)], mapping)
    assert [relabelled[i][1] for i in range(len(relabelled))] == [2, 0]
    with pytest.raises(DataError, match=r"'d' of the data are not among the checkpoint's "
                       r"classes \('a', 'b'\); evaluate"):  # fmt: skip
        checkpoint_label_map(["a", "b"], ["a", "d"])  # the list complete: no "..."
    assert class_names({"class_names": ["x", "y"]}, 2) == ["x", "y"]
    assert class_names({}, 3) == ["class 0", "class 1", "class 2"]


def test_media_paths_and_run_folders(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        expand_media_paths([tmp_path / "none.jpg"], video=False)
    (tmp_path / "notes.txt").write_text("")
    with pytest.raises(DataError, match="holds no image files"):
        expand_media_paths([tmp_path], video=False)
    # a pattern no shell expanded (quoted, or on Windows): the files it matches, sorted
    for name in ("b.jpg", "a.jpg"):
        (tmp_path / name).write_bytes(b"")
    pattern = tmp_path / "*.jpg"
    assert expand_media_paths([pattern], video=False) == [tmp_path / "a.jpg", tmp_path / "b.jpg"]
    with pytest.raises(DataError, match="the pattern .*png' matches no file"):
        expand_media_paths([tmp_path / "*.png"], video=False)
    (tmp_path / "up").symlink_to(tmp_path)  # a loop: ** gave each file dozens of times
    assert expand_media_paths([tmp_path / "**" / "*.jpg"], video=False) == [
        tmp_path / "a.jpg",
        tmp_path / "b.jpg",
    ]
    (tmp_path / "cls" / "x").mkdir(parents=True)  # a quoted 'val/*': folders, as a shell gives
    (tmp_path / "cls" / "x" / "1.jpg").write_bytes(b"")
    assert expand_media_paths([tmp_path / "cls" / "*"], video=False) == [
        tmp_path / "cls" / "x" / "1.jpg"
    ]
    nested = expand_media_paths([tmp_path / "cls" / "**" / ""], video=False)  # cls/ and cls/x/
    assert nested == [tmp_path / "cls" / "x" / "1.jpg"]  # each file once
    (tmp_path / "c.jpg").symlink_to(tmp_path / "a.jpg")  # two names of one file (a blob store)
    assert len(expand_media_paths([pattern], video=False)) == 3
    assert len(expand_media_paths([tmp_path / "**" / "*.jpg"], video=False)) == 4  # cls/x/1
    run = tmp_path / "run"
    prepare_output(run)
    (run / ".last.pt.tmp-1").write_bytes(b"")  # a run killed while writing
    for name in RUN_FILES:
        (run / name).write_text("")
    prepare_output(run)
    assert not (run / ".last.pt.tmp-1").exists() and (run / "last.pt").exists()
    board = run / "tensorboard"  # --overwrite drew the new run's curves over the old ones
    board.mkdir()
    (board / "events.out.tfevents.1.host.42.0").write_bytes(b"")
    (board / "notes.txt").write_text("")  # not ours: kept
    clear_old_run(run)
    assert [p.relative_to(run).as_posix() for p in run.rglob("*")] == [
        "tensorboard",
        "tensorboard/notes.txt",
    ]


def test_output_paths_are_checked_before_any_work(tmp_path):
    (tmp_path / "file").write_text("")
    check_output_path(tmp_path / "new" / "run", "--output", folder=True)
    with pytest.raises(ValueError, match="is a file; give a folder"):
        check_output_path(tmp_path / "file", "--output", folder=True)
    with pytest.raises(ValueError, match="is a folder; give a file path"):
        check_output_path(tmp_path, "--out")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        check_output_path(tmp_path / "file" / "x.onnx", "--out")
    # where permissions do not tell (root, a read-only mount, /proc): a file is tried
    for where in (Path("/proc/sys"), Path("/proc/self")) if Path("/proc/self").is_dir() else ():
        with pytest.raises(ValueError, match=f"--out '{where}/x.json': cannot write in"):
            check_output_path(where / "x.json", "--out")
    assert not list(tmp_path.glob(".sparseformer-probe-*"))  # the probe is removed


def test_a_part_way_epoch_resumed_on_new_steps_says_what_it_trains_again(caplog):
    """Saved at step 20 of epoch 2 with 64 steps per epoch, resumed on 128: the saved steps
    per epoch are 64 (not 84), and the 20 steps are said to be trained again."""
    from types import SimpleNamespace

    from sparseformer.engine.resume import _warn_new_schedule

    parts = SimpleNamespace(steps_per_epoch=128, total_batch=64)
    with caplog.at_level(logging.WARNING):
        _warn_new_schedule({"epoch": 1, "step": 84, "epoch_step": 20}, 2, 1, parts)
    said = caplog.records[0].getMessage()
    assert "saved with 2 process(es) and 64 steps per epoch, resumed with 1 and 128" in said
    assert "the 20 steps it had trained of epoch 2 are trained again" in said


def test_a_first_epoch_checkpoint_resumed_on_other_data_is_told_by_its_steps_per_epoch():
    """In the first epoch the step count agrees with any steps per epoch (step = steps done):
    a run saved at step 6 of 30 and resumed over 75 went on part-way into a new shuffle,
    unsaid. The saved count tells it; a run saved before it was kept, from epoch 2 on."""
    from sparseformer.engine.resume import _on_new_steps

    first = {"epoch": 0, "step": 6, "epoch_step": 6, "steps_per_epoch": 30}
    assert _on_new_steps(first, 75) and not _on_new_steps(first, 30)
    older = {"epoch": 1, "step": 36, "epoch_step": 6}  # no count: told by the step
    assert _on_new_steps(older, 75) and not _on_new_steps(older, 30)


def test_a_run_whose_last_checkpoint_links_to_a_backup_resumes_in_place(tmp_path):
    from sparseformer.engine.run_folder import refuse_overwriting_a_run

    backup, run = tmp_path / "backup", tmp_path / "run"
    backup.mkdir()
    run.mkdir()
    (backup / "last.pt").write_bytes(b"weights")
    (run / "last.pt").symlink_to(backup / "last.pt")
    refuse_overwriting_a_run(run, resume=run / "last.pt")  # the folder's own run: goes on
    with pytest.raises(ValueError, match="already holds another run"):
        refuse_overwriting_a_run(run, resume=backup / "last.pt")


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc (Linux)")
def test_outputs_named_by_a_descriptor_are_appended_to_never_replaced(tmp_path):
    """`bench --csv /dev/stdout > out.txt`: the redirected file gets the bytes after what the
    command printed, and nothing is staged in /dev or /proc."""
    from sparseformer.engine.atomic import install, is_stream, output_target, staging_file

    redirected = tmp_path / "out.txt"
    with open(redirected, "w") as f:
        f.write("the table\n")
        f.flush()
        name = Path(f"/proc/self/fd/{f.fileno()}")
        assert is_stream(name) and output_target(name) == name
        tmp = staging_file(name, ".csv")
        assert not str(tmp).startswith(("/dev", "/proc"))
        tmp.write_text("a,b\n")
        install(tmp, name)
        f.write("wrote it\n")  # what the command prints after: after the bytes, not over them
    assert redirected.read_text() == "the table\na,b\nwrote it\n" and not tmp.exists()
    assert not is_stream(redirected)  # a file named as itself is replaced, atomically


def test_a_run_resumed_on_other_data_says_so(tmp_path, monkeypatch, caplog):
    import logging

    from sparseformer.engine.resume import warn_of_other_data

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.WARNING):
        warn_of_other_data("a", str(tmp_path / "a"), "r/last.pt")  # the same folder, spelt anew
        warn_of_other_data("gone/a", "a", "r/last.pt")  # relative to another working folder
        warn_of_other_data(None, "a", "r/last.pt")  # an older run that recorded none
        assert not caplog.text
        warn_of_other_data("a", "b", "r/last.pt")
    assert "resuming r/last.pt on b, where the run trained on a: its best top-1" in caplog.text


def test_resume_messages_write_values_as_a_person_does():
    from sparseformer.engine.resume import _shown

    assert _shown(0.1 + 0.05) == "0.15" and _shown(1.0) == "1.0" and _shown(1e-12) == "1e-12"


def test_a_resumed_run_given_no_data_is_told_the_data_it_trained_on():
    from sparseformer.cli import build_parser
    from sparseformer.cli.common import data_source

    args = build_parser().parse_args(["train", "--output", "runs/a", "--resume", "auto"])
    with pytest.raises(DataError, match=r"trained on data/pets \(--data-dir data/pets\)"):
        data_source(args, views=False, trained_on="data/pets")
    with pytest.raises(DataError, match=r"\(--dataset fashion-mnist\)"):
        data_source(args, views=False, trained_on="fashion-mnist")
    with pytest.raises(DataError, match="give exactly one of --data-dir DIR and --dataset NAME"):
        data_source(args, views=False)  # a new run: nothing to name
