"""SparseFormer v1 for images.

SparseFormer: Sparse Visual Recognition via Limited Latent Tokens (Gao, Tong, Wang, Shou,
ICLR 2024, arXiv 2304.03768); official code at github.com/showlab/sparseformer.

A cheap stem gives a feature map; N latent tokens, each with a RoI, read it at a few points
(focusing units), then a transformer over the tokens (cortex units) classifies. The model
follows timm's API: ``forward_features``, ``forward_head(pre_logits=)``, ``forward``,
``no_weight_decay``, ``get_classifier``, ``reset_classifier``, ``group_matcher`` (layer-wise
learning-rate decay) and ``set_grad_checkpointing``.
"""

from __future__ import annotations

import dataclasses
import logging
import numbers

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from sparseformer.config import SparseFormerConfig
from sparseformer.layers import (
    EarlyConvolution,
    at_least_fp32,
    drop_path_rates,
    grid_and_whole_rois,
    grid_rois,
)
from sparseformer.models.blocks import OpContext, RoiAdjustOp, SampleMixOp, per_image
from sparseformer.models.loading import accept_official_layouts, shorter_load_error
from sparseformer.models.outputs import SparseFormerOutput
from sparseformer.models.stage import Stage, build_unit

logger = logging.getLogger(__name__)

__all__ = ["SparseFormer", "Stage", "build_unit"]


class SparseFormer(nn.Module):
    """SparseFormer image classifier: v1 and the bootstrapped family, by configuration.

    Args:
        config: the architecture.
    """

    roi_dims = 2

    def __init__(self, config: SparseFormerConfig) -> None:
        super().__init__()
        self.config = config
        self.num_classes = config.num_classes
        self.num_features = self.head_hidden_size = config.width
        # "avg", "token" (the CLS token) or "": one output per token (timm's convention)
        self.global_pool = config.global_pool
        first_width = config.stages[0].width
        # Video subclasses (roi_dims = 3) get the per-frame stem and their own token count.
        self.stem = EarlyConvolution(
            config.in_chans,
            config.stem_channels,
            config.stem_eps,
            video=self.roi_dims == 3,
            unbiased=config.stem_unbiased,
        )
        num_latent = self._num_latent_tokens()
        self.initial_rois = nn.Parameter(torch.zeros(num_latent, 2 * self.roi_dims))
        # one embedding per token, or one shared by all (bootstrapped models): (N or 1, D)
        num_embeddings = 1 if config.shared_initial_token else num_latent
        self.initial_tokens = nn.Parameter(torch.zeros(num_embeddings, first_width))
        self.cls_token = None
        self.cls_token_at = None  # (stage, unit within the stage) before which it joins
        if config.cls_token_unit is not None:
            self.cls_token_at = config.stage_of_unit(config.cls_token_unit)
            width = config.stages[self.cls_token_at[0]].width
            self.cls_token = nn.Parameter(torch.zeros(1, width))
        widths = [None] + [s.width for s in config.stages[:-1]]  # no transition into stage 0
        self.stages = nn.ModuleList(
            Stage(config, stage, in_width, self.roi_dims)
            for stage, in_width in zip(config.stages, widths)
        )
        self.fc_norm = nn.LayerNorm(config.width, eps=config.ln_eps)
        self.head_drop = nn.Dropout(config.drop_rate)
        self.head = self._make_head(config.num_classes)
        self.drop_path_rates = drop_path_rates(config.num_applications, config.drop_path_rate)
        self.grad_checkpointing = False
        self.init_weights()
        self.register_load_state_dict_pre_hook(accept_official_layouts)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict``, which also takes the authors' layouts (and image
        weights into a video model); tensors of other shapes (a file of another size or of a
        student with its own architecture) are said in a few lines, not one per tensor."""
        try:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        except RuntimeError as exc:
            raise shorter_load_error(exc, type(self).__name__) from None

    # ----------------------------------------------------------------------------- init
    def _make_head(self, num_classes: int) -> nn.Module:
        if num_classes <= 0:
            return nn.Identity()
        return nn.Linear(self.num_features, num_classes, bias=self.config.head_bias)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Generic init (trunc-normal Linear, unit LayerNorm), then each module's own priors.

        Order: every Linear/LayerNorm, then ops with ``reset_parameters`` (zeroed RoI-adjust
        and offset projections, grid offsets, static initial mixing), then the token table
        (trunc-normal std 1), the CLS token (trunc-normal std 0.02), the RoI grid and the stem
        (He-normal over the fan-out); stage embeddings stay zero.
        """
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, (RoiAdjustOp, SampleMixOp)):
                m.reset_parameters()
        nn.init.trunc_normal_(self.initial_tokens, std=1.0)
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.initial_rois.copy_(self._initial_roi_prior())
        self.stem.reset_parameters()

    def _num_latent_tokens(self) -> int:
        return self.config.num_tokens

    def _initial_roi_prior(self) -> Tensor:
        if self.config.roi_init == "grid_and_whole":
            return grid_and_whole_rois(self.config.num_tokens)
        return grid_rois(self.config.num_tokens)

    # ----------------------------------------------------------------------------- timm API
    def no_weight_decay(self) -> set[str]:
        """Parameter names exempt from weight decay (besides biases and norms)."""
        names = {"initial_rois", "cls_token"} if self.cls_token is not None else {"initial_rois"}
        return names | {
            f"stages.{i}.stage_embedding"
            for i, stage in enumerate(self.stages)
            if stage.stage_embedding is not None
        }

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, str | list]:
        """Parameter groups in depth order, for timm's layer-wise learning-rate decay
        (``create_optimizer_v2(model, layer_decay=...)``).

        The stem, initial RoIs and token embeddings come first; then one group per stage
        (``coarse``) or per unit, a stage's width transition before its units; the final
        norm and the head last.
        """
        if coarse:
            blocks = [(r"^stages\.(\d+)", None), (r"^fc_norm", (99999,))]
        else:
            blocks = [
                (r"^stages\.(\d+)\.transition", None),
                (r"^stages\.(\d+)\.stage_embedding", None),
                (r"^stages\.(\d+)\.units\.(\d+)", None),
                (r"^fc_norm", (99999,)),
            ]
        return {"stem": r"^stem|^initial_rois|^initial_tokens|^cls_token", "blocks": blocks}

    @torch.jit.ignore
    def lock(self, unlocked_groups: int = 0, freeze_bn_stats: bool = False) -> None:
        """OpenCLIP's image-tower lock (``clip_model.lock_image_tower(unlocked_groups)``):
        no gradient for any parameter but those of the last ``unlocked_groups`` groups of
        :meth:`group_matcher` (0: none trains). The model has no batch norm to freeze."""
        from timm.models import group_parameters

        groups = group_parameters(self, self.group_matcher())
        locked = max(groups) - unlocked_groups if unlocked_groups else max(groups)
        for index, names in groups.items():
            for name in names if index <= locked else ():
                self.get_parameter(name).requires_grad_(False)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each unit application in the backward pass instead of keeping its
        activations (sampled points, mixing weights, attention): less memory for about a
        third more compute. Results are unchanged; stochastic depth draws the same masks."""
        self.grad_checkpointing = enable

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier with a fresh one of ``num_classes`` (0 removes it), on the
        model's device and in its dtype. ``global_pool``: ``"avg"`` (average the tokens),
        ``"token"`` (the CLS token, for models with one) or ``""`` (no pooling:
        ``forward_head`` normalises and classifies every token)."""
        # the config's own check (a whole number >= 0, a NumPy integer made an int), before
        # anything of the model changes
        config = dataclasses.replace(self.config, num_classes=num_classes)
        num_classes = config.num_classes
        if global_pool is not None:
            allowed = ("avg", "", "token") if self.cls_token is not None else ("avg", "")
            if global_pool not in allowed:
                raise ValueError(
                    "global_pool must be 'avg' (average the tokens)"
                    + (", 'token' (the CLS token)" if self.cls_token is not None else "")
                    + f" or '' (one output per token), got {global_pool!r}"
                )
            self.global_pool = global_pool
        self.num_classes, self.config = num_classes, config  # the config says the model
        head = self._make_head(num_classes)
        if isinstance(head, nn.Linear):
            nn.init.trunc_normal_(head.weight, std=0.02)
            if head.bias is not None:
                nn.init.zeros_(head.bias)
        like = self.fc_norm.weight
        self.head = head.to(device=like.device, dtype=like.dtype)

    def _check_input(self, x: Tensor) -> None:
        """One clear line for the input mistakes that torch reports deep inside the stem."""
        name, video = type(self).__name__, self.roi_dims == 3
        # the stem's convolution, or the config's for one wrapped in an adapter
        channels = getattr(self.stem.conv, "in_channels", self.config.in_chans)
        layout = f"(B, {channels}, T, H, W) clips" if video else f"(B, {channels}, H, W) images"
        if isinstance(x, torch.fx.Proxy):  # torchvision's create_feature_extractor, timm's FX
            raise TypeError(
                f"torch.fx cannot trace {name} (its forward decides in Python on the input's "
                "shape and device); use forward_with_details for every stage's RoIs and "
                "tokens, or torch.export / torch.jit.trace for a graph"
            )
        if not isinstance(x, Tensor):  # a NumPy array or a PIL image, most often
            raise TypeError(
                f"{name} takes a torch.Tensor batch of {layout}, got a {type(x).__name__}; "
                "convert it with torch.as_tensor (and scale and normalise it as the model's "
                "pretrained_cfg says)"
            )
        if x.dim() != 2 + self.roi_dims:
            raise ValueError(
                f"{name} expects a {2 + self.roi_dims}-D input batch of {layout}, "
                f"got shape {tuple(x.shape)}"
            )
        if x.shape[1] != channels:
            hint = ""
            if video and x.shape[2] == channels:
                hint = f"; for (B, T, {channels}, H, W) clips use x.transpose(1, 2)"
            elif x.shape[-1] == channels:
                hint = "; for channels-last arrays use x.movedim(-1, 1)"
            raise ValueError(
                f"{name} expects {layout} with {channels} channels in dimension 1, got shape "
                f"{tuple(x.shape)}{hint}"
            )
        if 0 in x.shape[2:]:
            raise ValueError(
                f"{name} got an empty input of shape {tuple(x.shape)}: {layout} need "
                f"{'T, H and W' if video else 'H and W'} of at least 1"
            )
        if not x.is_floating_point():
            raise ValueError(
                f"{name} expects normalised floating-point input, got {x.dtype}: convert it to "
                "float and normalise it with the mean and std of model.pretrained_cfg"
            )
        dtype = self.initial_tokens.dtype  # the model's weights'
        if x.dtype != dtype and not _autocasting(x.device.type):
            autocast = dtype in (torch.float32, torch.bfloat16, torch.float16)
            raise ValueError(
                f"the input is {x.dtype} and {name}'s weights are {dtype}: convert the "
                f"input (x.to({dtype}))" + (" or run under torch.autocast" if autocast else "")
            )

    def _embed(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Stem features and the initial tokens and RoIs, ``(1, N, D)`` and ``(1, N, 2D)``:
        the same for every image, they are computed once for the batch until an op makes
        them differ (see :class:`~sparseformer.models.blocks.Unit`). SparseFormer v1's first
        unit (no stochastic depth at its rate of 0) then runs attention, RoI adjustment,
        sampling offsets and the mixing's generated matrices once per batch, not per image.
        Under ``torch.jit.trace`` they are ``(B, N, ...)``, as the traced graph needs."""
        self._check_input(x)
        # every sampling reads the map in float32: raised once here, not once per unit
        feats = at_least_fp32(self.stem(x))
        # torch.jit.trace takes them per image: its graph would keep the example's batch of 1
        B = x.shape[0] if torch.jit.is_tracing() else 1
        N = self.initial_rois.shape[0]
        # (N, D), or one (1, D), -> (B, N, D); (N, 2D) -> (B, N, 2D)
        tokens = self.initial_tokens.unsqueeze(0).expand(B, N, -1)
        rois = at_least_fp32(self.initial_rois).unsqueeze(0).expand(B, -1, -1)
        return feats, tokens, rois

    def _run(
        self,
        x: Tensor,
        coord_grad_scale: float | Tensor,
        rois_out: list[Tensor] | None,
        points_out: list[Tensor] | None,
    ) -> tuple[Tensor, Tensor]:
        # numbers only: a GradScaler's tensor is not read back, and FX passes a Proxy
        if isinstance(coord_grad_scale, numbers.Real) and not coord_grad_scale > 0:  # NaN too
            raise ValueError(
                f"coord_grad_scale must be > 0 (the fp16 loss scale, 1.0 without one), got "
                f"{coord_grad_scale!r}: the RoI coordinates' gradients are clamped to it"
            )
        feats, tokens, rois = self._embed(x)
        B = feats.shape[0]
        # The clamp bound is one feature cell (1/H), times the fp16 loss scale if any.
        bound = coord_grad_scale / feats.shape[-2] if self.config.coord_grad_clamp else None
        rates = iter(self.drop_path_rates)
        # Recomputation would append the sampling points twice, so details turn it off.
        recompute = self.grad_checkpointing and torch.is_grad_enabled() and points_out is None
        for s, stage in enumerate(self.stages):
            tokens = stage.transition(tokens)
            for u, repetition, unit in stage.applications():
                if (s, u) == self.cls_token_at and repetition == 0:
                    tokens = self._prepend_cls_token(tokens)
                tokens = stage.embed(tokens, u, repetition)
                ctx = OpContext(next(rates), bound, points_out)
                if recompute and not torch.jit.is_tracing():
                    tokens, rois = checkpoint(unit, tokens, rois, feats, ctx, use_reentrant=False)
                else:
                    tokens, rois = unit(tokens, rois, feats, ctx)
                if rois_out is not None:
                    rois_out.append(per_image(rois, B).contiguous())  # one row per image
        return per_image(tokens, B), per_image(rois, B)

    def _prepend_cls_token(self, tokens: Tensor) -> Tensor:
        """``(B, N, D) -> (B, 1 + N, D)``: the CLS token first, as in ViTs. It has no RoI: the
        RoIs stay ``(B, N, 2D)`` for the N latent tokens (the config puts no RoI op after)."""
        B, _, D = tokens.shape
        cls = self.cls_token.to(tokens.dtype).unsqueeze(0).expand(B, -1, -1)  # (1, D) -> (B, 1, D)
        return torch.cat([cls, tokens], dim=1)

    def forward_features(self, x: Tensor, *, coord_grad_scale: float | Tensor = 1.0) -> Tensor:
        """Final tokens: the latent tokens, after the CLS token if the model has one.

        Args:
            x: ``(B, 3, H, W)`` normalised images, any size (at least 1 x 1 after the stem).
            coord_grad_scale: the loss scale of fp16 training (GradScaler), so that the
                coordinate-gradient clamp bounds the *unscaled* gradient by ``1/H``.

        Returns:
            ``(B, N, D)`` tokens, ``(B, 1 + N, D)`` with a CLS token (first).
        """
        return self._run(x, coord_grad_scale, None, None)[0]

    def forward_head(self, tokens: Tensor, pre_logits: bool = False) -> Tensor:
        """Pool tokens, normalise, (dropout,) classify: ``(B, N, D) -> (B, classes)``, or
        ``(B, D)`` features with ``pre_logits``. ``global_pool="avg"`` averages the tokens,
        ``"token"`` takes the CLS token (the first); with ``""`` the tokens are not pooled:
        ``(B, N, classes)`` or ``(B, N, D)``."""
        if self.global_pool == "avg":
            tokens = tokens.mean(dim=1)
        elif self.global_pool == "token":
            tokens = tokens[:, 0]  # (B, 1 + N, D) -> (B, D)
        x = self.head_drop(self.fc_norm(tokens))  # pre-logits after the dropout, as in timm
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor, *, coord_grad_scale: float | Tensor = 1.0) -> Tensor:
        """Logits ``(B, num_classes)`` for images ``(B, 3, H, W)``."""
        return self.forward_head(self.forward_features(x, coord_grad_scale=coord_grad_scale))

    def forward_with_details(
        self, x: Tensor, *, coord_grad_scale: float | Tensor = 1.0
    ) -> SparseFormerOutput:
        """Logits with the RoIs after every unit application and every step's sampling points.

        Returns:
            :class:`SparseFormerOutput`; coordinates are normalised to the input image.
        """
        rois_out: list[Tensor] = []
        points_out: list[Tensor] = []
        tokens, _ = self._run(x, coord_grad_scale, rois_out, points_out)
        B = x.shape[0]
        return SparseFormerOutput(
            logits=self.forward_head(tokens),
            tokens=tokens,
            rois=rois_out,
            sampling_points=points_out,
            initial_rois=at_least_fp32(self.initial_rois).unsqueeze(0).expand(B, -1, -1),
            num_prefix_tokens=self.num_prefix_tokens,
        )

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the latent tokens in :meth:`forward_features`' output (1: the CLS
        token), as timm's ViTs name it."""
        return 0 if self.cls_token is None else 1


def _autocasting(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` (never on a device autocast does not know,
    such as ``meta``)."""
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


# the hook's earlier name: whole models pickled with torch.save(model) before it moved name it
_accept_official_layouts = accept_official_layouts
