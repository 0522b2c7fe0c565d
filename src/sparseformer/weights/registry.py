"""Named SparseFormer models and the weights released for them: data only.

SparseFormer (Gao et al., ICLR 2024), Table 1 of the paper and the official release at
github.com/showlab/sparseformer. The registry is an immutable mapping built at import.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from types import MappingProxyType

from sparseformer.config import SparseFormerConfig, StageConfig, VideoSparseFormerConfig

__all__ = ["WeightsSpec", "ModelSpec", "MODELS", "IMAGENET_MEAN", "IMAGENET_STD", "image_model_of"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_RELEASE = "https://github.com/showlab/sparseformer/releases/download/v1.0/"


@dataclass(frozen=True)
class WeightsSpec:
    """Where released weights live and how their inputs were preprocessed.

    Attributes:
        url: download address (used only when ``pretrained=True`` is asked for).
        source_format: checkpoint layout (see :mod:`sparseformer.weights.convert`).
        sha256: expected hash of the file, or ``None`` where the authors published none.
        mean, std, crop_pct, input_size, interpolation: the eval preprocessing.
        top1: ImageNet-1K top-1 reported by the paper.
    """

    url: str
    source_format: str = "imagenet"
    sha256: str | None = None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    crop_pct: float = 224 / 256
    input_size: tuple[int, int, int] = (3, 224, 224)
    interpolation: str = "bicubic"
    top1: float | None = None


@dataclass(frozen=True)
class ModelSpec:
    """A named model: its architecture and, when released, its weights."""

    config: SparseFormerConfig
    weights: WeightsSpec | None = None
    description: str = ""


def _v1(width: int, cortex_blocks: int, tokens: int, drop_path: float) -> SparseFormerConfig:
    return SparseFormerConfig(
        stages=(StageConfig(width, 1, 4), StageConfig(2 * width, cortex_blocks, 1)),
        num_tokens=tokens,
        num_points=36,
        stem_channels=96,
        drop_path_rate=drop_path,
    )


def _video(
    image: SparseFormerConfig, frames: int = 8, replicates: int = 4
) -> VideoSparseFormerConfig:
    """The video model of an image architecture (token inflation R over T frames)."""
    same = {f.name: getattr(image, f.name) for f in fields(SparseFormerConfig)}
    return VideoSparseFormerConfig(**same, num_frames=frames, replicates=replicates)


_MICRO = SparseFormerConfig(
    stages=(StageConfig(64, 1, 2), StageConfig(128, 3, 1)),
    num_tokens=16,
    num_points=16,
    stem_channels=32,
    num_heads=16,
    drop_path_rate=0.05,
)

MODELS = MappingProxyType(
    {
        "sparseformer_v1_tiny": ModelSpec(
            _v1(256, 8, 49, 0.2),
            WeightsSpec(_RELEASE + "sparseformer_t_imagenet1k.pth", top1=81.0),
            "SparseFormer-T, 49 tokens, 2.0 GFLOPs (paper)",
        ),
        "sparseformer_v1_small": ModelSpec(
            _v1(320, 8, 64, 0.3),
            WeightsSpec(_RELEASE + "sparseformer_s_imagenet1k.pth", top1=82.0),
            "SparseFormer-S, 64 tokens, 3.8 GFLOPs (paper)",
        ),
        "sparseformer_v1_base": ModelSpec(
            _v1(384, 10, 81, 0.4),
            WeightsSpec(_RELEASE + "sparseformer_b_imagenet1k.pth", top1=82.6),
            "SparseFormer-B, 81 tokens, 7.8 GFLOPs (paper)",
        ),
        # Small members of the family for CPU work: same ops, fewer and narrower everything.
        "sparseformer_v1_micro": ModelSpec(
            _MICRO,
            description="CPU-sized SparseFormer (16 tokens, 16 points) for demos and small data",
        ),
        "sparseformer_v1_nano": ModelSpec(
            SparseFormerConfig(
                stages=(StageConfig(32, 1, 2), StageConfig(64, 2, 1)),
                num_tokens=9,
                num_points=4,
                stem_channels=16,
                num_heads=8,
            ),
            description="the smallest SparseFormer, for unit tests",
        ),
        # Video models (Sec. 5 of the paper): no released weights; start from the image
        # release with create_model(name, checkpoint_path=IMAGE_CHECKPOINT), which inflates it.
        # GFLOPs: paper convention, 8 x 224 x 224 clips, from `python scripts/video_flops.py`.
        "video_sparseformer_v1_tiny": ModelSpec(
            _video(_v1(256, 8, 49, 0.2)),
            description="video SparseFormer-T, 49 tokens x 4 replicates, 8 frames",
        ),
        "video_sparseformer_v1_small": ModelSpec(
            _video(_v1(320, 8, 64, 0.3)),
            description="video SparseFormer-S, 64 tokens x 4 replicates, 8 frames",
        ),
        "video_sparseformer_v1_base": ModelSpec(
            _video(_v1(384, 10, 81, 0.4)),
            description="video SparseFormer-B, 81 tokens x 4 replicates, 8 frames",
        ),
        "video_sparseformer_v1_micro": ModelSpec(
            _video(_MICRO),
            description="CPU-sized video SparseFormer (16 tokens x 4 replicates, 16 points)",
        ),
    }
)


def image_model_of(name: str) -> str | None:
    """The registered image model whose weights a video model inflates
    (``video_sparseformer_v1_tiny`` -> ``sparseformer_v1_tiny``); ``None`` for other names."""
    image = name.removeprefix("video_")
    return image if image != name and image in MODELS else None
