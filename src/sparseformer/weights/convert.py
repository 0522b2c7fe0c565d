"""Official SparseFormer checkpoints -> this library's state dict, with a report.

SparseFormer (Gao et al., ICLR 2024); official code at github.com/showlab/sparseformer. Two
official formats store the same tensors under different names:

- ``imagenet``: the ImageNet release (``sparseformer_{t,s,b}_imagenet1k.pth``),
- ``v2``: the authors' library (``sparseformer_v1_{tiny,small,base}_converted.pth``).

Both keep the units in one flat ``layers.K`` list where a width transition is its own entry
(``layers.K.0`` Linear, ``layers.K.1`` LayerNorm). We map them to ``stages.S.units.U`` by
walking that list: a transition starts a new stage. Conversion is pure dict -> dict; the
legacy names (``tuo_proj``, ``m_beta``, ...) appear only in the tables below.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from torch import Tensor

from sparseformer.weights.convert_btsp import (
    BTSP_FORMAT,
    convert_btsp_state_dict,
    is_btsp_layout,
)

__all__ = [
    "FORMATS",
    "CheckpointError",
    "ConversionReport",
    "NotASparseFormerCheckpoint",
    "MODEL_WRAPPERS",
    "EMA_WRAPPERS",
    "detect_format",
    "convert_state_dict",
    "unwrap_checkpoint",
]

# Top-level keys: official name -> ours, per format.
TOP_LEVEL: dict[str, dict[str, str]] = {
    "imagenet": {
        "feat_extractor.conv1.weight": "stem.conv.weight",
        "feat_extractor.conv1.bias": "stem.conv.bias",
        "token_roi.weight": "initial_rois",
        "token_embedding.weight": "initial_tokens",
        "head.norm.weight": "fc_norm.weight",
        "head.norm.bias": "fc_norm.bias",
        "head.classifier.weight": "head.weight",
        "head.classifier.bias": "head.bias",
    },
    "v2": {
        "feat_extractor.conv1.weight": "stem.conv.weight",
        "feat_extractor.conv1.bias": "stem.conv.bias",
        "initial_roi.weight": "initial_rois",
        "initial_embedding.weight": "initial_tokens",
        "norm.weight": "fc_norm.weight",
        "norm.bias": "fc_norm.bias",
        "proj.weight": "head.weight",
        "proj.bias": "head.bias",
    },
}

# Inside a unit (after ``layers.K.``): official prefix -> ours. Longest prefixes first.
_SHARED_UNIT = {
    "roi_adjust_module.0.": "roi_adjust.norm.",
    "roi_adjust_module.1.": "roi_adjust.proj.",
    "roi_offset_module.0.": "sample_mix.offset_norm.",
    "roi_offset_module.1.": "sample_mix.offset_proj.",
    "roi_offset_bias": "sample_mix.offset_bias",
    "adaptive_mixing.parameter_generator.0.": "sample_mix.mixing.norm.",
    "adaptive_mixing.parameter_generator.1.": "sample_mix.mixing.reduce.",
    "adaptive_mixing.parameter_generator.2.": "sample_mix.mixing.generator.",
    "adaptive_mixing.m_beta": "sample_mix.mixing.channel_bias",
    "adaptive_mixing.s_beta": "sample_mix.mixing.point_bias",
}
UNIT: dict[str, dict[str, str]] = {
    "imagenet": {
        **_SHARED_UNIT,
        "ln_attn.": "attn.norm.",
        "attn.in_proj_weight": "attn.qkv.weight",
        "attn.in_proj_bias": "attn.qkv.bias",
        "attn.out_proj.": "attn.proj.",
        "ffn.0.": "mlp.norm.",
        "ffn.1.": "mlp.fc1.",
        "ffn.3.": "mlp.fc2.",
        "adaptive_mixing.tuo_proj.": "sample_mix.mixing.out_proj.",
    },
    "v2": {
        **_SHARED_UNIT,
        "norm1.": "attn.norm.",
        "attn.qkv.": "attn.qkv.",
        "attn.proj.": "attn.proj.",
        "norm2.": "mlp.norm.",
        "mlp.fc1.": "mlp.fc1.",
        "mlp.fc2.": "mlp.fc2.",
        "adaptive_mixing.out_proj.": "sample_mix.mixing.out_proj.",
    },
}
TRANSITION = {"0.": "transition.proj.", "1.": "transition.norm."}

FORMATS = ("sparseformer", "imagenet", "v2", BTSP_FORMAT)
# A key that only the given format has; "sparseformer" is this library's own.
_SIGNATURES = {
    "sparseformer": "initial_rois",
    "imagenet": "token_roi.weight",
    "v2": "initial_roi.weight",
}
# Keys that betray other well-known checkpoints, for a helpful error.
_FOREIGN_HINTS = {
    "cls_token": "a ViT/DeiT checkpoint",
    "patch_embed.proj.weight": "a ViT/DeiT/Swin checkpoint",
    "conv1.weight": "a ResNet checkpoint",
    "layers.0.blocks.0.attn.relative_position_bias_table": "a Swin checkpoint",
}
# timm's train.py writes "state_dict" and "state_dict_ema"; DeiT/Swin write "model" (+ "model_ema")
# where checkpoints keep their state dict: ours and timm's, PyTorch's tutorials'
# model_state_dict, the EMA weights of ours and timm's, DDP's module
MODEL_WRAPPERS = ("model", "state_dict", "model_state_dict")
EMA_WRAPPERS = ("model_ema", "state_dict_ema")
_WRAPPERS = (*MODEL_WRAPPERS, *EMA_WRAPPERS, "module")
_LAYER_KEY = re.compile(r"^layers\.(\d+)\.(.+)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit; the message says what to do."""


class UnreadableCheckpoint(CheckpointError):
    """A file that is missing, empty, cut short or not a checkpoint at all (as opposed to a
    checkpoint of something else)."""


class NotASparseFormerCheckpoint(CheckpointError):
    """The file or mapping is not a SparseFormer checkpoint in a known format."""


@dataclass
class ConversionReport:
    """What conversion did: the source format and every renamed or dropped key."""

    source_format: str
    renamed: dict[str, str] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)
    wrapper: str | None = None

    def summary(self) -> str:
        return (
            f"format {self.source_format!r}"
            + (f" (inside {self.wrapper!r})" if self.wrapper else "")
            + f": {len(self.renamed)} keys renamed, {len(self.dropped)} dropped"
            + (
                f" ({', '.join(self.dropped[:5])}{', ...' if len(self.dropped) > 5 else ''})"
                if self.dropped
                else ""
            )
        )


def unwrap_checkpoint(
    obj: object, prefer_ema: bool = False
) -> tuple[dict[str, Tensor], str | None]:
    """Find the state dict in a checkpoint: bare, or under ``model``/``state_dict``/``model_ema``
    (or timm's ``state_dict_ema``, or ``model_state_dict`` as PyTorch's tutorials save it).

    Args:
        obj: what ``torch.load`` or safetensors returned.
        prefer_ema: take ``model_ema`` over ``model`` when both are present.

    Returns:
        ``(state_dict, wrapper_key)``, with ``module.`` prefixes (DDP) removed.
    """
    if not isinstance(obj, Mapping):
        raise NotASparseFormerCheckpoint(
            f"expected a state dict (a mapping of names to tensors), got {type(obj).__name__}"
        )
    order = (*EMA_WRAPPERS, *MODEL_WRAPPERS, "module") if prefer_ema else _WRAPPERS
    wrapper = None
    for key in order:  # the first wrapper that holds tensors (a "model" may be a name record)
        held = obj.get(key)
        if isinstance(held, Mapping) and any(hasattr(v, "shape") for v in held.values()):
            obj, wrapper = held, key
            break
    state = {k: v for k, v in obj.items() if hasattr(v, "shape")}
    if not state:
        raise NotASparseFormerCheckpoint(_no_tensors(obj))
    if "n_averaged" in state and all(k.startswith("module.") for k in state if k != "n_averaged"):
        del state["n_averaged"]  # torch's AveragedModel (EMA): its count beside module.*
    # DDP's "module." and torch.compile's "_orig_mod." wrappers, in either order
    for prefix in ("module.", "_orig_mod.", "module."):
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state, wrapper


def _no_tensors(obj: Mapping) -> str:
    """Why a checkpoint without tensors where they are looked for cannot load, and the key
    that holds them instead, if one does."""
    held = {  # key -> tensors under it, where some are
        k: n
        for k, v in obj.items()
        if isinstance(v, Mapping) and (n := sum(hasattr(t, "shape") for t in v.values()))
    }
    if not held:
        keys = ", ".join(repr(k) for k in list(obj)[:6]) or "none"
        return f"the checkpoint holds no tensors (its keys: {keys})"
    key, n = max(held.items(), key=lambda kv: kv[1])
    return (
        f"the checkpoint keeps its {n} tensors under {key!r}, where weights are looked for "
        f"at the top level or under {', '.join(map(repr, _WRAPPERS))}; save that mapping "
        f"alone (torch.save(checkpoint[{key!r}], path)) and load the new file"
    )


def detect_format(keys: list[str] | set[str]) -> str:
    """Name the checkpoint format from its keys: ``sparseformer``, ``imagenet``, ``v2`` or
    ``btsp`` (the bootstrapped SparseFormers in the authors' library layout).

    Raises:
        NotASparseFormerCheckpoint: with a hint when the keys look like another model.
    """
    keys = set(keys)
    if is_btsp_layout(keys):  # the bootstrapped family, in the authors' library layout
        return BTSP_FORMAT
    for name, signature in _SIGNATURES.items():
        if signature in keys:
            return name
    hints = [what for key, what in _FOREIGN_HINTS.items() if key in keys]
    example = ", ".join(sorted(keys)[:4])
    raise NotASparseFormerCheckpoint(
        "not a SparseFormer checkpoint"
        + (f": it looks like {hints[0]}" if hints else "")
        + f" (keys such as {example}); expected the official ImageNet release "
        "('token_roi.weight'), the authors' library v2 ('initial_roi.weight') or this "
        "library's format ('initial_rois')"
    )


def _rename_prefix(rest: str, table: Mapping[str, str]) -> str | None:
    for old in sorted(table, key=len, reverse=True):
        if rest == old or (old.endswith(".") and rest.startswith(old)):
            return table[old] + rest[len(old) :]
    return None


def convert_state_dict(
    state: Mapping[str, Tensor], source_format: str | None = None
) -> tuple[dict[str, Tensor], ConversionReport]:
    """Rename an official state dict to this library's keys.

    Args:
        state: a bare state dict (see :func:`unwrap_checkpoint`).
        source_format: one of :data:`FORMATS`; detected from the keys when ``None``.

    Returns:
        ``(converted, report)``; keys that no table maps are dropped and listed in the report
        (strict loading then names what is missing).
    """
    fmt = source_format or detect_format(list(state))
    report = ConversionReport(fmt)
    if fmt == "sparseformer":
        return dict(state), report
    if fmt == BTSP_FORMAT:  # tables in convert_btsp.py
        converted, report.renamed, report.dropped = convert_btsp_state_dict(state)
        return converted, report
    # Which flat layer indices are transitions, and so where stages begin.
    transition_ids = {
        int(m.group(1))
        for k in state
        if (m := _LAYER_KEY.match(k)) and re.fullmatch(r"[01]\.(weight|bias)", m.group(2))
    }
    layer_ids = sorted({int(m.group(1)) for k in state if (m := _LAYER_KEY.match(k))})
    place: dict[int, str] = {}
    stage, unit = 0, 0
    for k in layer_ids:
        if k in transition_ids:
            stage, unit = stage + 1, 0
            place[k] = f"stages.{stage}."
        else:
            place[k] = f"stages.{stage}.units.{unit}."
            unit += 1
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        new = TOP_LEVEL[fmt].get(key)
        if new is None and (m := _LAYER_KEY.match(key)):
            k, rest = int(m.group(1)), m.group(2)
            table = TRANSITION if k in transition_ids else UNIT[fmt]
            suffix = _rename_prefix(rest, table)
            new = place[k] + suffix if suffix is not None else None
        if new is None:
            report.dropped.append(key)
            continue
        out[new] = value
        report.renamed[key] = new
    return out, report
