"""Train and eval transforms, built by timm's ``create_transform`` from plain settings.

Training: random-resized crop, flip, RandAugment / color jitter, random erasing (DeiT recipe).
Evaluation: resize the short side to ``size / crop_pct``, center-crop ``size``, normalise.
Every image is made 8-bit RGB first (see :func:`sparseformer.data.images.to_rgb`).

Transforms end in uint8 ``(3, S, S)`` arrays (timm's ``use_prefetcher`` path): normalisation
and random erasing run once per batch in the engine (``engine.loop.BatchPrep``), which is much
cheaper than per image on a small CPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

from PIL import Image, ImageOps
from timm.data import create_transform
from torchvision import transforms as T

from sparseformer.data.images import to_rgb
from sparseformer.weights.registry import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["Preprocessing", "Augmentation", "build_transform", "LimitAspect"]


@dataclass(frozen=True)
class Preprocessing:
    """What a model expects as input; stored in checkpoints so eval/predict match training."""

    img_size: int = 224
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    crop_pct: float = 0.875
    interpolation: str = "bicubic"

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        """An image's evaluation preprocessing in words (timm's eval transform)."""
        mean, std = (", ".join(f"{v:.4g}" for v in values) for values in (self.mean, self.std))
        return (
            f"short side resized to {math.floor(self.img_size / self.crop_pct)} px "
            f"({self.interpolation}; crop_pct {self.crop_pct:g}), centre crop {self.img_size}, "
            f"mean ({mean}), std ({std})"
        )

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        return cls(
            int(d["img_size"]),
            tuple(d["mean"]),
            tuple(d["std"]),
            float(d["crop_pct"]),
            str(d["interpolation"]),
        )


@dataclass(frozen=True)
class Augmentation:
    """Training-time augmentation (timm names; ``None``/0 switches a part off)."""

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    color_jitter: float | None = 0.4
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    re_prob: float = 0.25
    re_mode: str = "pixel"
    re_count: int = 1


def posterize(img: Image.Image, bits_to_keep: int, **_: object) -> Image.Image:
    """timm's RandAugment posterize for any Pillow. Keeping 0 bits (the strongest level of the
    ``inc1`` policies, which magnitude noise reaches: m9 with mstd 0.5 passes 10 in about 2%
    of draws) gave a black image in older Pillow; Pillow 13 raises ValueError on it, which
    stopped ImageNet-recipe runs at a random step."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return img.point(lambda _: 0)  # every bit dropped, as Pillow's mask used to do
    return ImageOps.posterize(img, bits_to_keep)


def _posterize_for_any_pillow() -> None:
    """Point timm's posterize ops at :func:`posterize` (their functions are looked up when a
    policy is built, so this runs before ``create_transform``)."""
    from timm.data import auto_augment

    for name, op in auto_augment.NAME_TO_OP.items():
        if op is auto_augment.posterize:
            auto_augment.NAME_TO_OP[name] = posterize


def build_transform(pre: Preprocessing, aug: Augmentation | None) -> Callable:
    """PIL image of any mode -> uint8 array (3, S, S), not normalised; ``aug=None`` gives eval.

    Random erasing (``aug.re_prob``) is not part of it: it runs on the normalised batch.
    """
    if aug is None:
        tf = create_transform(
            pre.img_size,
            is_training=False,
            crop_pct=pre.crop_pct,
            interpolation=pre.interpolation,
            use_prefetcher=True,
        )
    else:
        if aug.auto_augment:
            _posterize_for_any_pillow()
        tf = create_transform(
            pre.img_size,
            is_training=True,
            scale=tuple(aug.scale),
            ratio=tuple(aug.ratio),
            hflip=aug.hflip,
            color_jitter=aug.color_jitter or None,
            auto_augment=aug.auto_augment,
            interpolation=pre.interpolation,
            use_prefetcher=True,
        )
    return T.Compose([to_rgb, tf] if aug is not None else [to_rgb, LimitAspect(), tf])


class LimitAspect:
    """Centre-crop an image's long side to at most ``ratio`` times its short side.

    Evaluation resizes the short side to about the input size and then keeps a centre square,
    which spans less than the short side's length of the long side: a 4000 x 1 strip would be
    resized to 1,024,000 x 256 pixels (gigabytes for a 40000 x 1 one) to keep 256 of them.
    Cropping to ``ratio`` x the short side first keeps everything the centre crop keeps (and a
    margin for the resize's filter), so the result is the same but for rounding (a shift of
    at most about one output pixel).
    """

    def __init__(self, ratio: int = 8) -> None:
        self.ratio = ratio

    def __call__(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        keep = self.ratio * max(1, min(w, h))
        if max(w, h) <= keep:
            return img
        keep += (max(w, h) - keep) % 2  # the same centre, to the pixel
        if w > h:
            left = (w - keep) // 2
            return img.crop((left, 0, left + keep, h))
        top = (h - keep) // 2
        return img.crop((0, top, w, top + keep))
