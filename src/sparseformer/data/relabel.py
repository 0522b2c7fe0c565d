"""Labels by name: a data set's class folders matched to the classes a checkpoint was trained
on (any subset, any order), and the data set relabelled with the checkpoint's indices."""

from __future__ import annotations

from collections.abc import Sequence

from sparseformer.data.folder import DataError
from sparseformer.data.scan import first_names, spelling_hint

__all__ = ["RelabelledDataset", "checkpoint_label_map"]


class RelabelledDataset:
    """A data set whose label ``i`` becomes ``mapping[i]`` (the checkpoint's index)."""

    def __init__(self, dataset, mapping: list[int]) -> None:
        self.dataset, self.mapping = dataset, mapping

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        x, label = self.dataset[index]
        return x, self.mapping[label]


def checkpoint_label_map(
    trained_on: Sequence[str] | None, class_names: Sequence[str]
) -> list[int] | None:
    """The checkpoint's index of each of the data's classes, matched by name, or ``None``
    when no matching is needed: a checkpoint that names no classes (an official release,
    matched by position: ImageNet's sorted wnids) or one trained on exactly these classes.

    Raises:
        DataError: a class of the data that the checkpoint was not trained on.
    """
    if trained_on is None or list(trained_on) == list(class_names):
        return None
    unknown = [c for c in class_names if c not in trained_on]
    if unknown:
        raise DataError(
            f"class(es) {first_names(unknown)} of the data are not among the checkpoint's "
            f"classes ({first_names(trained_on, 8)}); evaluate on data of the classes it was "
            "trained on"
            f"{spelling_hint(unknown, trained_on)}"
        )
    return [list(trained_on).index(c) for c in class_names]
