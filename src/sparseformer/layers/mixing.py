"""Adaptive feature decoding ("adaptive mixing") of sampled points.

SparseFormer (Gao et al., ICLR 2024), Sec. 3.3, following AdaMixer (Gao et al., CVPR 2022):
each token generates, from its own embedding, a channel-mixing matrix ``Mc`` (C x C) and a
point-mixing matrix ``Mp`` (P x P), and decodes its P x C sampled values with them. Ported from
the official code (github.com/showlab/sparseformer).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparseformer.layers.linear import is_plain, is_tracing, linear, linear_split
from sparseformer.layers.mixing_fused import fused_mix, fused_mix_applies, tokens_per_chunk

__all__ = ["AdaptiveMixing"]


class AdaptiveMixing(nn.Module):
    """Decode sampled features with token-generated channel and point mixing.

    ``F = act(F @ Mc + bc)``, then ``F = act(Mp @ F + bp)``, then ``out_proj(flatten(F))``.
    The bootstrapped SparseFormers (Gao et al., CVPR 2024) drop the biases and the first
    activation (``act(Mp @ (F @ Mc))``) and mix the P points into more output points.

    Args:
        dim: token width D.
        in_channels: channels C of the sampled features.
        num_points: sampling points P.
        reduction: the parameter generator's bottleneck is ``D / reduction``...
        ln_eps: LayerNorm epsilon.
        activation: ``"gelu"`` or ``"quick_gelu"``.
        hidden_dim: ...unless given here as a width.
        out_points: rows of the point-mixing matrix ``Mp`` (``out_points x P``); ``None``: P.
        bias: learn the biases ``bc`` (C) and ``bp`` (one per output point).
        inner_activation: apply ``act`` after the channel mixing too.
    """

    def __init__(
        self,
        dim: int,
        in_channels: int,
        num_points: int,
        reduction: int = 4,
        ln_eps: float = 1e-6,
        activation: str = "gelu",
        hidden_dim: int | None = None,
        out_points: int | None = None,
        bias: bool = True,
        inner_activation: bool = True,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.num_points = num_points
        self.out_points = out_points or num_points
        self.activation = activation
        self.inner_activation = inner_activation
        hidden_dim = hidden_dim or dim // reduction
        C, P, Q = in_channels, num_points, self.out_points
        self.norm = nn.LayerNorm(dim, eps=ln_eps)
        self.reduce = nn.Linear(dim, hidden_dim)
        # No activation between reduce and generator: a low-rank linear generator.
        self.generator = nn.Linear(hidden_dim, C * C + Q * P)
        self.channel_bias = nn.Parameter(torch.zeros(C)) if bias else None
        self.point_bias = nn.Parameter(torch.zeros(Q)) if bias else None
        self.out_proj = nn.Linear(Q * C, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Start as a static learned mixing: zero generator weight, Xavier ``Mc``/``Mp`` bias.

        The norm starts at ``D^-0.5`` so that the generated matrices change slowly at first.
        """
        dim = self.norm.normalized_shape[0]
        nn.init.constant_(self.norm.weight, dim**-0.5)
        nn.init.zeros_(self.norm.bias)
        nn.init.zeros_(self.generator.weight)
        C, P, Q = self.in_channels, self.num_points, self.out_points
        # xavier_uniform of (Q, P): sqrt(6 / (P + Q)), written as v1 wrote it when Q == P
        mp_bound = math.sqrt(3.0 / P) if Q == P else math.sqrt(6.0 / (P + Q))
        with torch.no_grad():
            mc, mp = self.generator.bias.split([C * C, Q * P])
            mc.uniform_(-math.sqrt(3.0 / C), math.sqrt(3.0 / C))  # xavier_uniform of (C, C)
            mp.uniform_(-mp_bound, mp_bound)
        if self.channel_bias is not None:
            nn.init.zeros_(self.channel_bias)
            nn.init.zeros_(self.point_bias)

    def _act(self, x: Tensor) -> Tensor:
        return F.gelu(x) if self.activation == "gelu" else x * torch.sigmoid(1.702 * x)

    def forward(self, tokens: Tensor, sampled: Tensor) -> Tensor:
        """Decode.

        Args:
            tokens: ``(B, N, D)``, or ``(1, N, D)`` tokens that every image shares.
            sampled: ``(B, N, P, C)`` features at each token's sampling points.

        Returns:
            ``(B, N, D)`` the update for each token.
        """
        B, N, _ = tokens.shape
        if not torch.jit.is_tracing() and B == 1 != sampled.shape[0]:  # shared by every image
            return self._decode_shared(tokens, sampled)
        # a layer that is not a plain nn.Linear (hooks, adapters, quantised) is called itself,
        # on the whole batch
        plain = is_plain(self.generator)
        layers_plain = (
            plain
            and is_plain(self.reduce)
            and is_plain(self.out_proj)
            and is_plain(self.norm, nn.LayerNorm)
        )
        if plain and fused_mix_applies(tokens, sampled, self.generator.weight):
            return self._decode_fused(tokens, sampled)
        # tracing first: a size test would put a guard on the batch into an exported graph
        if (
            is_tracing()
            or not layers_plain
            or tokens.device.type != "cpu"
            or _needs_grad(tokens, sampled)
            or torch.is_autocast_enabled("cpu")
        ):
            return self._decode(tokens, sampled)
        # CPU inference decodes a few images at a time: each token's generated C x C and P x P
        # matrices are used once, right away, so a chunk's stay in cache instead of a round
        # trip through memory, and so do its mixed points on their way through the output
        # projection. Chunks hold as many images as fit the fused path's budget of generated
        # matrices (4 MB: two images of SparseFormer-T). Every token is computed exactly as in
        # one pass. CPU training of large matrices takes _decode_fused. Under autocast one pass
        # is faster: autocast converts the weights again for every chunk (it keeps no
        # conversions in inference mode; SparseFormer-T, bf16, batch 32: 498 ms in chunks of
        # two images, 441 ms in one pass, on an AVX-512 Xeon).
        C, P, Q = self.in_channels, self.num_points, self.out_points
        step = max(1, tokens_per_chunk(C * C + Q * P) // max(1, N))  # images per chunk
        if step >= B:
            return self._decode(tokens, sampled)
        chunks = zip(tokens.split(step), sampled.split(step))
        return torch.cat([self._decode(t, s) for t, s in chunks])

    def _decode(self, tokens: Tensor, sampled: Tensor) -> Tensor:
        """:meth:`forward` in one pass (of a chunk), ``(B, N, D), (B, N, P, C) -> (B, N, D)``."""
        return linear(self._mix(linear(self.norm(tokens), self.reduce), sampled), self.out_proj)

    def _mix(self, hidden: Tensor, sampled: Tensor) -> Tensor:
        """Generate each token's matrices from ``hidden`` (the reduced tokens) and mix its
        points with them: ``(B, N, h), (B, N, P, C) -> (B, N, Q*C)``."""
        B, N, _ = hidden.shape
        C, P, Q = self.in_channels, self.num_points, self.out_points
        channel_mix, point_mix = linear_split(hidden, self.generator, [C * C, Q * P])
        x = sampled.to(channel_mix.dtype).reshape(B * N, P, C)  # (B, N, P, C) -> (B*N, P, C)
        x = self._mix_with(x, channel_mix.reshape(B * N, C, C), point_mix.reshape(B * N, Q, P))
        return x.reshape(B, N, Q * C)  # (B*N, Q, C) -> (B, N, Q*C)

    def _mix_with(self, x: Tensor, channel_mix: Tensor, point_mix: Tensor) -> Tensor:
        """Mix ``k`` sets of points per matrix pair: ``act(Mp @ act(x @ Mc + bc) + bp)``.

        Args:
            x: ``(n, P*k, C)``, rows point-major (point ``p`` of set ``j`` at row ``p*k + j``).
            channel_mix: ``(n, C_in, C_out)``.
            point_mix: ``(n, Q_out, P_in)``.

        Returns:
            ``(n, Q, k*C)``: output point ``q`` of set ``j`` at ``[:, q, j*C:(j+1)*C]``.
        """
        n, rows, C = x.shape
        P = point_mix.shape[-1]
        if self.channel_bias is None:
            x = torch.bmm(x, channel_mix)
        else:
            x = torch.baddbmm(self.channel_bias.to(x.dtype), x, channel_mix)
        x = self._act(x) if self.inner_activation else x
        x = x.reshape(n, P, rows // P * C)  # (n, P*k, C) -> (n, P, k*C)
        if self.point_bias is None:
            return self._act(torch.bmm(point_mix, x))
        point_bias = self.point_bias.to(x.dtype).unsqueeze(-1)  # (Q,) -> (Q, 1), per out point
        return self._act(torch.baddbmm(point_bias, point_mix, x))  # (n, Q, k*C)

    def _decode_shared(self, tokens: Tensor, sampled: Tensor) -> Tensor:
        """:meth:`_decode` of tokens that every image shares, ``(1, N, D), (B, N, P, C) ->
        (B, N, D)``: each token's matrices are generated once, not once per image, and mix
        the points of all B images in one product each (``(B*P, C) x (C, C)`` and ``(Q, P) x
        (P, B*C)``), where one per image would be small. The model's initial tokens are such
        until an op reads the image (:class:`~sparseformer.models.SparseFormer`)."""
        B, N, P, C = sampled.shape
        Q = self.out_points
        hidden = linear(self.norm(tokens), self.reduce)  # (1, N, h)
        channel_mix, point_mix = linear_split(hidden, self.generator, [C * C, Q * P])
        # (B, N, P, C) -> (N, P, B, C) -> (N, P*B, C): each token's points of every image
        x = sampled.to(channel_mix.dtype).permute(1, 2, 0, 3).reshape(N, P * B, C)
        x = self._mix_with(x, channel_mix.reshape(N, C, C), point_mix.reshape(N, Q, P))
        # (N, Q, B*C) -> (N, Q, B, C) -> (B, N, Q, C) -> (B, N, Q*C)
        x = x.reshape(N, Q, B, C).permute(2, 0, 1, 3).reshape(B, N, Q * C)
        return linear(x, self.out_proj)

    def _decode_fused(self, tokens: Tensor, sampled: Tensor) -> Tensor:
        """:meth:`_decode` for CPU training, with the generated matrices and their gradients
        made a few tokens at a time in forward and backward (:mod:`.mixing_fused`)."""
        B, N, D = tokens.shape
        C, P, Q = self.in_channels, self.num_points, self.out_points
        hidden = self.reduce(self.norm(tokens))
        hidden = hidden.reshape(B * N, hidden.shape[-1])  # (B, N, h) -> (B*N, h)
        x = fused_mix(
            hidden,
            self.generator.weight,
            self.generator.bias,
            sampled.reshape(B * N, P, C),  # (B, N, P, C) -> (B*N, P, C)
            self.channel_bias,
            self.point_bias,
            (C, P, Q),
            self.activation,
            self.inner_activation,
        )
        return self.out_proj(x.reshape(B, N, Q * C))  # (B*N, Q, C) -> (B, N, Q*C)


def _needs_grad(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
