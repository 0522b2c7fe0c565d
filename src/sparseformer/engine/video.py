"""Multi-view video evaluation: average each video's class scores over its clips and crops.

The video SparseFormer (Gao et al., ICLR 2024, Sec. 5) is tested, like other Kinetics models,
on several clips x crops per video; the prediction is the mean of the views' softmax scores.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from sparseformer.data.video import ClipSpec, video_file_views

__all__ = ["ViewAveraging", "view_scores", "evaluate_views", "predict_video_file"]


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
    # one view at a time: the memory of a (B, 3, T, H, W) batch, not of B x V clips
    probs = sum(model(clips[:, v]).float().softmax(-1) for v in range(clips.shape[1]))
    return probs / clips.shape[1]


@torch.no_grad()
def evaluate_views(
    model: nn.Module, loader: DataLoader, device: torch.device | str = "cpu"
) -> dict[str, float]:
    """Top-1 accuracy and NLL of view-averaged scores over a loader of ``(clips, labels)``.

    Returns:
        ``{"acc1": percent, "loss": mean NLL of the averaged scores, "num_samples": n,
        "num_correct": top-1 hits}``.
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
    return {
        "acc1": 100.0 * correct / max(n, 1),
        "loss": nll / max(n, 1),
        "num_samples": n,
        "num_correct": correct,
    }


class ViewAveraging(nn.Module):
    """Wrap a video classifier so that ``(B, V, 3, T, H, W)`` batches give one prediction per
    video: the log of the views' mean softmax scores (valid logits: their softmax is the mean
    score, and cross-entropy on them is the NLL of the averaged prediction). Plain
    ``(B, 3, T, H, W)`` clips pass straight to the model.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 6:
            return self.model(x)
        return view_scores(self.model, x).clamp_min(1e-12).log()  # (B, K)


@torch.no_grad()
def predict_video_file(
    model: nn.Module, path: str, spec: ClipSpec, device: torch.device | str = "cpu"
) -> Tensor:
    """Class probabilities ``(classes,)`` of one video file, averaged over ``spec``'s views.

    Raises:
        VideoReadError: unreadable file; VideoDataError: too short for one clip.
    """
    views = video_file_views(path, spec).to(device)  # (V, 3, T, S, S)
    model.eval()
    return view_scores(model, views.unsqueeze(0))[0]
