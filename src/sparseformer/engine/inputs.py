"""What a command feeds its model: the preprocessing (from the checkpoint, the data set or the
released weights), an input size the model can take, and the names of its classes.

Shared by ``train``, ``eval`` and ``predict``, so that each decides these the same way.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from sparseformer.data.clips import CLIP_INTERPOLATION
from sparseformer.data.datasets import DataSource, dataset_defaults
from sparseformer.data.transforms import Preprocessing
from sparseformer.engine.device import available_cores
from sparseformer.engine.preprocessing import resolve_preprocessing, weights_preprocessing
from sparseformer.engine.recipe import Recipe
from sparseformer.engine.video import is_video_model
from sparseformer.weights.build import model_input_size
from sparseformer.weights.loading import is_sparseformer
from sparseformer.weights.registry import imagenet_class_ids, imagenet_class_names

__all__ = [
    "training_preprocessing",
    "evaluation_preprocessing",
    "checkpoint_preprocessing",
    "check_input_size",
    "class_names",
    "default_eval_workers",
]


logger = logging.getLogger(__name__)


def training_preprocessing(
    source: DataSource,
    model_name: str,
    recipe: Recipe,
    saved: dict[str, Any] | None = None,
    weights: Mapping[str, Any] | None = None,
) -> Preprocessing:
    """A resumed run's own preprocessing (``saved``: its checkpoint); else the data set's
    (a built-in one) or the input size and the mean and std the weights were trained with
    (``weights``: what a fine-tuning checkpoint records; else the model's input size and the
    released weights' mean and std, a bootstrapped model's being its teacher's), with the
    recipe's size, crop and interpolation.
    """
    if saved is not None:
        return Preprocessing.from_dict(saved["preprocessing"])
    released = weights_preprocessing(model_name)
    size = model_input_size(model_name) or 224
    if weights and weights.get("mean") is not None and weights.get("std") is not None:
        released = dataclasses.replace(
            released, mean=tuple(weights["mean"]), std=tuple(weights["std"])
        )
    if weights and weights.get("img_size") not in (None, size):  # a run goes on at its own
        size = int(weights["img_size"])
        if recipe.img_size is None and dataset_defaults(source) is None:
            logger.info("training at %dpx, the checkpoint's size (--img-size to change)", size)
    # clips are resized one way whatever the recipe's interpolation, which is for images (the
    # source carries clip settings for any model: the model says whether the data are clips)
    video = is_video_model(model_name)
    interpolation = CLIP_INTERPOLATION if video else recipe.interpolation
    base = dataset_defaults(source) or Preprocessing(
        size,
        released.mean,
        released.std,
        interpolation=interpolation,
    )
    return resolve_preprocessing(base, recipe.img_size, recipe.crop_pct, interpolation)


def evaluation_preprocessing(
    saved: dict[str, Any], source: DataSource, model_name: str, img_size: int | None
) -> Preprocessing:
    """The checkpoint's own preprocessing (``saved``), else the data set's, else the released
    weights'; at ``img_size`` when given."""
    if isinstance(saved.get("preprocessing"), dict):
        pre = Preprocessing.from_dict(saved["preprocessing"])
    else:
        pre = dataset_defaults(source) or weights_preprocessing(model_name)
    return resolve_preprocessing(pre, img_size, None, None)


def checkpoint_preprocessing(info: dict[str, Any], model_name: str) -> Preprocessing:
    """The preprocessing a checkpoint records (``info``), else the released weights'."""
    if "preprocessing" in info:
        return Preprocessing.from_dict(info["preprocessing"])
    return weights_preprocessing(model_name)


def check_input_size(model: nn.Module, name: str, size: int, trained_size: int | None) -> None:
    """A model built for one input size (a timm ViT) given another fails in one line: tried on
    one blank image before the evaluation starts.

    Raises:
        ValueError: ``model`` (named ``name``) cannot take ``size`` pixel inputs.
    """
    if is_sparseformer(model) or trained_size is None or size == trained_size:
        return
    try:
        with torch.inference_mode():
            model(torch.zeros(1, 3, size, size))
    except (AssertionError, RuntimeError, ValueError) as exc:
        raise ValueError(
            f"{name} was trained at {trained_size}px and cannot take {size}px inputs "
            f"({(str(exc) or type(exc).__name__).splitlines()[0]}); leave out --img-size"
        ) from exc


def class_names(info: dict, num_classes: int) -> list[str]:
    """The checkpoint's class names (ImageNet synset ids, of a run on ImageNet's own folders,
    as ImageNet's names: ``tench (n01440764)``), ImageNet's for 1000 classes, else
    ``class N``."""
    names = info.get("class_names")
    if names and len(names) == num_classes:
        ids = imagenet_class_ids()
        if all(isinstance(n, str) and n.startswith("n") for n in names) and set(names) <= set(ids):
            known = dict(zip(ids, imagenet_class_names()))
            return [f"{known[n].split(',')[0]} ({n})" for n in names]
        return list(names)
    if names:
        logger.warning(
            "the checkpoint names %d classes but the model has %d outputs: the names are not "
            "used", len(names), num_classes,
        )  # fmt: skip
    if num_classes == 1000:
        return imagenet_class_names()
    return [f"class {i}" for i in range(num_classes)]


def default_eval_workers(device: str) -> int:
    """Data-loading processes for evaluation: a GPU waits for images decoded one by one in
    this process (8, at most the cores); on the CPU the model needs the cores (0)."""
    return min(8, available_cores()) if device.startswith("cuda") else 0
