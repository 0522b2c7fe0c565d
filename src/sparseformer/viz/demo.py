"""Pictures for the demo: where a trained Fashion-MNIST model's tokens look on a few test
images, one per class (the last step of ``sparseformer demo``)."""

from __future__ import annotations

from pathlib import Path

import torch

from sparseformer.data.fashion_mnist import fashion_mnist
from sparseformer.data.images import to_rgb
from sparseformer.viz.figures import write_pictures
from sparseformer.viz.inputs import load_model_for_viz

__all__ = ["fashion_mnist_pictures"]


def fashion_mnist_pictures(
    model_name: str, checkpoint: str | Path, out_dir: str | Path, count: int = 4
) -> list[tuple[int, str, object]]:
    """Pictures of a trained Fashion-MNIST model on the first test image of ``count`` classes.

    Returns:
        ``(test index, class name, result of write_pictures)`` per picture.

    Raises:
        DataError: Fashion-MNIST is not downloaded.
    """
    model, info = load_model_for_viz(model_name, checkpoint)
    test = fashion_mnist(train=False)
    targets = torch.as_tensor(test.targets)
    written = []
    for label in range(min(count, int(targets.max()) + 1)):
        index = int((targets == label).nonzero()[0])
        img, _ = test[index]
        name = test.classes[label].split("/")[0].lower().replace(" ", "_")
        stem = f"test{index}_{name}"
        result = write_pictures(model, to_rgb(img), out_dir, stem, info=info, highlight=4)
        written.append((index, test.classes[label], result))
    return written
