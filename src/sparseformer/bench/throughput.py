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
import statistics
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from sparseformer.bench import official
from sparseformer.bench.counting import count_flops, count_params
from sparseformer.bench.results import (
    DEFAULT_MODELS,
    BenchError,
    BenchResult,
    BenchRow,
    BenchSettings,
    Spread,
)
from sparseformer.bench.timing import CpuShare, machine_record, matmul_peak, peak_memory_mb, timed
from sparseformer.config import VideoSparseFormerConfig
from sparseformer.data.scan import counted
from sparseformer.engine.device import warn_oversubscribed
from sparseformer.engine.optim import build_optimizer
from sparseformer.layers.linear import packed_weights
from sparseformer.weights.registry import MODELS, split_tag

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


# ----------------------------------------------------------------------------- building blocks
def build_model(
    name: str, img_size: int = 224, num_classes: int = 1000, num_frames: int | None = None
) -> nn.Module:
    """A randomly initialised model by SparseFormer or timm name, for ``img_size`` inputs.

    ``num_frames`` sets the clip length of a video SparseFormer; image models ignore it.
    """
    import timm

    from sparseformer.weights.build import timm_model, unknown_tag_problem
    from sparseformer.weights.factory import create_model, tag_problem

    problem, base = tag_problem(name), split_tag(name)[0]
    if problem is not None:  # ours: not timm's tags
        raise BenchError(problem)
    if base in MODELS:  # a tag names weights, which a bench does not load
        video = isinstance(MODELS[base].config, VideoSparseFormerConfig)
        extra = {"num_frames": num_frames} if video and num_frames is not None else {}
        return create_model(name, num_classes=num_classes, **extra)
    if not timm.is_model(name):
        from sparseformer.weights.build import close_model_names

        raise BenchError(
            f"unknown model {name!r}{close_model_names(name)} (neither a SparseFormer name, "
            "see `sparseformer models`, nor a timm model name)"
        )
    problem = unknown_tag_problem(name)  # before timm reads the tag's input size
    if problem is not None:
        raise BenchError(problem)
    default_size = timm.get_pretrained_cfg_value(name, "input_size") or (3, 224, 224)
    size = None if img_size == default_size[-1] else img_size  # ViTs fix their tables to it
    return timm_model(name, size, num_classes=num_classes)


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


# ----------------------------------------------------------------------------- the run
def run_benchmark(settings: BenchSettings) -> BenchResult:
    """Measure every model at every size, interleaved; see the module docstring."""
    official.timed_models(settings.models, settings.official)  # fails before any timing
    if settings.threads is not None:
        warn_oversubscribed(settings.threads)
        torch.set_num_threads(settings.threads)
    environment = machine_record(settings.device, settings.precision)
    log.info(
        "benchmarking %d model(s) on %s (%s, %s, torch %s)",
        len(settings.models),
        environment["device_name"],
        settings.precision,
        counted(environment["threads"], "thread"),
        torch.__version__,
    )
    peaks: list[float] = []
    rows: list[BenchRow] = []
    skipped: list[dict] = []
    share = CpuShare()  # what the timed calls got of the cores they asked for
    if not settings.skip_unsupported:  # a size a model cannot take: said before any timing,
        for img_size in settings.img_sizes[1:]:  # not after the sizes before it (the first is
            _prepare(settings, img_size, [])  # prepared at once, as it is timed)
    for img_size in settings.img_sizes:
        rows += _run_size(settings, img_size, peaks, skipped, share)
    if not peaks:  # --sweep: every model skipped at every size
        raise BenchError(
            f"no model could run at any of the sizes {', '.join(map(str, settings.img_sizes))} "
            "(the warnings above say why); give other sizes or models"
        )
    environment["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    if settings.device == "cpu":
        environment["cpu_share"] = share.of(environment["threads"])
    peak = Spread.of(peaks)
    for row in rows:
        achieved = 2 * row.gflops_complete * row.throughput.median
        row.peak_fraction = achieved / peak.median
    settings_dict = asdict(settings) | {"baseline": settings.baseline_model()}
    return BenchResult(environment, settings_dict, peak, rows, skipped)


def _prepare(settings: BenchSettings, img_size: int, skipped: list[dict]) -> tuple[dict, ...]:
    """Every model built for ``img_size`` with its inputs, counts and clip length: the models
    to time in inference, then those to train (the same, but for timm models that
    re-parameterize for inference, FastViT and the like: fused to infer, as deployed, and
    trained as they are).

    A model that cannot be built or run at this size stops the run with one line, or, with
    ``skip_unsupported``, is left out at this size and noted in ``skipped``.
    """
    s, device, batch = settings, settings.device, settings.batch_at(img_size)
    models, inputs, flops, frames, trained = {}, {}, {}, {}, {}
    for name in official.timed_models(s.models, s.official):
        try:
            if name.startswith(official.PREFIX):
                model = official.build_official(s.official, name[len(official.PREFIX) :],
                                                s.num_classes).to(device).eval()  # fmt: skip
            else:
                model = build_model(name, img_size, s.num_classes, s.num_frames).to(device).eval()
            trainable = model
            if name not in MODELS and any(hasattr(m, "reparameterize") for m in model.modules()):
                from timm.models import reparameterize_model

                model = reparameterize_model(model, inplace=not s.train)  # a copy to train
            shape = sample_shape(model, img_size)
            count = count_flops(model, shape)  # one forward pass at this size
        except BenchError:
            raise
        except Exception as exc:  # any model, any failure: the size is what it cannot take
            root = exc.__cause__ or exc  # the model's own error, not count_flops' advice
            reason = f"{type(root).__name__}: {str(root).splitlines()[0] if str(root) else ''}"
            if not s.skip_unsupported:
                raise BenchError(
                    f"{name} cannot take {img_size} px inputs ({reason}); drop that model or size"
                ) from None
            log.warning("%s cannot take %d px inputs (%s); skipped at that size", name, img_size,
                        reason)  # fmt: skip
            skipped.append({"model": name, "img_size": img_size, "reason": reason})
            continue
        if s.train and s.grad_checkpointing:
            _check_grad_checkpointing(name, trainable)
        if s.train:
            _check_training_step(name, trainable, shape, s)
        models[name], trained[name] = model, trainable
        frames[name] = shape[1] if len(shape) == 4 else None
        flops[name] = (count_params(model), count.gflops_paper, count.gflops_complete)
        x = torch.randn(batch, *shape, device=device)
        inputs[name] = {"batch": x, "single": x[:1].clone()}
    return models, inputs, flops, frames, trained


def _run_size(
    settings: BenchSettings,
    img_size: int,
    peaks: list[float],
    skipped: list[dict],
    share: CpuShare,
) -> list[BenchRow]:
    s, device, batch = settings, settings.device, settings.batch_at(img_size)
    models, inputs, flops, frames, trained = _prepare(settings, img_size, skipped)
    if not models:
        return []
    throughput: dict[str, list[float]] = {n: [] for n in models}
    latency: dict[str, list[float]] = {n: [] for n in models}
    memory: dict[str, float | None] = {}
    steps = len(models) * (s.warmup + s.repeats) + s.repeats
    with tqdm(total=steps, desc=f"inference {img_size}px", disable=None) as bar:
        with torch.inference_mode(), _autocast(s), packed_weights():
            for name, model in models.items():
                x = inputs[name]
                for _ in range(s.warmup):
                    model(x["batch"])
                    model(x["single"])
                    bar.update()
                if not s.warmup:  # one call first all the same: the packed weights are not
                    model(x["batch"])  # the call's memory (made on a weight's first use)
                memory[name] = peak_memory_mb(lambda m=model, x=x: m(x["batch"]), device)
            for _ in range(s.repeats):
                peaks.append(matmul_peak(device, s.dtype, min_time=min(s.min_time, 0.5)))
                bar.update()
                for name, model in models.items():
                    x = inputs[name]
                    times = timed(lambda m=model, x=x: m(x["batch"]), device, s.min_time, share)
                    throughput[name].append(batch * len(times) / sum(times))
                    times = timed(lambda m=model, x=x: m(x["single"]), device, s.min_time, share)
                    latency[name] += [1e3 * t for t in times]
                    bar.update()
    train, train_memory = (
        _train_rounds(settings, trained, img_size, share) if s.train else (None, {})
    )
    base = s.baseline_model()
    rows = []
    for name in models:
        params, gflops_paper, gflops_complete = flops[name]
        ratios = {}  # none at a size the baseline was skipped at
        if base in models:
            ratios["throughput"] = _median_ratio(throughput[name], throughput[base])
            ratios["latency"] = statistics.median(latency[base]) / statistics.median(latency[name])
            if train is not None:
                ratios["train"] = _median_ratio(train[name], train[base])
        theirs = official.official_name(name)
        if theirs in models:  # against the authors' implementation of the same architecture
            ratios["authors_throughput"] = _median_ratio(throughput[name], throughput[theirs])
            ratios["authors_latency"] = statistics.median(latency[theirs]) / statistics.median(
                latency[name]
            )
            if train is not None:
                ratios["authors_train"] = _median_ratio(train[name], train[theirs])
        rows.append(
            BenchRow(
                model=name,
                img_size=img_size,
                batch_size=batch,
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


def _check_training_step(name: str, model: nn.Module, shape: tuple, s: BenchSettings) -> None:
    """Fail before any timing where ``model``'s training step cannot run (a BatchNorm given
    batches of one): a failure after the inference rounds would lose them. One small step
    (at most 2 images), no update."""
    x = torch.randn(min(s.train_batch_size, 2), *shape, device=s.device)
    y = torch.zeros(len(x), dtype=torch.long, device=s.device)
    try:
        model.train()
        with _autocast(s):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
    except Exception as exc:  # any model, any failure: said with the model's name
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        raise BenchError(
            f"{name}: its training step fails ({reason}); drop it from --models, change "
            "--train-batch-size, or time inference alone with --no-train"
        ) from None
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


def _check_grad_checkpointing(name: str, model: nn.Module) -> None:
    """Fail before any timing if ``model`` cannot checkpoint (timm asserts in some models)."""
    try:
        model.set_grad_checkpointing(True)
        model.set_grad_checkpointing(False)
    except (AttributeError, AssertionError, NotImplementedError) as exc:
        drop = "--official" if name.startswith(official.PREFIX) else "that model"
        raise BenchError(
            f"{name} does not support gradient checkpointing ({exc or type(exc).__name__}); "
            f"drop --grad-checkpointing or {drop}"
        ) from None


def _median_ratio(values: list[float], baseline: list[float]) -> float:
    return statistics.median(a / b for a, b in zip(values, baseline))


def _train_rounds(
    settings: BenchSettings, models: dict[str, nn.Module], img_size: int, share: CpuShare
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
        optimizer = build_optimizer(model, 1e-5, 0.05)  # the trainer's AdamW (fused update)
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
                times = timed(steps[name], device, s.min_time, share)
                result[name].append(s.train_batch_size * len(times) / sum(times))
                bar.update()
        for model in models.values():
            model.eval()
            if s.grad_checkpointing:
                model.set_grad_checkpointing(False)
    return result, memory
