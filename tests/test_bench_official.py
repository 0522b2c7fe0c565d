"""`sparseformer bench --official PATH`: the authors' model found in their code, built with the
compared SparseFormer's architecture, timed beside it, and ours reported against it.

The authors' code is not shipped here; a stand-in checkout (a package with relative imports, a
decoy class, a hidden folder) is written per test. Its model is a small network: these tests
check finding, building and reporting, not anyone's speed.
"""

from __future__ import annotations

import sys
import textwrap

import pytest

from sparseformer.bench.official import build_official, official_counterparts, official_kwargs
from sparseformer.bench.throughput import BenchError, BenchSettings, run_benchmark
from sparseformer.cli import main
from sparseformer.weights.registry import MODELS

STAND_IN = """
from torch import nn

from .helpers import head

BUILT = []


class SparseFormer(nn.Module):
    def __init__(self, conv_dim=64, num_latent_tokens=49, token_sampling_points=36,
                 width_configurations=(256, 512), block_sizes=(1, 8), repeats=(4, 1),
                 num_classes=1000, drop_path_rate=0.2):
        super().__init__()
        BUILT.append(dict(conv_dim=conv_dim, num_latent_tokens=num_latent_tokens,
                          token_sampling_points=token_sampling_points,
                          width_configurations=width_configurations, block_sizes=block_sizes,
                          repeats=repeats, num_classes=num_classes,
                          drop_path_rate=drop_path_rate))
        self.body = nn.Sequential(nn.Conv2d(3, conv_dim, 4, 4), head(conv_dim, num_classes))

    def forward(self, x):
        return self.body(x), None  # (logits, something else), as some codebases return
"""


@pytest.fixture
def authors(tmp_path):
    """A stand-in checkout; the modules it imported are forgotten afterwards."""
    repo = tmp_path / "authors_code"
    package = repo / "authors_models"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "helpers.py").write_text(
        "from torch import nn\n\ndef head(c, n):\n"
        "    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, n))\n"
    )
    (package / "sparseformer.py").write_text(textwrap.dedent(STAND_IN))
    # the authors' library class: other constructor arguments, not the v1 model
    (package / "library.py").write_text(
        "class SparseFormer:\n    def __init__(self, width_configs, ops_list):\n        pass\n"
    )
    (repo / ".git").mkdir()
    (repo / ".git" / "broken.py").write_text("def (:\n")
    yield repo
    for name, module in list(sys.modules.items()):
        if str(getattr(module, "__file__", None) or "").startswith(str(tmp_path)):
            del sys.modules[name]
    sys.path[:] = [p for p in sys.path if not p.startswith(str(tmp_path))]


def test_the_authors_model_is_found_and_built_with_the_same_architecture(authors):
    model = build_official(authors, "sparseformer_v1_tiny", num_classes=10)
    built = sys.modules["authors_models.sparseformer"].BUILT
    assert built == [official_kwargs(MODELS["sparseformer_v1_tiny"].config, num_classes=10)]
    assert built[0]["width_configurations"] == [256, 512] and built[0]["conv_dim"] == 96
    import torch

    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)  # the logits of its tuple


def test_only_v1_image_sparseformers_have_an_authors_counterpart():
    names = ("sparseformer_v1_tiny", "sparseformer_v1_base", "deit_small_patch16_224")
    names += ("video_sparseformer_v1_tiny", "sparseformer_btsp_augreg_base")
    assert official_counterparts(names) == ["sparseformer_v1_tiny", "sparseformer_v1_base"]


def test_bench_times_ours_against_the_authors_round_by_round(authors, capsys):
    settings = BenchSettings(
        models=("sparseformer_v1_tiny",),
        img_sizes=(32,),
        batch_size=1,
        train_batch_size=1,
        repeats=2,
        warmup=0,
        min_time=0.0,
        num_classes=10,
        official=str(authors),
    )
    result = run_benchmark(settings)
    ours, theirs = result.rows
    assert (ours.model, theirs.model) == ("sparseformer_v1_tiny", "authors:sparseformer_v1_tiny")
    expected = sorted(a / b for a, b in zip(ours.throughput.runs, theirs.throughput.runs))
    assert ours.ratios["authors_throughput"] == pytest.approx(sum(expected) / 2)
    train = [a / b for a, b in zip(ours.train_throughput.runs, theirs.train_throughput.runs)]
    assert ours.ratios["authors_train"] == pytest.approx(sum(train) / 2)
    assert ours.ratios["authors_latency"] > 0 and "authors_throughput" not in theirs.ratios
    argv = ["bench", "--models", "sparseformer_v1_tiny", "--img-size", "32", "--batch-size", "1"]
    argv += ["--train-batch-size", "1", "--repeats", "1", "--warmup", "0", "--min-time", "0"]
    assert main([*argv, "--official", str(authors)]) == 0
    out = capsys.readouterr().out
    assert "| authors:sparseformer_v1_tiny |" in out
    assert f"sparseformer_v1_tiny at 32 px against the authors' implementation ({authors})" in out


def test_bad_official_paths_fail_in_one_line(authors, tmp_path, capsys):
    argv = ["bench", "--models", "sparseformer_v1_tiny", "--img-size", "32", "--no-train"]
    argv += ["--official"]
    cases = {
        str(tmp_path / "nowhere"): "no such file or directory",
        str(authors / "authors_models" / "library.py"): "no class there takes the v1",
    }
    missing = tmp_path / "needs_dep.py"
    missing.write_text(
        "import no_such_dependency_xyz\n\nclass Model:\n    def __init__(self, conv_dim, "
        "num_latent_tokens, token_sampling_points, width_configurations, block_sizes, "
        "repeats):\n        pass\n"
    )
    cases[str(missing)] = "needs 'no_such_dependency_xyz', which is not installed"
    for path, message in cases.items():
        assert main([*argv, path]) == 1
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    with pytest.raises(BenchError, match="add one"):
        run_benchmark(BenchSettings(models=("deit_tiny_patch16_224",), official=str(authors)))
