"""Data loaders whose order is a pure function of (seed, epoch, rank): resumable and sharded.

Training uses torch's ``DistributedSampler`` (a world of one without torchrun), re-seeded each
epoch with ``set_epoch``; with repeated augmentation across ranks, timm's ``RepeatAugSampler``.
Evaluation shards the validation set without padding, so every image counts exactly once.

A training epoch can start part-way (:func:`start_epoch`: a run resumed from a mid-epoch
checkpoint) and still see the same images with the same augmentation as an uninterrupted run:
each sample's random draws are seeded by (seed, rank, epoch, position in the epoch)
(:class:`EpochSampler`, :class:`SeededSamples`), not by which worker process loads it or what
it loaded before. Workers ignore SIGINT and SIGTERM: the main process alone handles a stop
(a Ctrl-C reaches the whole process group) and shuts them down.
"""

from __future__ import annotations

import logging
import random
import signal
import zlib
from collections.abc import Iterator, Sequence
from itertools import islice

import numpy as np
import torch
from timm.data.distributed_sampler import RepeatAugSampler
from timm.data.loader import fast_collate
from torch.utils.data import (
    DataLoader,
    Dataset,
    DistributedSampler,
    Sampler,
    Subset,
    default_collate,
)

from sparseformer.data.scan import counted

__all__ = [
    "ShardSampler",
    "EpochSampler",
    "SeededSamples",
    "start_epoch",
    "SharedCount",
    "SharedOnce",
    "collate",
    "build_train_loader",
    "FewerThanABatch",
    "build_eval_loader",
    "failed_loads",
    "DecodeFailures",
    "end_workers",
]

logger = logging.getLogger(__name__)


class SharedCount:
    """A count (or ``size`` counts) that DataLoader worker processes add to and the main
    process reads: a shared-memory tensor, which worker processes share whether forked or
    spawned. Additions from two workers at the same instant may lose one (no lock); it counts
    rare events."""

    def __init__(self, size: int | None = None) -> None:
        shape = () if size is None else (size,)
        self._value = torch.zeros(shape, dtype=torch.int64).share_memory_()

    def add(self, n: int = 1, at: int | None = None) -> None:
        """Add ``n``; to count ``at`` of a count made with a ``size``."""
        if at is None:
            self._value += n
        else:
            self._value[at] += n

    def __int__(self) -> int:
        return int(self._value)

    def __getitem__(self, at: int) -> int:
        return int(self._value[at])

    def __len__(self) -> int:
        return len(self._value)


class SharedOnce:
    """Keys (file paths) whose first report only is wanted, over the main process and its
    DataLoader workers, whether forked or spawned, epoch after epoch: shared-memory flags
    indexed by the key's CRC-32. A rare collision silences another key's report (never a
    count), and two workers meeting one key at the same instant may both report it."""

    def __init__(self, slots: int = 1 << 18) -> None:
        self._seen = torch.zeros(slots, dtype=torch.bool).share_memory_()

    def first(self, key: str) -> bool:
        """Whether ``key`` is met here for the first time (and mark it met)."""
        slot = zlib.crc32(key.encode("utf-8", "surrogatepass")) % len(self._seen)
        if self._seen[slot]:
            return False
        self._seen[slot] = True
        return True


class DecodeFailures:
    """Files of a data set that fail to decode after its folder check, over the main process
    and its DataLoader workers: every failure counted (``int()``), each file named once
    (:meth:`note` says whether this is its first), and per class, so that a class none of
    whose files decodes is said in an error line once (training: its samples are other
    classes' files; evaluation: it is not scored)."""

    def __init__(self, classes: Sequence[str], root, *, train: bool) -> None:
        self._count, self._named = SharedCount(), SharedOnce()
        self._per_class = SharedCount(len(classes))
        self._classes, self._root, self._train = list(classes), root, train

    def __int__(self) -> int:
        return int(self._count)

    def note(self, path: str, label: int, labels) -> bool:
        """Count a failure of ``path`` (of class ``label``; ``labels``: every file's);
        whether the file failed here for the first time."""
        self._count.add()
        first = self._named.first(path)
        if first and 0 <= label < len(self._per_class):
            self._per_class.add(at=label)
            files = int((labels == label).sum())
            if self._per_class[label] == files:
                logger.error(
                    "none of the %s of class %r under %s decodes (the folder's check passed "
                    "them): %s; repair or remove them", counted(files, "file"),
                    self._classes[label], self._root,
                    "its training samples are other classes' files" if self._train
                    else "it is not scored",
                )  # fmt: skip
        return first


def failed_loads(dataset: Dataset | None) -> int:
    """Files of ``dataset`` (through any ``Subset``) that failed to decode after the folder
    scan, counted over every process that loaded from it; 0 for data sets that do not count."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return int(getattr(dataset, "failed_loads", 0))


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world, ...`` of a dataset of ``size``: no padding, no overlap."""

    def __init__(self, size: int, rank: int = 0, world_size: int = 1) -> None:
        self.indices = range(rank, size, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def collate(batch: list) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 arrays/tensors -> one uint8 batch (timm's ``fast_collate``); floats -> stacked.

    Items whose input is ``None`` (an evaluation image that failed to decode) are left out;
    a batch of none gives empty tensors.
    """
    batch = [item for item in batch if item[0] is not None]
    if not batch:
        return torch.zeros((0, 3, 1, 1), dtype=torch.uint8), torch.zeros(0, dtype=torch.long)
    first = batch[0][0]
    if isinstance(first, np.ndarray) or (
        isinstance(first, torch.Tensor) and first.dtype == torch.uint8
    ):
        return fast_collate(batch)
    return default_collate(batch)


class SeededRepeatAugSampler(RepeatAugSampler):
    """timm's (DeiT's) repeated-augmentation sampler, shuffled by ``seed + epoch`` as torch's
    ``DistributedSampler`` is; timm's shuffles by the epoch alone, whatever ``--seed`` says."""

    def __init__(
        self, dataset: Dataset, num_replicas: int, rank: int, num_repeats: int, seed: int = 0
    ) -> None:
        super().__init__(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=True, num_repeats=num_repeats
        )
        self.seed = seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(self.seed + epoch)


class EpochSampler(Sampler[tuple[int, int]]):
    """``(index, seed)`` pairs: ``inner``'s indices, each with a seed of its own made from
    (seed, rank, epoch, position in the epoch); the first ``skip`` positions left out."""

    def __init__(self, inner: Sampler[int], seed: int, rank: int) -> None:
        self.inner, self.seed, self.rank = inner, seed, rank
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.inner.set_epoch(epoch)
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        base = ((self.seed * 1_000_003 + self.rank) * 1_000_003 + self.epoch) * 1_000_003
        for position, index in islice(enumerate(self.inner), self.skip, None):
            yield index, (base + position) % 2**63

    def __len__(self) -> int:  # the whole epoch: the schedule counts its steps from it
        return len(self.inner)


class SeededSamples(Dataset):
    """``dataset[index]`` with Python's, NumPy's and torch's random draws seeded by the
    sample's own seed (an :class:`EpochSampler` pair); the caller's generators are left as
    they were (in the main process they drive drop-path and Mixup)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]):
        return self.__getitems__([item])[0]

    def __getitems__(self, items: list[tuple[int, int]]) -> list:
        """A batch's samples (what ``DataLoader`` asks for): the caller's generator states
        are saved and restored once per batch, not per sample (NumPy's take 70 us a time)."""
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                return [self._seeded(index, seed) for index, seed in items]
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)

    def _seeded(self, index: int, seed: int):
        # the CPU generator only: torch.manual_seed also seeds every accelerator, or, before
        # one is initialised, queues its seeding with a formatted stack: 0.9 ms per sample
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        return self.dataset[index]


def start_epoch(loader: DataLoader, epoch: int, skip_batches: int = 0) -> None:
    """Make ``loader`` (from :func:`build_train_loader`) yield epoch ``epoch`` from batch
    ``skip_batches`` on, exactly as the batches of an uninterrupted epoch."""
    loader.sampler.set_epoch(epoch)
    loader.sampler.skip = skip_batches * loader.batch_size


_STOP = {signal.SIGINT, signal.SIGTERM}


class _WorkerStart:
    """A worker's first call (``worker_init_fn``): it leaves SIGINT and SIGTERM to the main
    process, which stops the run cleanly and shuts it down (a worker killed by them reads as a
    crash), and a worker started by spawn (macOS, Windows), which did not inherit the main
    process's logging, logs as it does. The two signals were held back since the worker
    started (:class:`_Loader`): one that came while it imported torch is dropped now."""

    def __init__(self) -> None:
        handler = next((h for h in logging.getLogger().handlers if h.formatter), None)
        self.level = logging.getLogger().level
        self.format = (handler.formatter._fmt, handler.formatter.datefmt) if handler else None

    def __call__(self, worker_id: int) -> None:
        for signum in _STOP:
            signal.signal(signum, signal.SIG_IGN)
        if hasattr(signal, "pthread_sigmask"):  # POSIX
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP)
        if not logging.getLogger().handlers and self.format is not None:  # spawned
            logging.basicConfig(level=self.level, format=self.format[0], datefmt=self.format[1])


class _Loader(DataLoader):
    """A ``DataLoader`` whose workers start with SIGINT and SIGTERM held back (the signal mask
    passes to a forked or spawned process), until :class:`_WorkerStart` ignores them: a
    spawned worker imports torch for seconds first, and a Ctrl-C or a SIGTERM to the process
    group then killed it, and the run ended as if a worker had run out of memory. The main
    process gets a signal that came meanwhile as soon as its workers have started."""

    def __iter__(self):
        if not hasattr(signal, "pthread_sigmask"):  # Windows: no signal masks
            return super().__iter__()
        held = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP)
        try:
            return super().__iter__()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)


def end_workers(*loaders: object) -> None:
    """End the worker processes of ``loaders`` now. Persistent workers otherwise live as long
    as their loader, and end in a garbage collector's ``__del__`` after the caller's signal
    handling is over: a Ctrl-C landing in that shutdown printed an "Exception ignored"
    traceback. (PyTorch has no public call for it: its iterator's own shutdown, as ``del``.)"""
    for loader in loaders:
        iterator = getattr(loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
            loader._iterator = None  # type: ignore[attr-defined]


class FewerThanABatch(ValueError):
    """A process's share of the training data is smaller than one batch."""

    def __init__(self, message: str, samples: int = 0, batch_size: int = 0) -> None:
        super().__init__(message)
        self.samples, self.batch_size = samples, batch_size


def build_train_loader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    repeated_aug: int = 0,
    pin_memory: bool | None = None,
) -> DataLoader:
    """Shuffled, sharded training loader (drops the last incomplete batch, for Mixup).

    Call :func:`start_epoch` before each epoch. ``pin_memory``: page-locked
    batches for a CUDA device (``None``: when CUDA is available); pinning starts a CUDA
    context, so a CPU run on a GPU host passes ``False``.
    """
    if repeated_aug > 1 and world_size > 1:
        sampler: Sampler = SeededRepeatAugSampler(
            dataset, world_size, rank, num_repeats=repeated_aug, seed=seed
        )
    else:
        sampler = DistributedSampler(
            dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed
        )
    if len(sampler) < batch_size:
        raise FewerThanABatch(
            f"{len(sampler)} training samples (images or videos) per process is fewer than "
            f"one batch of {batch_size} (the run's batch size); give a smaller --batch-size",
            len(sampler),
            batch_size,
        )
    return _Loader(
        SeededSamples(dataset),
        batch_size=batch_size,
        sampler=EpochSampler(sampler, seed, rank),
        num_workers=num_workers,
        collate_fn=collate,
        drop_last=True,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        worker_init_fn=_WorkerStart(),
        persistent_workers=num_workers > 0,  # started once a run, not per epoch (spawn: seconds)
        # the workers' base seed from a generator of its own, not the process's
        generator=torch.Generator().manual_seed(seed + rank),
    )


def build_eval_loader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool | None = None,
) -> DataLoader:
    """Ordered evaluation loader over this rank's shard (``pin_memory`` as for training)."""
    return _Loader(
        dataset,
        batch_size=batch_size,
        sampler=ShardSampler(len(dataset), rank, world_size),
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        worker_init_fn=_WorkerStart(),
        persistent_workers=num_workers > 0,  # started once a run, not per epoch (spawn: seconds)
        # Each iterator draws its workers' base seed from this generator. From the process's,
        # persistent workers (one iterator a process) moved training's stochastic depth by a
        # draw that a resumed process takes at another point than the run it continues.
        generator=torch.Generator(),
    )
