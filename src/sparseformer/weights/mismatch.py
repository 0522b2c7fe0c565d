"""Why a checkpoint's weights do not fit a model, in one line: the classifier's classes alone,
the classifier's bias alone (a CLIP tower's projection), or the keys and shapes that differ.

SparseFormer (Gao et al., ICLR 2024). :func:`sparseformer.weights.loading.load_checkpoint`
checks with :func:`check_keys` after the allowed adaptations (inflation, stem, classifier).
"""

from __future__ import annotations

from torch import Tensor

from sparseformer.weights.convert import CheckpointError, ConversionReport

__all__ = ["check_keys", "OTHER_SIZE"]

# the end of a mismatch with no more particular reason (build.py names whose weights they are)
OTHER_SIZE = ". Is it a checkpoint of another model size? Pass the matching --model / name."


def check_keys(own: dict[str, Tensor], new: dict[str, Tensor], report: ConversionReport) -> None:
    """Refuse ``new`` (the checkpoint's weights, converted) unless its keys and shapes are the
    model's (``own``).

    Raises:
        CheckpointError: the difference, in the words of its most likely cause.
    """
    missing = sorted(set(own) - set(new))
    unexpected = sorted(set(new) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(new[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(new))
        if new[k].shape != own[k].shape
    ]
    head = [k for k in own if k.startswith("head.") and k in new and new[k].shape != own[k].shape]
    if head and len(head) == len(shapes) and not missing and not unexpected:
        if all(new[k].shape[1:] == own[k].shape[1:] for k in head):  # the classes alone
            theirs, ours = new[head[0]].shape[0], own[head[0]].shape[0]
            raise CheckpointError(
                f"checkpoint ({report.source_format} format) has a classifier of {theirs} "
                f"classes where the model has {ours}: build the model with num_classes="
                f"{theirs}, or load with allow_classifier_mismatch=True to fine-tune a fresh "
                "classifier"
            )
    if missing or unexpected or shapes:

        def show(items: list[str]) -> str:
            return ", ".join(items[:8]) + (f" (+{len(items) - 8} more)" if len(items) > 8 else "")

        parts = []
        if shapes:
            parts.append(f"shape mismatches: {show(shapes)}")
        if missing:
            parts.append(f"missing keys: {show(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {show(unexpected)}")
        raise CheckpointError(
            f"checkpoint ({report.source_format} format) does not fit this model: "
            + "; ".join(parts)
            + (_HEAD_BIAS if set(missing + unexpected) == {"head.bias"} and not shapes else
               OTHER_SIZE)
        )  # fmt: skip


_HEAD_BIAS = (
    ". The classifier's bias is the only difference: a bootstrapped CLIP tower's projection has "
    "none (sparseformer_btsp_openai_clip_*), an AugReg or v1 classifier has one; build the "
    "model the file is of, or pass head_bias= to match the file"
)
