"""Multi-view video evaluation: average each video's class scores over its clips and crops.

The video SparseFormer (Gao et al., ICLR 2024, Sec. 5) is tested, like other Kinetics models,
on several clips x crops per video; the prediction is the mean of the views' softmax scores.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

__all__ = ["view_scores", "evaluate_views"]


@torch.no_grad()
def view_scores(model: nn.Module, clips: Tensor) -> Tensor:
    """Class probabilities averaged over views.

    Args:
        model: a video classifier taking ``(B, 3, T, H, W)``.
        clips: ``(B, 3, T, H, W)`` (one view) or ``(B, V, 3, T, H, W)``.

    Returns:
        ``(B, classes)`` mean softmax scores.
    """
    if clips.dim() == 5:
        clips = clips.unsqueeze(1)  # (B, 3, T, H, W) -> (B, 1, 3, T, H, W)
    B, V = clips.shape[:2]
    logits = model(clips.flatten(0, 1))  # (B, V, 3, T, H, W) -> (B*V, 3, T, H, W)
    return logits.float().softmax(-1).reshape(B, V, -1).mean(1)  # (B*V, K) -> (B, K)


@torch.no_grad()
def evaluate_views(
    model: nn.Module, loader: DataLoader, device: torch.device | str = "cpu"
) -> dict[str, float]:
    """Top-1 accuracy and NLL of view-averaged scores over a loader of ``(clips, labels)``.

    Returns:
        ``{"acc1": percent, "loss": mean NLL of the averaged scores, "num_samples": n}``.
    """
    was_training = model.training
    model.eval()
    correct, nll, n = 0, 0.0, 0
    for clips, labels in loader:
        labels = labels.to(device)
        probs = view_scores(model, clips.to(device))
        correct += int((probs.argmax(-1) == labels).sum())
        nll += float(F.nll_loss(probs.clamp_min(1e-12).log(), labels, reduction="sum"))
        n += labels.numel()
    model.train(was_training)
    return {"acc1": 100.0 * correct / max(n, 1), "loss": nll / max(n, 1), "num_samples": n}
