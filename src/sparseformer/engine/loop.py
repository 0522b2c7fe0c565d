"""One training epoch and one evaluation pass: explicit collaborators in, metric dicts out.

In the manner of DeiT's ``engine.py``: the caller hands over the model, the optimizer, the
schedule, the loss, Mixup, the EMA and the GradScaler; nothing here reads options or ranks on
its own. The engine owns precision (autocast, GradScaler, gradient clipping); a SparseFormer
receives the scaler's scale only as ``coord_grad_scale`` for its coordinate-gradient clamp.
Inputs may be images ``(B, C, H, W)`` or clips ``(B, C, T, H, W)``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm import tqdm

from sparseformer.engine.distributed import DistInfo, all_reduce_sum
from sparseformer.engine.metrics import TOP5_MIN_CLASSES, top5_or_none
from sparseformer.engine.optim import set_lr
from sparseformer.layers.linear import packed_weights
from sparseformer.weights.loading import is_sparseformer, non_finite, some

__all__ = [
    "check_finite_weights",
    "NonFiniteLossError",
    "BatchPrep",
    "StepTools",
    "EpochProgress",
    "train_one_epoch",
    "evaluate",
]

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The training loss, or the weights, became NaN or infinite."""


def check_finite_weights(model: nn.Module, step: int) -> None:
    """Refuse weights a diverged step left NaN or infinite, before they are saved or scored.

    Raises:
        NonFiniteLossError: naming the step.
    """
    broken = non_finite(model.named_parameters())
    if broken:
        raise NonFiniteLossError(
            f"the weights are NaN or infinite after step {step} ({some(broken)})"
        )


@dataclass
class BatchPrep:
    """Moves a batch to the device and normalises it.

    uint8 images (the fast loader path: decoding and augmentation produce bytes, normalisation
    runs once per batch) become ``(x - mean) / std`` in float32; float inputs pass unchanged.
    Random erasing, when given, runs on the normalised training batch (as timm's prefetcher).
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    device: torch.device
    random_erasing: Callable[[Tensor], Tensor] | None = None

    def __call__(self, x: Tensor, y: Tensor, train: bool) -> tuple[Tensor, Tensor]:
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        if x.dtype == torch.uint8:
            mean, std = self._scaled(x.ndim)
            x = (x.float() - mean) / std
        if train and self.random_erasing is not None and x.ndim == 4:
            x = self.random_erasing(x)
        return x, y

    def _scaled(self, ndim: int) -> tuple[Tensor, Tensor]:
        """``255 x`` mean and std on the device, shaped to broadcast over ``ndim``-D batches;
        made once (a host-to-device copy per batch would stall a GPU each step), and made
        again when the device, mean or std change."""
        key = (ndim, str(self.device), tuple(self.mean), tuple(self.std))
        cache = self.__dict__.setdefault("_cache", {})
        if key not in cache:
            shape = (1, -1) + (1,) * (ndim - 2)  # broadcast over (B, C, [T,] H, W)
            cache[key] = tuple(
                torch.tensor(v, device=self.device).view(shape) * 255 for v in (self.mean, self.std)
            )
        return cache[key]

    def __getstate__(self) -> dict:  # pickled without the cache (it may hold GPU tensors)
        return {k: v for k, v in self.__dict__.items() if k != "_cache"}


@dataclass
class StepTools:
    """What a training step needs besides model, data and optimizer.

    Attributes:
        criterion: loss on (logits, targets); soft targets when Mixup is on.
        schedule: learning rate as a pure function of the global step.
        prep: device transfer and normalisation.
        amp_dtype: autocast dtype (``None`` = fp32, no autocast).
        scaler: fp16 GradScaler, or ``None``.
        clip_grad: gradient-norm clip, or ``None``.
        mixup: timm ``Mixup`` (batch -> mixed batch, soft targets), or ``None``.
        ema: timm ``ModelEmaV3``, or ``None``.
        objective: the loss from ``(model, images, targets)`` instead of ``criterion`` on the
            logits (teacher alignment: the model and its teacher see the same batch).
    """

    criterion: nn.Module
    schedule: Callable[[int], float]  # engine.optim's LRSchedule or TimmCosineSchedule
    prep: BatchPrep
    amp_dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None
    clip_grad: float | None = None
    mixup: Callable | None = None
    ema: nn.Module | None = None
    objective: Callable[[nn.Module, Tensor, Tensor], Tensor] | None = None


@dataclass
class EpochProgress:
    """Where this rank's epoch stands: batches trained, the loss summed over its images (a
    float64 tensor on the device while training), the images and the seconds so far."""

    batches: int = 0
    loss_sum: Tensor | float = 0.0
    seen: int = 0
    seconds: float = 0.0


def _scale_tensor(scaler) -> Tensor | float:
    """A GradScaler's scale without a device-to-host read: its scale tensor where this torch
    exposes it (``_get_scale_async``), else the float ``get_scale()`` (one sync a step)."""
    scale = getattr(scaler, "_get_scale_async", None)
    value = scale() if scale is not None else None
    return value if torch.is_tensor(value) else scaler.get_scale()


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def _backward_and_step(
    model: nn.Module, loss: Tensor, optimizer: torch.optim.Optimizer, tools: StepTools
) -> None:
    """Gradients of ``loss`` (scaled by the fp16 GradScaler, when there is one), clipped to
    ``tools.clip_grad`` (after unscaling), then one optimizer step."""
    optimizer.zero_grad(set_to_none=True)
    if tools.scaler is not None:
        tools.scaler.scale(loss).backward()
        if tools.clip_grad is not None:
            tools.scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), tools.clip_grad)
        tools.scaler.step(optimizer)
        tools.scaler.update()
    else:
        loss.backward()
        if tools.clip_grad is not None:
            nn.utils.clip_grad_norm_(model.parameters(), tools.clip_grad)
        optimizer.step()


def train_one_epoch(
    model: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    tools: StepTools,
    step: int,
    dist: DistInfo | None = None,
    progress: bool = False,
    check_every: int = 10,
    start: EpochProgress | None = None,
    after_step: Callable[[EpochProgress, bool], bool] | None = None,
) -> dict[str, float]:
    """Train for one pass over ``loader``, starting at global step ``step``.

    Args:
        dist: the process group (default: one process, no group).
        start: an epoch resumed part-way (``loader`` then yields its remaining batches).
        after_step: ``(progress, ranks_can_agree) -> stop`` after each step; the ranks can
            agree every ``check_every`` steps (every step in a world of one).

    Returns:
        ``train_loss`` (mean over ranks and steps), ``lr`` (at the last step), ``steps`` (the
        new global step), ``images_per_second`` (all ranks), ``epoch_seconds``, ``stopped``
        (1.0 when ``after_step`` stopped the epoch).

    Raises:
        NonFiniteLossError: the loss is NaN/inf (checked every ``check_every`` steps).
    """
    dist = dist or DistInfo()
    model.train()
    device = tools.prep.device
    sparse = is_sparseformer(model)
    start = start or EpochProgress()
    loss_sum = torch.tensor(float(start.loss_sum), device=device, dtype=torch.float64)
    seen, stopped = start.seen, False
    lr = tools.schedule(max(step - 1, 0))  # the last step's, where none is left to take
    began = time.perf_counter() - start.seconds
    bar = tqdm(loader, desc="train", leave=False, disable=not progress, dynamic_ncols=True)
    for i, (x, y) in enumerate(bar, start=start.batches):
        x, y = tools.prep(x, y, train=True)
        if tools.mixup is not None:
            x, y = tools.mixup(x, y)
        lr = tools.schedule(step)
        set_lr(optimizer, lr)
        with _autocast(device, tools.amp_dtype):
            loss = _training_loss(model, x, y, tools, sparse)
        _backward_and_step(model, loss, optimizer, tools)
        step += 1
        if tools.ema is not None:
            tools.ema.update(getattr(model, "module", model), step=step)
        loss_sum += loss.detach().double() * len(y)
        seen += len(y)
        if (i + 1) % check_every == 0:
            sums = _summed(loss_sum, seen, dist)
            value = (sums[0] / sums[1]).item()
            if not math.isfinite(value):
                raise NonFiniteLossError(f"loss is {value} at step {step}")
            bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.2e}")
        if after_step is not None:
            now = EpochProgress(i + 1, loss_sum, seen, time.perf_counter() - began)
            if stopped := after_step(now, not dist.enabled or (i + 1) % check_every == 0):
                break
    seconds = time.perf_counter() - began
    totals = _summed(loss_sum, seen, dist)
    mean_loss = (totals[0] / totals[1].clamp(min=1)).item()
    if not math.isfinite(mean_loss):
        raise NonFiniteLossError(f"loss is {mean_loss} at step {step}")
    return {
        "train_loss": mean_loss,
        "lr": lr,
        "steps": step,
        "images_per_second": totals[1].item() / max(seconds, 1e-9),
        "epoch_seconds": seconds,
        "stopped": float(stopped),
    }


def _training_loss(model: nn.Module, x: Tensor, y: Tensor, tools: StepTools, sparse: bool):
    """The step's loss: the run's objective, or the criterion on the logits."""
    if tools.objective is not None:
        return tools.objective(model, x, y)
    if sparse and tools.scaler is not None:
        # the clamp keeps the coordinate gradient's size independent of fp16 loss scale
        logits = model(x, coord_grad_scale=_scale_tensor(tools.scaler))
    else:
        logits = model(x)
    # in float32: CPU autocast leaves log_softmax (label smoothing's) in bf16, as CUDA's does not
    return tools.criterion(logits.float(), y)


def _summed(loss_sum: Tensor, seen: int, dist: DistInfo) -> Tensor:
    """``[loss sum, images]`` summed over ranks. Every rank runs the same number of steps, so
    checked every ``check_every`` steps all stop together on a non-finite loss instead of one
    leaving the others waiting in DDP's gradient all-reduce."""
    return all_reduce_sum(
        torch.stack([loss_sum, torch.tensor(float(seen), **_like(loss_sum))]), dist
    )


def _like(t: Tensor) -> dict:
    return {"device": t.device, "dtype": t.dtype}


@packed_weights()  # the weights do not change during an evaluation
@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    prep: BatchPrep,
    dist: DistInfo | None = None,
    amp_dtype: torch.dtype | None = None,
    progress: bool = False,
    confusion: Tensor | None = None,
) -> dict[str, float | None]:
    """Top-1/top-5 accuracy (percent) and cross-entropy over ``loader``, summed over ranks.

    Args:
        dist: the process group (default: one process, no group).
        confusion: ``(classes, classes)`` counts to add this rank's ``[target, prediction]``
            pairs to (top-1), or ``None``.

    Returns:
        ``loss``, ``acc1``, ``acc5``, ``images``, ``non_finite`` (images whose outputs are NaN
        or infinite: scored as wrong, left out of ``confusion`` and of the loss, which is NaN
        when every output is); ``acc5`` is ``None`` for 5 classes or fewer
        (:func:`sparseformer.engine.metrics.top5_or_none`), all three are ``None`` when no
        image was scored.
    """
    dist = dist or DistInfo()
    model.eval()
    device = prep.device
    sums = torch.zeros(5, dtype=torch.float64, device=device)  # loss, top1, top5, count, bad
    num_classes = TOP5_MIN_CLASSES  # read from the logits; a rank that saw no batch keeps top-5
    for x, y in tqdm(loader, desc="eval", leave=False, disable=not progress, dynamic_ncols=True):
        if len(y) == 0:  # every image of the batch failed to decode (logged by the data set)
            continue
        x, y = prep(x, y, train=False)
        with _autocast(device, amp_dtype):
            logits = model(x)
        logits = logits.float()
        num_classes = logits.shape[-1]
        k = min(5, num_classes)
        top = logits.topk(k, dim=-1).indices  # (B, k)
        finite = torch.isfinite(logits).all(dim=-1)  # NaN outputs rank class 0 first: wrong
        hit = (top == y[:, None]) & finite[:, None]  # (B, k)
        if confusion is not None:  # a non-finite row adds 0: no mask, so no device sync
            pairs = (y.to(confusion.device), top[:, 0].to(confusion.device))
            confusion.index_put_(pairs, finite.to(confusion.device, confusion.dtype), True)
        losses = nn.functional.cross_entropy(logits, y, reduction="none")
        sums += torch.stack(
            [
                torch.where(finite, losses, 0.0).sum().double(),
                hit[:, 0].sum().double(),
                hit.any(dim=-1).sum().double(),
                torch.tensor(float(len(y)), dtype=torch.float64, device=device),
                (~finite).sum().double(),
            ]
        )
    sums = all_reduce_sum(sums, dist)
    n = sums[3].item()
    if n == 0:  # nothing scored (every file failed to decode): no loss and no accuracy
        return {"loss": None, "acc1": None, "acc5": None, "images": 0, "non_finite": 0}
    finite_n = n - sums[4].item()
    return {
        "loss": sums[0].item() / finite_n if finite_n else float("nan"),  # of finite outputs
        "acc1": 100.0 * sums[1].item() / n,
        "acc5": top5_or_none(100.0 * sums[2].item() / n, num_classes),
        "images": int(n),
        "non_finite": int(sums[4].item()),  # images whose outputs are NaN or infinite
    }
