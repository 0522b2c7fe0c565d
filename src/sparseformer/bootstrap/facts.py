"""What a timm ViT says about the SparseFormer bootstrapped from it: its width, depth, heads,
activation, pooling and head, its preprocessing, and why a ViT that the SparseFormer cortex
cannot hold is refused.

Bootstrapping SparseFormers from Vision Foundation Models (Gao et al., CVPR 2024,
arXiv 2312.01987) takes a plain pre-norm ViT's last blocks, final norm and head as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from sparseformer.data.transforms import Preprocessing

__all__ = [
    "BootstrapError",
    "TeacherFacts",
    "describe_teacher",
    "teacher_name",
    "teacher_preprocessing",
]


class BootstrapError(ValueError):
    """A teacher, checkpoint or student that cannot be bootstrapped; the message says why."""


@dataclass(frozen=True)
class TeacherFacts:
    """What a timm ViT says about the SparseFormer bootstrapped from it.

    Attributes:
        name: the teacher's timm name (for messages and the run record).
        width, depth, head_dim, mlp_ratio: its blocks' width, count, head width, MLP ratio.
        activation: ``"gelu"`` or ``"quick_gelu"`` (OpenAI CLIP) in its MLPs.
        ln_eps: its LayerNorms' epsilon.
        global_pool: ``"token"`` (CLS token, norm before pooling) or ``"avg"`` (``fc_norm``).
        num_classes: its head's outputs (classes, or the CLIP embedding width; 0: no head).
        head_bias: whether the head keeps a bias (see :func:`describe_teacher`).
        mean, std, img_size: its input preprocessing.
    """

    name: str
    width: int
    depth: int
    head_dim: int
    mlp_ratio: float
    activation: str
    ln_eps: float
    global_pool: str
    num_classes: int
    head_bias: bool
    mean: tuple[float, ...]
    std: tuple[float, ...]
    img_size: int


def teacher_name(teacher: nn.Module) -> str:
    """The teacher's timm architecture name (``pretrained_cfg["architecture"]``), else its
    class name, as bootstrapping records it."""
    cfg = getattr(teacher, "pretrained_cfg", None) or {}
    return str(cfg.get("architecture") or type(teacher).__name__)


def _check_block(block: nn.Module, name: str, index: int) -> None:
    """A plain pre-norm ViT block (timm's ``Block``): what our attention and MLP ops hold."""
    from timm.models.vision_transformer import Block

    where = f"{name} block {index}"
    if type(block) is not Block:
        raise BootstrapError(
            f"{where} is a {type(block).__name__}, not timm's plain ViT Block; bootstrap takes "
            "ViTs with pre-norm attention + MLP blocks (vit_*, deit_*, CLIP ViTs)"
        )
    extras = [n for n in ("ls1", "ls2") if not isinstance(getattr(block, n), nn.Identity)]
    extras += [
        f"attn.{n}" for n in ("q_norm", "k_norm", "norm") if not _identity(block.attn, n)
    ] + [f"mlp.{n}" for n in ("norm",) if not _identity(block.mlp, n)]
    if extras or not hasattr(block.mlp, "fc1"):
        what = ", ".join(extras) or "a gated MLP"
        raise BootstrapError(
            f"{where} has {what}, which the SparseFormer cortex does not: take a ViT without "
            "LayerScale, QK-norm or gated MLPs"
        )
    if block.attn.qkv.bias is None:
        raise BootstrapError(
            f"{where} has no qkv bias; the SparseFormer cortex has one: take a ViT with "
            "qkv_bias=True"
        )


def _identity(module: nn.Module, name: str) -> bool:
    return isinstance(getattr(module, name, nn.Identity()), nn.Identity)


def _activation(block: nn.Module, name: str) -> str:
    from timm.layers import QuickGELU

    act = block.mlp.act
    if isinstance(act, QuickGELU):
        return "quick_gelu"
    if isinstance(act, nn.GELU) and act.approximate == "none":
        return "gelu"
    raise BootstrapError(
        f"{name} uses {type(act).__name__} in its MLPs; bootstrap takes GELU or QuickGELU ViTs"
    )


def _pooling(teacher: nn.Module, name: str) -> str:
    pool = getattr(teacher, "global_pool", None)
    norm_ln = isinstance(teacher.norm, nn.LayerNorm)
    fc_ln = isinstance(teacher.fc_norm, nn.LayerNorm)
    if pool == "token" and getattr(teacher, "has_class_token", False) and norm_ln and not fc_ln:
        return "token"
    if pool == "avg" and fc_ln and not norm_ln:
        return "avg"
    raise BootstrapError(
        f"{name} pools with {pool!r} ({type(teacher.norm).__name__} norm, "
        f"{type(teacher.fc_norm).__name__} fc_norm); bootstrap takes ViTs that pool the CLS "
        "token after the final norm, or average before fc_norm"
    )


def _keeps_head_bias(head: nn.Module, clip_tower: bool) -> bool:
    """The head keeps its bias, except a CLIP tower's (pre-norm) whose bias is all zeros:
    OpenAI CLIP's projection has none, and timm stores it with a zero bias. Without values (a
    teacher on the meta device), a CLIP tower's bias is taken to be such a zero."""
    bias = getattr(head, "bias", None)
    if bias is None:
        return False
    if not clip_tower:
        return True
    return not bias.is_meta and bool(bias.detach().ne(0).any())


def describe_teacher(teacher: nn.Module) -> TeacherFacts:
    """The facts of a timm ``VisionTransformer`` that a bootstrapped student needs.

    Raises:
        BootstrapError: not a timm ViT, a distilled one, or a ViT whose blocks, pooling or
            activation the SparseFormer cortex cannot hold.
    """
    from timm.models.vision_transformer import VisionTransformer

    name = teacher_name(teacher)
    if not isinstance(teacher, VisionTransformer):
        raise BootstrapError(
            f"the teacher {name} is not a ViT (a {type(teacher).__name__}); bootstrap takes a "
            "timm VisionTransformer (vit_*, deit_*, CLIP ViTs)"
        )
    if getattr(teacher, "head_dist", None) is not None:  # timm's VisionTransformerDistilled
        raise BootstrapError(
            f"the teacher {name} is a distilled ViT: its output averages two heads over two "
            "tokens (class and distillation), where a student aligns one feature to one head; "
            "take the ViT without distillation (deit_small_patch16_224, not "
            "deit_small_distilled_patch16_224)"
        )
    blocks = list(teacher.blocks)
    for i, block in enumerate(blocks):
        _check_block(block, name, i)
    first = blocks[0]
    width = int(teacher.embed_dim)
    head = teacher.head
    cfg = getattr(teacher, "pretrained_cfg", None) or {}
    return TeacherFacts(
        name=name,
        width=width,
        depth=len(blocks),
        head_dim=width // int(first.attn.num_heads),
        mlp_ratio=first.mlp.fc1.out_features / width,
        activation=_activation(first, name),
        ln_eps=float(first.norm1.eps),
        global_pool=_pooling(teacher, name),
        num_classes=int(head.out_features) if isinstance(head, nn.Linear) else 0,
        head_bias=_keeps_head_bias(head, isinstance(teacher.norm_pre, nn.LayerNorm)),
        mean=tuple(float(v) for v in cfg.get("mean", (0.5, 0.5, 0.5))),
        std=tuple(float(v) for v in cfg.get("std", (0.5, 0.5, 0.5))),
        img_size=int(teacher.patch_embed.img_size[-1]),
    )


def teacher_preprocessing(teacher: nn.Module) -> Preprocessing:
    """The eval preprocessing of a timm ViT teacher (its ``pretrained_cfg``; timm's defaults
    where it has none), which its student shares: both see one image."""
    cfg = getattr(teacher, "pretrained_cfg", None) or {}
    facts = describe_teacher(teacher)
    return Preprocessing(
        facts.img_size, facts.mean, facts.std, float(cfg.get("crop_pct", 0.875)),
        str(cfg.get("interpolation", "bicubic")),
    )  # fmt: skip
