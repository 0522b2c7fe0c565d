"""Typed, frozen configuration of the SparseFormer architecture.

SparseFormer: Sparse Visual Recognition via Limited Latent Tokens (Gao et al., ICLR 2024,
arXiv 2304.03768), and the SparseFormers bootstrapped from vision foundation models (Gao et al.,
CVPR 2024, arXiv 2312.01987), which are the same building blocks configured differently. The
config describes the architecture only; preprocessing (mean, std, crop)
belongs to the weights record in :mod:`sparseformer.weights.registry`.

This module imports no torch, so configs can be built, validated and printed cheaply.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "OPS",
    "FOCUS_OPS",
    "ROI_OPS",
    "CORTEX_OPS",
    "StageConfig",
    "SparseFormerConfig",
    "VideoSparseFormerConfig",
    "IMG_SIZES",
    "INTERPOLATIONS",
]

# The input sizes (height and width, pixels) the commands take: those of an exported ONNX
# graph (sparseformer.export); 100,000 px ran out of memory deep in PIL's resize
IMG_SIZES = (4, 16384)
# The resize filters preprocessing may name (timm's names, after PIL's filters)
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")

# The op vocabulary. Every op is a pre-norm residual with the same signature
# (tokens, rois, feats) -> (tokens, rois); see models/blocks.py.
OPS = ("attn", "roi_adjust", "sample_mix", "mlp", "pos_embed")
# Ops that read or move RoIs: they run only on the latent tokens, before a CLS token joins.
ROI_OPS = ("roi_adjust", "sample_mix", "pos_embed")
# A focusing unit reads the image; a cortex unit only mixes tokens (paper, Sec. 3).
FOCUS_OPS = ("attn", "roi_adjust", "sample_mix", "mlp")
CORTEX_OPS = ("attn", "mlp")


@dataclass(frozen=True)
class StageConfig:
    """One stage: a width transition (for every stage but the first) followed by units.

    Args:
        width: token width D of the stage.
        depth: number of units with their own weights.
        repeats: applications of the first unit, sharing its weights (the paper's recurrent
            focusing stage repeats its single unit 4 times).
        first_ops: ops of the first unit, in order.
        other_ops: ops of units 2..depth, in order.
        stage_embedding: learn a ``(repeats, width)`` table whose row ``i`` is added to the
            tokens before application ``i`` of the first unit (bootstrapped models).
        mlp_activation: activation of this stage's feed-forward ops; ``None``: the model's
            ``activation`` (CLIP-bootstrapped models use QuickGELU in the inherited cortex).
    """

    width: int
    depth: int = 1
    repeats: int = 1
    first_ops: tuple[str, ...] = FOCUS_OPS
    other_ops: tuple[str, ...] = CORTEX_OPS
    stage_embedding: bool = False
    mlp_activation: Literal["gelu", "quick_gelu"] | None = None

    def __post_init__(self) -> None:
        for name in ("width", "depth", "repeats"):
            _check_int(self, name, least=1)
        for name in ("first_ops", "other_ops"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        for ops in (self.first_ops, self.other_ops):
            unknown = [op for op in ops if op not in OPS]
            if unknown:
                raise ValueError(f"unknown op(s) {unknown}; known ops are {OPS}")
            if len(set(ops)) != len(ops):
                raise ValueError(f"each op may appear at most once per unit, got {ops}")
        if self.mlp_activation not in (None, "gelu", "quick_gelu"):
            raise ValueError(
                f"mlp_activation must be None, 'gelu' or 'quick_gelu', got {self.mlp_activation!r}"
            )

    def unit_ops(self, index: int) -> tuple[str, ...]:
        """Ops of unit ``index`` of this stage."""
        return self.first_ops if index == 0 else self.other_ops

    def unit_repeats(self, index: int) -> int:
        """How many times unit ``index`` is applied (with shared weights)."""
        return self.repeats if index == 0 else 1


def _check_int(config: object, name: str, least: int) -> None:
    """``name`` a whole number ``>= least``, kept as a Python int (a NumPy integer, such as
    ``labels.max() + 1``, is one too, as timm's models take it)."""
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
        raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    object.__setattr__(config, name, int(value))


def _stage(stage: StageConfig | tuple | list | dict) -> StageConfig:
    """A stage given as a StageConfig, a ``(width, depth, repeats, ...)`` tuple or a dict."""
    if isinstance(stage, StageConfig):
        return stage
    if isinstance(stage, dict):
        return StageConfig(**stage)
    if isinstance(stage, (tuple, list)):
        return StageConfig(*stage)
    raise ValueError(
        f"a stage is a StageConfig, a (width, depth, repeats) tuple or a dict, got {stage!r}"
    )


@dataclass(frozen=True)
class SparseFormerConfig:
    """A SparseFormer image architecture: v1 by default, the bootstrapped family by its fields.

    Args:
        stages: the stages, in order.
        num_tokens: latent tokens N (a perfect square for ``roi_init="grid"``).
        num_points: sampling points P per token and sampling step.
        stem_channels: early-convolution channels C.
        num_heads: attention heads at widths of at least ``num_heads``; narrower stages use
            head width 1 (see :meth:`heads_at`), as the official code does.
        mlp_ratio: hidden width of the feed-forward ops, as a multiple of D.
        mixing_reduction: the adaptive-mixing parameter generator's bottleneck is D / this.
        num_classes: classifier outputs; 0 gives a model without classifier.
        in_chans: input image channels.
        drop_path_rate: largest stochastic-depth rate; rates rise linearly over applications.
        drop_rate: dropout before the classifier (timm's ``drop_rate``).
        ln_eps: epsilon of every LayerNorm.
        stem_eps: epsilon of the stem's parameter-free channel normalisation.
        offset_eps: epsilon added to the std when standardising sampling offsets.
        padding_mode: ``grid_sample`` padding outside the feature map.
        activation: activation of the feed-forward and mixing ops.
        offset_proj_init: the sampling-offset projection's initial weight: ``"zeros"`` (points
            start on an exact grid over each RoI, as the spec and the authors' later library
            have it) or ``"trunc_normal"`` (std 0.02, as the authors' v1 ImageNet code leaves
            it: a typo there zeroes the RoI-adjust projection twice instead); the second
            reproduces their v1 training (the ``imagenet1k`` recipe asks for it).

    The bootstrapped SparseFormers (Gao et al., CVPR 2024) differ from v1 (the defaults) in:

    Args:
        attn_head_dim: fixed head width (heads = width / this) instead of ``num_heads``.
        stem_unbiased: the stem normalises with the unbiased (v1) or biased variance.
        coord_grad_clamp: clamp the gradient reaching sampling coordinates to ``1/H`` (v1).
        roi_init: ``"grid"`` (v1, N square) or ``"grid_and_whole"``: the first
            ``floor(sqrt N)^2`` tokens on the grid, the others on the whole image.
        shared_initial_token: one initial embedding ``(1, D)`` shared by all tokens.
        transition_norm: width transitions are ``norm(proj(x))`` (v1) or ``proj(x)``.
        roi_adjust_mlp: the RoI adjustment is ``LN -> Linear(D, D) -> GELU -> Linear(D, 2D)``
            instead of ``LN -> Linear(D, 2D)``.
        roi_adjust_drop_path: stochastic depth on the RoI adjustment (v1).
        mixing_hidden_dim: the parameter generator's bottleneck as a width (instead of
            ``D / mixing_reduction``).
        mixing_out_points: output points of the point mixing (``None``: P).
        mixing_bias: learned biases in the channel and point mixing (v1).
        mixing_inner_activation: activation between channel and point mixing (v1).
        cls_token_unit: insert a learned CLS token before this unit (counted over all stages'
            units, from 0, transitions not counted); no RoI op may run from there on.
        global_pool: ``"avg"`` averages the final tokens, ``"token"`` takes the CLS token.
        head_bias: the classifier (or projection) has a bias.
    """

    stages: tuple[StageConfig, ...] = field(
        default_factory=lambda: (StageConfig(256, 1, 4), StageConfig(512, 8, 1))
    )
    num_tokens: int = 49
    num_points: int = 36
    stem_channels: int = 96
    num_heads: int = 64
    mlp_ratio: float = 4.0
    mixing_reduction: int = 4
    num_classes: int = 1000
    in_chans: int = 3
    drop_path_rate: float = 0.0
    drop_rate: float = 0.0
    ln_eps: float = 1e-6
    stem_eps: float = 1e-7
    offset_eps: float = 1e-7
    padding_mode: Literal["zeros", "border"] = "zeros"
    activation: Literal["gelu", "quick_gelu"] = "gelu"
    offset_proj_init: Literal["zeros", "trunc_normal"] = "zeros"
    attn_head_dim: int | None = None
    stem_unbiased: bool = True
    coord_grad_clamp: bool = True
    roi_init: Literal["grid", "grid_and_whole"] = "grid"
    shared_initial_token: bool = False
    transition_norm: bool = True
    roi_adjust_mlp: bool = False
    roi_adjust_drop_path: bool = True
    mixing_hidden_dim: int | None = None
    mixing_out_points: int | None = None
    mixing_bias: bool = True
    mixing_inner_activation: bool = True
    cls_token_unit: int | None = None
    global_pool: Literal["avg", "token"] = "avg"
    head_bias: bool = True

    def __post_init__(self) -> None:
        if not self.stages:
            raise ValueError("a SparseFormer needs at least one stage")
        object.__setattr__(self, "stages", tuple(_stage(s) for s in self.stages))
        for name in (
            "num_tokens", "num_points", "stem_channels", "num_heads", "mixing_reduction",
            "in_chans",
        ):  # fmt: skip
            _check_int(self, name, least=1)
        _check_int(self, "num_classes", least=0)
        for name in ("attn_head_dim", "mixing_hidden_dim", "mixing_out_points"):
            if getattr(self, name) is not None:
                _check_int(self, name, least=1)
        for name in ("mlp_ratio", "ln_eps", "stem_eps", "offset_eps"):
            value = getattr(self, name)
            number = not isinstance(value, bool) and isinstance(value, (int, float))
            if not (number and 0 < value < math.inf):  # NaN fails too: every output NaN
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        for name, allowed in (
            ("padding_mode", ("zeros", "border")),
            ("activation", ("gelu", "quick_gelu")),
            ("offset_proj_init", ("zeros", "trunc_normal")),
            ("roi_init", ("grid", "grid_and_whole")),
            ("global_pool", ("avg", "token")),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.roi_init == "grid" and math.isqrt(self.num_tokens) ** 2 != self.num_tokens:
            raise ValueError(
                f"num_tokens must be a perfect square for the grid RoI init, got "
                f"{self.num_tokens} (roi_init='grid_and_whole' takes any number)"
            )
        if math.isqrt(self.num_points) ** 2 != self.num_points or self.num_points < 4:
            raise ValueError(
                "num_points must be a perfect square of at least 4 (2 x 2) for the grid offset "
                "init and the offsets' standardisation over each token's points (one point has "
                f"no spread), got {self.num_points}"
            )
        self._check_widths()
        self._check_cls_token()
        for name in ("drop_path_rate", "drop_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")

    def _check_widths(self) -> None:
        for stage in self.stages:
            heads = self.heads_at(stage.width)
            if stage.width % heads:  # attn_head_dim: width // attn_head_dim heads, at least 1
                why = f"{heads} heads (width // attn_head_dim={self.attn_head_dim})"
                if self.attn_head_dim is None:
                    why = f"{heads} heads (num_heads={self.num_heads}, as the official code sets)"
                raise ValueError(
                    f"stage width {stage.width} does not split evenly into {why}; pick a width "
                    f"divisible by {'attn_head_dim' if self.attn_head_dim else 'num_heads'}"
                )
            ops = {op for i in range(stage.depth) for op in stage.unit_ops(i)}
            code = 4 * (3 if isinstance(self, VideoSparseFormerConfig) else 2)  # 2D coordinates
            if "pos_embed" in ops and stage.width % code:
                raise ValueError(
                    f"stage width {stage.width} has a pos_embed op, whose sine code of the RoI's "
                    f"coordinates needs a width divisible by {code}"
                )
            if self.mixing_hidden_dim is None and stage.width % self.mixing_reduction:
                raise ValueError(
                    f"stage width {stage.width} is not divisible by "
                    f"mixing_reduction={self.mixing_reduction}"
                )
            if int(stage.width * self.mlp_ratio) < 1:
                raise ValueError(
                    f"mlp_ratio={self.mlp_ratio} leaves stage width {stage.width} an MLP of no "
                    "hidden width; give at least 1 / width"
                )
        if self.stem_channels < 2:  # the stem normalises over its channels (unbiased variance)
            raise ValueError(
                f"stem_channels must be at least 2: the stem normalises its features over the "
                f"channels, and one channel has no variance (NaN), got {self.stem_channels}"
            )

    def _check_cls_token(self) -> None:
        units = [s.unit_ops(i) for s in self.stages for i in range(s.depth)]
        if self.global_pool == "token" and self.cls_token_unit is None:
            raise ValueError(
                "global_pool must be 'avg' (or '' through create_model: one output per token) "
                "for a model without a CLS token, got 'token' (cls_token_unit gives it one)"
            )
        if self.cls_token_unit is None:
            return
        if not 0 <= self.cls_token_unit < len(units):
            raise ValueError(
                f"cls_token_unit must index one of the {len(units)} units, "
                f"got {self.cls_token_unit}"
            )
        late = [op for ops in units[self.cls_token_unit :] for op in ops if op in ROI_OPS]
        if late:
            raise ValueError(
                f"the CLS token has no RoI, so no RoI op ({', '.join(sorted(set(late)))}) may "
                f"run from unit {self.cls_token_unit} on, where it joins the tokens"
            )

    def heads_at(self, width: int) -> int:
        """Attention heads for tokens of ``width``.

        With ``attn_head_dim`` (bootstrapped models, like ViTs): ``width // attn_head_dim``,
        at least 1. Otherwise head width ``max(width // num_heads, 1)``: the official v1 code
        fixes the head width this way, so a width-32 stage of a 64-head model runs 32 heads of
        width 1; the released v1 models (widths >= 256) all use 64 heads.
        """
        if self.attn_head_dim is not None:
            return max(width // self.attn_head_dim, 1)
        return width // max(width // self.num_heads, 1)

    def stage_of_unit(self, index: int) -> tuple[int, int]:
        """``(stage, unit within stage)`` of unit ``index`` counted over all stages."""
        for s, stage in enumerate(self.stages):
            if index < stage.depth:
                return s, index
            index -= stage.depth
        raise IndexError(f"the model has no unit {index}")

    @property
    def num_applications(self) -> int:
        """Unit applications in one forward pass (the drop-path schedule's length)."""
        return sum(s.unit_repeats(i) for s in self.stages for i in range(s.depth))

    @property
    def width(self) -> int:
        """Width of the final tokens (the head's input)."""
        return self.stages[-1].width


@dataclass(frozen=True)
class VideoSparseFormerConfig(SparseFormerConfig):
    """The video SparseFormer: the image architecture with spatio-temporal RoIs.

    Every field of :class:`SparseFormerConfig` keeps its meaning; ``num_tokens`` is the number
    of tokens *per replicate* (the image model's N), so the model runs ``num_tokens *
    replicates`` latent tokens.

    Args:
        num_frames: frames T of the clips the model is meant for (data pipeline and FLOP
            counts); the model itself accepts any T.
        replicates: token inflation R: replicate ``i`` of every image token covers the time
            slice ``[i/R, (i+1)/R]``.
    """

    num_frames: int = 8
    replicates: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_int(self, "num_frames", least=1)
        _check_int(self, "replicates", least=1)

    @property
    def num_latent_tokens(self) -> int:
        """Latent tokens the model runs: ``num_tokens * replicates``."""
        return self.num_tokens * self.replicates
