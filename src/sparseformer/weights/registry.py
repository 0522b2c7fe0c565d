"""Named SparseFormer models and the weights released for them: data only.

SparseFormer (Gao et al., ICLR 2024), Table 1 of the paper and the official release at
github.com/showlab/sparseformer. The registry is an immutable mapping built at import.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from types import MappingProxyType

from sparseformer.config import SparseFormerConfig, StageConfig, VideoSparseFormerConfig
from sparseformer.weights.convert_btsp import btsp_config

__all__ = [
    "release_named",
    "BTSP_NANO_ARGS",
    "WeightsSpec",
    "ModelSpec",
    "MODELS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "imagenet_class_names",
    "imagenet_class_ids",
    "classes_of_outputs",
    "image_model_of",
    "split_tag",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The authors' two releases of the same ImageNet-1K weights: the ImageNet release's layout
# (``sparseformer_{t,s,b}_imagenet1k.pth``) and their refactored library's
# (``sparseformer_v1_{tiny,small,base}_converted.pth``); see weights/convert.py.
_RELEASE = "https://github.com/showlab/sparseformer/releases/download/"
_IMAGENET_RELEASE = _RELEASE + "v1.0.0-imagenet/"
_LIBRARY_RELEASE = _RELEASE + "v2.0.0-refactor/"


def imagenet_class_names(short: bool = False) -> list[str]:
    """The ImageNet-1K classes in the order of a 1000-class classifier (the released
    weights'): timm's bundled descriptions ("tench, Tinca tinca"), no download; ``short``:
    each one's first name."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    names = [info.index_to_description(i) for i in range(info.num_classes())]
    return [n.split(",")[0] for n in names] if short else names


def imagenet_class_ids(folders: Sequence[str] = ()) -> list[str]:
    """An ImageNet-1K classifier's classes in output order, as a data set's class folders
    name them: ImageNet's synset ids (``n01440764`` ...: its own layout, in which a folder
    listing's order is the classifier's), or the folders themselves where they are the
    numbers 0 to 999, each once (ImageNetV2's layout, ``0``/``10``/``100`` or zero-padded,
    whose listing order is not the classifier's; ten digit folders are not ImageNet's). What a
    1000-class file that names no classes (a released one) is matched to a data set by."""
    numbers = [int(name) for name in folders if str(name).isdigit()]
    if len(numbers) == len(folders) and sorted(numbers) == list(range(1000)):
        return sorted(folders, key=int)
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [info.index_to_label_name(i) for i in range(info.num_classes())]


def classes_of_outputs(
    class_names: Sequence[str] | None, outputs: int, folders: Sequence[str] = ()
) -> list[str] | None:
    """The classes a classifier's outputs stand for, in order: the names its checkpoint
    records; for 1000 outputs and none recorded (a released classifier), ImageNet's as
    ``folders`` name them (:func:`imagenet_class_ids`); else ``None`` (matched by position)."""
    if class_names is not None:
        return list(class_names)
    return imagenet_class_ids(folders) if outputs == 1000 else None


@dataclass(frozen=True)
class WeightsSpec:
    """Where released weights live and how their inputs were preprocessed.

    Attributes:
        url: download address (used only when ``pretrained=True`` is asked for).
        tag: the pretrained tag, timm-style ``name.tag`` (``sparseformer_v1_tiny.in1k``).
        source_format: checkpoint layout (see :mod:`sparseformer.weights.convert`).
        sha256: expected hash of the file, or ``None`` where the authors published none.
        mean, std, crop_pct, input_size, interpolation: the eval preprocessing.
        top1: ImageNet-1K top-1 reported by the paper.
    """

    url: str
    tag: str = "in1k"
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
    """A named model: its architecture and, when released, its weights.

    Attributes:
        weights: the default released weights (what ``pretrained=True`` loads).
        other_weights: further releases, each chosen by its tag (``name.tag``).
        paper: the paper that defines the model (timm's ``paper_ids``).
    """

    config: SparseFormerConfig
    weights: WeightsSpec | None = None
    description: str = ""
    other_weights: tuple[WeightsSpec, ...] = ()
    paper: str = "arXiv:2304.03768"

    @property
    def released(self) -> tuple[WeightsSpec, ...]:
        """Every release, the default first; empty without released weights."""
        return (self.weights, *self.other_weights) if self.weights is not None else ()

    @property
    def tags(self) -> tuple[str, ...]:
        """The pretrained tags, the default first; empty without released weights."""
        return tuple(w.tag for w in self.released)

    def weights_for(self, tag: str | None = None) -> WeightsSpec | None:
        """The released weights of ``tag`` (``None``: the default).

        Raises:
            ValueError: a tag this model has no weights under (the message lists its tags).
        """
        if tag is None:
            return self.weights
        for weights in self.released:
            if weights.tag == tag:
                return weights
        known = ", ".join(self.tags) or "none: this model has no released weights"
        raise ValueError(f"no pretrained tag {tag!r}; tags: {known}")


def _released(letter: str, size: str, top1: float) -> dict:
    """The ModelSpec fields of one released size: the ImageNet release's file (default,
    tag ``in1k``) and the authors' library's (tag ``in1k_v2``), the same weights."""
    return {
        "weights": WeightsSpec(
            _IMAGENET_RELEASE + f"sparseformer_{letter}_imagenet1k.pth", top1=top1
        ),
        "other_weights": (
            WeightsSpec(
                _LIBRARY_RELEASE + f"sparseformer_v1_{size}_converted.pth",
                tag="in1k_v2",
                source_format="v2",
                top1=top1,
            ),
        ),
    }


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

# The bootstrapped SparseFormers (Gao et al., CVPR 2024, arXiv 2312.01987): a focusing part
# in front of most of a pretrained ViT. Eval preprocessing of the authors' library: resize 256
# (bilinear), centre crop 224, the teacher's mean/std.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BTSP_PAPER = "arXiv:2312.01987"


def _btsp(
    focus_width: int, cortex_width: int, cortex_blocks: int, tokens: int, outputs: int, clip: bool
) -> SparseFormerConfig:
    """A bootstrapped SparseFormer from the authors' constructor arguments: the focusing unit
    (sample+mix, PE injection, attention, MLP, RoI adjust) applied 4 times at
    ``focus_width``, a transition, a sample+mix+PE unit at ``cortex_width``, then
    ``cortex_blocks`` ViT blocks; a CLS token joins before the third unit. ``outputs``: the
    classes (AugReg, classifier with bias) or the CLIP embedding width (projection without
    bias, QuickGELU in the cortex)."""
    cortex = [["ATTN", "MLP"]] * cortex_blocks
    return btsp_config(
        {
            "conv_dim": 64,
            "num_latent_tokens": tokens,
            "num_sampling_points": 36,
            "same_token_embedding": True,
            "cls_token_insert_layer": 2,
            "width_configs": [focus_width] + [cortex_width] * (1 + cortex_blocks),
            "repeats": [4] + [1] * (1 + cortex_blocks),
            "head_op": "cls",
            "proj_dim": outputs,
            "proj_bias": not clip,
            "ops_list": [
                ["SAMPLING_M", "PE_INJECT", "ATTN", "MLP", "ROI_ADJ"],
                ["SAMPLING_M", "PE_INJECT"],
                *cortex,
            ],
            "compatible_config": {
                "pg_inner_dim": 128,
                "grid_sample_config": {"padding_mode": "border"},
                "type_num_attn_heads": 2,
                "type_op_adjust": 2,
                "restrict_grad_norm": False,
                "transition_ln": False,
                "mixing_bias": False,
                "ln_eps": 1e-5,
                "use_stage_embedding": True,
                "clip_quick_gelu": clip,
            },
        }
    )


# The authors' constructor arguments of their fixture's small "augreg" configuration
# (tests/data): the registered nano, and the base the tests vary.
BTSP_NANO_ARGS: dict = {
    "conv_dim": 16,
    "num_latent_tokens": 7,
    "num_sampling_points": 4,
    "cls_token_insert_layer": 2,
    "width_configs": [64, 96, 96, 96],
    "repeats": [3, 1, 1, 1],
    "proj_dim": 10,
    "ops_list": [
        ["SAMPLING_M", "PE_INJECT", "ATTN", "MLP", "ROI_ADJ"],
        ["SAMPLING_M", "PE_INJECT"],
        ["ATTN", "MLP"],
        ["ATTN", "MLP"],
    ],
    "compatible_config": {"pg_inner_dim": 16, "use_stage_embedding": True},
}
_BTSP_NANO = btsp_config(BTSP_NANO_ARGS)


def _btsp_weights(name: str, clip: bool, top1: float | None = None) -> WeightsSpec:
    """The authors' library release of ``name`` (their ``*_converted.pth`` layout)."""
    return WeightsSpec(
        _LIBRARY_RELEASE + f"{name}_converted.pth",
        tag="openai" if clip else "augreg_in21k_ft_in1k",
        source_format="btsp",
        mean=OPENAI_CLIP_MEAN if clip else (0.5, 0.5, 0.5),
        std=OPENAI_CLIP_STD if clip else (0.5, 0.5, 0.5),
        crop_pct=224 / 256,
        interpolation="bilinear",
        top1=top1,
    )


MODELS = MappingProxyType(
    {
        "sparseformer_v1_tiny": ModelSpec(
            _v1(256, 8, 49, 0.2),
            description="SparseFormer-T, 49 tokens, 2.0 GFLOPs (paper)",
            **_released("t", "tiny", 81.0),
        ),
        "sparseformer_v1_small": ModelSpec(
            _v1(320, 8, 64, 0.3),
            description="SparseFormer-S, 64 tokens, 3.8 GFLOPs (paper)",
            **_released("s", "small", 82.0),
        ),
        "sparseformer_v1_base": ModelSpec(
            _v1(384, 10, 81, 0.4),
            description="SparseFormer-B, 81 tokens, 7.8 GFLOPs (paper)",
            **_released("b", "base", 82.6),
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
        # Bootstrapped SparseFormers (CVPR 2024): AugReg ViT and OpenAI CLIP teachers.
        "sparseformer_btsp_augreg_base": ModelSpec(
            _btsp(384, 768, 8, 48, 1000, clip=False),
            _btsp_weights("sparseformer_btsp_augreg_base", clip=False),
            "SparseFormer bootstrapped from an AugReg ViT-B, 48 tokens + CLS",
            paper=BTSP_PAPER,
        ),
        "sparseformer_btsp_augreg_large": ModelSpec(
            _btsp(512, 1024, 16, 48, 1000, clip=False),
            _btsp_weights("sparseformer_btsp_augreg_large", clip=False, top1=84.9),
            "SparseFormer bootstrapped from an AugReg ViT-L, 48 tokens + CLS",
            paper=BTSP_PAPER,
        ),
        "sparseformer_btsp_openai_clip_base": ModelSpec(
            _btsp(384, 768, 8, 48, 512, clip=True),
            _btsp_weights("sparseformer_btsp_openai_clip_base", clip=True),
            "CLIP image tower bootstrapped from OpenAI CLIP ViT-B, 48 tokens + CLS, "
            "512-d embedding",
            paper=BTSP_PAPER,
        ),
        "sparseformer_btsp_openai_clip_large": ModelSpec(
            _btsp(512, 1024, 16, 63, 768, clip=True),
            _btsp_weights("sparseformer_btsp_openai_clip_large", clip=True),
            "CLIP image tower bootstrapped from OpenAI CLIP ViT-L, 63 tokens + CLS, "
            "768-d embedding",
            paper=BTSP_PAPER,
        ),
        # The smallest of the family, for unit tests: the "augreg" configuration of the
        # authors' fixture (tests/data), 7 tokens (not a square) + CLS, 4 points, 10 classes.
        "sparseformer_btsp_nano": ModelSpec(
            _BTSP_NANO,
            description="the smallest bootstrapped SparseFormer, for unit tests",
            paper=BTSP_PAPER,
        ),
    }
)


def split_tag(name: str) -> tuple[str, str | None]:
    """``"sparseformer_v1_tiny.in1k_v2"`` -> ``("sparseformer_v1_tiny", "in1k_v2")``; a name
    without a tag comes back with ``None``."""
    base, _, tag = name.partition(".")
    return base, tag or None


def image_model_of(name: str) -> str | None:
    """The registered image model whose weights a video model inflates
    (``video_sparseformer_v1_tiny`` -> ``sparseformer_v1_tiny``); ``None`` for other names."""
    image = name.removeprefix("video_")
    return image if image != name and image in MODELS else None


def release_named(file_name: str) -> tuple[str, WeightsSpec] | None:
    """The registered release whose file is called ``file_name`` (``"sparseformer_t_imagenet1k.
    pth"``), as ``("sparseformer_v1_tiny.in1k", its weights)``, or ``None``."""
    for name, spec in MODELS.items():
        for weights in spec.released:
            if weights.url.rsplit("/", 1)[-1] == file_name:
                return f"{name}.{weights.tag}", weights
    return None
