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

from .test_benchmark import small_settings

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


HELPERS = (
    "from torch import nn\n\ndef head(c, n):\n"
    "    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, n))\n"
)


def write_checkout(repo, package: str | None) -> str:
    """A stand-in checkout: the model in ``package`` (relative imports) or, with ``None``, in a
    top-level ``sparseformer.py`` beside ``helpers.py``. Returns the model's module name."""
    folder = repo / package if package else repo
    folder.mkdir(parents=True)
    (folder / "helpers.py").write_text(HELPERS)
    source = textwrap.dedent(STAND_IN)
    if package:
        (folder / "__init__.py").write_text("")
    else:
        source = source.replace("from .helpers import", "from helpers import")
    (folder / "sparseformer.py").write_text(source)
    # decoys: the authors' library class (other constructor arguments), a video model with
    # the same arguments in a file read first, a file that does not parse in a hidden folder
    (folder / "library.py").write_text(
        "class SparseFormer:\n    def __init__(self, width_configs, ops_list):\n        pass\n"
    )
    (folder / "a_video.py").write_text(
        "import no_such_dependency_xyz\n\nclass VideoSparseFormer:\n    def __init__(self, "
        "conv_dim, num_latent_tokens, token_sampling_points, width_configurations, "
        "block_sizes, repeats, num_frames):\n        pass\n"
    )
    (repo / ".git").mkdir()
    (repo / ".git" / "broken.py").write_text("def (:\n")
    return f"{package}.sparseformer" if package else "sparseformer"


@pytest.fixture
def forget_imports(tmp_path):
    """The stand-in's modules are forgotten afterwards, and its folders left off sys.path."""
    yield
    for name, module in list(sys.modules.items()):
        if str(getattr(module, "__file__", None) or "").startswith(str(tmp_path)):
            del sys.modules[name]
    sys.path[:] = [p for p in sys.path if not p.startswith(str(tmp_path))]


@pytest.fixture
def authors(tmp_path, forget_imports):
    repo = tmp_path / "authors_code"
    write_checkout(repo, "authors_models")
    return repo


@pytest.mark.parametrize("package", ["authors_models", "sparseformer", None])
def test_the_authors_model_is_found_and_built_with_the_same_architecture(
    tmp_path, forget_imports, package
):
    """Also when their folder or file is called ``sparseformer``, as this package is."""
    import sparseformer

    repo = tmp_path / "authors_code"
    write_checkout(repo, package)
    model = build_official(repo, "sparseformer_v1_tiny", num_classes=10)
    module = sys.modules[type(model.model).__module__]
    assert module.__file__.startswith(str(repo)) and sys.modules["sparseformer"] is sparseformer
    assert type(model.model).__name__ == "SparseFormer"  # not the video decoy
    assert module.BUILT == [official_kwargs(MODELS["sparseformer_v1_tiny"].config, num_classes=10)]
    assert module.BUILT[0]["width_configurations"] == [256, 512]
    assert module.BUILT[0]["conv_dim"] == 96
    import torch

    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)  # the logits of its tuple


def test_relative_imports_work_in_a_folder_without_init(tmp_path, forget_imports):
    """A namespace package (no ``__init__.py``): its file was imported as a top-level module,
    where ``from .helpers import`` cannot resolve, though the docs promise relative imports."""
    repo = tmp_path / "authors_code"
    write_checkout(repo, "authors_ns")
    (repo / "authors_ns" / "__init__.py").unlink()
    model = build_official(repo, "sparseformer_v1_tiny", num_classes=10)
    assert type(model.model).__module__ == "authors_ns.sparseformer"


def test_grad_checkpointing_reaches_the_authors_model_or_names_official(authors):
    """The authors' row is --official's, not --models': it checkpoints where their model can,
    and where it cannot, the error says to drop --official, not "that model"."""
    import torch
    from torch import nn

    from sparseformer.bench.official import _LogitsOnly
    from sparseformer.bench.throughput import _check_grad_checkpointing

    class Checkpointing(nn.Module):
        enabled = None

        def set_grad_checkpointing(self, enable=True):
            self.enabled = enable

        def forward(self, x):
            return x

    inner = Checkpointing()
    _LogitsOnly(inner).set_grad_checkpointing(True)
    assert inner.enabled is True
    _check_grad_checkpointing("authors:sparseformer_v1_tiny", _LogitsOnly(inner))
    plain = _LogitsOnly(nn.Identity())
    with pytest.raises(BenchError, match="drop --grad-checkpointing or --official"):
        _check_grad_checkpointing("authors:sparseformer_v1_tiny", plain)
    assert torch.equal(plain(torch.ones(1)), torch.ones(1))


def test_only_v1_image_sparseformers_have_an_authors_counterpart():
    names = ("sparseformer_v1_tiny", "sparseformer_v1_base", "deit_small_patch16_224")
    names += ("video_sparseformer_v1_tiny", "sparseformer_btsp_augreg_base")
    assert official_counterparts(names) == ["sparseformer_v1_tiny", "sparseformer_v1_base"]
    # a released model's tag names the same architecture (the sweep's subject too)
    assert official_counterparts(("sparseformer_v1_tiny.in1k",)) == ["sparseformer_v1_tiny.in1k"]
    from sparseformer.bench.sweep import subject_model

    assert subject_model(["resnet18", "sparseformer_v1_tiny.in1k"]) == "sparseformer_v1_tiny.in1k"


def test_bench_times_ours_against_the_authors_round_by_round(authors, capsys):
    settings = small_settings(
        models=("sparseformer_v1_tiny",),
        img_sizes=(32,),
        batch_size=1,
        train_batch_size=1,
        warmup=0,
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
        str(authors / "authors_models" / "a_video.py"): "needs 'no_such_dependency_xyz', which "
        "is not installed",
    }
    sibling = authors / "authors_models" / "needs_sibling.py"  # their own module, missing
    sibling.write_text(STAND_IN.replace(".helpers", ".not_in_this_checkout"))
    cases[str(sibling)] = "needs 'authors_models.not_in_this_checkout', a module of the authors'"
    broken = tmp_path / "broken.py"
    broken.write_text("class SparseFormer(nn.Module:\n    pass\n")
    cases[str(broken)] = "broken.py does not parse (line 1: "
    binary = tmp_path / "weights.py"  # not source at all: Python gives no line
    binary.write_bytes(b"\x00\x01binary")
    cases[str(binary)] = "weights.py does not parse (source code string cannot contain null "
    deep = tmp_path / "deep.py"  # the parser's stack overflows: it raised MemoryError
    deep.write_text("x = " + "-" * 200_000 + "1\n")
    cases[str(deep)] = "deep.py does not parse (nested too deeply for Python's parser)"
    for path, message in cases.items():
        assert main([*argv, path]) == 1
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    with pytest.raises(BenchError, match=r"add one they released \(sparseformer_v1_tiny, "):
        run_benchmark(BenchSettings(models=("sparseformer_v1_nano",), official=str(authors)))
