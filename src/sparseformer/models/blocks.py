"""SparseFormer's ops and units: every op is ``(tokens, rois, feats) -> (tokens, rois)``.

SparseFormer (Gao et al., ICLR 2024), Sec. 3; ported from the official code
(github.com/showlab/sparseformer). A unit is an ordered ModuleDict of ops, each a pre-norm
residual ``x + drop_path(op(norm(x)))``. The same classes serve images (D=2) and videos (D=3):
only the number of RoI coordinates differs. The bootstrapped SparseFormers (Gao et al., CVPR
2024, arXiv 2312.01987) add one op, position injection, and variants chosen by arguments.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparseformer.layers import (
    AdaptiveMixing,
    Attention,
    Mlp,
    adjust_rois,
    at_least_fp32,
    clamp_coordinate_grad,
    drop_path,
    fp32_geometry,
    grid_offsets,
    residual_drop_path,
    roi_sine_embedding,
    sample_features,
    sampling_points,
    standardize_offsets,
)
from sparseformer.layers.linear import is_plain

__all__ = [
    "OpContext",
    "AttnOp",
    "MlpOp",
    "PosEmbedOp",
    "RoiAdjustOp",
    "SampleMixOp",
    "Unit",
    "Transition",
    "per_image",
]


class OpContext(NamedTuple):
    """Per-application arguments shared by every op of a unit.

    Attributes:
        drop_rate: stochastic-depth rate of this application.
        coord_grad_bound: bound of the gradient reaching sampling coordinates (``1/H`` times
            the fp16 loss scale), a float or scalar tensor; ``None``: no clamp.
        points_out: if a list, sampling ops append their points ``(B, N, P, D)`` to it.
    """

    drop_rate: float
    coord_grad_bound: float | Tensor | None
    points_out: list[Tensor] | None = None


class AttnOp(Attention):
    """``tokens + drop_path(attn(norm(tokens)))``; parameters ``norm``, ``qkv``, ``proj``."""

    def __init__(self, dim: int, num_heads: int, ln_eps: float) -> None:
        super().__init__(dim, num_heads)
        self.norm = nn.LayerNorm(dim, eps=ln_eps)

    def forward(self, tokens: Tensor, rois: Tensor, feats: Tensor, ctx: OpContext):
        return residual_drop_path(tokens, self._update, ctx.drop_rate, self.training), rois

    def _update(self, tokens: Tensor) -> Tensor:
        return super().forward(self.norm(tokens))


class MlpOp(Mlp):
    """``tokens + drop_path(mlp(norm(tokens)))``; parameters ``norm``, ``fc1``, ``fc2``."""

    def __init__(self, dim: int, mlp_ratio: float, ln_eps: float, activation: str) -> None:
        super().__init__(dim, int(dim * mlp_ratio), activation)
        self.norm = nn.LayerNorm(dim, eps=ln_eps)

    def forward(self, tokens: Tensor, rois: Tensor, feats: Tensor, ctx: OpContext):
        return residual_drop_path(tokens, self._update, ctx.drop_rate, self.training), rois

    def _update(self, tokens: Tensor) -> Tensor:
        return super().forward(self.norm(tokens))


def project_fp32(
    norm: nn.LayerNorm, proj: nn.Linear, tokens: Tensor, hidden: nn.Linear | None = None
) -> Tensor:
    """``proj(norm(tokens))`` (``proj(gelu(hidden(norm(tokens))))`` with ``hidden``) for the
    geometry, in float32 (float64 kept): the projections that start it (RoI adjustment,
    sampling offsets) are part of it. Call inside :func:`fp32_geometry`, where autocast is off.
    A model cast to a half type as a whole projects in its own precision, then raises the
    result."""
    dtype = _float_dtype(proj) or _float_dtype(norm)  # a quantised proj has no float weight
    if dtype is not None and torch.finfo(dtype).bits >= 32:
        tokens = tokens.to(dtype)  # tokens that autocast computed in a half type
    x = norm(tokens)
    if hidden is not None:
        x = F.gelu(hidden(x))
    return at_least_fp32(proj(x))


def _float_dtype(module: nn.Module) -> torch.dtype | None:
    """The dtype of ``module``'s first floating-point parameter (its weight for a plain layer;
    wrappers and adapters included), ``None`` if it has none."""
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), None)


class RoiAdjustOp(nn.Module):
    """Move and rescale each token's RoI from its embedding (tokens unchanged).

    Args:
        dim: token width D.
        roi_dims: 2 for images, 3 for video; the projection outputs ``2 * roi_dims`` numbers.
        mlp: predict through a hidden ``Linear(D, D)`` and GELU (bootstrapped models).
        use_drop_path: stochastic depth on the predicted delta (v1).
    """

    def __init__(
        self,
        dim: int,
        ln_eps: float,
        roi_dims: int = 2,
        mlp: bool = False,
        use_drop_path: bool = True,
    ) -> None:
        super().__init__()
        self.use_drop_path = use_drop_path
        self.norm = nn.LayerNorm(dim, eps=ln_eps)
        self.hidden = nn.Linear(dim, dim) if mlp else None
        self.proj = nn.Linear(dim, 2 * roi_dims, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Zero projection: RoIs stay where initialised until training moves them."""
        nn.init.constant_(self.norm.weight, self.norm.normalized_shape[0] ** -0.5)
        nn.init.zeros_(self.norm.bias)
        nn.init.zeros_(self.proj.weight)

    def forward(self, tokens: Tensor, rois: Tensor, feats: Tensor, ctx: OpContext):
        with fp32_geometry(rois.device.type):
            delta = project_fp32(self.norm, self.proj, tokens, self.hidden)
            if self.use_drop_path:
                delta = drop_path(delta, ctx.drop_rate, self.training)
            rois = adjust_rois(at_least_fp32(rois), delta)
        return tokens, rois


class PosEmbedOp(nn.Module):
    """Inject the RoI's position: ``tokens + drop_path(proj(norm(pe(rois))))``.

    ``pe`` is the fixed sine code of :func:`roi_sine_embedding`, computed without gradient:
    the RoIs learn from what the tokens read, not from where the code says they are.

    Args:
        dim: token width D, a multiple of ``4 * roi_dims``.
    """

    def __init__(self, dim: int, ln_eps: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=ln_eps)
        self.proj = nn.Linear(dim, dim)

    def forward(self, tokens: Tensor, rois: Tensor, feats: Tensor, ctx: OpContext):
        B, N, D = tokens.shape
        with torch.no_grad(), fp32_geometry(rois.device.type):
            code = roi_sine_embedding(at_least_fp32(rois), D)  # (B, N, 2D) -> (B, N, D)
        update = self.proj(self.norm(code.to(_float_dtype(self.norm) or code.dtype)))
        return tokens + drop_path(update, ctx.drop_rate, self.training), rois


class SampleMixOp(nn.Module):
    """Sample the feature map around each RoI and decode the points into the token.

    Args:
        dim: token width D.
        in_channels: feature channels C.
        num_points: points P per token.
        roi_dims: 2 for images, 3 for video.
        mixing_reduction, ln_eps, activation: see :class:`AdaptiveMixing`.
        offset_eps: epsilon of the offset standardisation.
        padding_mode: ``grid_sample`` padding.
        mixing_hidden_dim, mixing_out_points, mixing_bias, mixing_inner_activation: the
            variant options ``hidden_dim``, ``out_points``, ``bias``, ``inner_activation`` of
            :class:`AdaptiveMixing`.
        offset_proj_init: ``"zeros"`` or ``"trunc_normal"`` (std 0.02, the authors' v1 code):
            the offset projection's initial weight.
    """

    def __init__(
        self,
        dim: int,
        in_channels: int,
        num_points: int,
        roi_dims: int = 2,
        mixing_reduction: int = 4,
        ln_eps: float = 1e-6,
        offset_eps: float = 1e-7,
        activation: str = "gelu",
        padding_mode: str = "zeros",
        *,
        mixing_hidden_dim: int | None = None,
        mixing_out_points: int | None = None,
        mixing_bias: bool = True,
        mixing_inner_activation: bool = True,
        offset_proj_init: str = "zeros",
    ) -> None:
        super().__init__()
        self.num_points = num_points
        self.offset_proj_init = offset_proj_init
        self.roi_dims = roi_dims
        self.offset_eps = offset_eps
        self.padding_mode = padding_mode
        self.offset_norm = nn.LayerNorm(dim, eps=ln_eps)
        self.offset_proj = nn.Linear(dim, num_points * roi_dims, bias=False)
        self.offset_bias = nn.Parameter(torch.zeros(num_points * roi_dims))
        self.mixing = AdaptiveMixing(
            dim,
            in_channels,
            num_points,
            mixing_reduction,
            ln_eps,
            activation,
            hidden_dim=mixing_hidden_dim,
            out_points=mixing_out_points,
            bias=mixing_bias,
            inner_activation=mixing_inner_activation,
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Points start on a regular grid over the RoI (zero weight, grid bias); with
        ``offset_proj_init="trunc_normal"`` the weight is trunc-normal std 0.02 instead, as the
        authors' v1 code leaves it, and the points start jittered around that grid."""
        nn.init.constant_(self.offset_norm.weight, self.offset_norm.normalized_shape[0] ** -0.5)
        nn.init.zeros_(self.offset_norm.bias)
        if self.offset_proj_init == "trunc_normal":
            nn.init.trunc_normal_(self.offset_proj.weight, std=0.02)
        else:
            nn.init.zeros_(self.offset_proj.weight)
        with torch.no_grad():
            self.offset_bias.copy_(grid_offsets(self.num_points, self.roi_dims).flatten())
        self.mixing.reset_parameters()

    def forward(self, tokens: Tensor, rois: Tensor, feats: Tensor, ctx: OpContext):
        B, N, _ = tokens.shape
        with fp32_geometry(tokens.device.type):
            offsets = project_fp32(self.offset_norm, self.offset_proj, tokens)  # (B, N, P*D)
            offsets = offsets + at_least_fp32(self.offset_bias)
            offsets = offsets.reshape(B, N, self.num_points, self.roi_dims)  # -> (B, N, P, D)
            offsets = standardize_offsets(offsets, self.offset_eps)
            points = sampling_points(at_least_fp32(rois), offsets)
            # shared tokens' points, per image: each image's gradient is clamped on its own
            points = per_image(points, feats.shape[0])
            if ctx.points_out is not None:
                ctx.points_out.append(points.contiguous())  # one row per image, writable
            if ctx.coord_grad_bound is not None:
                if self.training and torch.jit.is_tracing():
                    warnings.warn(_TRACED_TRAINING, stacklevel=2)
                points = clamp_coordinate_grad(points, ctx.coord_grad_bound)
            sampled = sample_features(
                at_least_fp32(feats), points, self.padding_mode
            )  # (B, N, P, C)
        update = self.mixing(tokens, sampled)
        return tokens + drop_path(update, ctx.drop_rate, self.training), rois


_TRACED_TRAINING = (
    "torch.jit.trace records no clamp of the gradient that reaches the sampling coordinates "
    "(the official code's bound), so a traced model in training mode trains otherwise than "
    "the model; train the model itself (or torch.compile it), and trace it in eval mode"
)


def per_image(x: Tensor, batch: int) -> Tensor:
    """``x`` with one row per image: ``(1, ...)`` rows that every image shares expanded to
    ``(batch, ...)`` (a view), others as they are."""
    return x.expand(batch, *x.shape[1:]) if x.shape[0] != batch else x


class Unit(nn.ModuleDict):
    """Ops keyed by name, applied in ``op_order``; each op appears at most once.

    Tokens and RoIs may be shared by every image, ``(1, N, ...)`` (the model's initial ones),
    until an op makes them differ: sampling reads each image. They are expanded to the batch
    before a unit that would otherwise run them once where it must run per image: stochastic
    depth in training draws per image, a user's layer (an adapter, which may draw dropout)
    is not known to compute every image alike, and hooks are promised the whole batch.
    """

    def __init__(self, ops: dict[str, nn.Module], op_order: tuple[str, ...]) -> None:
        super().__init__(ops)
        if tuple(ops) != op_order:
            raise ValueError(f"ops {tuple(ops)} do not match op_order {op_order}")
        self.op_order = op_order

    def forward(self, tokens: Tensor, rois: Tensor, feats: Tensor, ctx: OpContext):
        B = feats.shape[0]
        if tokens.shape[0] != B and not self._runs_shared(ctx):
            tokens, rois = per_image(tokens, B), per_image(rois, B)
        for name in self.op_order:
            tokens, rois = self[name](tokens, rois, feats, ctx)
        return tokens, rois

    def _runs_shared(self, ctx: OpContext) -> bool:
        """Whether shared tokens may run through this unit once for the batch: no stochastic
        depth in training, and only this package's ops and plain layers, without hooks."""
        if self.training and ctx.drop_rate > 0:
            return False
        return all(type(m) in _SHARED_OK and is_plain(m, type(m)) for m in self.modules())


# modules that compute every image alike (a user's subclass or wrapper is not among them)
_SHARED_OK = {
    Unit,
    AttnOp,
    MlpOp,
    RoiAdjustOp,
    PosEmbedOp,
    SampleMixOp,
    AdaptiveMixing,
    nn.Linear,
    nn.LayerNorm,
}


class Transition(nn.Module):
    """Width change between stages: ``norm(proj(tokens))`` (``proj(tokens)`` without
    ``norm``), no residual."""

    def __init__(self, in_dim: int, out_dim: int, ln_eps: float, norm: bool = True) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim)
        self.norm = nn.LayerNorm(out_dim, eps=ln_eps) if norm else nn.Identity()

    def forward(self, tokens: Tensor) -> Tensor:
        """``(B, N, D_in) -> (B, N, D_out)``."""
        return self.norm(self.proj(tokens))
