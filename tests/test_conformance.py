"""Conformance with the authors' code on the shipped fixture (see data/README.md)."""

from __future__ import annotations

import json
from contextlib import ExitStack
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

from sparseformer import SparseFormer, SparseFormerConfig, StageConfig, load_checkpoint
from sparseformer.layers.mixing_fused import fused_mix
from sparseformer.layers.sampling import sample_features_gather
from sparseformer.weights.convert import convert_state_dict

from .conftest import DATA

FIXTURE = DATA / "official-v1-small-config.safetensors"


def fixture_config() -> SparseFormerConfig:
    with safe_open(str(FIXTURE), "pt") as f:
        cfg = json.loads(f.metadata()["config"])
    stages = tuple(
        StageConfig(width, depth, repeats)
        for width, depth, repeats in zip(
            cfg["width_configurations"], cfg["block_sizes"], cfg["repeats"]
        )
    )
    return SparseFormerConfig(
        stages=stages,
        num_tokens=cfg["num_latent_tokens"],
        num_points=cfg["token_sampling_points"],
        stem_channels=cfg["conv_dim"],
        drop_path_rate=cfg["drop_path_rate"],
    )


@pytest.fixture(scope="module")
def fixture():
    return load_file(str(FIXTURE))


def layout(fixture, prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) + 1 :]: v for k, v in fixture.items() if k.startswith(prefix + ".")}


def cpu_fast_paths() -> ExitStack:
    """Every CPU fast path on, whatever this machine and the fixture's small sizes would choose:
    the gather sampler, the fused mixing and the narrow-head attention."""
    stack = ExitStack()
    for target in (
        "sparseformer.layers.sampling._GATHER_MIN_CHANNELS",
        "sparseformer.layers.sampling._GATHER_MIN_PIXELS",
        "sparseformer.layers.mixing_fused._FUSED_MIN_FLOATS",
    ):
        stack.enter_context(mock.patch(target, 0))
    stack.enter_context(
        mock.patch.object(torch.backends.cpu, "get_cpu_capability", return_value="AVX2")
    )
    race = mock.patch("sparseformer.layers.attention._products_win", return_value=True)
    stack.enter_context(race)  # inference measures the two: here the two products, always
    return stack


@pytest.mark.parametrize("fast_paths", [False, True])
@pytest.mark.parametrize("fmt", ["imagenet", "v2"])
@pytest.mark.parametrize("batch", ["a", "b"])
def test_matches_official_outputs_and_gradients(fixture, fmt, batch, fast_paths):
    model = SparseFormer(fixture_config()).eval()
    report = load_checkpoint(model, {"model": layout(fixture, fmt)})
    assert report.source_format == fmt and not report.dropped

    with cpu_fast_paths() if fast_paths else ExitStack() as stack:
        spies = [
            stack.enter_context(mock.patch(target, wraps=wrapped))
            for target, wrapped in (
                ("sparseformer.layers.mixing.fused_mix", fused_mix),
                ("sparseformer.layers.sampling.sample_features_gather", sample_features_gather),
                (
                    "torch.nn.functional.scaled_dot_product_attention",
                    F.scaled_dot_product_attention,
                ),
            )
        ]
        out = model.forward_with_details(fixture[f"input_{batch}"])
    called = [spy.called for spy in spies]
    if fast_paths:  # the fast paths ran: the gather, the fused mixing, no fused attention
        assert called == [True, True, False]
    torch.testing.assert_close(out.logits, fixture[f"logits_{batch}"], rtol=0, atol=1e-5)
    torch.testing.assert_close(out.rois[-1], fixture[f"rois_{batch}"], rtol=0, atol=1e-5)

    (out.logits * fixture[f"loss_weights_{batch}"]).sum().backward()
    # Gradients are stored under the ImageNet-release names; map them to ours.
    _, names = convert_state_dict(layout(fixture, "imagenet"))
    params = dict(model.named_parameters())
    assert set(names.renamed.values()) == set(params)
    for official, ours in names.renamed.items():
        reference = fixture[f"grad_{batch}.{official}"]
        grad = params[ours].grad
        assert grad is not None, ours
        rel = (grad - reference).norm() / reference.norm().clamp_min(1e-12)
        assert rel <= 1e-4, f"{ours}: relative gradient error {rel:.2e}"


def test_gradient_clamp_is_what_makes_the_gradients_match(fixture):
    """Without the coordinate-gradient clamp the RoI gradients differ: the test can fail."""
    model = SparseFormer(fixture_config()).eval()
    load_checkpoint(model, layout(fixture, "imagenet"))
    out = model(fixture["input_a"], coord_grad_scale=1e6)  # effectively unclamped
    (out * fixture["loss_weights_a"]).sum().backward()
    reference = fixture["grad_a.token_roi.weight"]
    rel = (model.initial_rois.grad - reference).norm() / reference.norm()
    assert rel > 1e-2
