"""The device and CPU threads a command runs on, checked before any work."""

from __future__ import annotations

import logging
import math
import os
import statistics
import time
from collections.abc import Callable

import torch

from sparseformer.engine.distributed import DistInfo

__all__ = [
    "pick_device",
    "available_cores",
    "load_average",
    "load_elsewhere",
    "set_threads",
    "warn_oversubscribed",
]

logger = logging.getLogger(__name__)


def pick_device(requested: str | None, *, allow_mps: bool = False) -> str:
    """The device a ``--device`` value names, checked before any work: ``"cpu"``, ``"cuda"`` or
    ``"cuda:N"`` (then also made the current CUDA device, so that pinned memory and CUDA's
    context go to GPU N, not GPU 0); ``None`` or ``"auto"`` is ``"cuda"`` when a GPU is
    visible, else ``"cpu"``. ``allow_mps``: also ``"mps"`` (Apple GPUs), for callers that keep
    float64 work on the CPU.

    Raises:
        ValueError: a name torch does not know (``"gpu"``), a CUDA device that is not there,
            or a device type these commands do not run on (``"mps"`` for train / eval /
            predict: their metric sums are float64, which MPS lacks).
    """
    if requested in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    known = "auto, cpu, cuda, cuda:N or mps" if allow_mps else "auto, cpu, cuda or cuda:N"
    try:
        device = torch.device(requested)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown --device {requested!r}; use {known}") from None
    if device.type == "cpu":
        return "cpu"
    if device.type == "mps" and allow_mps:
        if not torch.backends.mps.is_available():
            raise ValueError("--device mps asked for, but MPS is not available; use --device cpu")
        return "mps"
    if device.type != "cuda":
        raise ValueError(f"--device {requested} is not supported; use {known}")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise ValueError(f"--device {requested} asked for, but no CUDA GPU is visible; "
                         "use --device cpu")  # fmt: skip
    if device.index is not None:
        if device.index >= count:
            raise ValueError(f"--device {requested}: {count} CUDA GPU(s) visible, "
                             f"cuda:0 to cuda:{count - 1}")  # fmt: skip
        torch.cuda.set_device(device.index)
    return str(device)


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def set_threads(requested: int | None, dist: DistInfo) -> int:
    """Intra-op CPU threads: the cores this process may use, shared among local ranks.

    Busy-waiting OpenMP threads on cores that other jobs hold are ruinous: on a 2-core machine
    with a load average near 4 we measured 73 images/s with 2 threads against 505 with 1, while
    at a load of 1.5 two threads still ran at 730. So when other work (:func:`_load`) already
    exceeds the cores, the default gives up one thread per extra unit of load (at least 1);
    ``--threads`` sets the number, and so does ``OMP_NUM_THREADS`` where the user set it (but
    1 with several processes on the machine, which torchrun sets of its own accord).
    """
    if requested is None and (from_env := _omp_num_threads(dist)) is not None:
        logger.info("CPU threads: %d, as OMP_NUM_THREADS asks", from_env)
        requested = from_env
    if requested is None:
        cores = available_cores()
        load = _load(cores, dist)
        usable = cores if load <= cores else max(1, cores - math.ceil(load - cores))
        requested = max(1, usable // max(dist.local_world_size, 1))
        if usable < cores:
            logger.info("the machine is busy (load %.1f on %d cores): using %d thread(s)",
                        load, cores, requested)  # fmt: skip
    else:
        warn_oversubscribed(requested, dist.local_world_size)
    torch.set_num_threads(requested)
    return requested


# how the work running now is sampled: (samples, seconds apart), briefly, and longer where the
# 1-minute load average says the cores are taken and the brief look says they are free
_BRIEF, _LONG = (5, 0.01), (25, 0.02)


def _load(cores: int, dist: DistInfo) -> float:
    """The other work the default thread count gives way to. On Linux, for one process, the
    tasks running now (:func:`load_elsewhere`), looked at for half a second where the load
    average disagrees (work that comes and goes); elsewhere, and for several local ranks, the
    1-minute load average: the same number for every rank (each one's look would count the
    siblings started a moment before it, and ranks could take different counts)."""
    if cores == 1:
        return 0.0  # one thread whatever the load
    average = load_average()
    if dist.local_world_size > 1:
        return average
    try:
        now = load_elsewhere(*_BRIEF)
        if now <= cores < average:
            now = load_elsewhere(*_LONG, combine=statistics.fmean)
        return now
    except (OSError, ValueError):
        return average


def load_average() -> float:
    """The 1-minute load average, 0 where the OS keeps none."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # Windows; a Linux without /proc/loadavg
        return 0.0


def load_elsewhere(
    samples: int = 5, interval: float = 0.01, combine: Callable = statistics.median
) -> float:
    """How many threads outside this process are running or want to run (Linux): ``samples``
    looks, ``interval`` seconds apart, at the runnable tasks (``/proc/loadavg``) less this
    process's own, combined (by default their median). Unlike the load average, which lags by
    a minute, it does not count a command that ended seconds ago (``train`` then ``eval``).

    Raises:
        OSError, ValueError: no such count here (not Linux, or a sandbox's stand-in ``/proc``).
    """
    counts = []
    for i in range(samples):
        if i:
            time.sleep(interval)
        counts.append(_runnable() - _own_running())
    return float(max(0, combine(counts)))


def _runnable() -> int:
    """The machine's runnable tasks (threads) now, the calling one included (Linux)."""
    with open("/proc/loadavg") as loadavg:
        running = int(loadavg.read().split()[3].split("/")[0])  # "0.52 0.58 0.59 3/120 4242"
    if running < 1:  # the caller itself runs: a stand-in /proc (a sandbox) that counts nothing
        raise ValueError("/proc/loadavg counts no running task")
    return running


def _own_running() -> int:
    """This process's threads that are running or runnable now, the calling one included."""
    running = 0
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/stat") as stat:
                state = stat.read().rsplit(")", 1)[1].split()[0]  # after the thread's name
        except (OSError, IndexError):
            continue  # a thread that ended meanwhile
        running += state == "R"
    return running


def _omp_num_threads(dist: DistInfo) -> int | None:
    """``OMP_NUM_THREADS`` as a whole number of at least 1 where the user set it (``None``
    where unset, or where it may be torchrun's own: torchrun sets 1 for each of several
    processes on a machine when the user set nothing)."""
    try:
        threads = int(os.environ.get("OMP_NUM_THREADS", ""))
        local = max(dist.local_world_size, int(os.environ.get("LOCAL_WORLD_SIZE") or 1))
    except ValueError:
        return None
    if threads == 1 and local > 1:  # perhaps torchrun's: the free cores, shared out
        return None
    return threads if threads >= 1 else None


def warn_oversubscribed(threads: int, processes: int = 1) -> None:
    """A warning where ``threads`` per process exceed the cores they share: this process's own
    where it is bound to some of the machine's (a scheduler's per-rank binding), else the
    machine's, shared by the machine's ``processes``. Threads beyond the cores wait for each
    other at every operator."""
    cores = available_cores()
    bound = cores < (os.cpu_count() or cores)
    sharing = 1 if bound else max(processes, 1)
    if threads * sharing > cores:
        fewer = (
            f"give at most {cores // sharing}" if cores >= sharing
            else f"run at most {cores} processes on this machine (torchrun --nproc_per_node)"
        )  # fmt: skip
        logger.warning(
            "%d CPU threads on %d cores: threads beyond the cores wait for each other and slow "
            "every step; %s", threads * sharing, cores, fewer,
        )  # fmt: skip
