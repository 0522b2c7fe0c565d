"""Training as the authors did (their Swin-based ImageNet code): the stem's He-normal init, timm's
per-step cosine, the v1 offset-projection init behind a switch, and the best of model and EMA
evaluated in fp32."""

from __future__ import annotations

import json
import math

import pytest
import torch
from timm.scheduler import CosineLRScheduler

from sparseformer import create_model
from sparseformer.data import DatasetBundle, Preprocessing
from sparseformer.engine import checkpoint as ckpt_io
from sparseformer.engine import loop as loop_module
from sparseformer.engine import trainer as trainer_module
from sparseformer.engine.optim import LRSchedule, TimmCosineSchedule, build_schedule
from sparseformer.engine.recipe import RecipeError, load_recipe, saved_recipe
from sparseformer.engine.resume import RunState
from sparseformer.engine.trainer import RunOptions, fit
from sparseformer.layers import EarlyConvolution
from sparseformer.models.blocks import RoiAdjustOp, SampleMixOp
from sparseformer.weights.build import build_model
from tests.test_engine import BreaksLater, Pixels, tiny_run


def ks_to_normal(values: torch.Tensor, std: float) -> float:
    """Kolmogorov-Smirnov distance between ``values`` and N(0, std^2)."""
    x = values.flatten().double().sort().values
    n = x.numel()
    cdf = torch.special.ndtr(x / std)
    ranks = torch.arange(1, n + 1, dtype=torch.float64)
    return max((ranks / n - cdf).abs().max().item(), (cdf - (ranks - 1) / n).abs().max().item())


def test_the_stem_starts_he_normal_over_the_fan_out():
    fan_out_std = math.sqrt(2 / (96 * 7 * 7))  # about 0.0206 for 96 channels
    weight = EarlyConvolution(3, 96).conv.weight.detach()  # (96, 3, 7, 7): 14,112 draws
    critical = 1.63 / math.sqrt(weight.numel())  # the KS test at the 1% level
    assert weight.std().item() == pytest.approx(fan_out_std, rel=0.03)
    assert weight.mean().abs().item() < 3 * fan_out_std / math.sqrt(weight.numel())
    assert ks_to_normal(weight, fan_out_std) < critical
    # the check can fail: PyTorch's default (uniform, std about 0.048) is rejected
    default = torch.nn.Conv2d(3, 96, 7).weight.detach()
    assert ks_to_normal(default, fan_out_std) > 10 * critical
    # a model's init_weights reaches the stem (video stems too: same fan-out over 1x7x7)
    stem = create_model("sparseformer_v1_micro").stem.conv.weight.detach()  # (32, 3, 7, 7)
    micro_std = math.sqrt(2 / (32 * 7 * 7))
    assert stem.std().item() == pytest.approx(micro_std, rel=0.05)
    assert ks_to_normal(stem, micro_std) < 1.63 / math.sqrt(stem.numel())


def offset_and_adjust_weights(model) -> tuple[torch.Tensor, torch.Tensor]:
    offsets = [
        m.offset_proj.weight.flatten() for m in model.modules() if isinstance(m, SampleMixOp)
    ]
    adjust = [m.proj.weight.flatten() for m in model.modules() if isinstance(m, RoiAdjustOp)]
    return torch.cat(offsets).detach(), torch.cat(adjust).detach()


def test_the_offset_projection_init_is_a_named_switch():
    offsets, adjust = offset_and_adjust_weights(create_model("sparseformer_v1_micro"))
    assert (offsets == 0).all() and (adjust == 0).all()  # ours: points on an exact grid
    v1 = create_model("sparseformer_v1_micro", offset_proj_init="trunc_normal")
    offsets, adjust = offset_and_adjust_weights(v1)  # 6,144 offset weights
    assert offsets.std().item() == pytest.approx(0.02, rel=0.05)  # the authors' v1 code
    assert ks_to_normal(offsets, 0.02) < 1.63 / math.sqrt(offsets.numel())
    assert (adjust == 0).all()  # their typo zeroes the RoI adjustment either way
    with pytest.raises(ValueError, match="offset_proj_init must be one of"):
        create_model("sparseformer_v1_nano", offset_proj_init="xavier")


def test_the_v1_recipe_asks_for_the_authors_offset_init_and_the_cpu_recipe_does_not():
    v1, cpu = load_recipe("imagenet1k"), load_recipe("fashion-mnist-cpu")
    assert (v1.offset_proj_init, cpu.offset_proj_init) == ("trunc_normal", None)
    trained = build_model("sparseformer_v1_nano", 10, offset_proj_init=v1.offset_proj_init)
    assert (offset_and_adjust_weights(trained)[0] != 0).all()
    demo = build_model("sparseformer_v1_nano", 10, offset_proj_init=cpu.offset_proj_init)
    assert (offset_and_adjust_weights(demo)[0] == 0).all()
    build_model("resnet18", 10, offset_proj_init="trunc_normal")  # timm models have none
    with pytest.raises(RecipeError, match="offset_proj_init must be zeros, trunc_normal or null"):
        v1.replace(offset_proj_init="xavier")


def test_a_recipe_file_takes_imagenet1k_for_every_field_it_leaves_out(tmp_path):
    """As the docs and the warning say; the offset init took the model's zeros."""
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"name": "mine", "epochs": 30}))
    mine, v1 = load_recipe(path).to_dict(), load_recipe("imagenet1k").to_dict()
    differ = {k for k in v1 if mine.get(k) != v1[k]}
    assert differ <= {"name", "description", "epochs"} and mine["epochs"] == 30
    old = dict(v1)
    del old["offset_proj_init"]  # a checkpoint written before the field existed
    assert saved_recipe(old).offset_proj_init is None  # the model's own init, as that run took


def authors_rates(peak, warmup_lr, min_lr, warmup_steps, total_steps) -> list[float]:
    """The rate of every step of the authors' loop: timm's scheduler over one parameter group,
    ``step_update(k)`` after step ``k`` (Swin's ``train_one_epoch``)."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    scheduler = CosineLRScheduler(
        optimizer, t_initial=total_steps, lr_min=min_lr, warmup_lr_init=warmup_lr,
        warmup_t=warmup_steps, cycle_limit=1, t_in_epochs=False, warmup_prefix=False,
    )  # fmt: skip
    rates = []
    for k in range(total_steps):
        rates.append(optimizer.param_groups[0]["lr"])
        scheduler.step_update(k)
    return rates


def test_timm_cosine_equals_timm_over_a_whole_300_epoch_run():
    steps = 7  # per epoch: 2,100 steps, 140 of warm-up
    rates = authors_rates(1e-3, 1e-6, 1e-5, 20 * steps, 300 * steps)
    ours = build_schedule("timm_cosine", (1e-3, 1e-6, 1e-5), 20, 300, steps)
    assert [ours(k) for k in range(300 * steps)] == rates  # equal to the last bit
    # the shape differs from the cosine after the warm-up: below the peak when warm-up ends
    assert max(rates) < 1e-3  # the peak is never reached
    assert rates[20 * steps + 1] == pytest.approx(0.989 * 1e-3, rel=1e-3)  # cosine from step 0
    after = build_schedule("cosine_after_warmup", (1e-3, 1e-6, 1e-5), 20, 300, steps)
    assert isinstance(after, LRSchedule) and isinstance(ours, TimmCosineSchedule)
    assert after(175 * steps) > 1.1 * ours(175 * steps)
    # no warm-up: the optimizer starts at the peak, as timm leaves it
    assert build_schedule("timm_cosine", (1e-3, 0.0, 1e-5), 0, 3, 4)(0) == 1e-3


def test_every_step_of_a_short_v1_run_takes_timms_rate(tmp_path, monkeypatch):
    seen = []

    def recording_set_lr(optimizer, lr):
        seen.append(lr)
        return set_lr(optimizer, lr)

    set_lr = loop_module.set_lr
    monkeypatch.setattr(loop_module, "set_lr", recording_set_lr)
    v1 = load_recipe("imagenet1k")
    # the v1 recipe, shortened: 3 epochs of 4 steps of 16 images, the first one warm-up
    recipe = v1.replace(epochs=3, warmup_epochs=1, batch_size=16, mixup=0.0, cutmix=0.0,
                        repeated_aug=0, num_workers=0, precision="fp32")  # fmt: skip
    bundle = DatasetBundle(Pixels(64, 0), Pixels(32, 1), ["a", "b", "c", "d"])
    pre = Preprocessing(16, (0.5,) * 3, (0.25,) * 3, 1.0, "bilinear")
    options = RunOptions(output=tmp_path / "run", model_name="test", progress=False)
    fit(BreaksLater(10**9), bundle, recipe, pre, options)
    peak, warmup_lr, min_lr = v1.scaled_lr(16)
    assert seen == authors_rates(peak, warmup_lr, min_lr, 4, 12)
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["lr"] == seen[-1]


def test_the_cpu_recipe_keeps_its_cosine_after_warmup_and_old_runs_keep_theirs():
    assert load_recipe("fashion-mnist-cpu").schedule == "cosine_after_warmup"
    assert load_recipe("imagenet1k").schedule == "timm_cosine"
    old = load_recipe("imagenet1k").to_dict()
    del old["schedule"]  # a checkpoint written before the field existed
    assert saved_recipe(old).schedule == "cosine_after_warmup"
    with pytest.raises(RecipeError, match="schedule must be one of timm_cosine"):
        load_recipe("imagenet1k").replace(schedule="step")


def test_the_best_epoch_is_the_better_of_model_and_ema():
    state = RunState()
    assert state.update_best({"val_acc1": 50.0}, 1)  # no EMA: the model
    assert state.update_best({"val_acc1": 45.0, "ema_val_acc1": 60.0}, 2)
    assert (state.best, state.best_epoch, state.best_source) == (60.0, 2, "ema")
    assert not state.update_best({"val_acc1": 59.0, "ema_val_acc1": 60.0}, 3)  # a tie keeps it
    assert state.update_best({"val_acc1": 61.0, "ema_val_acc1": 61.0}, 4)
    assert (state.best, state.best_epoch, state.best_source) == (61.0, 4, "model")


def epoch_loop():
    """The module whose epoch loop calls ``evaluate``."""
    try:
        from sparseformer.engine import epoch
    except ImportError:  # the epoch loop inside the trainer
        return trainer_module
    return epoch


def test_best_pt_and_the_summary_follow_the_ema_when_it_scores_higher(tmp_path, monkeypatch):
    # epochs 1-3: (model, EMA) top-1 = (50, 40), (45, 60), (55, 50): the best is epoch 2's EMA
    scores = iter([50.0, 40.0, 45.0, 60.0, 55.0, 50.0])
    precisions = []

    def scripted_evaluate(model, loader, prep, dist, amp_dtype=None, progress=False):
        precisions.append(amp_dtype)
        return {"loss": 1.0, "acc1": next(scores), "acc5": 100.0, "images": 32}

    monkeypatch.setattr(epoch_loop(), "evaluate", scripted_evaluate)
    summary = tiny_run(tmp_path, BreaksLater(10**9), ema_decay=0.9, precision="bf16")
    assert precisions == [None] * 6  # fp32, not the run's bf16 autocast
    assert (summary["best_val_acc1"], summary["best_epoch"], summary["best_source"]) == (
        60.0, 2, "ema",
    )  # fmt: skip
    best = ckpt_io.read_training_checkpoint(tmp_path / "run" / "best.pt")
    assert (best["epoch"], best["best_source"]) == (2, "ema")
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (saved["best_val_acc1"], saved["best_source"]) == (60.0, "ema")
