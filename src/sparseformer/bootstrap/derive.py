"""From a timm ViT to a bootstrapped SparseFormer: the architecture it implies, and a student
that holds its cortex, final norm and head bit for bit.

Bootstrapping SparseFormers from Vision Foundation Models (Gao et al., CVPR 2024,
arXiv 2312.01987): the last C blocks of a pretrained ViT become the SparseFormer's cortex (the
units after the two focusing units), its final norm and head stay; only the focusing part in
front of them is new. The family's fixed choices (stem, 4 repeats of the focusing unit, PE
injection, CLS token before the third unit, the mixing and RoI-adjust variants) are those of the
registered ``sparseformer_btsp_*`` models: the derivation starts from their configuration and
changes only what the teacher (:mod:`~sparseformer.bootstrap.facts`) or the caller decides.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from torch import Tensor, nn

from sparseformer.bootstrap.facts import (
    BootstrapError,
    Preprocessing,
    TeacherFacts,
    describe_teacher,
    teacher_name,
    teacher_preprocessing,
)
from sparseformer.config import SparseFormerConfig
from sparseformer.models import SparseFormer
from sparseformer.weights.factory import pretrained_cfg
from sparseformer.weights.registry import MODELS

__all__ = [
    "BootstrapError",
    "TEMPLATE",
    "CLIP_TEMPLATE",
    "student_name",
    "TeacherFacts",
    "describe_teacher",
    "bootstrap_config",
    "inherited_units",
    "inherited_tensors",
    "build_student",
    "architecture_overrides",
]

logger = logging.getLogger(__name__)

# the registered model whose configuration a derived student starts from (and whose name its
# checkpoints record, with the fields that differ: see architecture_overrides)
TEMPLATE = "sparseformer_btsp_augreg_base"
CLIP_TEMPLATE = "sparseformer_btsp_openai_clip_base"  # the name a CLIP tower's student takes
_CORTEX_UNIT = 1  # units of the cortex stage before the inherited blocks (sample+mix, PE)
# timm block parameters -> ours (models/blocks.py: AttnOp and MlpOp)
_BLOCK_KEYS = {
    "norm1": "attn.norm",
    "attn.qkv": "attn.qkv",
    "attn.proj": "attn.proj",
    "norm2": "mlp.norm",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}


def _template(student: str | SparseFormerConfig | None) -> SparseFormerConfig:
    if isinstance(student, SparseFormerConfig):
        return student
    name = student or TEMPLATE
    if name not in MODELS or not name.startswith("sparseformer_btsp_"):
        btsp = ", ".join(n for n in MODELS if n.startswith("sparseformer_btsp_"))
        raise BootstrapError(f"--student {name!r} is not a bootstrapped SparseFormer; use {btsp}")
    return MODELS[name].config


def bootstrap_config(
    teacher: nn.Module | TeacherFacts,
    *,
    tokens: int | None = None,
    points: int | None = None,
    inherit: int | None = None,
    focus_width: int | None = None,
    student: str | SparseFormerConfig | None = None,
) -> SparseFormerConfig:
    """The bootstrapped SparseFormer of ``teacher``.

    From the teacher: the cortex width, head width, MLP ratio and activation (QuickGELU in the
    cortex only), LayerNorm epsilon, pooling (a CLS token joins before the third unit) and the
    head (classes or CLIP embedding, with or without bias).

    Args:
        tokens: latent tokens (default: the student's, 48).
        points: sampling points per token (default: the student's, 36).
        inherit: teacher blocks the cortex takes, its last ones (default: the student's count
            when it names one, else two thirds of the teacher's blocks, at least one: 8 of
            12, 16 of 24, 1 of 1).
        focus_width: width of the focusing unit (default: half the teacher's width, rounded
            down to whole heads).
        student: a registered ``sparseformer_btsp_*`` name or a config to follow (its tokens,
            points, focusing width and cortex depth); its cortex width must be the teacher's.

    Raises:
        BootstrapError: a student of another width, or more blocks than the teacher has.
    """
    facts = teacher if isinstance(teacher, TeacherFacts) else describe_teacher(teacher)
    base = _template(student)
    focus, cortex = base.stages[0], base.stages[-1]
    if student is not None and cortex.width != facts.width:
        raise BootstrapError(
            f"the student's cortex width {cortex.width} does not match the teacher's "
            f"{facts.width} ({facts.name}); pick a student of width {facts.width}, or leave "
            "--student out to derive one"
        )
    if inherit is None:
        own = cortex.depth - _CORTEX_UNIT if student is not None else (2 * facts.depth) // 3
        inherit = max(own, 1)  # a 1-block teacher: its block (2/3 of it rounds to none)
    if not 1 <= inherit <= facts.depth:
        raise BootstrapError(
            f"--inherit {inherit}: the teacher {facts.name} has {facts.depth} blocks; "
            f"inherit between 1 and {facts.depth}"
        )
    if focus_width is None:  # half the teacher's width, in whole heads
        half = max(facts.width // 2 // facts.head_dim, 1) * facts.head_dim
        focus_width = focus.width if student is not None else half
    if focus_width % facts.head_dim:
        raise BootstrapError(
            f"--focus-width {focus_width} does not split into the teacher's heads of width "
            f"{facts.head_dim}; pick a multiple of {facts.head_dim}"
        )
    quick = "quick_gelu" if facts.activation == "quick_gelu" else None
    return dataclasses.replace(
        base,
        stages=(
            dataclasses.replace(focus, width=focus_width),
            dataclasses.replace(
                cortex, width=facts.width, depth=_CORTEX_UNIT + inherit, mlp_activation=quick
            ),
        ),
        num_tokens=base.num_tokens if tokens is None else tokens,  # 0 is refused, not defaulted
        num_points=base.num_points if points is None else points,
        mixing_out_points=max(base.num_points if points is None else points, 32),  # authors' rule
        attn_head_dim=facts.head_dim,
        mlp_ratio=facts.mlp_ratio,
        ln_eps=facts.ln_eps,
        num_classes=facts.num_classes,
        head_bias=facts.head_bias,
        global_pool=facts.global_pool,
        cls_token_unit=base.cls_token_unit if facts.global_pool == "token" else None,
    )


def inherited_units(config: SparseFormerConfig) -> list[str]:
    """Key prefixes of the student's inherited blocks, in order (``"stages.1.units.1."``...)."""
    stage, cortex = len(config.stages) - 1, config.stages[-1]
    return [f"stages.{stage}.units.{u}." for u in range(_CORTEX_UNIT, cortex.depth)]


def inherited_tensors(teacher: nn.Module, config: SparseFormerConfig) -> dict[str, Tensor]:
    """The student's tensors taken from ``teacher``, under the student's keys: the last
    ``C`` blocks (C: the config's cortex depth less its sample+mix unit), the final norm
    (``norm``, or ``fc_norm`` for average pooling) and the head."""
    cortex = config.stages[-1]
    inherit = cortex.depth - _CORTEX_UNIT
    teacher_state = teacher.state_dict()
    stage = len(config.stages) - 1
    first = len(teacher.blocks) - inherit
    out = {}
    for j in range(inherit):
        for theirs, ours in _BLOCK_KEYS.items():
            for kind in ("weight", "bias"):
                unit = f"stages.{stage}.units.{_CORTEX_UNIT + j}"
                out[f"{unit}.{ours}.{kind}"] = teacher_state[f"blocks.{first + j}.{theirs}.{kind}"]
    norm = "norm" if config.global_pool == "token" else "fc_norm"
    for kind in ("weight", "bias"):
        out[f"fc_norm.{kind}"] = teacher_state[f"{norm}.{kind}"]
    if config.num_classes:
        out["head.weight"] = teacher_state["head.weight"]
        if config.head_bias:
            out["head.bias"] = teacher_state["head.bias"]
    return out


def build_student(
    teacher: nn.Module,
    config: SparseFormerConfig | None = None,
    preprocessing: Preprocessing | None = None,
) -> SparseFormer:
    """A SparseFormer of ``config`` (default: :func:`bootstrap_config` of ``teacher``) whose
    inherited tensors are copies of the teacher's, bit for bit; the rest keeps its own init.
    Its ``pretrained_cfg`` is its template's with the teacher's preprocessing (``preprocessing``,
    as a teacher's run recorded it; default: the teacher's ``pretrained_cfg``) and no released
    weights, so that timm's ``resolve_data_config`` prepares images as for the teacher.

    Raises:
        BootstrapError: a config whose inherited shapes differ from the teacher's.
    """
    config = config or bootstrap_config(teacher)
    student = SparseFormer(config)
    own = student.state_dict()
    with torch.no_grad():
        for key, value in inherited_tensors(teacher, config).items():
            if own[key].shape != value.shape:
                raise BootstrapError(
                    f"{key}: the student's shape {tuple(own[key].shape)} does not match the "
                    f"teacher's {tuple(value.shape)}; derive the student from this teacher"
                )
            own[key].copy_(value)
    pre = preprocessing or teacher_preprocessing(teacher)
    student.pretrained_cfg = student.default_cfg = {
        **pretrained_cfg(student_name(config)),
        "url": "",  # not the template's released weights
        "num_classes": config.num_classes,
        "input_size": (config.in_chans, pre.img_size, pre.img_size),
        **{k: getattr(pre, k) for k in ("crop_pct", "interpolation", "mean", "std")},
    }
    logger.info(
        "student of %s: %d tokens, focusing width %d, %d inherited blocks of width %d",
        teacher_name(teacher), config.num_tokens, config.stages[0].width,
        config.stages[-1].depth - _CORTEX_UNIT, config.width,
    )  # fmt: skip
    return student


def student_name(config: SparseFormerConfig, asked: str | SparseFormerConfig | None = None) -> str:
    """The registered model a student's checkpoints name (with
    :func:`architecture_overrides` against it): the ``--student`` asked for, else the template
    closer to the student (fewer fields differ; a tie: :data:`TEMPLATE`), so that a CLIP
    tower's student is a ``sparseformer_btsp_openai_clip_base`` for ``create_model``, the
    commands and OpenCLIP, as the released CLIP towers are."""
    if isinstance(asked, str):
        return asked
    return min((TEMPLATE, CLIP_TEMPLATE), key=lambda n: len(architecture_overrides(config, n)))


def architecture_overrides(config: SparseFormerConfig, name: str = TEMPLATE) -> dict:
    """The fields of ``config`` that differ from the registered model ``name``'s, as JSON-able
    data: what a student's checkpoint records so that ``create_model(name,
    checkpoint_path=...)`` builds the same architecture."""
    template = MODELS[name].config
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if value != getattr(template, f.name):
            out[f.name] = [dataclasses.asdict(s) for s in value] if f.name == "stages" else value
    return out
