"""Training recipes: every hyper-parameter of a run in one frozen dataclass, read from JSON.

Named recipes ship in ``sparseformer/recipes/*.json``: ``imagenet1k`` reproduces the paper's
ImageNet-1K settings (SparseFormer, Gao et al., ICLR 2024, Sec. 4 and its DeiT-style recipe);
``fashion-mnist-cpu`` is tuned for a short CPU run on Fashion-MNIST; a folder of your own gets
one scaled to it (:mod:`sparseformer.engine.own_folder`). A recipe file of your own can hold any
subset of the fields; the rest keep the defaults below (the paper's values).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from sparseformer.data.scan import counted
from sparseformer.data.transforms import Augmentation
from sparseformer.engine.recipe_rules import RecipeError, check_ranges, check_types

__all__ = [
    "Recipe",
    "RecipeError",
    "RecipeFlags",
    "list_recipes",
    "load_recipe",
    "recipe_from_flags",
    "saved_recipe",
    "recipe_for_clips",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recipe:
    """How to train. Learning rates are given for a total batch of ``lr_base_batch`` images
    and scaled linearly with the real total batch (``per-process batch x processes``).

    Attributes:
        name: recipe name (for logs and checkpoints).
        epochs: training epochs.
        batch_size: images per process and step.
        img_size: input resolution; ``None`` = the data set's or model's default.
        lr, warmup_lr, min_lr: peak, warm-up start and cosine floor, at ``lr_base_batch``.
        warmup_epochs: linear warm-up length (fractions allowed); the schedule runs by step.
        schedule: the learning rate's shape, set every step: ``"timm_cosine"`` (the paper's:
            timm's ``CosineLRScheduler`` as the authors' Swin-based code builds it, the cosine
            counted from step 0 over the whole run, warm-up included) or
            ``"cosine_after_warmup"`` (the cosine over the steps after the warm-up, which
            then ends exactly at the peak; ``fashion-mnist-cpu``'s).
        weight_decay: AdamW decay (not applied to norms, biases and the model's
            ``no_weight_decay()`` parameters such as the initial RoIs).
        betas, eps: AdamW moments and epsilon.
        layer_decay: layer-wise learning-rate decay (BEiT; timm ``layer_decay``), for
            fine-tuning: the head keeps the learning rate and each group below it takes this
            factor once more (SparseFormer: per unit, the stem and initial tokens deepest);
            ``None`` = off.
        clip_grad: gradient-norm clip; ``None`` switches it off.
        label_smoothing: label smoothing (also used inside Mixup's soft targets).
        mixup, cutmix: Beta-distribution alphas; both 0 switches Mixup/CutMix off.
        mixup_prob, mixup_switch_prob, mixup_mode: timm ``Mixup`` settings.
        augmentation: training augmentation (timm ``create_transform`` settings).
        repeated_aug: repeats per image and epoch across ranks (0 or 1 = off).
        ema_decay: EMA of weights; ``None`` = off.
        offset_proj_init: the sampling-offset projection's init for a freshly built SparseFormer
            (``"trunc_normal"``, the authors' v1 code, or ``"zeros"``; ``None``: the model's
            own); weights loaded by ``--checkpoint`` or a resume replace it.
        ema_warmup: ramp the EMA decay up from 0 (timm ``ModelEmaV3(use_warmup=True)``); for
            short runs, where the initial weights would otherwise linger in the average.
        drop_path: stochastic depth; ``None`` = the model's registered rate.
        crop_pct, interpolation: eval resize ratio and interpolation; ``None`` crop_pct = the
            data set's default.
        precision: default precision (``--precision`` overrides).
        num_workers: data-loading processes per training process.
    """

    name: str = "imagenet1k"
    epochs: int = 300
    batch_size: int = 128
    img_size: int | None = 224
    lr: float = 5e-4
    warmup_lr: float = 5e-7
    min_lr: float = 5e-6
    lr_base_batch: int = 512
    warmup_epochs: float = 20.0
    schedule: str = "timm_cosine"
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    layer_decay: float | None = None
    clip_grad: float | None = 5.0
    label_smoothing: float = 0.1
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"
    augmentation: Augmentation = Augmentation()
    repeated_aug: int = 3
    ema_decay: float | None = 0.9999
    ema_warmup: bool = False
    offset_proj_init: str | None = "trunc_normal"
    drop_path: float | None = None
    crop_pct: float | None = 224 / 256
    interpolation: str = "bicubic"
    precision: str = "bf16"
    num_workers: int = 8

    def __post_init__(self) -> None:
        check_types(self)
        check_types(self.augmentation)
        if self.epochs <= 0 or self.batch_size <= 0:
            raise RecipeError(f"epochs and batch_size must be positive (recipe {self.name!r})")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise RecipeError(f"precision must be fp32, bf16 or fp16, got {self.precision!r}")
        check_ranges(self)

    def scaled_lr(self, total_batch: int) -> tuple[float, float, float]:
        """(peak, warm-up start, floor) scaled linearly to ``total_batch``."""
        k = total_batch / self.lr_base_batch
        return self.lr * k, self.warmup_lr * k, self.min_lr * k

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> Recipe:
        """A copy with fields changed. ``augmentation`` may be a dict of some of its fields
        (the others keep this recipe's values)."""
        data = self.to_dict()
        if "augmentation" in changes:  # null too: refused by _from_dict, not passed over
            aug = changes.pop("augmentation")
            data["augmentation"] = {**data["augmentation"], **aug} if isinstance(aug, dict) else aug
        return _from_dict({**data, **changes}, self.name)


# what a run saved before a field existed used: its checkpoint's recipe lacks the field
_BEFORE_FIELD = {"schedule": "cosine_after_warmup", "offset_proj_init": None}


def _pair(value: Any, name: str, origin: str) -> tuple:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise RecipeError(
            f"{origin}: {name} must be a pair of numbers, e.g. [0.5, 1.0], got {value!r}"
        )
    return tuple(value)


def _from_dict(data: dict[str, Any], origin: str) -> Recipe:
    valid = {f.name for f in dataclasses.fields(Recipe)}
    unknown = sorted(set(data) - valid)
    if unknown:
        raise RecipeError(f"{origin}: unknown recipe field(s) {unknown}; valid: {sorted(valid)}")
    data = dict(data)
    aug = data.get("augmentation", {})
    if isinstance(aug, dict):
        aug_valid = {f.name for f in dataclasses.fields(Augmentation)}
        bad = sorted(set(aug) - aug_valid)
        if bad:
            raise RecipeError(
                f"{origin}: unknown augmentation field(s) {bad}; valid: {sorted(aug_valid)}"
            )
        for key in ("scale", "ratio"):
            if key in aug:
                aug[key] = _pair(aug[key], key, origin)
        data["augmentation"] = Augmentation(**aug)
    elif not isinstance(aug, Augmentation):
        raise RecipeError(
            f"{origin}: augmentation must be an object of its fields, e.g. "
            f'{{"hflip": 0.5, "scale": [0.08, 1.0]}}, got {json.dumps(aug, default=str)}'
        )
    if "betas" in data:
        data["betas"] = _pair(data["betas"], "betas", origin)
    try:
        return Recipe(**data)
    except TypeError as exc:
        raise RecipeError(f"{origin}: {exc}") from exc


def saved_recipe(fields: dict[str, Any]) -> Recipe:
    """The recipe a training checkpoint stored (``fields``), read as that run trained: a
    field added since takes the value the run used (``schedule``: ``cosine_after_warmup``),
    not today's default."""
    return Recipe().replace(**{**_BEFORE_FIELD, **fields})


def _builtin_dir():
    return resources.files("sparseformer") / "recipes"


def list_recipes() -> list[str]:
    """Names of the recipes shipped with the package."""
    return sorted(p.name[:-5] for p in _builtin_dir().iterdir() if p.name.endswith(".json"))


def load_recipe(name_or_path: str | Path) -> Recipe:
    """A shipped recipe by name (``imagenet1k``, ``fashion-mnist-cpu``) or a JSON file."""
    text = str(name_or_path)
    path = Path(text)
    if text.endswith(".json") or path.is_file():
        if not path.is_file():
            raise RecipeError(f"recipe file {text!r} does not exist")
        try:
            source, origin = path.read_text(encoding="utf-8"), text
        except UnicodeDecodeError:
            raise RecipeError(f"recipe file {text!r} is not text (a JSON file of recipe fields "
                              "is)") from None  # fmt: skip
    else:
        builtin = _builtin_dir() / f"{text}.json"
        if not builtin.is_file():
            raise RecipeError(
                f"unknown recipe {text!r}; shipped recipes: {', '.join(list_recipes())} "
                "(or pass a .json file)"
            )
        source, origin = builtin.read_text(), f"recipe {text}"
    try:
        data = json.loads(source)
    except json.JSONDecodeError as exc:
        raise RecipeError(f"{origin} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise RecipeError(f"{origin} must hold a JSON object of recipe fields")
    data.pop("description", None)  # free text for readers of the file
    data.setdefault("name", path.stem if path.suffix == ".json" else text)
    recipe = _from_dict(data, origin)
    if origin == text:
        _say_what_a_file_leaves_out(recipe, set(data), origin)
    return recipe


def _say_what_a_file_leaves_out(recipe: Recipe, given: set[str], origin: str) -> None:
    """A warning when a recipe file leaves out a field that shapes a run (its length,
    precision, batch size, learning rate and warm-up, Mixup and CutMix, EMA): it takes the
    ``imagenet1k`` recipe's value (the
    :class:`Recipe` defaults), not that of the recipe the run would take without
    ``--recipe``, which ``--set`` changes field by field."""
    left = [f.name for f in dataclasses.fields(Recipe) if f.name not in given | {"name"}]
    shaping = ("epochs", "precision", "batch_size", "lr", "warmup_epochs", "mixup", "cutmix",
               "ema_decay")  # fmt: skip
    mixing_off = "mixup_prob" in given and recipe.mixup_prob == 0  # its alphas do not shape it
    notable = [k for k in shaping if k in left and not (mixing_off and k in ("mixup", "cutmix"))]
    if not notable:  # finer fields (mixup_prob, ...) follow the ones the file sets
        return
    shown = ", ".join(f"{k} {getattr(recipe, k)}" for k in notable)
    logger.warning(
        "%s leaves %s out, which take the imagenet1k recipe's values (%s%s); "
        "to change a few fields of the recipe a run takes without --recipe, pass them with "
        "--set KEY=VALUE instead",
        origin, counted(len(left), "recipe field"), shown,
        ", ..." if len(left) > len(notable) else "",
    )  # fmt: skip


@dataclass(frozen=True)
class RecipeFlags:
    """What a command asks of the recipe, before it is read.

    Attributes:
        name: a shipped recipe name or a JSON file (``None``: the default for the data).
        fields: recipe fields given by flags of their own (``{"epochs": 3, "lr": 1e-3}``).
        settings: ``KEY=VALUE`` items (``--set``), values in JSON; augmentation fields by name
            (``hflip=0``) or dotted (``augmentation.scale=[0.5,1]``).
        flag_names: the flag that sets each field of ``fields`` (``{"num_workers":
            "--workers"}``), for messages.
    """

    name: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)
    settings: tuple[str, ...] = ()
    flag_names: dict[str, str] = field(default_factory=dict)


def recipe_from_flags(
    flags: RecipeFlags, dataset: str | None = None, default: Recipe | None = None
) -> Recipe:
    """The recipe ``flags.name`` names (else ``default``, e.g. a folder's from
    :func:`sparseformer.engine.own_folder.recipe_for_folder`; else ``fashion-mnist-cpu`` for
    that built-in data set, ``imagenet1k`` otherwise) with the fields and settings of ``flags``
    applied.

    Raises:
        RecipeError: an unknown recipe, a setting that is not ``KEY=VALUE``, a bad value.
    """
    named = flags.name or ("fashion-mnist-cpu" if dataset == "fashion-mnist" else "imagenet1k")
    recipe = default if flags.name is None and default is not None else load_recipe(named)
    changes = dict(flags.fields)
    augmentation: dict = {}
    aug_fields = {f.name for f in dataclasses.fields(Augmentation)}
    for item in flags.settings:
        key, parsed = _setting(item)
        # augmentation fields by name (hflip=0) or dotted (augmentation.hflip=0)
        name = key.removeprefix("augmentation.")
        if name in aug_fields and (name != key or not hasattr(recipe, key)):
            augmentation[name] = parsed
        else:
            _check_one_value(key, parsed, flags)
            changes[key] = parsed
    if augmentation:
        changes["augmentation"] = {**changes.get("augmentation", {}), **augmentation}
    lr = changes.get("lr")
    if recipe is default and isinstance(lr, (int, float)) and not isinstance(lr, bool):
        scale = lr / recipe.lr if recipe.lr > 0 else 1.0  # a folder's: warm-up and floor 1%
        for name in ("warmup_lr", "min_lr"):  # of the peak, the asked one too
            changes.setdefault(name, getattr(recipe, name) * scale)
    return recipe.replace(**changes) if changes else recipe


def _setting(item: str) -> tuple[str, Any]:
    """A ``--set`` item's key and its value, read as JSON (else as the bare string)."""
    key, sep, value = item.partition("=")
    if not sep:
        raise RecipeError(f"--set expects KEY=VALUE, got {item!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value  # a bare string such as rand-m9-mstd0.5


def asked_value(flags: RecipeFlags, key: str) -> Any:
    """The value ``flags`` give the recipe field ``key``, by its own flag or ``--set`` (the
    last one), else ``None``."""
    if key in flags.fields:
        return flags.fields[key]
    values = [value for name, value in map(_setting, flags.settings) if name == key]
    return values[-1] if values else None


def _check_one_value(key: str, value: Any, flags: RecipeFlags) -> None:
    """Refuse a ``--set`` of a field that a flag of its own sets to another value (which of
    the two was taken went unsaid)."""
    if key in flags.fields and flags.fields[key] != value:
        flag = flags.flag_names.get(key, f"the flag of {key}")
        raise RecipeError(
            f"--set {key}={json.dumps(value)} and {flag} {flags.fields[key]} ask for two "
            "values; give one of them"
        )


def recipe_for_clips(recipe: Recipe) -> Recipe:
    """The recipe as video clips take it: CutMix off (timm's cuts the last two axes, T x H on
    clips); RandAugment, colour jitter and random erasing are not applied (clips take one crop
    and flip for all frames, nothing else), which is logged."""
    if recipe.cutmix > 0:
        logger.info("video clips: CutMix is turned off")
        recipe = recipe.replace(cutmix=0.0)
    aug = recipe.augmentation
    unused = [name for name, on in (("RandAugment", aug.auto_augment),
              ("colour jitter", aug.color_jitter), ("random erasing", aug.re_prob))
              if on]  # fmt: skip
    if unused:
        logger.info(
            "video clips: the recipe's %s: not applied (clips take its crop scale and flip only)",
            ", ".join(unused),
        )
    return recipe
