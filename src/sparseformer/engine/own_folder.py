"""The default recipe for a folder of your own (``sparseformer train --data-dir DIR``).

The shipped ``imagenet1k`` recipe is the paper's (SparseFormer, Gao et al., ICLR 2024): 300
epochs, 20 of them warm-up, Mixup/CutMix, EMA 0.9999, bf16, 8 loader processes. On a folder of
a few hundred images, or in a run of a few epochs, it barely trains: one epoch ends inside the
warm-up, a few hundred steps leave an EMA of 0.9999 at the initial weights, and Mixup blurs
classes the model has not learnt yet. The rule here scales the recipe to the run instead:

- the warm-up is a fraction of the run (:data:`WARMUP_FRACTION`), and the cosine runs over the
  steps after it (``cosine_after_warmup``), so ``--epochs 1`` reaches the peak and ends at the
  floor;
- augmentation, Mixup/CutMix and EMA grow with the number of training images, in three sizes
  (:data:`SIZES`): a small folder takes crops and flips only, a large one the paper's strength;
- the batch shrinks for a small folder, so that an epoch still takes about ten steps (each
  torchrun process's batch sized for the share of the folder it reads);
- loader processes follow the CPU cores, and precision the device: fp32 on the CPU, bf16 on a
  GPU that supports it.

Flags (``--epochs``, ``--lr``, ``--set mixup=0.8`` ...) apply on top of the result, as they do
on a named recipe; ``--recipe imagenet1k`` still gives the paper's.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sparseformer.data.images import IMAGE_EXTENSIONS
from sparseformer.data.scan import is_hidden, walk_files
from sparseformer.data.transforms import Augmentation
from sparseformer.data.video_decode import VIDEO_EXTENSIONS
from sparseformer.engine.device import available_cores
from sparseformer.engine.distributed import launched_rank
from sparseformer.engine.recipe import Recipe, RecipeFlags, asked_value

__all__ = [
    "DEFAULT_EPOCHS",
    "SIZES",
    "WARMUP_FRACTION",
    "count_training_files",
    "default_precision",
    "folder_size",
    "own_folder_recipe",
    "recipe_for_folder",
]

DEFAULT_EPOCHS = 100
WARMUP_FRACTION = 0.05  # of the run's epochs
# (name, training images from): a folder takes the last size it reaches
SIZES = (("small", 0), ("medium", 10_000), ("large", 200_000))
_STEPS_PER_EPOCH = 10  # a small folder's batch is cut until an epoch takes about this many
_MIN_BATCH, _MAX_BATCH = 16, 128
_RANDAUGMENT = "rand-m{}-mstd0.5-inc1"  # timm's RandAugment policy (DeiT's, at magnitude m)


def folder_size(images: int) -> str:
    """The size name (``"small"``, ``"medium"``, ``"large"``) of a folder of ``images``
    training images."""
    return [name for name, start in SIZES if images >= start][-1]


def default_precision(device: str) -> str:
    """fp32 on the CPU (bf16 autocast there is slower on most CPUs and gains no memory that
    matters); bf16 on a CUDA GPU that supports it (Ampere and newer), else fp32 (fp16 needs a
    loss scaler and is left to ``--precision fp16``)."""
    if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def _default_workers(device: str, cores: int) -> int:
    """Loader processes: on a GPU up to 8, as many as there are cores; on the CPU the training
    threads need the cores, so half of them (none on one core), at most 4."""
    if device.startswith("cuda"):
        return max(0, min(8, cores))
    return min(4, cores // 2)


def _batch_size(images: int) -> int:
    """128, or for a small folder the largest power of two that still gives about
    ``_STEPS_PER_EPOCH`` steps an epoch (at least 16); a folder of fewer than 32 images,
    which 16 would leave with one step an epoch or none, takes the largest that gives two or more
    (at least 1)."""
    batch = _MAX_BATCH
    while batch > _MIN_BATCH and batch * _STEPS_PER_EPOCH > images:
        batch //= 2
    while batch > 1 and 2 * batch > images:
        batch //= 2
    return batch


def own_folder_recipe(
    images: int,
    *,
    epochs: int | None = None,
    device: str = "cpu",
    cores: int | None = None,
    processes: int = 1,
) -> Recipe:
    """The recipe for training on a folder of ``images`` training images for ``epochs``
    (default :data:`DEFAULT_EPOCHS`) on ``device`` with ``cores`` CPU cores (default: those
    this process may use), in ``processes`` processes (torchrun's), each of which reads its
    share of the images: the batch, per process, is sized for that share. Named
    ``own-folder-SIZE`` (:func:`folder_size`).

    Every size: AdamW with weight decay 0.05, gradient clipping at 5, label smoothing 0.1, a
    linear warm-up over :data:`WARMUP_FRACTION` of the run from 1% of the peak, then a cosine
    to 1% of it; no repeated augmentation (a one-machine run would see fewer distinct images
    per epoch); the model's own input size and drop-path rate. By size:

    =========  =============  ==================  =================  ===============  =====
    size       crop scale     RandAugment         random erasing     Mixup / CutMix   EMA
    =========  =============  ==================  =================  ===============  =====
    small      0.35 - 1       none                none               none             none
    medium     0.08 - 1       magnitude 7         0.1                half the batches 0.9998
    large      0.08 - 1       magnitude 9         0.25               every batch      0.9999
    =========  =============  ==================  =================  ===============  =====

    The EMA ramps its decay up from 0 (``ema_warmup``), so a short run's average is not the
    initial weights. The peak learning rate is 2e-3 per 512 images for small and medium
    folders (5e-4 at a batch of 128) and the paper's 5e-4 per 512 for large ones, both scaled
    linearly with the total batch.
    """
    epochs = DEFAULT_EPOCHS if epochs is None else epochs
    cores = available_cores() if cores is None else cores
    size = folder_size(images)
    lr = 5e-4 if size == "large" else 2e-3
    common = {
        "name": f"own-folder-{size}",
        "epochs": epochs,
        "batch_size": _batch_size(-(-images // max(processes, 1))),  # this process's share
        "img_size": None,
        "lr": lr,
        "warmup_lr": lr / 100,
        "min_lr": lr / 100,
        "warmup_epochs": WARMUP_FRACTION * epochs,
        "schedule": "cosine_after_warmup",
        "repeated_aug": 0,
        "drop_path": None,
        "offset_proj_init": None,
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "precision": default_precision(device),
        "num_workers": _default_workers(device, cores),
    }
    if size == "small":
        return Recipe(
            **common,
            mixup=0.0,
            cutmix=0.0,
            ema_decay=None,
            augmentation=Augmentation(scale=(0.35, 1.0), color_jitter=None, auto_augment=None,
                                      re_prob=0.0),
        )  # fmt: skip
    large = size == "large"
    return Recipe(
        **common,
        mixup=0.8,
        cutmix=1.0,
        mixup_prob=1.0 if large else 0.5,
        ema_decay=0.9999 if large else 0.9998,
        ema_warmup=True,
        augmentation=Augmentation(
            scale=(0.08, 1.0),
            color_jitter=0.4 if large else None,
            auto_augment=_RANDAUGMENT.format(9 if large else 7),
            re_prob=0.25 if large else 0.1,
        ),
    )


def count_training_files(
    data_dir: Path, *, video: bool = False, limit: int | None = None, stop_at: int | None = None
) -> int:
    """The training files of the folder ``data_dir`` (``DIR/train/CLASS/*``) by extension, as
    the data scan will take them (images, or videos with ``video``), at most ``limit``
    (``--limit-train``). Counting stops at ``stop_at`` (default: the largest size's start),
    so that a folder of millions of files costs no more than its first 200,000 names; a folder
    without ``train/`` counts 0 (the scan then says what is missing)."""
    extensions = VIDEO_EXTENSIONS if video else IMAGE_EXTENSIONS
    stop_at = SIZES[-1][1] if stop_at is None else stop_at
    if limit is not None:
        stop_at = min(stop_at, limit)
    train = Path(data_dir) / "train"
    if not train.is_dir():
        return 0
    n = 0
    for folder in sorted(p for p in train.iterdir() if p.is_dir() and not is_hidden(p.name)):
        for _ in walk_files(folder, extensions):  # class folders only: loose files are left out
            n += 1
            if n >= stop_at:
                return n
    return n


def recipe_for_folder(
    flags: RecipeFlags, data_dir: Path | None, *, video: bool = False, limit: int | None = None,
    device: str = "cpu",
) -> Recipe | None:  # fmt: skip
    """The default recipe of ``sparseformer train`` when the flags name none and the data is
    a folder: :func:`own_folder_recipe` for its training files and the asked ``--epochs``;
    ``None`` otherwise (a named recipe, or a built-in data set, which has its own)."""
    if flags.name is not None or data_dir is None:
        return None
    images = count_training_files(data_dir, video=video, limit=limit)
    processes = launched_rank()[1]  # under torchrun: each process reads a share
    epochs = asked_value(flags, "epochs")  # --epochs or --set epochs=: the warm-up's 5%
    if not (isinstance(epochs, int) and not isinstance(epochs, bool) and epochs > 0):
        epochs = None  # a bad value: the recipe's check names it, with the default's warm-up
    return own_folder_recipe(images, epochs=epochs, device=device, processes=processes)
