"""Stochastic depth for batch-first tensors, with the rate passed explicitly.

SparseFormer (Gao et al., ICLR 2024) repeats its focusing unit with shared weights but a
different drop-path rate per repetition, so the rate is an argument, not module state.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

from sparseformer.layers.linear import is_tracing

__all__ = ["drop_path", "drop_path_rates", "residual_drop_path"]


def drop_path(x: Tensor, rate: float, training: bool) -> Tensor:
    """Zero whole samples of ``x`` (any shape, batch first) with probability ``rate``.

    Survivors are scaled by ``1 / (1 - rate)`` so the expectation is unchanged.
    """
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    return x * mask.div_(keep)


def residual_drop_path(
    x: Tensor, branch: Callable[[Tensor], Tensor], rate: float, training: bool
) -> Tensor:
    """``x + drop_path(branch(x), rate, training)``, where CPU training runs ``branch`` on the
    samples it keeps only: a dropped sample's branch is multiplied by zero, so none of its
    work is needed, forward or backward (at SparseFormer-T's rates, 0 to 0.2, about a tenth
    of the attention and MLP work of a training step).

    ``branch`` must treat samples independently (attention within a sample, an MLP per
    token) and draw no random numbers of its own (a dropout: here the samples are drawn
    before it runs, there after). The samples are drawn as :func:`drop_path` draws them, one
    Bernoulli per sample from the same generator, so the outputs and gradients are the same
    (under autocast, up to rounding: the kept samples are scaled in the residual's float32,
    not the branch's half type). CUDA keeps the multiplication: finding the kept samples would
    wait for the device (a synchronisation per block). So do tracing, ``torch.func`` and
    dispatch modes (FLOP counting), whose shapes must not depend on a draw.
    """
    if rate == 0.0 or not training:
        return x + branch(x)
    if x.device.type != "cpu" or is_tracing() or _get_current_dispatch_mode() is not None:
        return x + drop_path(branch(x), rate, training)
    keep = 1.0 - rate
    kept = x.new_empty(x.shape[0]).bernoulli_(keep).nonzero().squeeze(1)  # (B_kept,)
    update = branch(x.index_select(0, kept))  # none kept: an empty batch, zero gradients
    return x.index_add(0, kept, update.to(x.dtype), alpha=1.0 / keep)


def drop_path_rates(total: int, max_rate: float) -> tuple[float, ...]:
    """Rates rising linearly from 0 to ``max_rate`` over ``total`` applications."""
    if total <= 1:
        return (0.0,) * total
    return tuple(max_rate * i / (total - 1) for i in range(total))
