"""Data-parallel set-up and rank bookkeeping: the only place that reads rank and world size.

``torchrun --nproc_per_node=N -m sparseformer train ...`` sets ``RANK``, ``LOCAL_RANK`` and
``WORLD_SIZE``; we start a process group on them (nccl on CUDA, gloo on CPU). A plain
``sparseformer train`` is a world of one and runs the same code without a process group.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "DistInfo",
    "quiet_other_ranks",
    "setup_distributed",
    "cleanup_distributed",
    "all_reduce_sum",
    "broadcast_object",
    "broadcast_buffers",
    "weights_in_sync",
    "gather_objects",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Only the main process writes files and prints."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def launched_rank() -> tuple[int, int]:
    """``(rank, world size)`` as torchrun sets them (``RANK``, ``WORLD_SIZE``), before any
    process group exists; ``(0, 1)`` without torchrun or where they are not numbers."""
    try:
        if "RANK" not in os.environ:
            return 0, 1
        return int(os.environ["RANK"]), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 0, 1


def quiet_other_ranks() -> None:
    """Under torchrun, let the processes other than the first log errors only: what every
    process meets alike (a run's plan: its recipe, its resume) is said once, by the first.
    Training lowers them to warnings again, for what each meets on its own."""
    if launched_rank()[0] != 0:
        logging.getLogger().setLevel(logging.ERROR)


def setup_distributed(device: str) -> DistInfo:
    """Join the process group that ``torchrun`` describes, if any.

    Args:
        device: ``"cpu"`` or ``"cuda"``; picks the backend (gloo / nccl) and, on CUDA, binds
            this process to GPU ``LOCAL_RANK``.
    """
    end_with_launcher()  # under torchrun, one process or many
    if launched_rank()[1] <= 1:
        return DistInfo()
    info = DistInfo(
        int(os.environ["RANK"]),
        int(os.environ["WORLD_SIZE"]),
        int(os.environ.get("LOCAL_RANK", os.environ["RANK"])),  # one machine, if not said
        int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"])),
    )
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if device.startswith("cuda"):
        torch.cuda.set_device(info.local_rank)
    if not dist.is_initialized():
        with _sigterm_ends_at_once():
            dist.init_process_group(backend=backend)
    logger.info("rank %d of %d (%s)", info.rank, info.world_size, backend)
    return info


@contextlib.contextmanager
def _sigterm_ends_at_once() -> Iterator[None]:
    """SIGTERM's default action (the process ends) while joining the group. torchrun sends
    SIGTERM to the others when one process fails before it joins (rank 0 refusing an --output
    another run holds); they wait in C++, where Python's handler never runs, and were killed
    30 s later. Nothing is there to save yet."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def end_with_launcher() -> None:
    """Have Linux send this torchrun worker SIGTERM when its launcher dies.

    torchrun ends its workers when it is stopped, but killed with -9 (an out-of-memory killer, a
    scheduler) it cannot, and they would go on training unseen, holding the output folder's
    lock. SIGTERM stops a run as a scheduler's does: at a step boundary, ``last.pt`` saved. Only
    for a process torchrun started (``TORCHELASTIC_RUN_ID``), and only on Linux.
    """
    if not sys.platform.startswith("linux") or "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    launcher = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):  # no prctl to call: workers outlive a killed launcher
        return
    if os.getppid() != launcher or launcher == 1:  # the launcher died before the request
        os.kill(os.getpid(), signal.SIGTERM)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: Tensor, info: DistInfo) -> Tensor:
    """Sum a tensor over ranks (a no-op for a world of one)."""
    if info.enabled:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def broadcast_buffers(module: nn.Module, info: DistInfo) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics), as DDP does before a
    forward, so that evaluating the bare module scores the weights rank 0 saves."""
    if info.enabled:
        with torch.no_grad():
            for buffer in module.buffers():
                dist.broadcast(buffer, src=0)


def broadcast_object(obj, info: DistInfo):
    """Rank 0's value of ``obj`` on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def weights_in_sync(model: nn.Module, info: DistInfo) -> bool:
    """Whether every rank holds the same parameters (compares per-tensor sums and norms)."""
    if not info.enabled:
        return True
    with torch.no_grad():
        stats = torch.stack(
            [torch.stack([p.double().sum(), p.double().norm()]) for p in model.parameters()]
        )
        low, high = stats.clone(), stats.clone()
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
    return bool(torch.equal(low, high))


def gather_objects(obj, info: DistInfo) -> list:
    """Every rank's ``obj``, in rank order (a one-item list for a world of one)."""
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out
