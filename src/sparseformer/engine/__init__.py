"""Training and evaluation engine: recipes, loops, checkpoints, data parallelism."""

from __future__ import annotations

from sparseformer.engine.loop import BatchPrep, NonFiniteLossError, evaluate, train_one_epoch
from sparseformer.engine.recipe import Recipe, RecipeError, list_recipes, load_recipe
from sparseformer.engine.trainer import RunOptions, TrainingError, fit, seed_everything

__all__ = [
    "BatchPrep",
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
    "train_one_epoch",
]
