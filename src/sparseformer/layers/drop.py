"""Stochastic depth for batch-first tensors, with the rate passed explicitly.

SparseFormer (Gao et al., ICLR 2024) repeats its focusing unit with shared weights but a
different drop-path rate per repetition, so the rate is an argument, not module state.
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["drop_path", "drop_path_rates"]


def drop_path(x: Tensor, rate: float, training: bool) -> Tensor:
    """Zero whole samples of ``x`` (any shape, batch first) with probability ``rate``.

    Survivors are scaled by ``1 / (1 - rate)`` so the expectation is unchanged.
    """
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    return x * mask.div_(keep)


def drop_path_rates(total: int, max_rate: float) -> tuple[float, ...]:
    """Rates rising linearly from 0 to ``max_rate`` over ``total`` applications."""
    if total <= 1:
        return (0.0,) * total
    return tuple(max_rate * i / (total - 1) for i in range(total))
