"""How a SparseFormer takes a state dict: the authors' layouts renamed to ours (and image
weights inflated for a video model) by a ``load_state_dict`` pre-hook, and torch's error on
tensors of other shapes said in a few lines."""

from __future__ import annotations

import logging
import re

from torch import nn

__all__ = ["accept_official_layouts", "shorter_load_error"]

logger = logging.getLogger(__name__)

_MISMATCH = re.compile(
    r"size mismatch for (\S+): copying a param with shape torch.Size\((\[[^\]]*\])\) from "
    r"checkpoint, the shape in current model is torch.Size\((\[[^\]]*\])\)"
)


def shorter_load_error(exc: RuntimeError, name: str) -> RuntimeError:
    """torch's ``load_state_dict`` error with its size mismatches (one line per tensor:
    dozens for another model size) counted and two of them shown, what to do, and its other
    lines (missing and unexpected keys) as torch wrote them; any other error as it is."""
    found = _MISMATCH.findall(str(exc))
    if not found:
        return exc
    shown = "; ".join(f"{key}: {file} in the file, {ours} here" for key, file, ours in found[:2])
    others = [
        line.strip()
        for line in str(exc).splitlines()[1:]
        if line.strip() and "size mismatch for" not in line
    ]
    return RuntimeError(
        f"Error(s) in loading state_dict for {name}: {len(found)} tensor(s) have other shapes "
        f"than this model's ({shown}{'; ...' if len(found) > 2 else ''}): the weights are of "
        "another model size, classes or architecture. Build the model they were made for: a "
        "run of sparseformer train or bootstrap loads with sparseformer.create_model(NAME, "
        "checkpoint_path=FILE), which builds what the run records"
        + "".join(f"\n\t{line}" for line in others)
    )


def accept_official_layouts(
    module: nn.Module, state_dict: dict, prefix: str, *args: object
) -> None:
    """``load_state_dict`` pre-hook: rename the authors' layouts (ImageNet release, library v2)
    to ours in place, and inflate image weights given to a video model, so that
    ``model.load_state_dict(official)`` and timm's ``checkpoint_path`` work. Keys no table maps
    stay as they are, for strict loading to report."""
    from sparseformer.weights.convert import (
        NotASparseFormerCheckpoint,
        convert_state_dict,
        detect_format,
    )
    from sparseformer.weights.convert_btsp import BTSP_FORMAT, fill_missing_stage_embeddings
    from sparseformer.weights.inflate import inflate_image_state_dict, is_image_state_dict

    keys = [k[len(prefix) :] for k in state_dict if k.startswith(prefix)]
    if not keys:
        return
    theirs = {k: state_dict[prefix + k] for k in keys}
    if "initial_rois" not in keys:
        try:
            fmt = detect_format(keys)
        except NotASparseFormerCheckpoint:
            return  # strict loading names the keys
        if fmt == "sparseformer":
            return
        converted, report = convert_state_dict(theirs, fmt)
        converted.update({k: theirs[k] for k in report.dropped})
        if fmt == BTSP_FORMAT:  # released files may lack stage embeddings, as load_checkpoint
            fill_missing_stage_embeddings(converted, module.state_dict())
        logger.info(
            "load_state_dict: renamed %d keys of the official %s layout", len(converted), fmt
        )
    else:
        converted = theirs
    if module.roi_dims == 3:
        if is_image_state_dict(converted):  # image weights for a video model: inflate them
            converted = inflate_image_state_dict(converted, module.config)
        rois = converted.get("initial_rois")
        if rois is not None and rois.shape[0] != module.initial_rois.shape[0]:
            n = module.config.num_tokens
            raise ValueError(
                f"these weights hold {rois.shape[0]} latent tokens, {rois.shape[0] / n:g} "
                f"replicates of {n}; the model has {module.config.replicates}: build it with "
                f"replicates={rois.shape[0] // n}"
            )
    if converted is theirs:
        return
    for k in keys:
        del state_dict[prefix + k]
    state_dict.update({prefix + k: v for k, v in converted.items()})
