"""Stages: a width transition and units built from the config, the first unit repeated.

SparseFormer (Gao et al., ICLR 2024) and the bootstrapped SparseFormers (Gao et al., CVPR 2024,
arXiv 2312.01987) are lists of such stages; only the config differs. Ported from the official
code (github.com/showlab/sparseformer).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn

from sparseformer.config import SparseFormerConfig, StageConfig
from sparseformer.models.blocks import (
    AttnOp,
    MlpOp,
    PosEmbedOp,
    RoiAdjustOp,
    SampleMixOp,
    Transition,
    Unit,
)

__all__ = ["Stage", "build_unit"]


def build_unit(
    config: SparseFormerConfig,
    width: int,
    ops: tuple[str, ...],
    roi_dims: int,
    mlp_activation: str | None = None,
) -> Unit:
    """Build one unit's ops, in order, for tokens of ``width`` and ``roi_dims``-D RoIs.

    ``mlp_activation`` overrides ``config.activation`` for the feed-forward op only.
    """
    c = config
    makers = {
        "attn": lambda: AttnOp(width, c.heads_at(width), c.ln_eps),
        "roi_adjust": lambda: RoiAdjustOp(
            width, c.ln_eps, roi_dims, c.roi_adjust_mlp, c.roi_adjust_drop_path
        ),
        "sample_mix": lambda: SampleMixOp(
            width,
            c.stem_channels,
            c.num_points,
            roi_dims,
            c.mixing_reduction,
            c.ln_eps,
            c.offset_eps,
            c.activation,
            c.padding_mode,
            mixing_hidden_dim=c.mixing_hidden_dim,
            mixing_out_points=c.mixing_out_points,
            mixing_bias=c.mixing_bias,
            mixing_inner_activation=c.mixing_inner_activation,
            offset_proj_init=c.offset_proj_init,
        ),
        "mlp": lambda: MlpOp(width, c.mlp_ratio, c.ln_eps, mlp_activation or c.activation),
        "pos_embed": lambda: PosEmbedOp(width, c.ln_eps),
    }
    return Unit({name: makers[name]() for name in ops}, ops)


class Stage(nn.Module):
    """A width transition (identity for the first stage) and units, the first one repeated.

    With ``stage.stage_embedding``, row ``i`` of ``stage_embedding`` ``(repeats, D)`` is added
    to the tokens before application ``i`` of the first unit, so that the shared weights know
    which repetition they run (bootstrapped SparseFormers).
    """

    def __init__(
        self, config: SparseFormerConfig, stage: StageConfig, in_width: int | None, roi_dims: int
    ) -> None:
        super().__init__()
        self.transition = (
            Transition(in_width, stage.width, config.ln_eps, config.transition_norm)
            if in_width
            else nn.Identity()
        )
        self.units = nn.ModuleList(
            build_unit(config, stage.width, stage.unit_ops(i), roi_dims, stage.mlp_activation)
            for i in range(stage.depth)
        )
        self.repeats = tuple(stage.unit_repeats(i) for i in range(stage.depth))
        self.stage_embedding = (
            nn.Parameter(torch.zeros(stage.repeats, stage.width)) if stage.stage_embedding else None
        )

    def applications(self) -> Iterator[tuple[int, int, Unit]]:
        """``(unit index in the stage, repetition, unit)`` in the order they run, repeated
        units once per application."""
        for index, (unit, repeats) in enumerate(zip(self.units, self.repeats)):
            for repetition in range(repeats):
                yield index, repetition, unit

    def embed(self, tokens: Tensor, unit: int, repetition: int) -> Tensor:
        """Add row ``repetition`` of the stage embedding to ``(B, N, D)`` tokens before the
        first unit (``unit == 0``); unchanged without a stage embedding or for other units."""
        if self.stage_embedding is None or unit != 0:
            return tokens
        return tokens + self.stage_embedding[repetition]
