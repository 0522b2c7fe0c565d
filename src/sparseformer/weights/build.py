"""Models by name for training and evaluation: our registered SparseFormers or any timm model,
built fresh or from a checkpoint.

SparseFormer (Gao et al., ICLR 2024). Dense timm baselines (``resnet18``,
``vit_tiny_patch16_224``, ...) train through the same engine, so comparisons use one recipe and
one data pipeline. :func:`model_from_checkpoint` is the one way the commands (eval, predict,
viz) build a model from a checkpoint.
"""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from torch import nn

from sparseformer.weights.checkpoint import Checkpoint, check_model, read_checkpoint
from sparseformer.weights.convert import CheckpointError
from sparseformer.weights.factory import UnknownModelError, create_model, list_models
from sparseformer.weights.loading import load_weights
from sparseformer.weights.mismatch import OTHER_SIZE
from sparseformer.weights.registry import MODELS, split_tag

__all__ = [
    "patch_grid_problem",
    "build_model",
    "check_model_name",
    "classes_problem",
    "close_model_names",
    "embedding_width",
    "model_from_checkpoint",
    "models_with_weights",
    "naming_their_model",
    "model_input_size",
    "require_sparseformer",
    "timm_model",
    "unknown_tag_problem",
]

logger = logging.getLogger(__name__)


def close_model_names(name: str) -> str:
    """``"; did you mean a, b?"`` with the registered SparseFormer or timm names closest to
    ``name``, or ``""`` when none is close."""
    import timm

    pool = list(dict.fromkeys(list_models() + timm.list_models()))  # timm lists ours too
    close = difflib.get_close_matches(name, pool, n=4, cutoff=0.5)
    return f"; did you mean {', '.join(close)}?" if close else ""


def check_model_name(name: str) -> str:
    """``"sparseformer"`` or ``"timm"``; an unknown name raises, listing close names."""
    import timm

    if name in list_models():
        return "sparseformer"
    if timm.is_model(name):
        problem = unknown_tag_problem(name)
        if problem is not None:
            raise UnknownModelError(problem)
        return "timm"
    raise UnknownModelError(
        f"unknown model {name!r}{close_model_names(name)} (SparseFormers: sparseformer models; "
        "any timm model name also works)"
    )


def unknown_tag_problem(name: str) -> str | None:
    """Why timm has no pretrained tag ``name`` names (``arch.tag``), with the tags it has, or
    ``None`` (no tag, or a known one). timm itself fails only when building, in a traceback
    that reads as a size the model cannot take."""
    import timm

    arch, _, tag = name.partition(".")
    known = timm.list_models(f"{arch}.*", include_tags=True)  # with weights or not (untrained)
    if not tag or name in known:
        return None
    tags = ", ".join(k.partition(".")[2] for k in known) or "none"
    return f"{arch} has no pretrained tag {tag!r} (timm's tags: {tags})"


def timm_model(name: str, img_size: int | None = None, **kwargs: Any) -> nn.Module:
    """timm's model ``name`` without weights, for ``img_size`` inputs where it takes a size
    (ViTs fix their position table to it; convolutional nets take any, and no argument).

    Raises:
        UnknownModelError: a pretrained tag timm does not have.
        ValueError: timm cannot build it for ``img_size`` inputs (a hybrid ViT's backbone
            stride, say), in one line where timm asserts and builds it at its own size.
    """
    import timm

    problem = unknown_tag_problem(name)
    if problem is not None:
        raise UnknownModelError(problem)
    if img_size is not None:
        try:
            return timm.create_model(name, pretrained=False, img_size=img_size, **kwargs)
        except TypeError:  # convolutional nets take any size and no img_size argument
            pass
        except AssertionError as exc:  # timm's shape checks: bare, from deep in the model
            timm.create_model(name, pretrained=False, **kwargs)  # fails alike: not the size
            reason = f": {str(exc).splitlines()[0]}" if str(exc).strip() else ""
            raise ValueError(
                f"timm cannot build {name} for {img_size} px inputs (an assertion in timm"
                f"{reason}); pick another size, a multiple of the model's stride"
            ) from exc
    return timm.create_model(name, pretrained=False, **kwargs)


def require_sparseformer(name: str, command: str) -> None:
    """Refuse a timm model in a command that handles SparseFormers only, saying so, and an
    unknown name with the closest SparseFormer names.

    Raises:
        UnknownModelError: not a registered SparseFormer.
    """
    import timm

    if name in list_models():
        return
    arch, tag = split_tag(name)
    if tag is not None and arch in list_models():  # a pretrained tag names weights
        raise UnknownModelError(
            f"{command} takes a model name without a pretrained tag ({tag!r}): {arch!r}, with "
            "the weights from --checkpoint"
        )
    if timm.is_model(name):
        raise UnknownModelError(
            f"{command} handles SparseFormer models only (sparseformer models lists them); "
            f"{name!r} is a timm model: use timm's own tools for it"
        )
    close = difflib.get_close_matches(name, list_models(), n=4, cutoff=0.5)
    raise UnknownModelError(
        f"unknown model {name!r}"
        + (f"; did you mean {', '.join(close)}?" if close else "")
        + f" ({command} takes the SparseFormers that sparseformer models lists)"
    )


def build_model(
    name: str,
    num_classes: int,
    img_size: int | None = None,
    drop_path: float | None = None,
    num_frames: int | None = None,
    replicates: int | None = None,
    offset_proj_init: str | None = None,
    architecture: Mapping[str, Any] | None = None,
) -> nn.Module:
    """A fresh model ``name`` with ``num_classes`` outputs.

    Args:
        name: a registered SparseFormer or any timm model name.
        num_classes: classifier outputs.
        img_size: input size, passed to timm models that take one (SparseFormers take any
            size).
        drop_path: stochastic-depth rate; ``None`` keeps the model's default.
        num_frames: a video model's clip length (its config records it; it warns when
            fewer than its token replicates); ``None`` keeps the model's default.
        replicates: a video model's token replicates (a checkpoint's, from
            :func:`~sparseformer.weights.checkpoint.checkpoint_replicates`); ``None``: the default.
        offset_proj_init: a SparseFormer's sampling-offset projection init (``"zeros"`` or
            ``"trunc_normal"``, the authors' v1 code); ``None``: the model's own. timm models
            have none.
        architecture: config fields over the name's (a bootstrapped student's, as its
            checkpoint records them); its ``num_classes`` gives way to ``num_classes``.
    """
    kind = check_model_name(name)
    if kind == "sparseformer":
        overrides: dict[str, Any] = {
            k: v for k, v in (architecture or {}).items() if k != "num_classes"
        }
        if drop_path is not None:
            overrides["drop_path_rate"] = drop_path
        if num_frames is not None:
            overrides["num_frames"] = num_frames
        if replicates is not None:
            overrides["replicates"] = replicates
        if offset_proj_init is not None:
            overrides["offset_proj_init"] = offset_proj_init
        return create_model(name, num_classes=num_classes, **overrides)
    kwargs: dict[str, Any] = {"num_classes": num_classes}
    if drop_path is not None:
        kwargs["drop_path_rate"] = drop_path
    return timm_model(name, img_size, **kwargs)


def patch_grid_problem(model: nn.Module, img_size: int, whose: str = "the model's") -> str | None:
    """Why ``img_size`` does not fit the patches of a model that cuts its input into them (a
    timm ViT's ``patch_embed``: its convolution's kernel and stride), or ``None``. A size its
    windows do not tile leaves the pixels past the last one unseen: a 16 px ViT at 30 px sees
    only the top-left 16 x 16 pixels, in silence. ``whose`` words the message ("the teacher's")."""
    embed = getattr(model, "patch_embed", None)
    proj = getattr(embed, "proj", None) or getattr(embed, "conv", None)  # ViT's, PiT's
    proj = proj if isinstance(proj, nn.Conv2d) else None
    kernel = _pair(proj.kernel_size if proj else getattr(embed, "patch_size", None))
    stride = _pair(proj.stride) if proj else kernel
    if not kernel or getattr(embed, "dynamic_img_pad", False):  # padded to whole patches
        return None

    def unseen(size: int) -> int:  # pixels past the last window, on the worse side
        return max((size - k) % s for k, s in zip(kernel, stride))

    side = max(kernel)
    if img_size < side:
        return f"the input size {img_size} is smaller than {whose} {side}px patches; use {side}"
    if not unseen(img_size):
        return None
    fits = [n for n in range(side, img_size + 4 * max(stride)) if not unseen(n)]
    lower, upper = [n for n in fits if n < img_size], [n for n in fits if n > img_size]
    offer = " or ".join(str(n) for n in (lower[-1:] + upper[:1]))
    return (
        f"the input size {img_size} does not fit {whose} {side}px patches: the last "
        f"{unseen(img_size)} pixels of a side would go unseen; use {offer}"
    )


def _pair(value) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(int(v) for v in value) if isinstance(value, (tuple, list)) else (int(value),) * 2


def model_input_size(name: str) -> int | None:
    """The input size a timm model was designed for (``None`` for SparseFormers and unknown)."""
    if check_model_name(name) == "sparseformer":
        return None
    import timm

    cfg = timm.models.get_pretrained_cfg(name)
    return int(cfg.input_size[-1]) if cfg is not None else None


def embedding_width(model: nn.Module, name: str, class_names=None) -> int | None:
    """The width of the embedding ``model`` outputs in place of class scores, or ``None`` for
    a classifier: a CLIP image tower's bias-free projection at its released width (512 for
    ``sparseformer_btsp_openai_clip_base``), unless its run named classes (a bias-free
    classifier of other classes, or of as many, is one)."""
    width = int(getattr(model, "num_classes", 0) or 0)
    spec = MODELS.get(split_tag(name)[0])
    released = spec is not None and width == spec.config.num_classes
    config = getattr(model, "config", None)  # a timm model has none: a classifier
    if released and not getattr(config, "head_bias", True) and not class_names:
        return width
    return None


def classes_problem(model: nn.Module, name: str, class_names=None) -> str | None:
    """Why ``model``'s outputs are not class scores (no classifier, or a CLIP tower's
    embedding: :func:`embedding_width`), or ``None``."""
    if not int(getattr(model, "num_classes", 0) or 0):
        return (
            f"{name} has no classifier here (its outputs are features), so it scores no "
            "classes; fine-tune one first (sparseformer train --checkpoint ...)"
        )
    width = embedding_width(model, name, class_names)
    if width is None:
        return None
    return (
        f"{name} outputs a {width}-d embedding (a CLIP image tower's projection), not class "
        "scores; compare it with text embeddings (encode_image), or fine-tune a classifier "
        "first (sparseformer train --checkpoint ...)"
    )


def model_from_checkpoint(
    model_name: str | None,
    checkpoint: str | os.PathLike | Mapping[str, Any] | Checkpoint,
    num_classes: int | None = None,
    prefer_ema: bool = False,
) -> tuple[nn.Module, Checkpoint]:
    """Build a model with a checkpoint's weights (ours or either official layout), as it was
    trained: its classes, its token replicates, its preprocessing in ``pretrained_cfg``.

    Args:
        model_name: a registered SparseFormer or a timm name; ``None`` takes the model the
            checkpoint records. A video model also takes its image model's checkpoint
            (inflated on loading); a checkpoint of any other model is refused.
        checkpoint: a path, a loaded mapping or a :class:`Checkpoint`.
        num_classes: the classes the caller needs (eval: the data set's); ``None`` takes the
            checkpoint's.
        prefer_ema: load the EMA weights when the checkpoint has them.

    Returns:
        The model in eval mode, and the :class:`Checkpoint` it was loaded from (``ema``:
        whether the EMA weights were loaded).

    Raises:
        CheckpointError: a checkpoint of another model, or of another number of classes; a
            CLIP image tower's embedding where ``num_classes`` asks for class scores.
    """
    ckpt = read_checkpoint(checkpoint, prefer_ema=prefer_ema)
    model_name = check_model(ckpt, model_name)
    sparseformer = check_model_name(model_name) == "sparseformer"
    classes = ckpt.num_classes if sparseformer else ckpt.num_classes or 1000
    # loaded first: weights of another model are named as such, not as another class count
    if sparseformer:
        with naming_their_model(ckpt, model_name):
            model = create_model(model_name, checkpoint_path=ckpt, num_classes=classes)
    else:
        model = build_model(model_name, classes, ckpt.img_size)  # timm models fix their size
        load_weights(model, ckpt)
    no_classes = num_classes is not None and classes_problem(model, model_name, ckpt.class_names)
    if no_classes:  # the caller scores classes
        raise CheckpointError(no_classes)
    if num_classes is not None and num_classes != classes:
        where = repr(ckpt.path) if ckpt.path is not None else "the checkpoint"
        raise CheckpointError(
            f"{where} classifies {classes} classes but the data has {num_classes}; evaluate "
            "on data with the same classes, or fine-tune first (sparseformer train "
            "--checkpoint ...)"
        )
    return model.eval(), ckpt


@contextmanager
def naming_their_model(ckpt: Checkpoint | None, model_name: str) -> Iterator[None]:
    """Inside, a :class:`CheckpointError` over ``ckpt``'s weights (building or loading
    ``model_name`` with them) names the registered model they are of, if another."""
    try:
        yield
    except CheckpointError as exc:
        said = str(exc) if ckpt is None else _whose(ckpt.state_dict, model_name, str(exc))
        if said == str(exc):  # no other model's: the error as it was, of its own type
            raise
        raise CheckpointError(said) from None


def models_with_weights(state: Mapping[str, Any]) -> list[str]:
    """The registered models whose weights have the names and shapes of ``state``'s (the
    classifier aside): the model a file that names none is of. Each is built on the meta
    device (no memory, no initialisation): seconds in all, for error messages."""
    import torch

    def body(weights: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
        return {
            k: tuple(v.shape)
            for k, v in weights.items()
            if not k.startswith("head.") and isinstance(v, torch.Tensor)
        }

    theirs, found = body(state), []
    for name in list_models():
        try:
            with torch.device("meta"):
                ours = body(create_model(name, num_classes=0).state_dict())
        except Exception:  # noqa: BLE001 - a model that cannot be built so is not the answer
            continue
        if ours == theirs:
            found.append(name)
    return found


def _whose(state: Mapping[str, Any], asked: str, error: str) -> str:
    """``error``, saying which registered model other than ``asked`` ``state`` is of, if any."""
    found = [name for name in models_with_weights(state) if name != asked]
    if not found:
        return error
    video = f"video_{found[0]}"
    takes = asked.startswith("video_") and video in list_models()
    video = f" (or {video}, which takes them)" if takes else ""
    return (f"{error.replace(OTHER_SIZE, '')}; its weights are those of {' or '.join(found)}: pass "
            f"--model {found[0]}{video}")  # fmt: skip
