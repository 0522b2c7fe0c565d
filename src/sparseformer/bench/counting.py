"""Parameter and FLOP counting in the paper's convention and in full.

SparseFormer (Gao et al., ICLR 2024) reports GFLOPs from fvcore's counter, which counts the
bilinear sampling but not the biased batched matmuls of the adaptive mixing (``baddbmm``). We
count with ``torch.utils.flop_counter.FlopCounterMode`` (which sees through fused attention, so
SDPA is counted) plus an explicit rule for ``grid_sampler``, and report both conventions:

- ``paper``: everything except ``baddbmm`` (any model's: in SparseFormer, adaptive mixing's),
  which reproduces the paper's table for SparseFormer;
- ``complete``: everything, grid sampling included.

All figures are multiply-adds (MACs), the unit the paper calls FLOPs. Elementwise ops,
normalisation and pooling are not counted in either convention. (fvcore itself does count
normalisation, and skips PyTorch's fused attention: its totals for other models differ.)
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

__all__ = ["FlopCount", "count_params", "count_flops"]

_aten = torch.ops.aten
# Bilinear sampling reads 4 corners per output value (trilinear: 8); one MAC per corner.
_CORNERS = {_aten.grid_sampler_2d: 4, _aten.grid_sampler_3d: 8}
# Ops the paper's (fvcore) convention leaves out.
_NOT_IN_PAPER = {"baddbmm"}


def _grid_sampler_flops(corners: int):
    def rule(input_shape, grid_shape, *args, out_shape=None, **kwargs) -> int:
        # FlopCounterMode counts a MAC as 2 FLOPs; keep that unit here.
        numel = 1
        for s in out_shape:
            numel *= s
        return 2 * corners * numel

    return rule


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    # PyTorch's table knows the CUDA attention kernels but not the fused CPU one, which would
    # otherwise silently drop attention from the count.
    return sdpa_flop_count(query_shape, key_shape, value_shape)


@dataclass
class FlopCount:
    """Multiply-adds of one forward pass, by op, in both conventions.

    Attributes:
        complete: every counted op, grid sampling included.
        paper: ``complete`` minus the biased batched matmuls (``baddbmm``), as fvcore counts.
        by_op: MACs per aten op name (``mm``, ``addmm``, ``bmm``, ``baddbmm``, ``convolution``,
            ``_scaled_dot_product_*``, ``grid_sampler_2d``, ...).
        input_shape: the ``(B, C, ...)`` input the count was made for.
    """

    complete: int
    paper: int
    by_op: dict[str, int] = field(default_factory=dict)
    input_shape: tuple[int, ...] = ()

    @property
    def gflops_paper(self) -> float:
        return self.paper / 1e9

    @property
    def gflops_complete(self) -> float:
        return self.complete / 1e9

    def table(self) -> str:
        """A plain-text per-op breakdown."""
        rows = [f"{'op':<48}{'GMACs':>10}  in paper"]
        for name, macs in sorted(self.by_op.items(), key=lambda kv: -kv[1]):
            rows.append(f"{name:<48}{macs / 1e9:>10.4f}  {_in_paper(name)}")
        rows.append(f"{'total (paper convention)':<48}{self.gflops_paper:>10.4f}")
        rows.append(f"{'total (complete)':<48}{self.gflops_complete:>10.4f}")
        return "\n".join(rows)


def _in_paper(op_name: str) -> bool:
    return op_name not in _NOT_IN_PAPER


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (each shared tensor counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_flops(
    model: nn.Module,
    input_size: tuple[int, ...] | torch.Tensor | None = None,
    batch_size: int = 1,
) -> FlopCount:
    """Count one forward pass's multiply-adds.

    Args:
        model: any ``nn.Module`` taking one tensor (SparseFormer or a timm model).
        input_size: ``(C, H, W)``, ``(C, T, H, W)``, or a full shape including the batch, or
            an example input (its shape is taken); default: the model's own (its channels,
            clip length and ``pretrained_cfg`` input size; 224 x 224 when it has none).
        batch_size: used when ``input_size`` has no batch dimension.

    Returns:
        :class:`FlopCount` for the whole batch.

    Raises:
        ValueError: a shape of other than 3 to 5 numbers, or one the model cannot run on.
    """
    if input_size is None:
        input_size = default_input_size(model)
    if isinstance(input_size, torch.Tensor):
        input_size = tuple(input_size.shape)
    if isinstance(input_size, int) or not 3 <= len(input_size) <= 5:
        given = input_size if isinstance(input_size, int) else tuple(input_size)
        raise ValueError(
            f"input_size {given} is not a shape: give (C, H, W) such as (3, 224, 224), "
            "(C, T, H, W) for a video model, or either with the batch first"
        )
    if len(input_size) == 3 and getattr(model, "roi_dims", 2) == 3:
        raise ValueError(
            f"input_size {tuple(input_size)}: a video model takes clips; give (C, T, H, W) "
            "such as (3, 8, 224, 224), or (B, C, T, H, W)"
        )
    if len(input_size) in (3, 4) and not _has_batch(model, input_size):
        shape = (batch_size, *input_size)
    else:
        shape = tuple(input_size)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    mapping = {op: _grid_sampler_flops(c) for op, c in _CORNERS.items()}
    if hasattr(_aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[_aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_sdpa_flops
    counter = FlopCounterMode(display=False, custom_mapping=mapping)
    was_training = model.training
    model.eval()
    # the counter's module tracker follows autograd: a caller's no_grad or inference_mode
    # (where people count) would fail it, and would take other code paths
    try:
        with torch.inference_mode(False), torch.enable_grad(), counter:
            model(torch.zeros(shape, device=device, dtype=dtype))
    except (RuntimeError, IndexError, ValueError, TypeError, AssertionError) as exc:  # the shape
        # most often (timm's models assert their input size)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(
            f"{type(model).__name__} cannot run on the input it was counted with, shape "
            f"{shape} ({first}); give the full shape, batch first (a clip model's: (B, C, T, "
            "H, W))"
        ) from exc
    finally:
        model.train(was_training)
    by_op: dict[str, int] = defaultdict(int)
    for op, flops in counter.get_flop_counts()["Global"].items():
        by_op[getattr(op, "__name__", str(op)).split(".")[0]] += flops // 2
    complete = sum(by_op.values())
    paper = sum(v for k, v in by_op.items() if _in_paper(k))
    return FlopCount(complete, paper, dict(by_op), shape)


def default_input_size(model: nn.Module) -> tuple[int, ...]:
    """``(C, H, W)``, or ``(C, T, H, W)`` for a video SparseFormer: the model's channels and
    clip length, and the spatial size of its ``pretrained_cfg`` (224 x 224 without one)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    _, H, W = cfg.get("input_size") or (3, 224, 224)
    config = getattr(model, "config", None)
    chans = getattr(config, "in_chans", None) or getattr(model, "in_chans", None) or 3
    if getattr(model, "roi_dims", 2) == 3:
        return (chans, config.num_frames, H, W)
    return (chans, H, W)


def _has_batch(model: nn.Module, input_size: tuple[int, ...]) -> bool:
    # A 4-tuple is (B, C, H, W) for image models and (C, T, H, W) for video models.
    return len(input_size) == 4 and getattr(model, "roi_dims", 2) == 2
