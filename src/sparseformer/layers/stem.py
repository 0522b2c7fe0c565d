"""The early-convolution stem: the only part of SparseFormer that sees every pixel.

SparseFormer (Gao et al., ICLR 2024), Sec. 3.1: a 7x7/2 convolution, ReLU and a 3x3/2 max-pool
give a stride-4 feature map, normalised per pixel over channels without learned affine.
The 3-D variant applies the same per frame (1x7x7 convolution, 1x3x3 pooling).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparseformer.layers.linear import in_functorch, is_plain, is_tracing

__all__ = ["EarlyConvolution", "channel_normalize"]

# CPU stems run a few images at a time: at most this many convolution outputs per chunk (8 MB)
_CHUNK_FLOATS = 1 << 21
_NHWC = torch.channels_last


def channel_normalize(x: Tensor, eps: float = 1e-7, unbiased: bool = True) -> Tensor:
    """Normalise each pixel over channels: ``(x - mean) / sqrt(var + eps)``.

    Args:
        x: ``(B, C, ...)``.
        eps: added to the variance.
        unbiased: divide the squared deviations by ``C - 1`` (SparseFormer v1) or by ``C``
            (the bootstrapped SparseFormers, a LayerNorm without affine).
    """
    C = x.shape[1]
    if x.numel() == 0:  # an empty batch: nothing to normalise (and no statistics to warn of)
        return x * 1
    if x.dim() == 4 and C > 1 and not in_functorch() and x.is_contiguous(memory_format=_NHWC):
        # Channels-last (B, C, H, W) is (B, H, W, C) in memory, so this is a LayerNorm over the
        # last axis: one fused pass instead of five (5x faster on CPU). LayerNorm divides by
        # the biased variance, var_b = var * (C-1)/C, hence the rescaled eps and the constant
        # weight: (x - m) / sqrt(var + eps) = sqrt((C-1)/C) (x - m) / sqrt(var_b + eps (C-1)/C).
        shrink = (C - 1) / C if unbiased else 1.0
        weight = x.new_full((C,), math.sqrt(shrink))
        y = F.layer_norm(x.permute(0, 2, 3, 1), (C,), weight, None, eps * shrink)  # (B, H, W, C)
        return y.permute(0, 3, 1, 2)  # (B, H, W, C) -> (B, C, H, W), channels-last
    var, mean = torch.var_mean(x, dim=1, keepdim=True, correction=int(unbiased))
    return (x - mean) / (var + eps).sqrt()


class EarlyConvolution(nn.Module):
    """Conv(7, stride 2) -> ReLU -> MaxPool(3, stride 2) -> channel normalisation.

    Args:
        in_chans: input channels.
        channels: output channels C.
        eps: epsilon of the channel normalisation.
        unbiased: the channel normalisation's variance (see :func:`channel_normalize`).
        video: build the per-frame 3-D variant (input ``(B, 3, T, H, W)``).
    """

    def __init__(
        self,
        in_chans: int,
        channels: int,
        eps: float = 1e-7,
        video: bool = False,
        unbiased: bool = True,
    ) -> None:
        super().__init__()
        self.eps = eps
        self.unbiased = unbiased
        self.video = video
        if video:
            self.conv = nn.Conv3d(in_chans, channels, (1, 7, 7), (1, 2, 2), (0, 3, 3))
        else:
            self.conv = nn.Conv2d(in_chans, channels, 7, 2, 3)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """He-normal weight over the fan-out (``kaiming_normal_(mode="fan_out",
        nonlinearity="relu")``: std ``sqrt(2 / (C * 49))``, about 0.021 for 96 channels), as the
        authors' v1 code initialises its stem, since a ReLU follows; the bias keeps PyTorch's
        default uniform init, which they leave too."""
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        """``(B, 3, H, W) -> (B, C, H/4, W/4)``, or ``(B, 3, T, H, W) -> (B, C, T, H/4, W/4)``.

        A video runs the 2-D stem on every frame, folded into the batch: the same numbers as a
        1x7x7 ``conv3d`` and 1x3x3 ``max_pool3d`` (the weight is kept 3-D, as checkpoints store
        it), but the channels-last 2-D kernels run, where CPU ``max_pool3d`` always computes
        indices and was as slow as the whole convolution. Its output is ``(B, C, T, h, w)`` in
        channels-last-3d memory.
        """
        if not self._weight_usable():
            return self._stem_module(x)
        if not self.video:
            return self._stem_2d(x, self.conv.weight)
        B, _, T, H, W = x.shape
        # (B, 3, T, H, W) -> (B*T, 3, H, W); channels by name, so that an empty batch works
        frames = x.transpose(1, 2).reshape(B * T, x.shape[1], H, W)
        weight = self.conv.weight.squeeze(2)  # (C, 3, 1, 7, 7) -> (C, 3, 7, 7)
        y = self._stem_2d(frames, weight)  # (B*T, C, h, w), channels-last
        _, C, h, w = y.shape
        # channels-last (B*T, C, h, w) is (B, T, h, w, C) in memory: a view, no copy, as long
        # as the layout held; reshape copies otherwise.
        y = y.permute(0, 2, 3, 1).reshape(B, T, h, w, C)  # (B*T, C, h, w) -> (B, T, h, w, C)
        return y.permute(0, 4, 1, 2, 3)  # (B, T, h, w, C) -> (B, C, T, h, w)

    def _weight_usable(self) -> bool:
        """Whether the stem may convolve with ``self.conv``'s weight itself (frame by frame for
        video, a few images at a time on CPU) instead of calling ``self.conv``: a plain
        convolution (no hooks, no subclass ``forward``) with zero padding given in pixels, for
        video one of one frame."""
        conv = self.conv
        if not is_plain(conv, nn.Conv3d if self.video else nn.Conv2d):
            return False  # a wrapper may lack the attributes read below
        if not (isinstance(conv.padding, tuple) and conv.padding_mode == "zeros"):
            return False
        if self.video:  # a kernel over one frame
            return conv.kernel_size[0] == conv.stride[0] == 1 and conv.padding[0] == 0
        return True

    def _stem_2d(self, x: Tensor, weight: Tensor) -> Tensor:
        """Convolution, pooling, ReLU and channel normalisation of ``(B, 3, H, W)`` images.

        On CPU a few images at a time: the convolution's output (4.8 MB per 224 px image) is
        pooled while it is still in cache instead of after a round trip through memory, which
        halves the stem's time at batch 32 (2-core AMD EPYC: inference 182 -> 88 ms, forward
        and backward 336 -> 185 ms). Every image is computed exactly as in one pass.
        """
        # Channels-last: oneDNN's convolution and the pooling vectorise over channels (2x
        # faster stem on CPU, identical numbers); the output stays channels-last, which grid
        # sampling reads as fast, and the channel statistics read contiguously.
        if in_functorch():  # no memory format can be forced there: plain ops
            return self._stem_chunk(x, weight)
        x = x.contiguous(memory_format=torch.channels_last)
        per_image = weight.shape[0] * math.ceil(x.shape[-2] / 2) * math.ceil(x.shape[-1] / 2)
        step = max(1, _CHUNK_FLOATS // max(1, per_image))
        # tracing first: a size test would put a guard on the batch into an exported graph
        if is_tracing() or x.device.type != "cpu" or step >= x.shape[0]:
            return self._stem_chunk(x, weight)
        return torch.cat([self._stem_chunk(images, weight) for images in x.split(step)])

    def _stem_chunk(self, x: Tensor, weight: Tensor) -> Tensor:
        """:meth:`_stem_2d` for channels-last images, in one pass."""
        conv = self.conv
        stride, padding, dilation = conv.stride[-2:], conv.padding[-2:], conv.dilation[-2:]
        x = F.conv2d(x, weight, conv.bias, stride, padding, dilation, conv.groups)
        return self._pool_normalize(x)

    def _pool_normalize(self, x: Tensor) -> Tensor:
        """ReLU, 3x3/2 max-pooling and channel normalisation of ``(B, C, H, W)`` maps. ReLU
        commutes with max-pooling (both monotone), so it runs on the 4x smaller pooled map:
        same values, same gradients."""
        return channel_normalize(F.relu(F.max_pool2d(x, 3, 2, 1)), self.eps, self.unbiased)

    def _stem_module(self, x: Tensor) -> Tensor:
        """:meth:`forward` through a call of ``self.conv``, in one pass: a convolution with
        hooks (pruning, weight norm, feature capture) or of a subclass with its own
        ``forward`` is called itself, as a user who wraps or replaces it expects."""
        y = self.conv(x)
        if not self.video:
            return self._pool_normalize(y)
        B, C, T, h, w = y.shape
        frames = y.transpose(1, 2).reshape(B * T, C, h, w)  # (B, C, T, h, w) -> (B*T, C, h, w)
        y = self._pool_normalize(frames)
        return y.reshape(B, T, C, *y.shape[-2:]).transpose(1, 2)  # -> (B, C, T, h', w')
