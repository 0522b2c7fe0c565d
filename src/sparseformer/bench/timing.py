"""Timing and memory primitives of :mod:`sparseformer.bench.throughput`, and the record of the
machine they ran on.

Clocks are read after CUDA work has finished (``synchronize``); CPU memory is the process's
resident set, polled while the measured call runs, since PyTorch's CPU allocator keeps no
statistics.
"""

from __future__ import annotations

import ctypes
import os
import platform
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from sparseformer.engine.device import available_cores

__all__ = ["sync", "CpuShare", "timed", "matmul_peak", "peak_memory_mb", "machine_record"]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@dataclass
class CpuShare:
    """CPU and wall seconds of timed calls, added up by :func:`timed`: how much of the cores
    they asked for the calls got. Well below 1 on a CPU, other work took the cores, and the
    times are too long by as much."""

    cpu_seconds: float = 0.0
    wall_seconds: float = 0.0

    def of(self, threads: int) -> float | None:
        """The CPU time as a fraction of ``threads`` cores over the wall time (``None``:
        nothing timed)."""
        return self.cpu_seconds / (self.wall_seconds * threads) if self.wall_seconds else None


def timed(
    fn: Callable[[], object], device: str, min_time: float, share: CpuShare | None = None
) -> list[float]:
    """Seconds of each call of ``fn``, calling it until ``min_time`` seconds have passed (the
    process's CPU and wall time over them are added to ``share``)."""
    times: list[float] = []
    start, cpu = time.perf_counter(), time.process_time()
    while not times or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    if share is not None:
        share.cpu_seconds += time.process_time() - cpu
        share.wall_seconds += time.perf_counter() - start
    return times


def matmul_peak(
    device: str = "cpu", dtype: torch.dtype = torch.float32, size: int = 2048, min_time: float = 0.5
) -> float:
    """GFLOP/s of a ``size`` x ``size`` matrix product (2 FLOPs per multiply-add), best pass."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    torch.mm(a, b)  # warm-up
    sync(device)
    times = timed(lambda: torch.mm(a, b), device, min_time)
    return 2 * size**3 / min(times) / 1e9


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _release_free_heap() -> None:
    """Give freed heap pages back to the OS (glibc), so RSS growth reflects new allocations."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_memory_mb(fn: Callable[[], object], device: str) -> float | None:
    """Extra memory while ``fn`` runs: CUDA allocator peak, or polled CPU resident set."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    _release_free_heap()
    base = _rss_bytes()
    if base is None:
        return None
    peak = base
    done = threading.Event()

    def poll() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss_bytes() or 0)
            time.sleep(0.0005)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    return max(peak - base, 0) / 2**20


def machine_record(device: str, precision: str) -> dict:
    """What a run's figures depend on: torch and Python, the device and its name, the dtype,
    threads, cores this process may run on, the load average at the start, the time."""
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else _cpu_name(),
        "dtype": precision,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cores": available_cores(),  # those this process may run on
        "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
