"""Published ImageNet-1K top-1 accuracies, each with its source: data only.

Used by ``sparseformer bench`` to draw the accuracy-throughput trade-off on the user's own
machine: accuracy from the papers (we do not re-train on ImageNet), throughput measured.
All figures are single-crop 224 x 224 top-1 on the ImageNet-1K validation set, trained on
ImageNet-1K only (LeViT with DeiT's distillation from a teacher also trained on ImageNet-1K).
Each row names its source; a model we found no such figure for is left out, not guessed.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType

__all__ = ["PublishedAccuracy", "PUBLISHED_TOP1", "published_top1"]


@dataclass(frozen=True)
class PublishedAccuracy:
    """A top-1 figure, where it was published, and the pretrained tags (timm's, or ours for
    SparseFormer) of the weights it is for: a name with another tag gets no figure."""

    top1: float
    source: str
    tags: tuple[str, ...] = ()


_SPARSEFORMER = "Gao et al., SparseFormer, ICLR 2024 (arXiv 2304.03768), Table 1"
_DEIT = "Touvron et al., DeiT, ICML 2021 (arXiv 2012.12877), Table 1 (no distillation)"
_SWIN = "Liu et al., Swin Transformer, ICCV 2021 (arXiv 2103.14030), Table 1a"
_RESNET = (
    "torchvision ResNet50_Weights.IMAGENET1K_V1 (acc@1 76.130), the original recipe of "
    "He et al., CVPR 2016"
)

_LEVIT = (
    "Graham et al., LeViT, ICCV 2021 (arXiv 2104.01136), main ImageNet results: LeViT-256, "
    "1000 epochs with distillation"
)
_EFFICIENTVIT = (
    "Cai et al., EfficientViT (MIT), ICCV 2023 (arXiv 2205.14756), ImageNet results: "
    "EfficientViT-B1 at r224"
)
_FASTVIT = (
    "Vasu et al., FastViT, ICCV 2023 (arXiv 2303.14189), ImageNet results: FastViT-T12 "
    "without distillation (timm's fastvit_t12.apple_in1k)"
)
_CONVNEXT_NANO = (
    "timm README (timm 0.6.12), What's New, July 27 2022: convnext_nano 80.8 @ 224 "
    "(timm's convnext_nano.d1h_in1k, ImageNet-1K only); the ConvNeXt paper has no nano"
)

PUBLISHED_TOP1 = MappingProxyType(
    {
        "sparseformer_v1_tiny": PublishedAccuracy(81.0, _SPARSEFORMER, ("in1k", "in1k_v2")),
        "sparseformer_v1_small": PublishedAccuracy(82.0, _SPARSEFORMER, ("in1k", "in1k_v2")),
        "sparseformer_v1_base": PublishedAccuracy(82.6, _SPARSEFORMER, ("in1k", "in1k_v2")),
        "deit_tiny_patch16_224": PublishedAccuracy(72.2, _DEIT, ("fb_in1k",)),
        "deit_small_patch16_224": PublishedAccuracy(79.8, _DEIT, ("fb_in1k",)),
        "deit_base_patch16_224": PublishedAccuracy(81.8, _DEIT, ("fb_in1k",)),
        "swin_tiny_patch4_window7_224": PublishedAccuracy(81.3, _SWIN, ("ms_in1k",)),
        "swin_small_patch4_window7_224": PublishedAccuracy(83.0, _SWIN, ("ms_in1k",)),
        "resnet50": PublishedAccuracy(76.1, _RESNET, ("tv_in1k",)),
        "levit_256": PublishedAccuracy(81.6, _LEVIT, ("fb_dist_in1k",)),
        "efficientvit_b1": PublishedAccuracy(79.4, _EFFICIENTVIT, ("r224_in1k",)),
        "fastvit_t12": PublishedAccuracy(79.1, _FASTVIT, ("apple_in1k",)),
        "convnext_nano": PublishedAccuracy(80.8, _CONVNEXT_NANO, ("d1h_in1k",)),
    }
)


def published_top1(name: str) -> PublishedAccuracy | None:
    """The published figure for a model name (``arch`` or ``arch.tag``, the tag of the weights
    the figure is for), or ``None`` if we cite none."""
    arch, _, tag = name.partition(".")
    figure = PUBLISHED_TOP1.get(arch)
    if figure is None or (tag and tag not in figure.tags):
        return None
    return figure
