"""Sampling points from RoIs and offsets, and bilinear (2-D) / trilinear (3-D) sampling.

SparseFormer (Gao et al., ICLR 2024), Sec. 3.2; ported from the official code
(github.com/showlab/sparseformer). All geometry here runs in float32, whatever autocast says:
coordinates are fractions of the image, and bf16's 8-bit mantissa would quantise a point on a
224-pixel image to ~1 pixel and a RoI update to nothing.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

from sparseformer.layers.linear import is_tracing

__all__ = [
    "grid_offsets",
    "standardize_offsets",
    "sampling_points",
    "clamp_coordinate_grad",
    "sample_features",
    "sample_features_gather",
    "sample_features_grid",
    "sample_features_reference",
    "fp32_geometry",
    "at_least_fp32",
]


def at_least_fp32(t: Tensor) -> Tensor:
    """``t`` in float32, or kept in float64: half types are raised, nothing is lowered."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def fp32_geometry(device_type: str) -> AbstractContextManager:
    """A context that disables autocast, so the geometry inside runs in float32 (nothing to
    disable on devices without autocast, such as ``meta``)."""
    if not torch.amp.is_autocast_available(device_type):
        return nullcontext()
    return torch.autocast(device_type=device_type, enabled=False)


def grid_offsets(num_points: int, dims: int = 2) -> Tensor:
    """The initial offsets: a regular ``k x k`` grid centred on the RoI, ``k = sqrt(P)``.

    Offsets are ``(i + 0.5) / k - 0.5`` per axis, x varying fastest; the time axis (D=3) starts
    at 0. Returns ``(P, D)``.
    """
    k = math.isqrt(num_points)
    if k * k != num_points:
        raise ValueError(f"grid offsets need a square number of points, got {num_points}")
    ticks = (torch.arange(k, dtype=torch.float32) + 0.5) / k - 0.5
    y, x = torch.meshgrid(ticks, ticks, indexing="ij")  # (k, k) each, x fastest
    xy = torch.stack([x, y], dim=-1).reshape(num_points, 2)  # (k, k, 2) -> (P, 2)
    if dims == 3:
        xy = torch.cat([xy, xy.new_zeros(num_points, 1)], dim=-1)  # (P, 2) -> (P, 3)
    return xy


def standardize_offsets(offsets: Tensor, eps: float = 1e-7) -> Tensor:
    """Standardise each token's offsets per axis over its points, scaled to 1/3 sigma.

    Dividing by three standard deviations keeps ~99.7% of points inside ``[-1/2, 1/2]`` of the
    RoI when offsets are roughly normal, whatever scale the projection outputs; the mean is
    removed so that the RoI centre, not the offsets, decides where a token looks.

    Args:
        offsets: ``(B, N, P, D)``.

    Returns:
        ``(B, N, P, D)`` with zero mean and std ``1/3`` (unbiased) along P.
    """
    if offsets.numel() == 0:  # an empty batch: no statistics (torch would warn of them)
        return offsets * 1
    mean = offsets.mean(dim=2, keepdim=True)
    std = offsets.std(dim=2, keepdim=True)  # unbiased, as in the official code
    return (offsets - mean) / (3 * (std + eps))


def sampling_points(rois: Tensor, offsets: Tensor) -> Tensor:
    """Absolute sampling points ``c + o * (p2 - p1)`` in normalised image coordinates.

    The size is signed (not ``abs``), as in the official code.

    Args:
        rois: ``(B, N, 2D)`` corners.
        offsets: ``(B, N, P, D)`` standardised offsets.

    Returns:
        ``(B, N, P, D)`` points, possibly outside ``[0, 1]``.
    """
    p1, p2 = rois.unsqueeze(2).chunk(2, dim=-1)  # (B, N, 2D) -> 2 x (B, N, 1, D)
    return (p1 + p2) / 2 + offsets * (p2 - p1)


class _ClampGrad(torch.autograd.Function):
    """Identity forward; backward clamps the incoming gradient to ``[-bound, bound]``
    (``bound`` a Python float, or a scalar tensor on the gradient's device)."""

    generate_vmap_rule = True  # torch.func.vmap (per-sample gradients) batches it as it is

    @staticmethod
    def forward(x: Tensor, bound: float | Tensor) -> Tensor:  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # separate from forward, for torch.func
        bound = inputs[1]
        if torch.is_tensor(bound):
            ctx.save_for_backward(bound)
        ctx.bound = None if torch.is_tensor(bound) else bound

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        if ctx.bound is not None:  # a float: no tensor, no host-to-device copy (a GPU sync)
            return grad.clamp(-ctx.bound, ctx.bound), None
        (bound,) = ctx.saved_tensors
        return torch.minimum(torch.maximum(grad, -bound), bound), None


def clamp_coordinate_grad(points: Tensor, bound: float | Tensor) -> Tensor:
    """Clamp the gradient reaching sampling coordinates to ``[-bound, bound]`` elementwise.

    Bilinear interpolation gives a coordinate a gradient from only the 4 (8 in 3-D) nearest
    feature cells, scaled by the feature difference across a cell: a large, noisy signal that
    can fling a point far away in one step. The official code bounds it by ``1/H`` (about one
    feature cell) times the fp16 loss scale; the caller passes that product explicitly.

    Args:
        points: any shape.
        bound: a positive float or scalar tensor (a GradScaler's scale may be a tensor).
    """
    if not (torch.is_grad_enabled() and points.requires_grad) or torch.jit.is_tracing():
        return points  # no backward, nothing to clamp (and no node in an exported graph)
    if isinstance(bound, torch.SymFloat):  # torch.export with a symbolic height: do not
        return _ClampGrad.apply(points, bound)  # specialise the graph on it (export keeps no clamp)
    if not torch.is_tensor(bound):
        return _ClampGrad.apply(points, float(bound))
    return _ClampGrad.apply(points, bound.to(device=points.device, dtype=points.dtype))


def sample_features(feats: Tensor, points: Tensor, padding_mode: str = "zeros") -> Tensor:
    """Read ``feats`` at ``points`` by bilinear (2-D) or trilinear (3-D) interpolation.

    A point ``p`` in ``[0, 1]`` maps to ``grid_sample``'s ``2p - 1`` with
    ``align_corners=False``: 0 and 1 are the outer edges of the first and last pixels.

    Args:
        feats: ``(B, C, H, W)`` or ``(B, C, T, H, W)``.
        points: ``(B, N, P, 2)`` as ``(x, y)`` or ``(B, N, P, 3)`` as ``(x, y, t)``.
        padding_mode: ``"zeros"`` (v1) or ``"border"``.

    Returns:
        ``(B, N, P, C)`` sampled values.
    """
    if _gather_applies(feats, points):
        return sample_features_gather(feats, points, padding_mode)
    return sample_features_grid(feats, points, padding_mode)


# CPU inference gathers from this many sampling points per call, grid_sample below
_GATHER_MIN_POINTS = 16384
# ... and only from maps of at least this many channels; training also needs maps of at least
# this many pixels per image (per clip for video)
_GATHER_MIN_CHANNELS = 64
_GATHER_MIN_PIXELS = 32 * 32


def _gather_applies(feats: Tensor, points: Tensor) -> bool:
    """CPU training takes :func:`sample_features_gather` on wide, large maps (SparseFormer-T's
    96 channels over 56 x 56: forward and backward 129 -> 55 ms for a batch of 32, 1 thread);
    so does CPU inference on many points of wide maps, where it also spares mixing a copy of
    ``grid_sample``'s permuted output (SparseFormer-T, batch 32, alternated in one process: 3-6%
    faster on 1 and 2 threads). The gather costs about the same per point whatever the width,
    ``grid_sample`` per point and channel: on narrow maps it wins (the demo's 32 channels over
    12 x 12, batch 128, 2 threads: forward and backward 17.0 -> 4.7 ms, inference 1.9 -> 1.5
    ms), and so it does on few points (batch 1: 46.6 against 48.3 ms) and, in training, on
    small maps (96 channels over 12 x 12, batch 128: 18.8 -> 14.1 ms)."""
    if not (
        feats.device.type == "cpu" and not is_tracing() and _get_current_dispatch_mode() is None
    ):
        return False
    if feats.shape[1] < _GATHER_MIN_CHANNELS:
        return False
    if torch.is_grad_enabled() and (feats.requires_grad or points.requires_grad):
        return math.prod(feats.shape[2:]) >= _GATHER_MIN_PIXELS
    return points[..., 0].numel() >= _GATHER_MIN_POINTS


def sample_features_grid(feats: Tensor, points: Tensor, padding_mode: str = "zeros") -> Tensor:
    """:func:`sample_features` by ``grid_sample``: on GPUs, under tracing and export (ONNX
    has the operator), on CPU maps under 64 channels, in CPU inference on few points and CPU
    training on maps under 32 x 32 pixels, and as the reference of
    :func:`sample_features_gather`."""
    grid = 2 * points - 1
    if feats.dim() == 4:
        out = F.grid_sample(feats, grid, "bilinear", padding_mode, align_corners=False)
        return out.permute(0, 2, 3, 1)  # (B, C, N, P) -> (B, N, P, C)
    grid = grid.unsqueeze(3)  # (B, N, P, 3) -> (B, N, P, 1, 3)
    out = F.grid_sample(feats, grid, "bilinear", padding_mode, align_corners=False)
    return out.squeeze(4).permute(0, 2, 3, 1)  # (B, C, N, P, 1) -> (B, N, P, C)


def sample_features_gather(feats: Tensor, points: Tensor, padding_mode: str = "zeros") -> Tensor:
    """:func:`sample_features` as a weighted sum of ``2^D`` rows of the channels-last map.

    On CPU, ``grid_sample`` reads a channels-last map one strided value at a time and its
    backward scatters one value at a time, into a zeroed gradient it allocates per call: 129 ms
    of forward and backward for SparseFormer-T's 32 x 49 x 36 points. Read as a table of
    ``B*H*W`` rows of ``C`` channels (a view of the channels-last map), bilinear sampling is an
    ``embedding_bag`` over each point's 4 corner rows weighted by the bilinear weights: the
    rows are read and their gradients added whole, and the weights' gradients (dot products
    with the rows) are what reaches the coordinates (55 ms). The output is ``(B, N, P, C)`` in
    memory, the layout adaptive mixing reads. The weights and the summation order are those of
    ``grid_sample`` (``align_corners=False``); out-of-map corners get weight 0 (``"zeros"``),
    or the coordinates are clamped into the map first (``"border"``).
    """
    B, C, *spatial = feats.shape  # spatial (H, W) or (T, H, W)
    _, N, P, dims = points.shape
    sizes = spatial[::-1]  # the point coordinates' axis order: W, H[, T]
    strides = [math.prod(sizes[:a]) for a in range(dims)]  # row stride of x, y[, t]
    lows, fracs, inside = [], [], []
    for a, size in enumerate(sizes):
        pos = points[..., a] * size - 0.5  # (B, N, P), pixel i's centre at i
        if padding_mode == "border":
            pos = pos.clamp(0, size - 1)
        low = pos.detach().floor()
        lows.append(low)
        fracs.append((low + 1 - pos, pos - low))  # weights of the low and high neighbour
        inside.append(((low >= 0) & (low <= size - 1), (low >= -1) & (low <= size - 2)))
    weights, rows = [], []
    first_row = (torch.arange(B, device=points.device) * math.prod(sizes)).view(B, 1, 1)
    for corner in range(2**dims):  # x fastest, as grid_sample sums its corners
        bits = [(corner >> a) & 1 for a in range(dims)]
        weight = math.prod(fracs[a][bit] for a, bit in enumerate(bits))
        valid = _all([inside[a][bit] for a, bit in enumerate(bits)])
        row = first_row + sum((lows[a] + bit).long() * strides[a] for a, bit in enumerate(bits))
        weights.append(weight * valid)
        rows.append(torch.where(valid, row, 0))
    weights = torch.stack(weights, -1).reshape(B * N * P, 2**dims)  # (B, N, P, 2^D) -> (S, 2^D)
    rows = torch.stack(rows, -1).reshape(B * N * P, 2**dims)
    dim_order = (0, *range(2, feats.dim()), 1)
    table = feats.permute(dim_order).reshape(-1, C)  # (B, C, [T,] H, W) -> (B*[T*]H*W, C)
    out = F.embedding_bag(rows, table, mode="sum", per_sample_weights=weights.to(table.dtype))
    return out.view(B, N, P, C)  # (S, C) -> (B, N, P, C)


def _all(masks: list[Tensor]) -> Tensor:
    out = masks[0]
    for m in masks[1:]:
        out = out & m
    return out


def sample_features_reference(feats: Tensor, points: Tensor) -> Tensor:
    """Slow, obviously correct zero-padded bilinear/trilinear sampling, for tests.

    Same contract as :func:`sample_features` with ``padding_mode="zeros"``: pixel ``i`` covers
    ``[i/W, (i+1)/W]`` so its centre is at ``(i + 0.5) / W``.
    """
    spatial = feats.shape[2:]  # (H, W) or (T, H, W)
    dims = len(spatial)
    B, N, P, _ = points.shape
    out = feats.new_zeros(B, N, P, feats.shape[1])
    sizes = list(reversed(spatial))  # axis order of the point coordinates: W, H[, T]
    for b in range(B):
        for n in range(N):
            for p in range(P):
                # continuous pixel coordinate, centre of pixel i at i
                pos = [points[b, n, p, a] * sizes[a] - 0.5 for a in range(dims)]
                lo = [int(math.floor(float(v))) for v in pos]
                value = feats.new_zeros(feats.shape[1])
                for corner in range(2**dims):
                    idx, weight = [], 1.0
                    for a in range(dims):
                        i = lo[a] + ((corner >> a) & 1)
                        frac = pos[a] - lo[a]
                        weight = weight * (frac if (corner >> a) & 1 else 1 - frac)
                        idx.append(i)
                    if all(0 <= idx[a] < sizes[a] for a in range(dims)):
                        value = value + weight * feats[(b, slice(None), *reversed(idx))]
                out[b, n, p] = value
    return out
