"""What a recipe's fields must be: their types and sensible ranges, checked when a
:class:`~sparseformer.engine.recipe.Recipe` is made, each refusal a :class:`RecipeError`
naming the field, its value and what it must be."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from typing import Any

from sparseformer.config import IMG_SIZES, INTERPOLATIONS

__all__ = ["RecipeError", "SCHEDULES", "check_ranges", "check_types"]


class RecipeError(ValueError):
    """A recipe that cannot be read; the message says what is wrong."""


SCHEDULES = ("timm_cosine", "cosine_after_warmup")


def _numbers(r: Any) -> Iterator[tuple[str, float]]:
    """Every float of the recipe ``r`` (its augmentation's too, pairs included), by name."""
    for owner, prefix in ((r, ""), (r.augmentation, "augmentation.")):
        for field in dataclasses.fields(owner):
            value = getattr(owner, field.name)
            for v in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(v, float):
                    yield prefix + field.name, v


def check_ranges(r: Any) -> None:
    """Raise a RecipeError naming the first field of the recipe ``r`` whose value makes no
    sense (an EMA decay of 1.5, a crop scale range upside down), before a run spends its time
    on it."""
    aug = r.augmentation

    def need(ok: bool, field: str, value: Any, what: str) -> None:
        if not ok:
            raise RecipeError(f"recipe {r.name!r}: {field} must be {what}, got {value!r}")

    for name, value in _numbers(r):  # inf passes every bound below: a NaN loss, or no step
        need(math.isfinite(value), name, value, "a finite number")
    for name in ("lr", "warmup_lr", "min_lr", "warmup_epochs", "weight_decay", "mixup", "cutmix"):
        need(getattr(r, name) >= 0, name, getattr(r, name), "at least 0")
    need(r.lr_base_batch > 0, "lr_base_batch", r.lr_base_batch, "positive")
    need(all(0 <= b < 1 for b in r.betas), "betas", r.betas, "two numbers in [0, 1)")
    need(r.eps > 0, "eps", r.eps, "positive")
    decay = r.layer_decay
    need(decay is None or 0 < decay <= 1, "layer_decay", decay, "in (0, 1] or null (off)")
    need(r.clip_grad is None or r.clip_grad > 0, "clip_grad", r.clip_grad, "positive or null")
    need(0 <= r.label_smoothing < 1, "label_smoothing", r.label_smoothing, "in [0, 1)")
    for name in ("mixup_prob", "mixup_switch_prob"):
        need(0 <= getattr(r, name) <= 1, name, getattr(r, name), "a probability in [0, 1]")
    modes = ("batch", "pair", "elem")
    need(r.mixup_mode in modes, "mixup_mode", r.mixup_mode, f"one of {', '.join(modes)}")
    need(r.schedule in SCHEDULES, "schedule", r.schedule, f"one of {', '.join(SCHEDULES)}")
    inits = (None, "zeros", "trunc_normal")
    need(r.offset_proj_init in inits, "offset_proj_init", r.offset_proj_init,
         "zeros, trunc_normal or null (the model's own)")  # fmt: skip
    need(r.repeated_aug >= 0, "repeated_aug", r.repeated_aug, "at least 0")
    if r.mixup > 0 or r.cutmix > 0:  # timm's Mixup mixes each sample with another of the batch
        need(r.batch_size % 2 == 0, "batch_size", r.batch_size,
             f"even with Mixup or CutMix on (e.g. --batch-size {r.batch_size + 1}), or turn "
             "them off with --set mixup=0 cutmix=0")  # fmt: skip
    ema = r.ema_decay
    need(ema is None or 0 <= ema < 1, "ema_decay", ema, "in [0, 1) or null (no EMA)")
    need(r.drop_path is None or 0 <= r.drop_path < 1, "drop_path", r.drop_path, "in [0, 1)")
    need(r.crop_pct is None or 0 < r.crop_pct <= 1, "crop_pct", r.crop_pct, "in (0, 1]")
    low, high = IMG_SIZES
    need(r.img_size is None or low <= r.img_size <= high, "img_size", r.img_size,
         f"{low} to {high} pixels or null (the model's)")  # fmt: skip
    need(r.num_workers >= 0, "num_workers", r.num_workers, "at least 0")
    interp = r.interpolation
    need(interp in INTERPOLATIONS, "interpolation", interp, f"one of {', '.join(INTERPOLATIONS)}")
    lo, hi = aug.scale
    need(0 < lo <= hi <= 1, "augmentation.scale", aug.scale, "a range [lo, hi] in (0, 1]")
    lo, hi = aug.ratio
    need(0 < lo <= hi, "augmentation.ratio", aug.ratio, "a range [lo, hi] of positive numbers")
    need(0 <= aug.hflip <= 1, "augmentation.hflip", aug.hflip, "a probability in [0, 1]")
    need(0 <= aug.re_prob <= 1, "augmentation.re_prob", aug.re_prob, "a probability in [0, 1]")
    jitter = aug.color_jitter
    need(jitter is None or jitter >= 0, "augmentation.color_jitter", jitter, "at least 0 or null")
    need(aug.re_mode in ("const", "rand", "pixel"), "augmentation.re_mode", aug.re_mode,
         "one of const, rand, pixel")  # fmt: skip
    need(aug.re_count >= 1, "augmentation.re_count", aug.re_count, "at least 1")
    if aug.auto_augment:  # timm parses the policy string: let it say whether it can
        from timm.data import create_transform

        policy, *sections = aug.auto_augment.split("-")
        # timm skips a section without a number ("rand-zz": plain RandAugment, no error)
        odd = [c for c in sections if not any(ch.isdigit() for ch in c)
               and not (policy == "rand" and c.startswith("t") and len(c) > 1)]  # fmt: skip
        if odd:
            raise RecipeError(
                f"recipe {r.name!r}: augmentation.auto_augment {aug.auto_augment!r}: section "
                f"{odd[0]!r} has no value, and timm would ignore it; e.g. rand-m9-mstd0.5-inc1"
            )
        try:
            create_transform(32, is_training=True, auto_augment=aug.auto_augment)
        except (AssertionError, ValueError, KeyError, IndexError) as exc:
            raise RecipeError(
                f"recipe {r.name!r}: augmentation.auto_augment {aug.auto_augment!r} is not a "
                f"timm policy ({exc}); e.g. rand-m9-mstd0.5-inc1, augmix-m5, or null"
            ) from exc


def _fits(value: Any, annotation: str) -> bool:
    """Whether ``value`` fits a simple annotation such as ``float | None`` or ``tuple[...]``."""
    for part in (p.strip() for p in annotation.split("|")):
        if part == "None":
            fits = value is None
        elif part == "bool":
            fits = isinstance(value, bool)
        elif isinstance(value, bool):  # a bool is an int to Python, not to a recipe
            fits = False
        elif part == "int":
            fits = isinstance(value, int)
        elif part == "float":
            fits = isinstance(value, (int, float))
        elif part == "str":
            fits = isinstance(value, str)
        elif part.startswith("tuple["):
            fits = isinstance(value, tuple) and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
            )
        else:
            fits = True  # a nested dataclass: checked on its own
        if fits:
            return True
    return False


def check_types(obj: Any) -> None:
    """Raise a RecipeError naming the first field whose value does not fit its type."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if not _fits(value, str(f.type)):
            raise RecipeError(f"recipe field {f.name} must be {f.type}, got {value!r}")
