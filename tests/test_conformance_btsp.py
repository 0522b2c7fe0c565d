"""Conformance of the bootstrapped SparseFormers (CVPR 2024) with the authors' library, on the
shipped fixture (see data/README.md): both configurations built from the authors' constructor
arguments, their weights loaded through our loader."""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from sparseformer import SparseFormer, load_checkpoint
from sparseformer.weights.convert import convert_state_dict
from sparseformer.weights.convert_btsp import btsp_config

from .conftest import DATA

FIXTURE = DATA / "official-btsp-small-config.safetensors"
VARIANTS = ("augreg", "clip")
_NOT_WEIGHTS = ("input_", "output_", "rois_", "loss_weights_", "grad_")


def authors_config(variant: str) -> dict:
    with safe_open(str(FIXTURE), "pt") as f:
        return json.loads(f.metadata()[f"config_{variant}"])


@pytest.fixture(scope="module")
def fixture():
    return load_file(str(FIXTURE))


def weights(fixture, variant: str) -> dict[str, torch.Tensor]:
    """The authors' library-layout state dict of ``variant``."""
    prefix = variant + "."
    return {
        k[len(prefix) :]: v
        for k, v in fixture.items()
        if k.startswith(prefix) and not k[len(prefix) :].startswith(_NOT_WEIGHTS)
    }


def build(fixture, variant: str, **overrides) -> SparseFormer:
    model = SparseFormer(btsp_config(authors_config(variant), **overrides)).eval()
    report = load_checkpoint(model, {"model": weights(fixture, variant)})
    assert report.source_format == "btsp" and not report.dropped
    return model


def test_configs_are_the_two_variants():
    augreg, clip = (btsp_config(authors_config(v)) for v in VARIANTS)
    for config in (augreg, clip):
        assert config.num_tokens == 7 and config.cls_token_unit == 2
        assert config.global_pool == "token" and config.shared_initial_token
    assert augreg.head_bias and not clip.head_bias
    assert [s.mlp_activation for s in augreg.stages] == [None, None]
    assert [s.mlp_activation for s in clip.stages] == [None, "quick_gelu"]
    assert clip.activation == "gelu"  # the focusing unit and the mixing keep exact GELU


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("batch", ["a", "b"])
def test_matches_official_outputs_and_gradients(fixture, variant, batch):
    model = build(fixture, variant)
    x = fixture[f"{variant}.input_{batch}"]
    out = model.forward_with_details(x)
    expected = fixture[f"{variant}.output_{batch}"]
    torch.testing.assert_close(out.logits, expected, rtol=0, atol=1e-5)
    # the final RoIs of the 7 latent tokens: the CLS token has none
    torch.testing.assert_close(out.rois[-1], fixture[f"{variant}.rois_{batch}"], rtol=0, atol=1e-5)
    assert out.tokens.shape[1] == 1 + model.config.num_tokens

    (out.logits * fixture[f"{variant}.loss_weights_{batch}"]).sum().backward()
    # Gradients are stored under the authors' names; map them with the same conversion.
    _, names = convert_state_dict(weights(fixture, variant))
    params = dict(model.named_parameters())
    assert set(names.renamed.values()) == set(params)
    for official, ours in names.renamed.items():
        reference = fixture[f"{variant}.grad_{batch}.{official}"]
        grad = params[ours].grad
        assert grad is not None, ours
        rel = (grad - reference).norm() / reference.norm().clamp_min(1e-12)
        assert rel <= 1e-4, f"{ours}: relative gradient error {rel:.2e}"


def _gelu_cortex() -> dict:
    stages = btsp_config(authors_config("clip")).stages
    return {"stages": tuple(dataclasses.replace(s, mlp_activation=None) for s in stages)}


@pytest.mark.parametrize(
    "variant, change",
    [
        ("clip", "gelu_cortex"),  # exact GELU in the cortex instead of QuickGELU
        ("augreg", {"stem_unbiased": True}),
        ("augreg", {"mixing_inner_activation": True}),
    ],
)
def test_each_variant_setting_is_visible_in_the_outputs(fixture, variant, change):
    """The fixture tells these settings apart: the matching test could fail. (It does not
    tell the stem's eps nor the padding mode apart: the values and points it reaches do not
    depend on them; those follow the authors' constructor arguments and the issue.)"""
    if change == "gelu_cortex":
        change = _gelu_cortex()
    model = build(fixture, variant, **change)
    with torch.no_grad():
        out = model(fixture[f"{variant}.input_a"])
    assert (out - fixture[f"{variant}.output_a"]).abs().max() > 1e-4


def test_no_coordinate_gradient_clamp(fixture):
    """The authors' gradients are unclamped: scaled by 1e4 they stay exact without the clamp,
    and v1's clamp (to 1/H) cuts them."""
    scale = 1e4
    reference = fixture["augreg.grad_a.initial_roi.weight"] * scale
    errors = []
    for clamp in (False, True):
        model = build(fixture, "augreg", coord_grad_clamp=clamp)
        out = model(fixture["augreg.input_a"])
        (out * fixture["augreg.loss_weights_a"] * scale).sum().backward()
        errors.append((model.initial_rois.grad - reference).norm() / reference.norm())
    assert errors[0] <= 1e-4 < 1e-2 < errors[1]


def test_missing_stage_embedding_is_zero_and_said(fixture, caplog):
    """A released file without stage embeddings (the authors' converter deletes them) loads
    with zeros, the value that adds nothing, and says so in one line."""
    state = weights(fixture, "augreg")
    del state["layers.0.stage_embedding.weight"]
    model = SparseFormer(btsp_config(authors_config("augreg")))
    with torch.no_grad():
        model.stages[0].stage_embedding.normal_()
    with caplog.at_level(logging.INFO, logger="sparseformer"):
        load_checkpoint(model, state)
    assert torch.equal(model.stages[0].stage_embedding, torch.zeros(3, 64))
    lines = [r.getMessage() for r in caplog.records if "stage_embedding" in r.getMessage()]
    assert len(lines) == 1 and "zeros" in lines[0]


def test_missing_stage_embedding_is_zero_by_every_route(fixture, tmp_path):
    """``model.load_state_dict`` and timm's ``checkpoint_path`` (which calls it) fill a missing
    stage embedding as load_checkpoint does."""
    state = weights(fixture, "augreg")
    del state["layers.0.stage_embedding.weight"]
    model = SparseFormer(btsp_config(authors_config("augreg")))
    with torch.no_grad():
        model.stages[0].stage_embedding.normal_()
    model.load_state_dict(state)
    assert torch.equal(model.stages[0].stage_embedding, torch.zeros(3, 64))
    assert "layers.0.stage_embedding.weight" not in state  # the caller's dict is untouched
    torch.save(state, tmp_path / "released.pth")
    loaded = timm.create_model(
        "sparseformer_btsp_nano", checkpoint_path=str(tmp_path / "released.pth")
    )
    torch.testing.assert_close(loaded.state_dict(), model.state_dict(), rtol=0, atol=0)


def test_a_release_without_stage_embeddings_converts_to_a_file_that_loads(fixture, tmp_path):
    """``convert --model`` checks the weights by loading them; the file it wrote lacked the
    stage embedding that loading had filled, and no strict load took it."""
    from sparseformer.cli import main

    state = weights(fixture, "augreg")
    del state["layers.0.stage_embedding.weight"]
    torch.save({"model": state}, tmp_path / "released.pth")
    out = tmp_path / "ours.safetensors"
    assert main(["convert", str(tmp_path / "released.pth"), str(out),
                 "--model", "sparseformer_btsp_nano"]) == 0  # fmt: skip
    assert torch.equal(load_file(str(out))["stages.0.stage_embedding"], torch.zeros(3, 64))
    converted = timm.create_model("sparseformer_btsp_nano", checkpoint_path=str(out))
    released = timm.create_model(
        "sparseformer_btsp_nano", checkpoint_path=str(tmp_path / "released.pth")
    )
    torch.testing.assert_close(converted.state_dict(), released.state_dict(), rtol=0, atol=0)
