"""The samples a folder scan found, stored for DataLoader workers.

A list of a million samples kept as Python tuples is copied page by page into every DataLoader
worker as the workers touch its reference counts (PyTorch issue #13246: about 200 bytes per
sample and worker). :class:`SampleTable` keeps paths in one byte buffer with offsets and the
integer columns (label, frame count) in NumPy arrays: no per-sample Python object, nothing to
copy; :class:`RowView` shows its rows as a list.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence

import numpy as np

__all__ = ["RowView", "SampleTable"]


class SampleTable:
    """Paths with integer columns, stored without a Python object per row.

    Args:
        paths: the file paths, as strings.
        **columns: integer columns of the same length (``label``, ``frames``).

    ``table.path(i)`` is row ``i``'s path; ``table.column("label")`` a NumPy array.
    """

    def __init__(self, paths: Sequence[str], **columns: Sequence[int]) -> None:
        encoded = [p.encode("utf-8", "surrogatepass") for p in paths]
        lengths = np.fromiter((len(b) for b in encoded), dtype=np.int64, count=len(encoded))
        self._offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum(lengths, out=self._offsets[1:])
        self._bytes = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        self._columns = {
            name: np.asarray(values, dtype=np.int64) for name, values in columns.items()
        }
        for name, values in self._columns.items():
            if len(values) != len(encoded):
                raise ValueError(f"column {name!r} has {len(values)} rows for {len(encoded)} paths")

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def path(self, i: int) -> str:
        start, end = self._offsets[i], self._offsets[i + 1]
        return self._bytes[start:end].tobytes().decode("utf-8", "surrogatepass")

    def column(self, name: str) -> np.ndarray:
        return self._columns[name]

    def value(self, name: str, i: int) -> int:
        return int(self._columns[name][i])


class RowView(Sequence):
    """A read-only list of a table's rows, each made when asked for: ``view[i]`` costs one
    row, not the whole list. Compares equal to a list of the same rows, and pickles as one.

    Args:
        table: the rows' table; the view keeps reading this one, whatever its owner holds later.
        row: ``row(table, i)`` makes row ``i``.
    """

    def __init__(self, table: SampleTable, row: Callable[[SampleTable, int], tuple]) -> None:
        self._length = len(table)
        self._row = functools.partial(row, table)

    def __reduce__(self):
        return list, (list(self),)

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._row(j) for j in range(*i.indices(self._length))]
        if not -self._length <= i < self._length:
            raise IndexError(f"row {i} of {self._length}")
        return self._row(i % self._length)

    def __iter__(self) -> Iterator[tuple]:
        return (self._row(i) for i in range(self._length))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)

    def __repr__(self) -> str:
        return f"RowView({self._length} rows)"
