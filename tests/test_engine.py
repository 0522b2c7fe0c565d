"""Engine pieces: LR schedule, weight-decay groups, recipes, checkpoints, RNG, failure modes."""

from __future__ import annotations

import json
import pickle
import random
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from sparseformer import create_model
from sparseformer.data import DatasetBundle, Preprocessing
from sparseformer.engine import checkpoint as ckpt_io
from sparseformer.engine.loop import BatchPrep
from sparseformer.engine.optim import LRSchedule, build_optimizer, fused_update_applies
from sparseformer.engine.recipe import RecipeError, list_recipes, load_recipe
from sparseformer.engine.trainer import RunOptions, TrainingError, fit

RECIPES = Path(__file__).parents[1] / "src" / "sparseformer" / "recipes"


def test_schedule_is_a_pure_function_of_step():
    s = LRSchedule(peak_lr=1e-3, warmup_lr=1e-6, min_lr=1e-5, warmup_steps=10, total_steps=110)
    assert s(0) == pytest.approx(1e-6)
    assert s(10) == pytest.approx(1e-3)
    assert s(60) == pytest.approx(1e-5 + (1e-3 - 1e-5) / 2)
    assert s(110) == pytest.approx(1e-5) and s(500) == pytest.approx(1e-5)
    warm = [s(i) for i in range(11)]
    decay = [s(i) for i in range(10, 111)]
    assert warm == sorted(warm) and decay == sorted(decay, reverse=True)
    assert [s(i) for i in range(110)] == [s(i) for i in range(110)]  # no hidden state


def test_no_weight_decay_on_norms_biases_and_initial_rois():
    model = create_model("sparseformer_v1_nano", num_classes=10)
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.05)
    decay_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    names = dict(model.named_parameters())
    assert len(decay_of) == len(names)  # every parameter is optimised
    for name, p in names.items():
        expected = 0.0 if (p.ndim <= 1 or name in model.no_weight_decay()) else 0.05
        assert decay_of[id(p)] == expected, name
    assert decay_of[id(model.initial_rois)] == 0.0
    assert decay_of[id(model.head.weight)] == 0.05


def test_adamw_takes_the_fused_update_where_torch_has_it():
    model = create_model("sparseformer_v1_nano", num_classes=10)
    assert fused_update_applies(model) and build_optimizer(model, 1e-3, 0.05).defaults["fused"]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(torch.randn(2, 3, 32, 32)).square().mean().backward()
    build_optimizer(model, 1e-3, 0.05).step()  # the fused step updates each one with a gradient
    graded = [n for n, p in model.named_parameters() if p.grad is not None and p.grad.any()]
    assert len(graded) > 10
    assert all(not torch.equal(model.get_parameter(n), before[n]) for n in graded)
    meta = create_model("sparseformer_v1_nano", num_classes=10).to("meta")
    assert not fused_update_applies(meta)
    assert not build_optimizer(meta, 1e-3, 0.05).defaults["fused"]  # per tensor there


def test_imagenet_recipe_is_the_papers():
    r = load_recipe("imagenet1k")
    assert (r.epochs, r.batch_size, r.img_size, r.lr, r.lr_base_batch) == (300, 128, 224, 5e-4, 512)
    assert (r.warmup_lr, r.min_lr, r.warmup_epochs, r.weight_decay) == (5e-7, 5e-6, 20, 0.05)
    assert (r.betas, r.eps, r.clip_grad, r.label_smoothing) == ((0.9, 0.999), 1e-8, 5.0, 0.1)
    assert (r.mixup, r.cutmix, r.mixup_prob, r.mixup_switch_prob) == (0.8, 1.0, 1.0, 0.5)
    a = r.augmentation
    assert (a.auto_augment, a.color_jitter, a.re_prob, a.re_mode) == (
        "rand-m9-mstd0.5-inc1", 0.4, 0.25, "pixel",
    )  # fmt: skip
    assert (r.repeated_aug, r.ema_decay, r.interpolation) == (3, 0.9999, "bicubic")
    assert r.crop_pct == pytest.approx(224 / 256) and r.drop_path is None  # per model
    # linear scaling with the total batch: 8 GPUs x 128 = 1024 images -> twice the base
    assert r.scaled_lr(1024) == pytest.approx((1e-3, 1e-6, 1e-5))
    assert {"imagenet1k", "fashion-mnist-cpu"} <= set(list_recipes())


def test_a_recipe_file_that_leaves_out_what_shapes_a_run_is_a_warning(tmp_path, caplog):
    # before, {"epochs": 1} trained in bf16 with Mixup and EMA (the imagenet1k defaults) unsaid
    partial = tmp_path / "short.json"
    partial.write_text(json.dumps({"epochs": 1}))
    with caplog.at_level("WARNING", logger="sparseformer"):
        assert load_recipe(partial).precision == "bf16"
    assert "short.json leaves 29 recipe fields out" in caplog.text
    assert "(precision bf16, batch_size 128, lr 0.0005, warmup_epochs 20.0, mixup 0.8, cutmix" in (
        caplog.text
    )
    assert "--set" in caplog.text
    caplog.clear()
    partial.write_text(json.dumps({"epochs": 1, "mixup_prob": 0}))  # no mixing: alphas unsaid
    with caplog.at_level("WARNING", logger="sparseformer"):
        load_recipe(partial)
    assert "ema_decay 0.9999, ...)" in caplog.text and "mixup 0.8" not in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="sparseformer"):
        load_recipe("fashion-mnist-cpu")
        load_recipe(RECIPES / "fashion-mnist-cpu.json")  # sets all that shapes a run
    assert caplog.text == ""


def test_recipe_errors_are_one_line(tmp_path):
    with pytest.raises(RecipeError, match="shipped recipes: .*imagenet1k"):
        load_recipe("imagenet22k")
    bad = tmp_path / "r.json"
    bad.write_text(json.dumps({"epochs": 3, "learning_rate": 1.0}))
    with pytest.raises(RecipeError, match="unknown recipe field.*learning_rate"):
        load_recipe(bad)
    bad.write_text("{not json")
    with pytest.raises(RecipeError, match="not valid JSON"):
        load_recipe(bad)
    picture = tmp_path / "photo.jpg"  # was "'utf-8' codec can't decode byte 0xff ..."
    picture.write_bytes(b"\xff\xd8\xff\xe0 not text")
    with pytest.raises(RecipeError, match=r"recipe file '.*photo.jpg' is not text"):
        load_recipe(picture)
    good = tmp_path / "mine.json"
    good.write_text(json.dumps({"epochs": 3, "augmentation": {"re_prob": 0.0}}))
    r = load_recipe(good)
    assert (r.name, r.epochs, r.augmentation.re_prob, r.lr) == ("mine", 3, 0.0, 5e-4)
    # values of the wrong type are named at once, not met as a TypeError mid-run
    for change, message in (
        ({"lr": "abc"}, "lr must be float"),
        ({"epochs": 2.5}, "epochs must be int"),
        ({"betas": 0.9}, "betas must be a pair"),
        ({"augmentation": {"scale": 0.5}}, "scale must be a pair"),
        ({"augmentation": {"hflip": "x"}}, "hflip must be float"),
    ):
        with pytest.raises(RecipeError, match=message):
            r.replace(**change)
    assert r.replace(ema_decay=None, lr=1).lr == 1  # None where allowed, ints for floats
    # values of the right type that make no sense are named too, before a run is wasted
    for change, message in (
        ({"ema_decay": 1.5}, r"ema_decay must be in \[0, 1\)"),
        ({"label_smoothing": 1.5}, "label_smoothing must be in"),
        ({"mixup": -1}, "mixup must be at least 0"),
        ({"mixup_mode": "foo"}, "mixup_mode must be one of batch, pair, elem"),
        ({"warmup_epochs": -3}, "warmup_epochs must be at least 0"),
        ({"crop_pct": 0}, r"crop_pct must be in \(0, 1\]"),
        ({"layer_decay": 0}, r"layer_decay must be in \(0, 1\] or null"),
        ({"layer_decay": 1.5}, r"layer_decay must be in \(0, 1\] or null"),
        ({"interpolation": "nearest2"}, "interpolation must be one of"),
        ({"img_size": 100_000}, "img_size must be 4 to 16384 pixels or null"),
        ({"eps": float("inf")}, "eps must be a finite number, got inf"),
        ({"augmentation": {"scale": [0.1, float("inf")]}}, "augmentation.scale must be a fin"),
        ({"img_size": 2}, "img_size must be 4 to 16384 pixels or null"),
        ({"augmentation": {"scale": [1, 0.5]}}, r"augmentation.scale must be a range"),
        ({"augmentation": {"re_prob": 2}}, "re_prob must be a probability"),
        ({"augmentation": {"auto_augment": "foo"}}, "auto_augment 'foo' is not a timm policy"),
    ):
        with pytest.raises(RecipeError, match=message):
            r.replace(**change)


def test_atomic_save_and_rng_round_trip(tmp_path):
    path = tmp_path / "ck.pt"
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    state = ckpt_io.capture_rng()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    ckpt_io.save_atomic({"model": {}, "step": 0, "rng": state}, path)
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]  # no temporary left behind
    weights = torch.nn.BatchNorm1d(2).state_dict()  # an OrderedDict with version _metadata
    ckpt_io.save_atomic({"model": weights}, tmp_path / "bn.pt")
    again = torch.load(tmp_path / "bn.pt", weights_only=True)["model"]
    assert again._metadata == weights._metadata and again.keys() == weights.keys()
    (tmp_path / "bn.pt").unlink()
    loaded = ckpt_io.read_training_checkpoint(path)  # weights_only=True
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    ckpt_io.restore_rng(loaded["rng"])
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0])
    assert np.array_equal(expected[1], again[1]) and expected[2] == again[2]


def test_a_best_epoch_is_serialised_once_for_best_and_last(tmp_path, monkeypatch):
    import os

    saved, linked = [], []
    save, link = ckpt_io.save_atomic, ckpt_io.link_atomic
    monkeypatch.setattr(ckpt_io, "save_atomic", lambda obj, p: saved.append(p) or save(obj, p))
    monkeypatch.setattr(ckpt_io, "link_atomic", lambda a, b: linked.append(b) or link(a, b))
    tiny_run(tmp_path, BreaksLater(good_calls=10**9), n_train=320, lr=0.2)
    assert len(saved) == 3 and linked  # one serialisation per epoch; a best one linked to last
    run = tmp_path / "run"
    best, last = run / "best.pt", run / "last.pt"
    assert ckpt_io.read_training_checkpoint(last)["epoch"] == 3
    link(last, run / "same.pt")
    assert os.stat(run / "same.pt").st_ino == os.stat(last).st_ino  # one file, two names
    # where the file system has no hard links: a copy, as atomic
    monkeypatch.setattr(os, "link", lambda *a: (_ for _ in ()).throw(OSError("no links")))
    link(best, run / "copy.pt")
    assert (run / "copy.pt").read_bytes() == best.read_bytes()
    assert os.stat(run / "copy.pt").st_ino != os.stat(best).st_ino
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]  # no temporaries


def test_a_resume_restores_this_gpus_generator_whatever_was_saved(monkeypatch):
    # no GPU here: the CUDA calls are recorded, the choice of state is what is tested
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, d: calls.append((int(s[0]), str(d))))
    base = ckpt_io.capture_rng()  # CPU only: CUDA was never initialised
    assert "cuda" not in base
    states = [torch.full((4,), i, dtype=torch.uint8) for i in range(3)]
    ckpt_io.restore_rng({**base, "cuda": states[2]})  # this format: this process's GPU
    ckpt_io.restore_rng({**base, "cuda": states})  # older: every GPU; GPU 1 takes its own
    ckpt_io.restore_rng({**base, "cuda": states[:1]})  # saved with fewer GPUs: none to take
    ckpt_io.restore_rng({**base, "cuda": states}, torch.device("cuda", 0))  # a given device
    ckpt_io.restore_rng({**base, "cuda": states[2]}, "cpu")  # a CPU run: no GPU state
    assert calls == [(2, "cuda:1"), (1, "cuda:1"), (0, "cuda:0")]


def test_batch_normalisation_is_made_once_per_shape():
    prep = BatchPrep((0.5, 0.25, 0.0), (0.5, 0.5, 1.0), torch.device("cpu"))
    x = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    first, _ = prep(x, torch.zeros(2), train=False)
    again, _ = prep(x, torch.zeros(2), train=False)
    expected = (x.float() / 255 - torch.tensor([0.5, 0.25, 0.0]).view(1, 3, 1, 1)) / torch.tensor(
        [0.5, 0.5, 1.0]
    ).view(1, 3, 1, 1)
    assert torch.allclose(first, expected, atol=1e-6) and torch.equal(first, again)
    clip, _ = prep(x.unsqueeze(2), torch.zeros(2), train=False)  # (B, C, T, H, W)
    assert torch.allclose(clip.squeeze(2), expected, atol=1e-6)
    assert prep._scaled(4) is prep._scaled(4)
    prep.mean = (0.0, 0.0, 0.0)  # a changed mean is not served from the cache
    assert torch.allclose(prep(x, torch.zeros(2), train=False)[0], x.float() / 255 / torch.tensor(
        [0.5, 0.5, 1.0]).view(1, 3, 1, 1), atol=1e-6)  # fmt: skip
    assert "_cache" not in pickle.loads(pickle.dumps(prep)).__dict__


class Pixels(Dataset):
    """Random uint8 images whose label is their bright quadrant (learnable, tiny)."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.y = torch.randint(0, 4, (n,), generator=g)
        noise = torch.randint(0, 40, (n, 3, 16, 16), generator=g)
        for i, label in enumerate(self.y.tolist()):
            r, c = divmod(label, 2)
            noise[i, :, 8 * r : 8 * r + 8, 8 * c : 8 * c + 8] += 150  # (3, 16, 16) quadrant
        self.x = noise.to(torch.uint8)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


class BreaksLater(nn.Module):
    """A classifier whose output turns NaN after ``good_calls`` training calls."""

    def __init__(self, good_calls: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 4))
        self.good_calls = good_calls
        self.calls = 0

    def forward(self, x):
        out = self.net(x)
        if self.training:
            self.calls += 1
            if self.calls > self.good_calls:
                out = out * float("nan")
        return out


class WeightsBreakLater(BreaksLater):
    """A classifier whose weights turn NaN in training call ``good_calls + 1``, its loss of
    that step still finite (a diverged update); ``eval_nan``: its outputs NaN in evaluation
    instead, its weights finite (RoIs run off to infinity)."""

    def __init__(self, good_calls: int, eval_nan: bool = False) -> None:
        super().__init__(good_calls)
        self.eval_nan = eval_nan

    def forward(self, x):
        out = self.net(x)
        if not self.training:
            return out * float("nan") if self.eval_nan else out
        self.calls += 1
        if self.calls > self.good_calls and not self.eval_nan:
            with torch.no_grad():
                self.net[1].weight.fill_(float("nan"))
            out = out.detach().requires_grad_()  # this step's loss: finite
        return out


def tiny_run(tmp_path, model, n_train=64, device="cpu", every=None, **recipe_changes):
    recipe = load_recipe("fashion-mnist-cpu").replace(
        epochs=3, batch_size=16, warmup_epochs=0, **recipe_changes
    )
    bundle = DatasetBundle(Pixels(n_train, 0), Pixels(32, 1), ["a", "b", "c", "d"])
    pre = Preprocessing(16, (0.5,) * 3, (0.25,) * 3, 1.0, "bilinear")
    options = RunOptions(
        output=tmp_path / "run",
        model_name="test",
        device=device,
        precision=recipe.precision,
        progress=False,
        checkpoint_every=every,
    )
    return fit(model, bundle, recipe, pre, options)


def test_non_finite_loss_stops_with_a_clear_message_and_keeps_the_checkpoint(tmp_path):
    model = BreaksLater(good_calls=4 + 2)  # 4 steps per epoch: breaks in epoch 2
    with pytest.raises(TrainingError, match=r"epoch 2: loss is nan.*last good checkpoint") as e:
        tiny_run(tmp_path, model)
    assert "\n" not in str(e.value) and "--lr" in str(e.value)
    last = tmp_path / "run" / "last.pt"  # a resumed run keeps its schedule: a new one from it
    assert f"a new run, --checkpoint {last} --lr ... --output NEW)" in str(e.value)
    kept = ckpt_io.read_training_checkpoint(tmp_path / "run" / "last.pt")
    assert kept["epoch"] == 1 and kept["steps_per_epoch"] == 4  # what a resume checks
    assert all(torch.isfinite(v).all() for v in kept["model"].values())
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1]


@pytest.mark.parametrize(("every", "broken_step", "kept_step"), [(None, 8, 4), (1, 6, 5)])
def test_nan_weights_are_never_saved_and_never_called_good(tmp_path, every, broken_step,
                                                           kept_step):  # fmt: skip
    """A step whose update leaves NaN weights, its loss finite (an epoch's last step; a step
    mid-epoch under --checkpoint-every): no checkpoint of them, and the run stops saying so."""
    from sparseformer.engine.stopping import CheckpointEvery

    every = CheckpointEvery(steps=every) if every else None
    model = WeightsBreakLater(good_calls=broken_step - 1)  # 4 steps an epoch
    with pytest.raises(TrainingError, match=rf"epoch 2: the weights are NaN or infinite after "
                       rf"step {broken_step} \(\d+ tensors?, e\.g\. [\w.]+\); the last good "
                       rf"checkpoint .* is kept"):  # fmt: skip
        tiny_run(tmp_path, model, every=every)
    kept = ckpt_io.read_training_checkpoint(tmp_path / "run" / "last.pt")
    assert kept["step"] == kept_step
    assert all(torch.isfinite(v).all() for v in kept["model"].values())


def test_a_non_finite_validation_loss_ends_the_run_before_its_checkpoint(tmp_path):
    """Finite weights whose outputs are NaN score nothing: the epoch is neither best nor
    last, and its meaningless top-1 is not written."""
    with pytest.raises(TrainingError, match=r"epoch 1: every validation output is NaN or inf"):
        tiny_run(tmp_path, WeightsBreakLater(good_calls=10**9, eval_nan=True))
    run = tmp_path / "run"
    assert not (run / "last.pt").exists() and not (run / "best.pt").exists()
    assert not (run / "metrics.jsonl").exists() or not (run / "metrics.jsonl").read_text()


def test_evaluation_scores_nan_outputs_as_wrong_and_counts_them():
    from sparseformer.engine.loop import evaluate

    class HalfBroken(nn.Module):  # NaN logits for the images whose first pixel is negative
        def forward(self, x):
            logits = torch.tensor([[9.0, 0.0, 0.0, 0.0]]).expand(len(x), 4).clone()
            logits[x[:, 0, 0, 0] < 0] = float("nan")
            return logits

    x = torch.ones(6, 3, 4, 4)
    x[:4] *= -1  # four NaN rows, all of class 0, which NaN's topk puts first
    prep = BatchPrep((0.0,) * 3, (1.0,) * 3, torch.device("cpu"))
    confusion = torch.zeros(4, 4)
    out = evaluate(HalfBroken(), [(x, torch.zeros(6, dtype=torch.long))], prep, confusion=confusion)
    assert (out["images"], out["non_finite"]) == (6, 4)
    assert out["acc1"] == pytest.approx(100 * 2 / 6)  # only the two finite rows hit
    assert confusion.sum() == 2
    expected = nn.functional.cross_entropy(torch.tensor([[9.0, 0, 0, 0]]), torch.tensor([0]))
    assert out["loss"] == pytest.approx(expected.item())  # of the finite outputs


def test_the_training_loss_is_taken_in_float32_under_cpu_autocast():
    """CPU autocast leaves label smoothing's log_softmax in bf16 (CUDA's raises it)."""
    from types import SimpleNamespace

    from timm.loss import LabelSmoothingCrossEntropy

    from sparseformer.engine.loop import _training_loss

    model = create_model("sparseformer_v1_nano", num_classes=3)
    tools = SimpleNamespace(objective=None, scaler=None, criterion=LabelSmoothingCrossEntropy(0.1))
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = _training_loss(model, x, y, tools, sparse=True)
        logits = model(x)
    assert loss.dtype == torch.float32
    expected = LabelSmoothingCrossEntropy(0.1)(logits.float(), y)
    torch.testing.assert_close(loss, expected, rtol=0, atol=0.02)


def test_a_run_validates_with_one_linear_kernel_not_the_faster_per_process(tmp_path):
    """Each process races the linear kernels for itself: a resumed run would score its
    epochs with others than the run it continues, to the last bits of the loss."""
    from sparseformer.layers import linear as linear_module

    seen = set()

    class Records(BreaksLater):
        def forward(self, x):
            if not self.training:
                seen.add(linear_module.kernel_setting())
            return super().forward(x)

    assert linear_module.kernel_setting() == "auto"
    tiny_run(tmp_path, Records(good_calls=10**9))
    assert seen == {"always"} and linear_module.kernel_setting() == "auto"


def test_tiny_run_learns_and_writes_everything(tmp_path):
    summary = tiny_run(tmp_path, BreaksLater(good_calls=10**9), n_train=320, lr=0.2)
    run = tmp_path / "run"
    assert sorted(p.name for p in run.iterdir()) == [
        "best.pt", "last.pt", "metrics.jsonl", "metrics.png", "summary.json",
    ]  # fmt: skip
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    keys = {"epoch", "train_loss", "val_loss", "val_acc1", "val_acc5", "lr", "images_per_second"}
    assert all(keys <= set(r) for r in records)
    assert records[-1]["val_acc1"] > 60  # 4 classes: chance is 25%
    assert summary["best_val_acc1"] == max(r["val_acc1"] for r in records)


def test_fit_keeps_a_run_it_is_not_asked_to_replace_and_checks_the_classifier(tmp_path):
    """What the CLI checks before work, fit() checks for Python callers too."""
    tiny_run(tmp_path, BreaksLater(good_calls=10**9))
    before = (tmp_path / "run" / "last.pt").read_bytes()
    with pytest.raises(TrainingError, match="already holds a run"):
        tiny_run(tmp_path, BreaksLater(good_calls=10**9))
    assert (tmp_path / "run" / "last.pt").read_bytes() == before
    two = create_model("sparseformer_v1_nano", num_classes=2)
    with pytest.raises(TrainingError, match="2 outputs for the data's 4 classes; build it with"):
        tiny_run(tmp_path / "other", two)  # the loss would fail part-way through an epoch
    assert not (tmp_path / "other" / "run" / "last.pt").exists()


def test_layer_decay_scales_each_depth_and_resumes(tmp_path):
    model = create_model("sparseformer_v1_nano", num_classes=4)
    tiny_run(tmp_path, model, layer_decay=0.5)
    saved = ckpt_io.read_training_checkpoint(tmp_path / "run" / "last.pt")
    groups = saved["optimizer"]["param_groups"]
    # nano: stem, unit 0.0, transition 1, units 1.0 and 1.1, head
    assert sorted({g["lr_scale"] for g in groups}) == [0.5**k for k in range(5, -1, -1)]
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    for g in groups:  # the schedule's rate (logged: the head's) times each group's scale
        assert g["lr"] == pytest.approx(last["lr"] * g["lr_scale"])


def test_a_run_saved_before_data_order_keeps_its_old_order_in_every_resume(tmp_path):
    from sparseformer.engine.trainer import DATA_ORDER

    tiny_run(tmp_path, BreaksLater(10**9))
    last = tmp_path / "run" / "last.pt"
    assert ckpt_io.read_training_checkpoint(last)["data_order"] == DATA_ORDER
    old = ckpt_io.read_training_checkpoint(last)
    del old["data_order"]  # as a checkpoint written before the key existed
    ckpt_io.save_atomic(old, last)
    recipe = load_recipe("fashion-mnist-cpu").replace(epochs=4, batch_size=16, warmup_epochs=0)
    bundle = DatasetBundle(Pixels(64, 0), Pixels(32, 1), ["a", "b", "c", "d"])
    pre = Preprocessing(16, (0.5,) * 3, (0.25,) * 3, 1.0, "bilinear")
    options = RunOptions(output=tmp_path / "run", model_name="test", device="cpu",
                         precision="fp32", progress=False, resume=last)  # fmt: skip
    fit(BreaksLater(10**9), bundle, recipe, pre, options)
    assert ckpt_io.read_training_checkpoint(last)["data_order"] is None  # still the old order


def test_a_resume_on_too_little_data_for_its_batch_says_what_may_change(tmp_path):
    """A resume keeps the run's batch size, so "give a smaller --batch-size" (which it
    ignores) is not the way out: fewer processes, or a new run from the weights."""
    from sparseformer.data.loader import FewerThanABatch

    tiny_run(tmp_path, BreaksLater(10**9))
    last = tmp_path / "run" / "last.pt"
    recipe = load_recipe("fashion-mnist-cpu").replace(epochs=4, batch_size=16, warmup_epochs=0)
    bundle = DatasetBundle(Pixels(8, 0), Pixels(32, 1), ["a", "b", "c", "d"])
    pre = Preprocessing(16, (0.5,) * 3, (0.25,) * 3, 1.0, "bilinear")
    options = RunOptions(output=tmp_path / "run", model_name="test", device="cpu",
                         precision="fp32", progress=False, resume=last)  # fmt: skip
    said = r"8 training samples .* batch of 16, the resumed run's .* keeps: start a new run"
    with pytest.raises(FewerThanABatch, match=said + f".*--checkpoint {re.escape(str(last))}"):
        fit(BreaksLater(10**9), bundle, recipe, pre, options)  # one process: none fewer
    with pytest.raises(FewerThanABatch, match="give a smaller --batch-size"):  # a new run
        fit(
            BreaksLater(10**9),
            bundle,
            recipe,
            pre,
            replace(options, resume=None, output=tmp_path / "new"),
        )


def _running_now(monkeypatch, counts):
    """``device._runnable`` gives ``counts`` in turn (this thread included), this process runs
    one thread, and the looks take no time."""
    from sparseformer.engine import device

    counts = iter(counts)
    monkeypatch.setattr(device, "_runnable", lambda: next(counts))
    monkeypatch.setattr(device, "_own_running", lambda: 1)
    monkeypatch.setattr(device, "_BRIEF", (5, 0.0))
    monkeypatch.setattr(device, "_LONG", (25, 0.0))
    return counts


def test_threads_count_the_work_running_now_not_the_lagging_load_average(monkeypatch):
    """The 1-minute load average still counts a command that ended seconds ago (``train``
    then ``eval``): what runs now, less this process's own threads, decides; where the two
    disagree, a longer look (work that comes and goes)."""
    import os

    from sparseformer.engine import device
    from sparseformer.engine.distributed import DistInfo

    before = torch.get_num_threads()
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        _running_now(monkeypatch, [1, 1, 4, 1, 1])  # one look catches a burst
        assert device.load_elsewhere() == 0.0  # the median, less this thread
        _running_now(monkeypatch, [5] * 5)
        assert device.load_elsewhere() == 4.0  # four others
        monkeypatch.setattr(os, "getloadavg", lambda: (2.6, 1.0, 0.5))  # a run that just ended
        _running_now(monkeypatch, [1] * 30)  # free now, and over the longer look
        assert device.set_threads(None, DistInfo()) == 2
        _running_now(monkeypatch, [1] * 5 + [5] * 25)  # free a moment, busy over half a second
        assert device.set_threads(None, DistInfo()) == 1
        monkeypatch.setattr(os, "getloadavg", lambda: (0.5, 1.0, 0.5))
        _running_now(monkeypatch, [5] * 5)  # four others now: the average has not caught up
        assert device.set_threads(None, DistInfo()) == 1
        _running_now(monkeypatch, [5] * 5)  # torchrun's ranks all read the average instead
        assert device.set_threads(None, DistInfo(0, 2, 0, 2)) == 1  # 2 cores, 2 ranks
        monkeypatch.setattr(os, "getloadavg", lambda: (9.0, 1.0, 0.5))
        assert device.set_threads(None, DistInfo(0, 2, 0, 2)) == 1
    finally:
        torch.set_num_threads(before)


def test_load_elsewhere_reads_proc_and_falls_back_to_the_load_average(monkeypatch):
    import os
    import threading

    from sparseformer.engine import device
    from sparseformer.engine.distributed import DistInfo

    if not os.path.exists("/proc/self/task"):
        pytest.skip("no /proc")
    comm = f"/proc/self/task/{threading.get_native_id()}/comm"
    name = open(comm).read()
    try:
        with open(comm, "w") as f:
            f.write("a) S (b")  # a thread's name may hold what its state is parsed after
        assert device._own_running() >= 1 and device._runnable() >= 1  # the caller runs
    finally:
        with open(comm, "w") as f:
            f.write(name.strip())

    def no_proc():
        raise OSError("no /proc/loadavg")

    before = torch.get_num_threads()
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(device, "_runnable", no_proc)
    try:
        monkeypatch.setattr(os, "getloadavg", lambda: (5.5, 0.0, 0.0))
        assert device.set_threads(None, DistInfo()) == 2
        monkeypatch.setattr(os, "getloadavg", no_proc)  # no load average either: all cores
        assert device.set_threads(None, DistInfo()) == 4
    finally:
        torch.set_num_threads(before)


def test_fp16_on_cpu_is_refused(tmp_path):
    """Asked by a recipe (a resumed run's), not only by --precision: no flag is blamed."""
    with pytest.raises(TrainingError, match="^fp16 needs a CUDA GPU; use bf16 or fp32 on CPU"):
        tiny_run(tmp_path, BreaksLater(10**9), precision="fp16")


def test_default_threads_leave_busy_cores_alone(monkeypatch):
    import os

    from sparseformer.engine import device
    from sparseformer.engine.device import set_threads
    from sparseformer.engine.distributed import DistInfo

    before = torch.get_num_threads()
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        monkeypatch.setattr(device, "_load", lambda cores, dist: 0.1)
        assert set_threads(None, DistInfo()) == 4 == torch.get_num_threads()
        assert set_threads(None, DistInfo(0, 2, 0, 2)) == 2  # two local ranks share the cores
        monkeypatch.setattr(device, "_load", lambda cores, dist: 3.9)
        assert set_threads(None, DistInfo()) == 4  # busy, but not over-subscribed yet
        monkeypatch.setattr(device, "_load", lambda cores, dist: 4.6)
        assert set_threads(None, DistInfo()) == 3
        monkeypatch.setattr(device, "_load", lambda cores, dist: 9.0)
        assert set_threads(None, DistInfo()) == 1
        assert set_threads(3, DistInfo()) == 3  # --threads wins
        monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's: bootstrap took 4 (or 1)
        assert set_threads(None, DistInfo()) == 3 == torch.get_num_threads()
        assert set_threads(2, DistInfo()) == 2  # --threads still wins
        monkeypatch.setattr(device, "_load", lambda cores, dist: 0.1)
        assert set_threads(None, DistInfo(0, 2, 0, 2)) == 3  # the user's 3, under torchrun too
        monkeypatch.setenv("OMP_NUM_THREADS", "1")  # torchrun's own, for 2 local processes
        assert set_threads(None, DistInfo(0, 2, 0, 2)) == 2  # the free cores, shared out
        assert set_threads(None, DistInfo()) == 1  # one process: the user's
        monkeypatch.setenv("OMP_NUM_THREADS", "lots")  # not a number: the default
        assert set_threads(None, DistInfo()) == 4
    finally:
        torch.set_num_threads(before)


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_training_on_cuda(tmp_path, precision):
    model = create_model("sparseformer_v1_nano", num_classes=4)
    summary = tiny_run(tmp_path, model, n_train=320, device="cuda", precision=precision, lr=0.2)
    state = ckpt_io.read_training_checkpoint(tmp_path / "run" / "last.pt")
    assert (state["scaler"] is not None) == (precision == "fp16")  # GradScaler only for fp16
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert summary["final"]["val_acc1"] > 40  # 4 classes: chance is 25%


def test_the_skipped_list_reads_back_whatever_the_file_names(tmp_path):
    import csv

    from sparseformer.engine.run_folder import write_skipped_list as _write_skipped_list

    skipped = [("a/tab\tname.jpg", "cannot\tread"), ('b/new\nline "q".png', "empty  file\n")]
    path = tmp_path / "skipped_files.tsv"
    _write_skipped_list(path, skipped)
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    assert rows == [["file", "reason"], ["a/tab\tname.jpg", "cannot read"],
                    ['b/new\nline "q".png', "empty file"]]  # fmt: skip
    _write_skipped_list(path, [])  # nothing skipped this time: no stale list
    assert not path.exists()


def test_a_hand_written_loop_needs_no_process_group():
    from sparseformer.engine import BatchPrep, StepTools, evaluate, train_one_epoch

    model = create_model("sparseformer_v1_nano", num_classes=4)
    prep = BatchPrep((0.5,) * 3, (0.5,) * 3, torch.device("cpu"))
    tools = StepTools(nn.CrossEntropyLoss(), LRSchedule(1e-3, 1e-3, 1e-3, 0, 10), prep)
    batches = [(torch.randn(4, 3, 32, 32), torch.randint(0, 4, (4,))) for _ in range(2)]
    optimizer = build_optimizer(model, 1e-3, 0.05)
    assert train_one_epoch(model, batches, optimizer, tools, 0)["steps"] == 2
    assert evaluate(model, batches, prep)["images"] == 8


def test_an_epoch_resumed_after_its_last_step_reports_that_steps_rate():
    """A checkpoint saved at an epoch's last step (a stop during validation) resumes with no
    batch left: the epoch's ``lr`` is its last step's, not the next one's."""
    from types import SimpleNamespace

    from sparseformer.engine.loop import EpochProgress, train_one_epoch

    model = torch.nn.Linear(2, 2)
    tools = SimpleNamespace(schedule=lambda step: 1.0 / (step + 1),
                            prep=SimpleNamespace(device=torch.device("cpu")))  # fmt: skip
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    done = EpochProgress(75, 3.0, 300, 1.0)  # all 75 batches taken, 75 steps in all
    record = train_one_epoch(model, [], optimizer, tools, step=75, start=done)
    assert record["lr"] == 1.0 / 75 and record["steps"] == 75  # step 74's rate


def test_class_names_the_fonts_lack_are_said_once(tmp_path, caplog, recwarn):
    """matplotlib warned once per character, in its words, of CJK class names it drew as
    boxes; now one logged line names them (and nothing is said where a font has them)."""
    from sparseformer.engine.per_class import per_class_report, write_per_class

    report = per_class_report(torch.eye(3) * 5, ["猫", "犬", "bird"])
    with caplog.at_level("WARNING", logger="sparseformer"):
        write_per_class(report, tmp_path)
    said = glyph_lines(recwarn, caplog)
    if _fonts_lack("猫犬"):
        assert len(said) == 1 and "2 characters of the class names (猫犬)" in said[0]
    else:  # a CJK font is installed
        assert said == []


def glyph_lines(recwarn, caplog) -> list[str]:
    """The logged lines on characters the fonts lack, once sure that none of matplotlib's own
    warnings of them came through."""
    assert not [w for w in recwarn if "Glyph" in str(w.message)]
    return [r.getMessage() for r in caplog.records if "fonts lack" in r.getMessage()]


def _fonts_lack(text: str) -> bool:
    """Whether matplotlib, drawing ``text`` itself, warns of glyphs its fonts lack."""
    import warnings

    import matplotlib.pyplot as plt

    fig = plt.figure()
    fig.text(0, 0, text)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fig.canvas.draw()
    plt.close(fig)
    return any("Glyph" in str(w.message) for w in caught)


def test_persistent_workers_end_now_and_within_the_runs_signal_handling(tmp_path, monkeypatch):
    """Persistent workers outlived fit's signal handling and ended in their loader's __del__,
    where a Ctrl-C landing in the shutdown printed an 'Exception ignored' traceback."""
    import signal

    from torch.utils.data import DataLoader, TensorDataset

    import sparseformer.engine.trainer as trainer
    from sparseformer.data.loader import end_workers

    loader = DataLoader(TensorDataset(torch.arange(8.0)), batch_size=2, num_workers=2,
                        persistent_workers=True)  # fmt: skip
    assert len(list(loader)) == 4
    workers = loader._iterator._workers
    assert all(w.is_alive() for w in workers)
    end_workers(loader, [])  # a loader without workers: nothing to end
    assert loader._iterator is None and not any(w.is_alive() for w in workers)

    handlers = []
    monkeypatch.setattr(trainer, "end_workers", lambda *loaders: handlers.append(
        signal.getsignal(signal.SIGINT)))  # fmt: skip
    tiny_run(tmp_path, BreaksLater(good_calls=10**9), n_train=32)
    assert [h.__name__ for h in handlers] == ["_note"]  # StopSignals': a signal is noted
