"""The preprocessing a command runs with: the released weights', with flags on top.

A checkpoint's own preprocessing is read by :func:`sparseformer.weights.checkpoint.read_checkpoint`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from sparseformer.data.transforms import Preprocessing
from sparseformer.weights.registry import MODELS

__all__ = ["weights_preprocessing", "resolve_preprocessing"]


def weights_preprocessing(model_name: str) -> Preprocessing:
    """The eval preprocessing of a registered model's released weights; for a timm name, that
    of its pretrained config (``name.tag`` or its default tag: a CLIP tower's mean and std, an
    AugReg ViT's 0.5), as timm's ``resolve_data_config`` gives it; else ImageNet's."""
    spec = MODELS.get(model_name)
    if spec is not None and spec.weights is not None:
        w = spec.weights
        return Preprocessing(w.input_size[-1], w.mean, w.std, w.crop_pct, w.interpolation)
    if spec is None:
        import timm

        try:  # an unknown tag: timm says so when the model is built
            cfg = timm.models.get_pretrained_cfg(model_name) if timm.is_model(model_name) else None
        except RuntimeError:
            cfg = None
        if cfg is not None and cfg.mean is not None and cfg.std is not None:
            return Preprocessing(
                int(cfg.input_size[-1]), tuple(cfg.mean), tuple(cfg.std),
                float(cfg.crop_pct or Preprocessing().crop_pct),
                cfg.interpolation or Preprocessing().interpolation,
            )  # fmt: skip
    return Preprocessing()


def resolve_preprocessing(
    base: Preprocessing, img_size: int | None, crop_pct: float | None, interpolation: str | None
) -> Preprocessing:
    """``base`` with the given fields replaced (``None`` keeps them)."""
    changes: dict[str, Any] = {}
    if img_size is not None:
        changes["img_size"] = int(img_size)
    if crop_pct is not None:
        changes["crop_pct"] = float(crop_pct)
    if interpolation is not None:
        changes["interpolation"] = interpolation
    return dataclasses.replace(base, **changes)
