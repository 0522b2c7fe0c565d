"""What a benchmark run measures (:class:`BenchSettings`) and what it reports
(:class:`BenchResult`: one :class:`BenchRow` per model and input size, spreads over rounds).

Plain records: :mod:`sparseformer.bench.throughput` fills them, :mod:`sparseformer.bench.report`
prints and plots them.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = [
    "DEFAULT_MODELS",
    "BenchError",
    "BenchSettings",
    "Spread",
    "BenchRow",
    "BenchResult",
]

DEFAULT_MODELS = (
    "sparseformer_v1_tiny",
    # the efficient frontier a user weighs today
    "levit_256",
    "efficientvit_b1",
    "fastvit_t12",
    "convnext_nano",
    # the paper's comparisons
    "deit_small_patch16_224",
    "swin_tiny_patch4_window7_224",
    "resnet50",
)
# torch dtype names: torch is imported when a benchmark runs, not when `sparseformer --help`
# reads DEFAULT_MODELS
_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


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
        scale_batch: ``batch_size`` holds up to 224 px; above, at size S, the batch is scaled
            by ``(224 / S)^2`` (at least 1), so that every size runs about as many pixels.
        skip_unsupported: a model that cannot be built or run at a size is left out there (and
            listed in :attr:`BenchResult.skipped`) instead of stopping the run.
        official: the authors' v1 code (a checkout or file): each v1 image SparseFormer among
            ``models`` is also timed as the authors' implementation (``authors:<name>``), and
            its row gets ratios against it (:mod:`sparseformer.bench.official`).
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
    scale_batch: bool = False
    skip_unsupported: bool = False
    official: str | None = None

    def __post_init__(self) -> None:
        if self.precision not in _DTYPES:
            raise BenchError(f"unknown precision {self.precision!r}; use one of {list(_DTYPES)}")
        if self.device not in ("cpu", "cuda"):
            raise BenchError(f"unknown device {self.device!r}; use cpu or cuda")
        import torch

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
        if not (math.isfinite(self.min_time) and self.min_time >= 0):
            raise BenchError(f"--min-time {self.min_time}: give a number of seconds, 0 or more")
        if self.baseline is not None and self.baseline not in self.models:
            raise BenchError(
                f"baseline {self.baseline!r} is not among the models ({', '.join(self.models)}); "
                "add it to --models or give one of them"
            )

    @property
    def dtype(self) -> torch.dtype:
        import torch

        return getattr(torch, _DTYPES[self.precision])

    def batch_at(self, img_size: int) -> int:
        """The throughput batch at ``img_size``: see ``scale_batch``."""
        if not self.scale_batch:
            return self.batch_size
        return min(self.batch_size, max(1, round(self.batch_size * (224 / img_size) ** 2)))

    def baseline_model(self) -> str:
        if self.baseline is not None:
            return self.baseline
        deit = [m for m in self.models if m.partition(".")[0] == "deit_small_patch16_224"]
        return deit[0] if deit else self.models[0]  # DeiT-S by name, with or without a tag


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
            paper's convention (without baddbmm) and complete; see
            :mod:`sparseformer.bench.counting`.
        throughput: images per second at ``batch_size``, one value per round.
        latency_ms: milliseconds per batch-1 forward pass, one value per pass.
        peak_memory_mb: extra memory while running one batch: the CPU process's resident-set
            growth (sampled every 0.5 ms) or CUDA's ``max_memory_allocated``.
        peak_fraction: ``2 * gflops_complete * img/s / matmul GFLOP/s``.
        train_throughput: images per second of a training step, one value per round.
        train_peak_memory_mb: extra memory of one training step at ``train_batch_size``:
            activations, gradients and AdamW's temporaries of its update (the weights and
            AdamW's state are held before it), measured as ``peak_memory_mb``.
        ratios: against the baseline: ``throughput`` and ``train``, medians of per-round
            ratios (higher is faster); ``latency``, the baseline's median batch-1 latency over
            this one's (of every pass of every round).
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
    """A whole run: the conditions, the machine's matmul peak, and one row per model and size.

    ``skipped`` lists the models a size was too much for (``model``, ``img_size``, ``reason``),
    when the settings allowed skipping.
    """

    environment: dict
    settings: dict
    matmul_peak_gflops: Spread
    rows: list[BenchRow]
    skipped: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)
