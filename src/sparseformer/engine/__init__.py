"""Training and evaluation engine: recipes, loops, checkpoints, data parallelism."""

from __future__ import annotations

from sparseformer.engine.distributed import DistInfo
from sparseformer.engine.loop import (
    BatchPrep,
    NonFiniteLossError,
    StepTools,
    evaluate,
    train_one_epoch,
)
from sparseformer.engine.recipe import Recipe, RecipeError, list_recipes, load_recipe
from sparseformer.engine.trainer import RunOptions, TrainingError, fit, seed_everything

__all__ = [
    "BatchPrep",
    "DistInfo",
    "NonFiniteLossError",
    "Recipe",
    "RecipeError",
    "RunOptions",
    "TrainingError",
    "evaluate",
    "fit",
    "list_recipes",
    "load_recipe",
    "seed_everything",
    "StepTools",
    "train_one_epoch",
]
