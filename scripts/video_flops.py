"""Measure the video SparseFormer's cost against frames and tokens: python scripts/video_flops.py

Prints a Markdown table of parameters and GMACs (``sparseformer.count_flops``: the paper's
fvcore-style convention, and complete) for 224 x 224 clips, by counting one forward pass.
"""

from __future__ import annotations

import argparse

import torch

from sparseformer import count_flops, count_params, create_model


def row(name: str, frames: int, replicates: int, size: int) -> str:
    with torch.device("cpu"):
        model = create_model(name, num_frames=frames, replicates=replicates).eval()
    flops = count_flops(model, (3, frames, size, size))
    stem = flops.by_op.get("convolution", 0) / 1e9
    tokens = model.config.num_tokens * replicates
    return (
        f"| {name} | {frames} | {replicates} | {tokens} | {count_params(model) / 1e6:.2f}M "
        f"| {flops.gflops_paper:.2f} | {flops.gflops_complete:.2f} | {stem:.2f} |"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--size", type=int, default=224)
    args = p.parse_args()
    print(
        "| model | frames T | replicates R | tokens N*R | params | GFLOPs (paper) "
        "| GFLOPs (complete) | of which stem |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for frames in (1, 4, 8, 16, 32):
        print(row("video_sparseformer_v1_tiny", frames, 4, args.size), flush=True)
    for replicates in (1, 2, 8):
        print(row("video_sparseformer_v1_tiny", 8, replicates, args.size), flush=True)
    for name in ("video_sparseformer_v1_small", "video_sparseformer_v1_base"):
        print(row(name, 8, 4, args.size), flush=True)


if __name__ == "__main__":
    main()
