"""Honest speed measurements: throughput, latency, memory, and the share of the machine used.

Every model of a run is built first, then timed in turns (interleaved), repeat after repeat, so
that a change in machine load hits all models alike; medians and min/max over the repeats are
reported, and ratios against a baseline are taken repeat by repeat before the median. Timing
follows the usual rules: warm-up passes first, ``torch.inference_mode``, CUDA synchronised
before the clock is read, and the thread count, torch version, device and dtype recorded.

The fraction of the machine's peak compares the model's complete multiply-add count
(:func:`sparseformer.count_flops`, which counts fused attention and grid sampling) with a large
matrix product timed in the same run, in the same dtype: ``2 * MACs * img/s / (matmul FLOP/s)``.
"""

from __future__ import annotations

import logging
import os
import platform
import statistics
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from sparseformer.bench.counting import count_flops, count_params
from sparseformer.bench.timing import matmul_peak, peak_memory_mb, timed
from sparseformer.config import VideoSparseFormerConfig
from sparseformer.weights.registry import MODELS

__all__ = [
    "DEFAULT_MODELS",
    "BenchError",
    "BenchSettings",
    "Spread",
    "BenchRow",
    "BenchResult",
    "build_model",
    "matmul_peak",
    "run_benchmark",
    "sample_shape",
]

log = logging.getLogger(__name__)

DEFAULT_MODELS = (
    "sparseformer_v1_tiny",
    "deit_tiny_patch16_224",
    "deit_small_patch16_224",
    "swin_tiny_patch4_window7_224",
    "resnet50",
)
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class BenchError(ValueError):
    """A benchmark request that cannot run (unknown model, device, precision)."""


@dataclass(frozen=True)
class BenchSettings:
    """What to measure and how.

    Attributes:
        models: SparseFormer or timm model names, timed in this order.
        img_sizes: square input sizes; every model is measured at each.
        batch_size: batch of the throughput measurement.
        precision: ``fp32``, or ``bf16``/``fp16`` through autocast.
        device: ``cpu`` or ``cuda``.
        threads: CPU threads (``None``: torch's default).
        repeats: interleaved rounds; medians and spreads are over these.
        warmup: untimed passes per model before the first round.
        min_time: seconds each timed measurement runs at least (more passes if fast).
        train: also time a training step (forward, backward, AdamW) at ``train_batch_size``.
        grad_checkpointing: train with ``model.set_grad_checkpointing()`` (recompute
            activations in the backward pass: less memory, more time).
        baseline: model the ratio columns compare against (default: DeiT-S if present).
        num_classes: classifier width of every model.
        num_frames: clip length of video models (``None``: their config's default, 8); each
            row of a video model counts clips, not images, per second.
    """

    models: tuple[str, ...] = DEFAULT_MODELS
    img_sizes: tuple[int, ...] = (224,)
    batch_size: int = 32
    precision: str = "fp32"
    device: str = "cpu"
    threads: int | None = None
    repeats: int = 3
    warmup: int = 1
    min_time: float = 1.0
    train: bool = True
    train_batch_size: int = 32
    grad_checkpointing: bool = False
    baseline: str | None = None
    num_classes: int = 1000
    num_frames: int | None = None

    def __post_init__(self) -> None:
        if self.precision not in _DTYPES:
            raise BenchError(f"unknown precision {self.precision!r}; use one of {list(_DTYPES)}")
        if self.device not in ("cpu", "cuda"):
            raise BenchError(f"unknown device {self.device!r}; use cpu or cuda")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise BenchError("--device cuda asked for, but torch sees no CUDA device")
        if self.device == "cpu" and self.precision == "fp16":
            raise BenchError(
                "fp16 on the CPU is emulated and far slower than fp32 (a 2048^3 product takes "
                "seconds): measure bf16 or fp32 on the CPU, fp16 with --device cuda"
            )
        if not self.models:
            raise BenchError("no models to benchmark")
        sizes = (self.batch_size, self.repeats, self.train_batch_size, *self.img_sizes)
        if min(sizes) < 1 or (self.num_frames is not None and self.num_frames < 1):
            raise BenchError("batch sizes, repeats, image sizes and frames must be positive")
        if self.baseline is not None and self.baseline not in self.models:
            raise BenchError(f"baseline {self.baseline!r} is not among the models {self.models}")

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self.precision]

    def baseline_model(self) -> str:
        if self.baseline is not None:
            return self.baseline
        return (
            "deit_small_patch16_224" if "deit_small_patch16_224" in self.models else self.models[0]
        )


@dataclass
class Spread:
    """Median and range of repeated measurements."""

    median: float
    min: float
    max: float
    runs: list[float] = field(default_factory=list)

    @classmethod
    def of(cls, values: list[float]) -> Spread:
        return cls(statistics.median(values), min(values), max(values), list(values))


@dataclass
class BenchRow:
    """One model at one input size.

    Attributes:
        gflops_paper, gflops_complete: multiply-adds per image (the paper's "FLOPs"), in the
            paper's fvcore-style convention and complete; see :mod:`sparseformer.bench.counting`.
        throughput: images per second at ``batch_size``, one value per round.
        latency_ms: milliseconds per batch-1 forward pass, one value per pass.
        peak_memory_mb: extra memory while running one batch: the CPU process's resident-set
            growth (sampled every 0.5 ms) or CUDA's ``max_memory_allocated``.
        peak_fraction: ``2 * gflops_complete * img/s / matmul GFLOP/s``.
        train_throughput: images per second of a training step, one value per round.
        train_peak_memory_mb: extra memory of one training step at ``train_batch_size``:
            activations, gradients and AdamW's temporaries of its update (the weights and
            AdamW's state are held before it), measured as ``peak_memory_mb``.
        ratios: per-round ratios against the baseline, medians: ``throughput`` and ``train``
            (higher is faster), ``latency`` (baseline latency / this latency).
        num_frames: clip length T of a video model, whose "images" are clips of T frames
            (FLOPs per clip, clips per second); ``None`` for image models.
    """

    model: str
    img_size: int
    batch_size: int
    params: int
    gflops_paper: float
    gflops_complete: float
    throughput: Spread
    latency_ms: Spread
    peak_memory_mb: float | None
    peak_fraction: float
    train_throughput: Spread | None = None
    train_peak_memory_mb: float | None = None
    ratios: dict[str, float] = field(default_factory=dict)
    num_frames: int | None = None


@dataclass
class BenchResult:
    """A whole run: the conditions, the machine's matmul peak, and one row per model and size."""

    environment: dict
    settings: dict
    matmul_peak_gflops: Spread
    rows: list[BenchRow]

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- building blocks
def build_model(
    name: str, img_size: int = 224, num_classes: int = 1000, num_frames: int | None = None
) -> nn.Module:
    """A randomly initialised model by SparseFormer or timm name, for ``img_size`` inputs.

    ``num_frames`` sets the clip length of a video SparseFormer; image models ignore it.
    """
    import timm

    from sparseformer.weights.factory import create_model

    if name in MODELS:
        video = isinstance(MODELS[name].config, VideoSparseFormerConfig)
        extra = {"num_frames": num_frames} if video and num_frames is not None else {}
        return create_model(name, num_classes=num_classes, **extra)
    if not timm.is_model(name):
        from sparseformer.engine.modeling import close_model_names

        raise BenchError(
            f"unknown model {name!r}{close_model_names(name)} (neither a SparseFormer name, "
            "see `sparseformer models`, nor a timm model name)"
        )
    default_size = timm.get_pretrained_cfg_value(name, "input_size") or (3, 224, 224)
    if img_size != default_size[-1]:
        try:  # vision transformers fix their position table and windows to the input size
            return timm.create_model(name, num_classes=num_classes, img_size=img_size)
        except TypeError:  # convolutional networks take any size
            pass
    return timm.create_model(name, num_classes=num_classes)


def sample_shape(model: nn.Module, img_size: int) -> tuple[int, ...]:
    """One input sample: ``(3, T, S, S)`` for a video SparseFormer, else ``(3, S, S)``."""
    num_frames = getattr(getattr(model, "config", None), "num_frames", None)
    if num_frames is None:
        return (3, img_size, img_size)
    return (3, num_frames, img_size, img_size)


def _autocast(settings: BenchSettings) -> AbstractContextManager:
    if settings.precision == "fp32":
        return nullcontext()
    return torch.autocast(settings.device, dtype=settings.dtype)


def _environment(settings: BenchSettings) -> dict:
    if settings.device == "cuda":
        device_name = torch.cuda.get_device_name()
    else:
        device_name = _cpu_name()
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": settings.device,
        "device_name": device_name,
        "dtype": settings.precision,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
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


# ----------------------------------------------------------------------------- the run
def run_benchmark(settings: BenchSettings) -> BenchResult:
    """Measure every model at every size, interleaved; see the module docstring."""
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    environment = _environment(settings)
    log.info(
        "benchmarking %d model(s) on %s (%s, %d threads, torch %s)",
        len(settings.models),
        environment["device_name"],
        settings.precision,
        environment["threads"],
        torch.__version__,
    )
    peaks: list[float] = []
    rows: list[BenchRow] = []
    for img_size in settings.img_sizes:
        rows += _run_size(settings, img_size, peaks)
    environment["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    peak = Spread.of(peaks)
    for row in rows:
        achieved = 2 * row.gflops_complete * row.throughput.median
        row.peak_fraction = achieved / peak.median
    settings_dict = asdict(settings) | {"baseline": settings.baseline_model()}
    return BenchResult(environment, settings_dict, peak, rows)


def _run_size(settings: BenchSettings, img_size: int, peaks: list[float]) -> list[BenchRow]:
    s, device = settings, settings.device
    models, inputs, flops, frames = {}, {}, {}, {}
    for name in s.models:
        model = build_model(name, img_size, s.num_classes, s.num_frames).to(device).eval()
        if s.train and s.grad_checkpointing:
            _check_grad_checkpointing(name, model)
        models[name] = model
        shape = sample_shape(model, img_size)
        frames[name] = shape[1] if len(shape) == 4 else None
        count = count_flops(model, shape)
        flops[name] = (count_params(model), count.gflops_paper, count.gflops_complete)
        x = torch.randn(s.batch_size, *shape, device=device)
        inputs[name] = {"batch": x, "single": x[:1].clone()}
    throughput: dict[str, list[float]] = {n: [] for n in s.models}
    latency: dict[str, list[float]] = {n: [] for n in s.models}
    memory: dict[str, float | None] = {}
    steps = len(s.models) * (s.warmup + s.repeats) + s.repeats
    with tqdm(total=steps, desc=f"inference {img_size}px", disable=None) as bar:
        with torch.inference_mode(), _autocast(s):
            for name, model in models.items():
                x = inputs[name]
                for _ in range(s.warmup):
                    model(x["batch"])
                    model(x["single"])
                    bar.update()
                memory[name] = peak_memory_mb(lambda m=model, x=x: m(x["batch"]), device)
            for _ in range(s.repeats):
                peaks.append(matmul_peak(device, s.dtype, min_time=min(s.min_time, 0.5)))
                bar.update()
                for name, model in models.items():
                    x = inputs[name]
                    times = timed(lambda m=model, x=x: m(x["batch"]), device, s.min_time)
                    throughput[name].append(s.batch_size * len(times) / sum(times))
                    times = timed(lambda m=model, x=x: m(x["single"]), device, s.min_time)
                    latency[name] += [1e3 * t for t in times]
                    bar.update()
    train, train_memory = _train_rounds(settings, models, img_size) if s.train else (None, {})
    base = s.baseline_model()
    rows = []
    for name in s.models:
        params, gflops_paper, gflops_complete = flops[name]
        ratios = {
            "throughput": _median_ratio(throughput[name], throughput[base]),
            "latency": statistics.median(latency[base]) / statistics.median(latency[name]),
        }
        if train is not None:
            ratios["train"] = _median_ratio(train[name], train[base])
        rows.append(
            BenchRow(
                model=name,
                img_size=img_size,
                batch_size=s.batch_size,
                params=params,
                gflops_paper=gflops_paper,
                gflops_complete=gflops_complete,
                throughput=Spread.of(throughput[name]),
                latency_ms=Spread.of(latency[name]),
                peak_memory_mb=memory[name],
                peak_fraction=float("nan"),  # set once the run's matmul peak is known
                train_throughput=Spread.of(train[name]) if train is not None else None,
                train_peak_memory_mb=train_memory.get(name),
                ratios=ratios,
                num_frames=frames[name],
            )
        )
    return rows


def _check_grad_checkpointing(name: str, model: nn.Module) -> None:
    """Fail before any timing if ``model`` cannot checkpoint (timm asserts in some models)."""
    try:
        model.set_grad_checkpointing(True)
        model.set_grad_checkpointing(False)
    except (AttributeError, AssertionError, NotImplementedError) as exc:
        raise BenchError(
            f"{name} does not support gradient checkpointing ({exc or type(exc).__name__}); "
            "drop --grad-checkpointing or that model"
        ) from None


def _median_ratio(values: list[float], baseline: list[float]) -> float:
    return statistics.median(a / b for a, b in zip(values, baseline))


def _train_rounds(
    settings: BenchSettings, models: dict[str, nn.Module], img_size: int
) -> tuple[dict[str, list[float]], dict[str, float | None]]:
    """Images per second of a full training step per model, interleaved over the rounds, and
    each model's extra memory in one step."""
    s, device = settings, settings.device
    if s.grad_checkpointing:
        for model in models.values():
            model.set_grad_checkpointing(True)
    y = torch.randint(0, s.num_classes, (s.train_batch_size,), device=device)
    steps, optimizers = {}, {}
    for name, model in models.items():
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        x = torch.randn(s.train_batch_size, *sample_shape(model, img_size), device=device)

        def step(
            model: nn.Module = model, optimizer: torch.optim.Optimizer = optimizer, x=x
        ) -> None:
            optimizer.zero_grad(set_to_none=True)
            with _autocast(s):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()

        steps[name], optimizers[name] = step, optimizer
    result: dict[str, list[float]] = {n: [] for n in models}
    memory: dict[str, float | None] = {}
    total = len(models) * (s.warmup + s.repeats)
    with tqdm(total=total, desc=f"training {img_size}px", disable=None) as bar:
        for model in models.values():
            model.train()
        for name in models:
            for _ in range(s.warmup):
                steps[name]()
                bar.update()
            if not s.warmup:  # one step first all the same: AdamW's state is not the step's
                steps[name]()
            # the weights and AdamW's state are held; the step's activations, gradients and
            # update temporaries are what it measures
            optimizers[name].zero_grad(set_to_none=True)
            memory[name] = peak_memory_mb(steps[name], device)
        for _ in range(s.repeats):
            for name in models:
                times = timed(steps[name], device, s.min_time)
                result[name].append(s.train_batch_size * len(times) / sum(times))
                bar.update()
        for model in models.values():
            model.eval()
            if s.grad_checkpointing:
                model.set_grad_checkpointing(False)
    return result, memory
