"""Per-class scores from a confusion matrix: top-1 of each class, as JSON and as a picture with
the class names (``sparseformer eval --per-class``)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from torch import Tensor

from sparseformer.data.scan import display_name
from sparseformer.engine.atomic import write_atomic, write_text_atomic
from sparseformer.viz.glyphs import missing_glyphs_said

__all__ = ["per_class_report", "write_per_class"]

logger = logging.getLogger(__name__)


def per_class_report(
    confusion: Tensor, class_names: list[str], data_classes: list[int] | None = None
) -> dict[str, Any]:
    """``confusion[t, p]``: images of class ``t`` predicted ``p``. Returns each class's images
    and top-1 (percent; ``None`` for a class with no images), and the matrix with its names.

    ``data_classes``: the outputs the data's classes are (a 1000-class classifier on a few
    ImageNet classes); the report then holds those and the other classes predicted, not a
    1000 x 1000 matrix of zeros (``left_out`` counts the classes neither in the data nor
    predicted). ``None``: every class."""
    counts = confusion.long()
    kept = list(range(len(class_names)))
    if data_classes is not None:
        predicted = set(counts.sum(dim=0).nonzero().flatten().tolist())
        kept = sorted(set(data_classes) | predicted)
        counts = counts[kept][:, kept]
    names = [class_names[i] for i in kept]
    images = counts.sum(dim=1)
    correct = counts.diagonal()
    classes = [
        {
            "class": name,
            "images": int(n),
            "acc1": 100.0 * int(c) / int(n) if n else None,
        }
        for name, n, c in zip(names, images, correct)
    ]
    report = {"classes": classes, "class_names": names, "confusion": counts.tolist()}
    if data_classes is None:
        return report
    return {**report, "left_out": len(class_names) - len(kept)}


def write_per_class(report: dict[str, Any], folder: str | os.PathLike) -> tuple[Path, Path]:
    """``folder/per_class.json`` and ``folder/confusion.png`` (rows: true class, columns:
    predicted; each row as a fraction of its images), written atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    json_path, png_path = folder / "per_class.json", folder / "confusion.png"
    write_text_atomic(json_path, json.dumps(report, indent=1) + "\n")
    import numpy as np
    from matplotlib.figure import Figure  # not pyplot: the caller's backend is left alone

    counts = np.asarray(report["confusion"], dtype=float)
    rows = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    names = [display_name(n) for n in report["class_names"]]
    size = min(4 + 0.35 * len(names), 40)
    fig = Figure(figsize=(size, size))
    ax = fig.subplots()
    shown = ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    ticks = range(len(names))
    ax.set_xticks(ticks, names, rotation=90, fontsize=8, parse_math=False)  # $ is a dollar
    ax.set_yticks(ticks, names, fontsize=8, parse_math=False)
    ax.set(xlabel="predicted", ylabel="true class", title="confusion (fraction of each class)")
    fig.colorbar(shown, ax=ax, fraction=0.046)
    with missing_glyphs_said(png_path, in_full=json_path.name):
        fig.tight_layout()
        write_atomic(png_path, lambda f: fig.savefig(f, dpi=100, format="png"))
    return json_path, png_path
