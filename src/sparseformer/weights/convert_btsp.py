"""The bootstrapped SparseFormers' checkpoints and constructor arguments -> ours.

Bootstrapping SparseFormers from Vision Foundation Models (Gao, Tong, Lin, Chen, Shou, CVPR
2024, arXiv 2312.01987); official code at github.com/showlab/sparseformer. The authors' library
stores these models (``sparseformer_btsp_*_converted.pth``) in its own layout, a flat
``layers.K`` list where a width transition is its own entry (``layers.K.0``, a Linear without
LayerNorm). This module is pure data and dict -> dict: the rename tables, the layout's
signature, the mapping of the authors' constructor arguments to a
:class:`~sparseformer.config.SparseFormerConfig`, and the policy for stage embeddings that a
released file lacks. :func:`sparseformer.weights.convert.convert_state_dict` calls it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Collection, Mapping
from typing import Any

import torch
from torch import Tensor

from sparseformer.config import SparseFormerConfig, StageConfig

__all__ = [
    "BTSP_FORMAT",
    "is_btsp_layout",
    "convert_btsp_state_dict",
    "btsp_config",
    "fill_missing_stage_embeddings",
    "warn_on_variant_mismatch",
]

logger = logging.getLogger(__name__)

BTSP_FORMAT = "btsp"

# Top-level keys: the authors' name -> ours.
BTSP_TOP_LEVEL = {
    "feat_extractor.conv1.weight": "stem.conv.weight",
    "feat_extractor.conv1.bias": "stem.conv.bias",
    "initial_roi.weight": "initial_rois",
    "initial_embedding.weight": "initial_tokens",
    "cls_embedding.weight": "cls_token",
    "norm.weight": "fc_norm.weight",
    "norm.bias": "fc_norm.bias",
    "proj.weight": "head.weight",
    "proj.bias": "head.bias",
}
# Inside a unit (after ``layers.K.``): the authors' prefix -> ours (within the unit).
BTSP_UNIT = {
    "norm1.": "attn.norm.",
    "attn.qkv.": "attn.qkv.",
    "attn.proj.": "attn.proj.",
    "norm2.": "mlp.norm.",
    "mlp.fc1.": "mlp.fc1.",
    "mlp.fc2.": "mlp.fc2.",
    "roi_adjust_module.0.": "roi_adjust.norm.",
    "roi_adjust_module.1.": "roi_adjust.hidden.",  # module 2 is the GELU
    "roi_adjust_module.3.": "roi_adjust.proj.",
    "roi_offset_module.0.": "sample_mix.offset_norm.",
    "roi_offset_module.1.": "sample_mix.offset_proj.",
    "roi_offset_bias": "sample_mix.offset_bias",
    "adaptive_mixing.parameter_generator.0.": "sample_mix.mixing.norm.",
    "adaptive_mixing.parameter_generator.1.": "sample_mix.mixing.reduce.",
    "adaptive_mixing.parameter_generator.2.": "sample_mix.mixing.generator.",
    "adaptive_mixing.out_proj.": "sample_mix.mixing.out_proj.",
    "pe_transition.0.": "pos_embed.norm.",
    "pe_transition.1.": "pos_embed.proj.",
}
# Unit-level keys that are stage-level here: the stage embedding of a repeated first unit.
BTSP_STAGE = {"stage_embedding.weight": "stage_embedding"}
BTSP_TRANSITION = {"0.": "transition.proj."}
# The authors' op codes -> our op names.
BTSP_OPS = {
    "SAMPLING_M": "sample_mix",
    "PE_INJECT": "pos_embed",
    "ATTN": "attn",
    "MLP": "mlp",
    "ROI_ADJ": "roi_adjust",
}
# Keys only this layout has (the library-v2 layout of v1 shares ``initial_roi.weight``).
_SIGNATURES = (re.compile(r"^layers\.\d+\.pe_transition\."), re.compile(r"^cls_embedding\."))
_LAYER_KEY = re.compile(r"^layers\.(\d+)\.(.+)$")


def is_btsp_layout(keys: Collection[str]) -> bool:
    """Whether ``keys`` are a bootstrapped SparseFormer in the authors' library layout."""
    return "initial_roi.weight" in keys and any(p.match(k) for k in keys for p in _SIGNATURES)


def _rename(rest: str, table: Mapping[str, str]) -> str | None:
    for old in sorted(table, key=len, reverse=True):
        if rest == old or (old.endswith(".") and rest.startswith(old)):
            return table[old] + rest[len(old) :]
    return None


def _places(state: Mapping[str, Tensor]) -> tuple[dict[int, str], set[int]]:
    """Our prefix of every ``layers.K`` entry, and which entries are transitions."""
    transitions = {
        int(m.group(1))
        for k in state
        if (m := _LAYER_KEY.match(k)) and re.fullmatch(r"0\.(weight|bias)", m.group(2))
    }
    place: dict[int, str] = {}
    stage, unit = 0, 0
    for k in sorted({int(m.group(1)) for key in state if (m := _LAYER_KEY.match(key))}):
        if k in transitions:
            stage, unit = stage + 1, 0
            place[k] = f"stages.{stage}."
        else:
            place[k] = f"stages.{stage}.units.{unit}."
            unit += 1
    return place, transitions


def convert_btsp_state_dict(
    state: Mapping[str, Tensor],
) -> tuple[dict[str, Tensor], dict[str, str], list[str]]:
    """Rename a bootstrapped SparseFormer state dict of the authors' library to our keys.

    Args:
        state: a bare state dict in the authors' layout.

    Returns:
        ``(converted, renamed, dropped)``: our state dict, the authors' name -> ours for each
        key kept, and the keys that no table maps (strict loading then names what is missing).
    """
    place, transitions = _places(state)
    out: dict[str, Tensor] = {}
    renamed: dict[str, str] = {}
    dropped: list[str] = []
    for key, value in state.items():
        new = BTSP_TOP_LEVEL.get(key)
        if new is None and (m := _LAYER_KEY.match(key)):
            k, rest = int(m.group(1)), m.group(2)
            if k in transitions:
                suffix = _rename(rest, BTSP_TRANSITION)
                new = place[k] + suffix if suffix is not None else None
            elif rest in BTSP_STAGE:
                new = place[k].split("units.")[0] + BTSP_STAGE[rest]
            else:
                suffix = _rename(rest, BTSP_UNIT)
                new = place[k] + suffix if suffix is not None else None
        if new is None:
            dropped.append(key)
            continue
        out[new] = value
        renamed[key] = new
    return out, renamed, dropped


def fill_missing_stage_embeddings(
    converted: dict[str, Tensor], own: Mapping[str, Tensor]
) -> list[str]:
    """Fill the stage embeddings that a bootstrapped checkpoint lacks with zeros, in place.

    The authors' converter deletes ``stage_embedding`` keys, so their released files may lack
    them, and their library then runs silently on whatever the embedding was initialised to.
    We never run on values that were not loaded: a missing stage embedding becomes zeros,
    which add nothing, so the model computes exactly what the same model without stage
    embedding computes, and one log line says so. (A file of our own layout has no such
    allowance: strict loading reports the key.)

    Args:
        converted: the checkpoint in our layout.
        own: the model's state dict (for the shapes).

    Returns:
        The keys filled.
    """
    filled = [k for k in own if k.endswith("stage_embedding") and k not in converted]
    for k in filled:
        converted[k] = torch.zeros_like(own[k], device="cpu")
    if filled:
        logger.info(
            "the checkpoint has no %s (the authors' converter deletes them): filled with zeros, "
            "so the model runs as one without stage embedding",
            ", ".join(filled),
        )
    return filled


def warn_on_variant_mismatch(converted: Mapping[str, Tensor], config: SparseFormerConfig) -> bool:
    """Log a warning when a bootstrapped checkpoint's head says CLIP (a projection without
    bias) and the model's cortex runs GELU, or says AugReg (a classifier with bias) and the
    cortex runs QuickGELU: both have the same keys and shapes otherwise, so the weights would
    load and compute with the other activation. Returns whether it warned."""
    if "head.weight" not in converted:
        return False
    clip_head = "head.bias" not in converted
    quick = any((s.mlp_activation or config.activation) == "quick_gelu" for s in config.stages)
    if clip_head == quick:
        return False
    logger.warning(
        "the checkpoint's head is %s, as in the %s models, but this model's cortex runs %s: "
        "build it as a sparseformer_btsp_%s_* model (num_classes= sets a new classifier)",
        "a projection without bias" if clip_head else "a classifier with bias",
        "CLIP" if clip_head else "AugReg",
        "QuickGELU" if quick else "GELU",
        "openai_clip" if clip_head else "augreg",
    )
    return True


def btsp_config(authors: Mapping[str, Any], **overrides: Any) -> SparseFormerConfig:
    """Our config of a bootstrapped SparseFormer from the authors' constructor arguments
    (``ops_list``, ``width_configs``, ``repeats``, ``compatible_config``, ...).

    Consecutive units of one width form a stage; a width change is a transition. Settings the
    authors' code fixes for this family and has no argument for: the stem normalises with the
    biased variance and eps 1e-5, offsets are standardised with eps 1e-5, the point mixing has
    ``max(P, 32)`` output points, heads are 64 wide, and tokens beyond the square grid start on
    the whole image.
    """
    compat = authors.get("compatible_config", {})
    if compat.get("type_num_attn_heads", 2) != 2 or compat.get("type_op_adjust", 2) != 2:
        raise ValueError(
            "only the released bootstrapped SparseFormers' variants are supported "
            "(type_num_attn_heads=2, type_op_adjust=2), got "
            f"{compat.get('type_num_attn_heads')}, {compat.get('type_op_adjust')}"
        )
    points = authors["num_sampling_points"]
    mixing_bias = compat.get("mixing_bias", False)
    fields: dict[str, Any] = dict(
        stages=_btsp_stages(authors, compat.get("clip_quick_gelu", False)),
        num_tokens=authors["num_latent_tokens"],
        num_points=points,
        stem_channels=authors["conv_dim"],
        num_classes=authors["proj_dim"],
        drop_path_rate=authors.get("drop_path_rate", 0.0),
        ln_eps=compat.get("ln_eps", 1e-5),
        stem_eps=1e-5,
        offset_eps=1e-5,
        padding_mode=compat.get("grid_sample_config", {}).get("padding_mode", "border"),
        attn_head_dim=64,
        stem_unbiased=False,
        coord_grad_clamp=compat.get("restrict_grad_norm", False),
        roi_init="grid_and_whole",
        shared_initial_token=authors.get("same_token_embedding", True),
        transition_norm=compat.get("transition_ln", False),
        roi_adjust_mlp=True,
        roi_adjust_drop_path=False,
        mixing_hidden_dim=compat.get("pg_inner_dim", 128),
        mixing_out_points=max(points, 32),
        mixing_bias=mixing_bias,
        mixing_inner_activation=mixing_bias,
        cls_token_unit=authors.get("cls_token_insert_layer"),
        global_pool="token" if authors.get("head_op", "cls") == "cls" else "avg",
        head_bias=authors.get("proj_bias", True),
    )
    fields.update(overrides)
    return SparseFormerConfig(**fields)


def _btsp_stages(authors: Mapping[str, Any], quick_gelu: bool) -> tuple[StageConfig, ...]:
    """Group the authors' units into stages: consecutive units of one width."""
    widths, repeats = authors["width_configs"], authors["repeats"]
    ops = [tuple(BTSP_OPS[op] for op in unit) for unit in authors["ops_list"]]
    stage_embedding = authors.get("compatible_config", {}).get("use_stage_embedding", False)
    groups: list[list[int]] = []
    for i, width in enumerate(widths):
        if groups and widths[groups[-1][0]] == width and repeats[i] == 1:
            groups[-1].append(i)
        else:
            groups.append([i])
    stages = []
    for units in groups:
        first, others = units[0], units[1:]
        if len({ops[i] for i in others}) > 1:
            raise ValueError(f"units {others} of one width have different ops; not supported")
        stages.append(
            StageConfig(
                widths[first],
                depth=len(units),
                repeats=repeats[first],
                first_ops=ops[first],
                other_ops=ops[others[0]] if others else (),
                stage_embedding=stage_embedding and repeats[first] > 1,
                # QuickGELU (CLIP) in the inherited cortex: the units that are not repeated
                mlp_activation="quick_gelu" if quick_gelu and repeats[first] == 1 else None,
            )
        )
    return tuple(stages)
