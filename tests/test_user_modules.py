"""What users attach to or swap into a model is honoured on every path: forward hooks, pruning
and adapters on the stem's convolution and on the Linear layers that the fast paths read the
weights of, dynamically quantised Linear layers; and an empty batch with gradients on."""

from __future__ import annotations

import copy
import warnings
from unittest import mock

import pytest
import torch
import torch.nn.utils.prune as prune
from torch import nn

from sparseformer import create_model
from sparseformer.layers import mixing_fused


class Adapter(nn.Module):
    """A LoRA-like adapter by composition (as PEFT wraps a layer): not an ``nn.Linear``."""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.base = base
        self.down = nn.Parameter(torch.zeros(2, base.in_features))
        self.up = nn.Parameter(torch.zeros(base.out_features, 2))

    def forward(self, x):
        return self.base(x) + x @ self.down.t() @ self.up.t()


@pytest.mark.parametrize(
    "name, shape",
    [("sparseformer_v1_nano", (2, 3, 32, 32)), ("video_sparseformer_v1_micro", (2, 3, 2, 32, 32))],
)
def test_hooks_on_the_stem_convolution_see_and_change_its_output(name, shape):
    model = create_model(name).eval()
    x = torch.randn(shape)
    with torch.no_grad():
        plain = model(x)
        seen = []
        handle = model.stem.conv.register_forward_hook(lambda m, i, o: seen.append(o.shape))
        torch.testing.assert_close(model(x), plain, rtol=0, atol=1e-5)  # the same numbers
        handle.remove()
        assert len(seen) == 1 and seen[0][0] == 2
        handle = model.stem.conv.register_forward_hook(lambda m, i, o: torch.zeros_like(o))
        zeroed = model(x)
        handle.remove()
    assert (zeroed - plain).abs().max() > 1e-3


def test_a_pruned_stem_trains():
    """Pruning recomputes the weight in a forward pre-hook: the stem must call its conv."""
    model = create_model("sparseformer_v1_nano").train()
    prune.l1_unstructured(model.stem.conv, "weight", amount=0.5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        model(torch.randn(2, 3, 32, 32)).logsumexp(-1).mean().backward()
        optimizer.step()
    assert (model.stem.conv.weight == 0).float().mean() >= 0.5  # the mask holds after a step


def test_adapters_wrapping_the_generator_and_geometry_projections():
    model = create_model("sparseformer_v1_nano").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = model(x)
    op = model.stages[0].units[0].sample_mix
    op.mixing.generator = Adapter(op.mixing.generator)
    op.offset_proj = Adapter(op.offset_proj)
    roi = model.stages[0].units[0].roi_adjust
    roi.proj = Adapter(roi.proj)
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain, rtol=0, atol=1e-5)  # zero adapters
        nn.init.normal_(op.mixing.generator.down)
        nn.init.normal_(op.mixing.generator.up)
        assert (model(x) - plain).abs().max() > 1e-3  # ... and a trained one counts
    model.train()
    model(x).sum().backward()
    assert op.mixing.generator.down.grad is not None and roi.proj.down.grad is not None


class ConvAdapter(nn.Module):
    """A convolution wrapped by composition, with a zero-initialised 1x1 branch."""

    def __init__(self, base: nn.Conv2d) -> None:
        super().__init__()
        self.base = base
        self.branch = nn.Conv2d(base.in_channels, base.out_channels, 1, base.stride, 0)
        nn.init.zeros_(self.branch.weight)
        nn.init.zeros_(self.branch.bias)

    def forward(self, x):
        return self.base(x) + self.branch(x)


def test_a_stem_convolution_wrapped_in_an_adapter():
    model = create_model("sparseformer_v1_nano").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = model(x)
        model.stem.conv = ConvAdapter(model.stem.conv)
        torch.testing.assert_close(model(x), plain, rtol=0, atol=1e-5)
        nn.init.normal_(model.stem.conv.branch.weight)
        assert (model(x) - plain).abs().max() > 1e-3


def test_a_forward_replaced_on_the_instance_and_backward_hooks_are_honoured():
    """Tools such as accelerate replace ``module.forward`` on the instance; gradient tools
    register backward hooks: both need the layer to be called."""
    model = create_model("sparseformer_v1_nano").train()
    mixing = model.stages[0].units[0].sample_mix.mixing
    calls, grads = [], []
    plain_forward = mixing.generator.forward
    mixing.generator.forward = lambda x: calls.append(1) or plain_forward(x)
    mixing.reduce.register_full_backward_hook(lambda m, gi, go: grads.append(go[0].shape))
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert calls and grads  # once per application of the unit


def test_dynamically_quantised_linear_layers():
    model = create_model("sparseformer_v1_nano").eval()
    x = torch.randn(1, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's deprecation notes of eager quantisation
        quantised = torch.ao.quantization.quantize_dynamic(
            copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8
        )
    with torch.no_grad():
        expected, got = model(x), quantised(x)
    assert (got - expected).abs().max() < 0.1 * expected.abs().max()


@pytest.mark.parametrize("layer", ["generator", "reduce", "out_proj", "norm"])
def test_a_mixing_layers_hook_sees_the_whole_batch_in_inference(monkeypatch, layer):
    """CPU inference decodes a few images at a time, but not past a hooked layer."""
    model = create_model("sparseformer_v1_nano").eval()
    mixing = model.stages[0].units[0].sample_mix.mixing
    C, P, N = mixing.in_channels, mixing.num_points, model.config.num_tokens
    monkeypatch.setattr(mixing_fused, "_CHUNK_FLOATS", 2 * N * (C * C + P * P))  # 2 images
    seen = []
    getattr(mixing, layer).register_forward_hook(lambda m, i, o: seen.append(o.shape[0]))
    with torch.inference_mode(), mock.patch.object(mixing, "_mix", wraps=mixing._mix) as spy:
        model(torch.randn(4, 3, 32, 32))
    assert seen and set(seen) == {4}  # once per application of the unit, the whole batch
    assert {call.args[0].shape[0] for call in spy.call_args_list} == {4}
    getattr(mixing, layer)._forward_hooks.clear()
    with torch.inference_mode(), mock.patch.object(mixing, "_mix", wraps=mixing._mix) as spy:
        model(torch.randn(4, 3, 32, 32))
    assert {call.args[0].shape[0] for call in spy.call_args_list} == {2}  # without: chunks


def test_an_empty_batch_with_gradients_on():
    """The CPU training path of adaptive mixing (SparseFormer-T's width) takes no images."""
    model = create_model("sparseformer_v1_tiny", num_classes=5).train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "statistics of nothing" notes from torch
        out = model(torch.randn(0, 3, 64, 64))
        assert out.shape == (0, 5)
        out.sum().backward()
