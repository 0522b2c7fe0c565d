"""The default recipe for a folder of your own, called directly, and one short run that records it.

The rule (``sparseformer.engine.own_folder``): warm-up as a fraction of the run, augmentation,
Mixup and EMA by the number of training images, loader processes by the cores, precision by the
device; flags and ``--recipe`` override it.
"""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch

from sparseformer.cli import main
from sparseformer.engine.optim import build_schedule
from sparseformer.engine.own_folder import (
    DEFAULT_EPOCHS,
    WARMUP_FRACTION,
    count_training_files,
    default_precision,
    folder_size,
    own_folder_recipe,
    recipe_for_folder,
)
from sparseformer.engine.recipe import (
    RecipeError,
    RecipeFlags,
    load_recipe,
    recipe_from_flags,
)

from .test_data import make_folder


def lr_by_step(recipe, images: int) -> list[float]:
    """The learning rate of every step of ``recipe`` on ``images`` images, one process."""
    steps = math.ceil(images / recipe.batch_size)
    lrs = recipe.scaled_lr(recipe.batch_size)
    schedule = build_schedule(recipe.schedule, lrs, recipe.warmup_epochs, recipe.epochs, steps)
    return [schedule(s) for s in range(recipe.epochs * steps)]


def test_one_epoch_reaches_the_peak_and_ends_at_the_floor():
    recipe = own_folder_recipe(300, epochs=1)
    peak, _, floor = recipe.scaled_lr(recipe.batch_size)
    lrs = lr_by_step(recipe, 300)
    assert max(lrs) == pytest.approx(peak)
    assert floor <= lrs[-1] < 0.05 * peak  # decayed, not stuck in the warm-up
    assert all(lr >= floor for lr in lrs)
    # the paper's recipe on the same run never leaves its 20-epoch warm-up
    imagenet = load_recipe("imagenet1k").replace(epochs=1)
    assert max(lr_by_step(imagenet, 300)) < 0.05 * imagenet.scaled_lr(imagenet.batch_size)[0]


def test_a_ten_step_run_warms_up_over_its_first_step():
    """5% of 10 steps is half a step, which rounded to none: the first step ran at the peak."""
    recipe = own_folder_recipe(160, epochs=1)  # a small folder: 16 a batch, 10 steps
    assert recipe.batch_size == 16
    peak, start, _ = recipe.scaled_lr(recipe.batch_size)
    lrs = lr_by_step(recipe, 160)
    assert len(lrs) == 10 and lrs[0] == pytest.approx(start) and lrs[1] == pytest.approx(peak)


@pytest.mark.parametrize("epochs", [1, 3, 100, 300])
def test_the_warm_up_is_a_fraction_of_the_run(epochs):
    recipe = own_folder_recipe(50_000, epochs=epochs)
    assert recipe.epochs == epochs
    assert recipe.warmup_epochs == pytest.approx(WARMUP_FRACTION * epochs)
    assert recipe.schedule == "cosine_after_warmup"
    assert own_folder_recipe(50_000).epochs == DEFAULT_EPOCHS


def test_a_small_folder_gets_crops_and_flips_only():
    recipe = own_folder_recipe(480)
    assert recipe.name == "own-folder-small" and folder_size(480) == "small"
    assert recipe.mixup == 0 and recipe.cutmix == 0 and recipe.ema_decay is None
    aug = recipe.augmentation
    assert aug.auto_augment is None and aug.re_prob == 0 and aug.color_jitter is None
    assert aug.hflip == 0.5 and aug.scale[0] > 0.08  # a milder crop than ImageNet's
    assert recipe.repeated_aug == 0
    # an epoch keeps about ten steps: batches shrink with the folder, to 16 at least
    assert own_folder_recipe(480).batch_size == 32
    assert own_folder_recipe(40).batch_size == 16
    assert own_folder_recipe(5_000).batch_size == 128
    # under 32 files, 16 would leave one step an epoch or none: two steps, whatever the size
    assert [own_folder_recipe(n).batch_size for n in (31, 24, 6, 4, 3, 1)] == [8, 8, 2, 2, 1, 1]


def test_under_torchrun_each_process_batch_fits_its_share(tmp_path, monkeypatch):
    """Two processes on 400 images took 32 each (the batch of 400 in one process): 6 steps an
    epoch, where one process takes 12; on 8 GPUs, 4 steps an epoch."""
    assert own_folder_recipe(480, processes=2).batch_size == own_folder_recipe(240).batch_size
    assert own_folder_recipe(400, processes=8).batch_size == 16  # the floor
    assert own_folder_recipe(5_000, processes=2).batch_size == 128  # the cap, per process
    folder = make_folder(tmp_path / "d", classes=("cat", "dog"), per_class=12)  # 24 files
    alone = recipe_for_folder(RecipeFlags(), folder).batch_size
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert (alone, recipe_for_folder(RecipeFlags(), folder).batch_size) == (8, 4)


def test_bigger_folders_get_the_stronger_recipe():
    medium, large = own_folder_recipe(50_000), own_folder_recipe(1_281_167)
    assert medium.name == "own-folder-medium" and large.name == "own-folder-large"
    assert 0 < medium.mixup_prob < large.mixup_prob == 1.0
    assert medium.augmentation.re_prob < large.augmentation.re_prob
    assert medium.ema_decay < large.ema_decay and medium.ema_warmup and large.ema_warmup
    paper = load_recipe("imagenet1k")
    assert (large.mixup, large.cutmix, large.ema_decay) == (0.8, 1.0, paper.ema_decay)
    assert large.augmentation == paper.augmentation and large.lr == paper.lr
    assert large.batch_size == medium.batch_size == paper.batch_size


def test_workers_follow_the_cores_and_precision_the_device(monkeypatch):
    assert own_folder_recipe(100, cores=2).num_workers == 1
    assert own_folder_recipe(100, cores=1).num_workers == 0
    assert own_folder_recipe(100, cores=64).num_workers == 4  # the training threads need cores
    assert own_folder_recipe(100, device="cuda", cores=64).num_workers == 8
    assert own_folder_recipe(100, device="cuda", cores=4).num_workers == 4
    assert default_precision("cpu") == "fp32" == own_folder_recipe(100).precision
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert default_precision("cuda") == default_precision("cuda:1") == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert default_precision("cuda") == "fp32"  # fp16 needs a scaler: asked for, not default


def test_flags_and_a_named_recipe_override_the_rule(tmp_path):
    folder = make_folder(tmp_path / "d", classes=("cat", "dog"), per_class=3)
    flags = RecipeFlags(fields={"epochs": 4, "lr": 0.5, "batch_size": 6}, settings=("mixup=0.2",))
    own = recipe_for_folder(flags, folder)
    recipe = recipe_from_flags(flags, None, own)
    assert recipe.name == "own-folder-small" and recipe.epochs == 4
    assert recipe.warmup_epochs == pytest.approx(WARMUP_FRACTION * 4)  # of the asked run
    assert (recipe.lr, recipe.batch_size, recipe.mixup) == (0.5, 6, 0.2)
    # the rule's warm-up start and floor are 1% of the peak: of the asked one too
    assert (recipe.warmup_lr, recipe.min_lr) == pytest.approx((0.005, 0.005))
    low = RecipeFlags(fields={"lr": 1e-5}, settings=("min_lr=0",))
    recipe = recipe_from_flags(low, None, recipe_for_folder(low, folder))
    assert (recipe.warmup_lr, recipe.min_lr) == pytest.approx((1e-7, 0.0))  # asked: as asked
    for bad in ("null", "[1]", "abc"):  # named by the recipe's type check, not a TypeError
        with pytest.raises(RecipeError, match="lr must be"):
            recipe_from_flags(RecipeFlags(settings=(f"lr={bad}",)), None, own)
    asked = RecipeFlags(fields={"warmup_epochs": 0.0})
    assert recipe_from_flags(asked, None, recipe_for_folder(asked, folder)).warmup_epochs == 0
    named = RecipeFlags(name="imagenet1k")
    assert recipe_for_folder(named, folder) is None
    assert recipe_from_flags(named, None, None).name == "imagenet1k"
    assert recipe_for_folder(RecipeFlags(), None) is None  # a built-in data set keeps its own


def test_a_schedule_that_would_climb_is_warned_not_refused(caplog):
    """A shipped recipe's floor is fixed: a low --lr puts it above the peak. Refusing it
    would also refuse to resume the runs saved so before."""
    from sparseformer.engine.collaborators import _warn_upside_down

    low = load_recipe("imagenet1k").replace(lr=1e-6)  # min_lr 5e-6 stays
    with caplog.at_level(logging.WARNING, logger="sparseformer"):
        _warn_upside_down(low)
        _warn_upside_down(load_recipe("imagenet1k"))  # as shipped: nothing to say
    assert caplog.text.count("above the peak lr") == 1
    assert "min_lr 5e-06 above the peak lr 1e-06" in caplog.text
    assert "--set min_lr=1e-08 warmup_lr=1e-08" in caplog.text


def test_training_files_are_counted_as_the_scan_takes_them(tmp_path):
    folder = make_folder(tmp_path / "d", classes=("cat", "dog"), per_class=5)
    (folder / "train" / "cat" / "notes.txt").write_text("not an image")
    (folder / "train" / "cat" / ".hidden.jpg").write_bytes(b"")
    assert count_training_files(folder) == 10
    assert count_training_files(folder, limit=4) == 4  # --limit-train
    assert count_training_files(folder, stop_at=7) == 7  # a huge folder: the first names
    assert count_training_files(folder, video=True) == 0
    assert count_training_files(tmp_path / "missing") == 0  # the scan says what is missing
    for i in range(40):  # files in no class folder: the scan leaves them out, and so does this
        (folder / "train" / f"loose{i}.png").write_bytes(b"")
    assert count_training_files(folder) == 10


@pytest.mark.parametrize("asked", [["--epochs", 10], ["--set", "epochs=10"]])
def test_the_warm_up_follows_the_epochs_asked_by_flag_or_by_set(tmp_path, asked):
    folder = make_folder(tmp_path / "d", classes=("cat", "dog"), per_class=5)
    flag, value = asked
    flags = (
        RecipeFlags(fields={"epochs": value})
        if flag == "--epochs"
        else RecipeFlags(settings=(value,))
    )
    recipe = recipe_from_flags(flags, default=recipe_for_folder(flags, folder))
    assert recipe.epochs == 10 and recipe.warmup_epochs == pytest.approx(WARMUP_FRACTION * 10)


def test_a_one_epoch_run_on_a_small_folder_records_the_own_folder_recipe(tmp_path, capsys):
    folder = make_folder(tmp_path / "data", classes=("cat", "dog", "emu"), per_class=12)
    out = tmp_path / "run"
    code = main(["train", "--model", "sparseformer_v1_nano", "--data-dir", str(folder),
                 "--output", str(out), "--epochs", "1", "--img-size", "32", "--quiet",
                 "--threads", "1", "--device", "cpu"])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0 and "recipe own-folder-small" in printed and "cpu, fp32" in printed
    recipe = torch.load(out / "last.pt", weights_only=True)["recipe"]
    assert recipe["name"] == "own-folder-small" and recipe["precision"] == "fp32"
    assert recipe["mixup"] == 0 and recipe["ema_decay"] is None and recipe["epochs"] == 1
    assert recipe["batch_size"] == 16 and recipe["warmup_epochs"] == WARMUP_FRACTION
    (record,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    peak = recipe["lr"] * 16 / recipe["lr_base_batch"]
    assert peak / 100 <= record["lr"] < peak  # past the peak, at the floor's side of it
