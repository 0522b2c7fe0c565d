"""`sparseformer bench` runs on small models and writes well-formed results (no timing checks)."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import stat

import pytest
import timm

from sparseformer.bench.counting import count_flops
from sparseformer.bench.report import markdown_table
from sparseformer.bench.throughput import BenchError, BenchSettings, build_model, run_benchmark
from sparseformer.cli import main

SMALL = ("sparseformer_v1_nano", "sparseformer_v1_micro")


def small_settings(**overrides) -> BenchSettings:
    kwargs = dict(
        models=SMALL,
        img_sizes=(32, 64),
        batch_size=2,
        train_batch_size=2,
        repeats=2,
        warmup=1,
        min_time=0.0,
        num_classes=10,
    )
    return BenchSettings(**(kwargs | overrides))


def test_run_benchmark_reports_every_model_and_size():
    result = run_benchmark(small_settings(baseline="sparseformer_v1_micro"))
    assert [(r.model, r.img_size) for r in result.rows] == [(m, s) for s in (32, 64) for m in SMALL]
    assert result.matmul_peak_gflops.median > 0
    assert len(result.matmul_peak_gflops.runs) == 4  # one per round per size
    for row in result.rows:
        assert row.params > 0
        assert 0 < row.gflops_paper <= row.gflops_complete
        assert len(row.throughput.runs) == 2
        assert row.throughput.min <= row.throughput.median <= row.throughput.max
        assert row.latency_ms.median > 0
        assert row.train_throughput is not None and row.train_throughput.median > 0
        assert row.peak_memory_mb is not None and row.peak_memory_mb >= 0
        expected = 2 * row.gflops_complete * row.throughput.median
        assert row.peak_fraction == pytest.approx(expected / result.matmul_peak_gflops.median)
        if row.model == "sparseformer_v1_micro":  # the baseline is 1 by construction
            assert row.ratios == {"throughput": 1.0, "latency": 1.0, "train": 1.0}
    # Only the stem sees pixels: 4x the pixels costs SparseFormer far less than 4x the FLOPs.
    nano = {r.img_size: r.gflops_complete for r in result.rows if r.model == SMALL[0]}
    assert nano[64] < 4 * nano[32]
    table = markdown_table(result)
    assert table.count("\n") == 1 + len(result.rows)


def test_cli_writes_json_csv_and_plot(tmp_path, capsys):
    paths = {ext: tmp_path / f"out.{ext}" for ext in ("json", "csv", "png")}
    argv = ["bench", "--models", *SMALL, "--batch-size", "2", "--img-size", "32"]
    argv += ["--repeats", "1", "--min-time", "0", "--no-train"]
    argv += ["--json", str(paths["json"]), "--csv", str(paths["csv"]), "--plot", str(paths["png"])]
    assert main(argv) == 0
    data = json.loads(paths["json"].read_text())
    assert data["environment"]["threads"] >= 1 and data["environment"]["torch"]
    assert 0 < data["environment"]["cpu_share"]  # what the timed calls got of their cores
    assert data["settings"]["baseline"] == SMALL[0]
    keys = {"params", "gflops_paper", "gflops_complete", "throughput", "latency_ms"}
    keys |= {"peak_memory_mb", "peak_fraction", "img_size", "model"}
    for row in data["rows"]:
        assert keys <= set(row)
        assert math.isfinite(row["peak_fraction"]) and row["train_throughput"] is None
    with open(paths["csv"]) as f:
        assert [r["model"] for r in csv.DictReader(f)] == list(SMALL)
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"
    assert "sparseformer_v1_micro" in capsys.readouterr().out
    # a device is written into, never renamed over; one path for two outputs is refused
    link = tmp_path / "null.json"
    link.symlink_to(os.devnull)
    assert main([*argv[: argv.index("--json")], "--json", str(link)]) == 0
    assert stat.S_ISCHR(os.stat(os.devnull).st_mode) and link.is_symlink()
    alias = tmp_path / "alias.json"  # a second name for out.json: one file for two outputs
    alias.symlink_to(paths["json"])
    twice = [*argv[: argv.index("--json")], "--json", str(paths["json"]), "--csv", str(alias)]
    assert main(twice) == 1 and "is given for two outputs" in capsys.readouterr().err
    weights = tmp_path / "best.pt"  # a link named .json to a checkpoint: not replaced
    weights.write_bytes(b"a run's weights")
    (tmp_path / "to_weights.json").symlink_to(weights)
    linked = [*argv[: argv.index("--json")], "--json", str(tmp_path / "to_weights.json")]
    assert main(linked) == 1 and "a file of another kind" in capsys.readouterr().err
    assert weights.read_bytes() == b"a run's weights"


def test_cli_rejects_unknown_model_in_one_line(capsys):
    assert main(["bench", "--models", "no_such_model_xyz", "--no-train"]) == 1
    err = capsys.readouterr().err.strip()
    assert "no_such_model_xyz" in err and len(err.splitlines()) == 1
    assert main(["bench", "--models", "sparsformer_v1_nano", "--no-train"]) == 1
    assert "did you mean sparseformer_v1_nano" in capsys.readouterr().err
    assert main(["bench", "--models", "sparseformer_v1_nano", "--plot", "p.xyz"]) == 1
    assert "give a .png" in capsys.readouterr().err
    assert main(["models", "no_such_model_xyz"]) == 1
    assert "no registered model matches" in capsys.readouterr().err
    assert main(["models", "micro"]) == 0  # a part of the names: it matched nothing
    assert capsys.readouterr().out.count("micro ") == 2  # the image and the video model
    assert main(["models", "sparseformer_v1_tiny"]) == 0  # a whole name: that model alone
    assert len(capsys.readouterr().out.splitlines()) == 1
    assert main(["models", "sparseformer_v1_tiny.*"]) == 0  # its tags, as timm lists them
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == ["sparseformer_v1_tiny.in1k", "sparseformer_v1_tiny.in1k_v2"]
    assert main(["models", "*.in1k"]) == 0  # a pattern over the names, a tag given
    assert "sparseformer_v1_small.in1k " in capsys.readouterr().out
    assert main(["models", "sparseformer_v1_nano.*"]) == 1
    assert "no registered model with released weights matches" in capsys.readouterr().err


def test_settings_validate_baseline_and_precision(capsys):
    with pytest.raises(BenchError, match="baseline"):
        small_settings(baseline="resnet50")
    for bad in (-1.0, float("nan")):
        with pytest.raises(BenchError, match="--min-time .*: give a number of seconds"):
            small_settings(min_time=bad)
    assert main(["bench", "--models", "sparseformer_v1_nano", "--num-frames", "4"]) == 1
    assert "--num-frames is for video models" in capsys.readouterr().err
    # a training-step flag where no step is timed was ignored in silence
    nano = ["bench", "--models", "sparseformer_v1_nano"]
    assert main([*nano, "--sweep", "out/s", "--train-batch-size", "8"]) == 1
    assert "--train-batch-size is for the training step, which --sweep leaves out" in (
        capsys.readouterr().err
    )
    assert main([*nano, "--no-train", "--grad-checkpointing"]) == 1
    assert "which --no-train leaves out" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a batch of none was taken
        main([*nano, "--train-batch-size", "0"])
    with pytest.raises(BenchError, match="precision"):
        small_settings(precision="int8")
    with pytest.raises(BenchError, match="fp16 on the CPU is emulated"):
        small_settings(precision="fp16")


def test_timm_baseline_attention_is_counted():
    """DeiT-Ti runs fused attention; the count must include it (paper: 1.3 GFLOPs)."""
    count = count_flops(build_model("deit_tiny_patch16_224", 224), (3, 224, 224))
    attention = sum(v for k, v in count.by_op.items() if "scaled_dot_product" in k)
    assert attention > 0
    assert count.gflops_complete == pytest.approx(1.26, abs=0.02)


def test_video_models_are_timed_on_clips():
    video = "video_sparseformer_v1_micro"
    settings = small_settings(models=(SMALL[0], video), img_sizes=(32,), num_frames=2)
    rows = {r.model: r for r in run_benchmark(settings).rows}
    assert rows[SMALL[0]].num_frames is None and rows[video].num_frames == 2
    assert rows[video].throughput.median > 0 and rows[video].train_throughput.median > 0
    model = build_model(video, 32, 10, num_frames=2)
    assert rows[video].gflops_complete == count_flops(model, (3, 2, 32, 32)).gflops_complete
    table = markdown_table(run_benchmark(settings))
    assert "| 2x32 |" in table and "its row counts clips, not images, per second" in table
    assert "clips" not in markdown_table(run_benchmark(small_settings(img_sizes=(32,))))


def test_training_memory_and_grad_checkpointing_are_reported(monkeypatch):
    from sparseformer.bench import throughput as benchmark
    from sparseformer.bench.report import summary_lines

    built = []
    build = benchmark.build_model
    monkeypatch.setattr(
        benchmark, "build_model", lambda *a, **k: built.append(build(*a, **k)) or built[-1]
    )
    measure = benchmark.peak_memory_mb
    during = []  # the checkpointing flags of the models in training mode, at each measurement

    def spy(fn, device):
        training = [m for m in built if m.training]
        during.append([m.grad_checkpointing for m in training])
        if training:  # the models' steps are measured in turn: the measured one holds no
            measured = training[sum(map(bool, during)) - 1]  # gradients yet, they count too
            assert all(p.grad is None for p in measured.parameters())
        return measure(fn, device)

    monkeypatch.setattr(benchmark, "peak_memory_mb", spy)
    settings = small_settings(img_sizes=(32,), grad_checkpointing=True, warmup=0)
    result = run_benchmark(settings)
    assert all(r.train_peak_memory_mb is not None for r in result.rows)
    assert during[-1] == [True, True]  # the training steps were measured with it on
    assert not any(m.grad_checkpointing for m in built)  # and it is off again afterwards
    assert "gradient checkpointing on" in "\n".join(summary_lines(result))
    assert "train mem (MB)" in markdown_table(result)


# ----------------------------------------------------------------------------- the sweep
def test_crossover_is_the_size_from_which_the_subject_stays_ahead():
    from sparseformer.bench.sweep import crossover

    assert crossover({224: 0.5, 448: 1.8, 768: 3.0, 1024: 4.0}) == 448
    assert crossover({224: 1.2, 448: 1.5}) == 224  # ahead everywhere: already at the smallest
    assert crossover({224: 0.5, 448: 0.9}) is None  # behind everywhere
    assert crossover({224: 0.5, 448: 1.2, 768: 0.9}) is None  # ahead in the middle only
    assert crossover({224: 0.5, 448: 1.0, 768: 1.1}) == 768  # a tie is not ahead
    assert crossover({1024: 2.0, 224: 0.5, 448: 0.7, 768: 1.5}) == 768  # order of the keys
    assert crossover({}) is None


def test_speedups_are_per_round_ratios_against_the_subject():
    from sparseformer.bench.results import BenchResult, BenchRow, Spread
    from sparseformer.bench.sweep import crossover_lines, speedups, sweep_table

    def row(model, size, runs, latency):
        return BenchRow(model, size, 2, 1, 1.0, 1.0, Spread.of(runs), Spread.of([latency]),
                        None, 0.0)  # fmt: skip

    rows = [row("sf", 224, [10, 20], 50), row("peer", 224, [20, 20], 25)]
    rows += [row("sf", 448, [8, 8], 60), row("peer", 448, [4, 2], 120)]
    skipped = [{"model": "other", "img_size": 448, "reason": "RuntimeError: too big"}]
    result = BenchResult({}, {}, Spread.of([1.0]), rows + [row("other", 224, [20, 40], 9)], skipped)
    assert speedups(result, "sf")["peer"] == {224: pytest.approx(0.75), 448: pytest.approx(3.0)}
    assert speedups(result, "sf", "latency")["peer"] == {224: 0.5, 448: 2.0}
    assert speedups(result, "sf")["other"] == {224: 0.5}  # the size it was skipped at is absent
    table = sweep_table(result, "sf").splitlines()
    assert table[0].startswith("| model | published top-1 | img/s 224 / 448 | batch-1 ms 224 / 448")
    assert table[2:] == [
        "| sf | - | 15 / 8 | 50 / 60 | 1 / 1 | - |",
        "| peer | - | 20 / 3 | 25 / 120 | 1 / 1 | 448 px |",
        "| other | - | 30 / - | 9 / - | 1 / - | not up to 448 px |",
    ]
    lines = crossover_lines(result, "sf")
    assert "sf ahead of peer in throughput from 448 px" in lines[0]
    assert "other skipped at 448 px: RuntimeError: too big" in lines[-1]


def test_sweep_scales_the_batch_and_skips_sizes_a_model_cannot_take(monkeypatch):
    from sparseformer.bench import throughput as benchmark

    build = benchmark.build_model

    def picky(name, img_size, *args, **kwargs):
        if name == "test_vit" and img_size == 64:
            raise RuntimeError("position table fixed at 32 px\nsecond line")
        return build(name, img_size, *args, **kwargs)

    monkeypatch.setattr(benchmark, "build_model", picky)
    settings = small_settings(
        models=(SMALL[0], "test_vit"), img_sizes=(64, 256), repeats=1, batch_size=4,
        scale_batch=True, train=False,
    )  # fmt: skip
    with pytest.raises(BenchError, match=r"^test_vit cannot take 64 px inputs \(RuntimeError"):
        run_benchmark(settings)
    assert [settings.batch_at(s) for s in (32, 224, 256, 448, 1024)] == [4, 4, 3, 1, 1]
    result = run_benchmark(dataclasses.replace(settings, skip_unsupported=True))
    assert [(r.model, r.img_size, r.batch_size) for r in result.rows] == [
        (SMALL[0], 64, 4), (SMALL[0], 256, 3), ("test_vit", 256, 3)
    ]  # fmt: skip
    assert result.skipped == [
        {
            "model": "test_vit",
            "img_size": 64,
            "reason": "RuntimeError: position table fixed at 32 px",
        }
    ]
    assert result.rows[0].ratios == {"throughput": 1.0, "latency": 1.0}  # baseline: SMALL[0]
    assert len(result.rows[2].throughput.runs) == 1


def test_a_size_a_model_cannot_take_fails_before_the_sizes_before_it_are_timed(monkeypatch):
    """The 32 px timing ran, then 64 px failed and the run's results were lost; and a sweep
    in which nothing could run said 'no median for empty data'."""
    from sparseformer.bench import throughput as benchmark

    build, timed = benchmark.build_model, []

    def picky(name, img_size, *args, **kwargs):
        if img_size == 64:
            raise RuntimeError("position table fixed at 32 px")
        return build(name, img_size, *args, **kwargs)

    monkeypatch.setattr(benchmark, "build_model", picky)
    monkeypatch.setattr(benchmark, "matmul_peak", lambda *a, **k: timed.append(1) or 1.0)
    settings = small_settings(models=(SMALL[0],), img_sizes=(32, 64), repeats=1, train=False)
    with pytest.raises(BenchError, match="cannot take 64 px inputs"):
        run_benchmark(settings)
    assert not timed  # nothing timed before the refusal
    only_64 = dataclasses.replace(settings, img_sizes=(64,), skip_unsupported=True)
    with pytest.raises(BenchError, match="no model could run at any of the sizes 64 .* why"):
        run_benchmark(only_64)


def test_a_tagged_video_sparseformer_is_built_as_one():
    """A video model takes its image model's tags; tagged, it went to timm, which knows none
    and would not take the clip length."""
    from sparseformer.bench.throughput import build_model

    model = build_model("video_sparseformer_v1_tiny.in1k", 32, 10, num_frames=4)
    assert model.config.num_frames == 4


def test_count_flops_says_a_size_a_timm_model_asserts_against_as_a_value_error():
    import timm

    from sparseformer import count_flops

    vit = timm.create_model("vit_tiny_patch16_224", depth=1)
    with pytest.raises(ValueError, match="cannot run on the input it was counted with"):
        count_flops(vit, (3, 256, 256))  # timm asserts the input size


def test_default_peers_have_published_top1_and_a_source():
    from sparseformer.bench.published import published_top1
    from sparseformer.bench.results import DEFAULT_MODELS

    frontier = {"levit_256", "efficientvit_b1", "fastvit_t12", "convnext_nano"}
    assert frontier | {"deit_small_patch16_224", "swin_tiny_patch4_window7_224", "resnet50"} <= set(
        DEFAULT_MODELS
    )
    for name in DEFAULT_MODELS:
        cited = published_top1(name)
        assert cited is not None, name
        assert 70 < cited.top1 < 90 and len(cited.source) > 20, name
        assert "arXiv" in cited.source or "timm" in cited.source or "torchvision" in cited.source
        for tag in cited.tags:  # each tag is one timm (or this registry) knows
            assert f"{name}.{tag}" in timm.list_pretrained(f"{name}.*"), (name, tag)
    # a tag names weights: the figure is for the cited ones only
    assert published_top1("deit_small_patch16_224.fb_in1k").top1 == 79.8
    assert published_top1("resnet50.tv_in1k").top1 == 76.1
    assert published_top1("resnet50.a1_in1k") is None  # timm's recipe: 80.4, not the paper's
    assert published_top1("sparseformer_v1_tiny.in1k_v2").top1 == 81.0


def test_a_tagged_deit_small_is_the_default_baseline_and_bad_tags_are_named(
    capsys, caplog, monkeypatch
):
    tagged = small_settings(models=("sparseformer_v1_nano", "deit_small_patch16_224.fb_in1k"))
    assert tagged.baseline_model() == "deit_small_patch16_224.fb_in1k"
    argv = ["bench", "--models", "sparseformer_v1_nano", "resnet18.no_such_tag", "--no-train"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert "resnet18 has no pretrained tag 'no_such_tag' (timm's tags: a1_in1k" in err, err
    assert "cannot take" not in err and len(err.splitlines()) == 1
    assert main(["bench", "--models", "sparseformer_v1_nano.badtag", "--no-train"]) == 1
    err = capsys.readouterr().err.strip()  # its own tags, not "timm's tags: none"
    assert "sparseformer_v1_nano has no pretrained tag 'badtag' (it has no released" in err, err
    from sparseformer.engine.device import available_cores, warn_oversubscribed

    caplog.clear()
    warn_oversubscribed(available_cores())
    assert not caplog.records
    warn_oversubscribed(available_cores() + 1)  # --threads beyond the cores: said, not silent
    assert "threads beyond the cores wait for each other" in caplog.records[0].getMessage()
    caplog.clear()  # bound to some cores (a scheduler's per-rank binding): per process
    monkeypatch.setattr(os, "cpu_count", lambda: 4 * available_cores())
    warn_oversubscribed(available_cores(), processes=4)
    assert not caplog.records
    monkeypatch.setattr(os, "cpu_count", lambda: available_cores())  # unbound: shared
    warn_oversubscribed(1, processes=available_cores() + 1)
    said = caplog.records[0].getMessage()  # one thread each already: fewer processes
    assert "threads beyond the cores" in said and "give at most 0" not in said
    assert f"run at most {available_cores()} processes on this machine" in said


def test_cli_sweep_writes_json_csv_and_both_plots(tmp_path, capsys):
    prefix = tmp_path / "sweep" / "cpu"
    argv = ["bench", "--models", SMALL[0], "test_convnext", "--img-size", "32", "64"]
    argv += ["--batch-size", "2", "--repeats", "1", "--min-time", "0", "--sweep", str(prefix)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"{SMALL[0]} ahead of test_convnext in throughput " in out
    assert f"| {SMALL[0]} ahead from |" in out
    data = json.loads(prefix.with_suffix(".json").read_text())
    assert [(r["model"], r["img_size"]) for r in data["rows"]] == [
        (m, s) for s in (32, 64) for m in (SMALL[0], "test_convnext")
    ]
    assert data["settings"]["train"] is False and data["settings"]["scale_batch"] is True
    assert all(r["train_throughput"] is None for r in data["rows"])
    with open(prefix.with_suffix(".csv")) as f:
        assert len(list(csv.DictReader(f))) == 4
    for suffix in ("-throughput.png", "-top1.png"):
        assert (tmp_path / "sweep" / f"cpu{suffix}").read_bytes()[:4] == b"\x89PNG"


def test_a_model_given_twice_is_timed_once(tmp_path):
    out = tmp_path / "b.json"
    argv = ["bench", "--models", "sparseformer_v1_nano", "sparseformer_v1_nano", "--batch-size",
            "2", "--img-size", "32", "--repeats", "1", "--min-time", "0", "--no-train",
            "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    data = json.loads(out.read_text())
    assert data["settings"]["models"] == ["sparseformer_v1_nano"] and len(data["rows"]) == 1


def test_the_tradeoff_plot_shows_throughput_when_no_model_has_a_published_top1():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sparseformer.bench.report import draw_tradeoff
    from sparseformer.bench.results import BenchResult, BenchRow, Spread

    def row(model, runs):
        return BenchRow(model, 224, 2, 1, 1.0, 1.0, Spread.of(runs), Spread.of([1.0]), None, 0.0)

    env = {"device_name": "cpu", "threads": 2, "dtype": "fp32"}
    uncited = BenchResult(env, {}, Spread.of([1.0]), [row("a", [10]), row("b", [30])])
    fig, ax = plt.subplots()
    draw_tradeoff(ax, uncited, 224)
    assert [p.get_width() for p in ax.patches] == [10, 30]  # a bar per model, no empty axis
    plt.close(fig)
    cited = BenchResult(env, {}, Spread.of([1.0]), [row("deit_small_patch16_224", [10])])
    fig, ax = plt.subplots()
    draw_tradeoff(ax, cited, 224)
    assert not ax.patches and ax.collections[0].get_offsets().tolist() == [[10, 79.8]]
    plt.close(fig)


def test_a_training_step_that_cannot_run_is_named_before_any_timing(capsys):
    """A BatchNorm model trained on batches of one fails; it used to fail after the inference
    rounds, losing them, and without its name."""
    argv = ["bench", "--models", "sparseformer_v1_nano", "test_resnet", "--img-size", "32",
            "--batch-size", "2", "--train-batch-size", "1", "--repeats", "1"]  # fmt: skip
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "test_resnet: its training step fails (ValueError: Expected more than 1 value" in err


def test_a_reparameterizing_model_infers_fused_and_trains_as_it_is():
    """FastViT and the like are deployed fused: inference is timed on a fused copy, whether or
    not the training step is timed too (it trains the model as it is)."""
    from sparseformer.bench.throughput import _prepare

    for train in (True, False):
        settings = BenchSettings(models=("fastvit_t8",), img_sizes=(32,), batch_size=1,
                                 train=train, train_batch_size=2)  # fmt: skip
        models, _, _, _, trained = _prepare(settings, 32, [])
        fused, as_is = models["fastvit_t8"], trained["fastvit_t8"]
        n_fused = sum(p.numel() for p in fused.parameters())
        assert n_fused < sum(p.numel() for p in timm.create_model("fastvit_t8").parameters())
        assert (as_is is not fused) == train  # trained unfused only where a step is timed
        if train:
            assert sum(p.numel() for p in as_is.parameters()) > n_fused


def test_a_run_starved_of_its_cores_says_so():
    """A run beside other work printed times 50-100x too long, and the load average (a
    minute behind) did not show it."""
    from sparseformer.bench.report import _cpu_share_lines

    assert _cpu_share_lines({"cpu_share": 0.99, "threads": 2}) == [
        "CPU time of the timed calls: 99% of 2 threads"
    ]
    (line,) = _cpu_share_lines({"cpu_share": 0.49, "threads": 2})
    assert "49.0% of 2 threads: WARNING, other work took the cores" in line
    (line,) = _cpu_share_lines({"cpu_share": 0.97, "threads": 2})  # enough to skew ratios
    assert "97.0% of 2 threads: WARNING" in line
    (line,) = _cpu_share_lines({"cpu_share": 0.9799, "threads": 1})  # not "98%: WARNING"
    assert "97.9% of 1 thread: WARNING" in line
    assert _cpu_share_lines({"threads": 1}) == []  # CUDA, or a run of an older version
    (line,) = _cpu_share_lines({"cpu_share": 0.5, "threads": 4, "cores": 2})
    assert "4 threads on 2 cores wait for each other" in line and "--threads 2 or fewer" in line
    assert "other work" in _cpu_share_lines({"cpu_share": 0.5, "threads": 2, "cores": 2})[0]


def test_a_sweep_prefix_that_is_a_folder_is_refused(tmp_path, capsys):
    """'--sweep out/' wrote out/.json, out/.csv and out/-throughput.png, hidden files."""
    for prefix in (str(tmp_path), str(tmp_path / "new") + "/"):
        assert main(["bench", "--models", "sparseformer_v1_nano", "--sweep", prefix]) == 1
        assert "is a folder; give a prefix for the files, e.g." in capsys.readouterr().err
    assert sorted(tmp_path.iterdir()) == []


def test_a_size_a_model_cannot_run_is_said_in_the_models_words(monkeypatch):
    """count_flops' advice to give the full shape, batch first, is for its caller, not for a
    bench user: the reason is the model's own error."""
    from sparseformer.bench import throughput as benchmark

    def fails(model, shape):
        try:
            raise RuntimeError("shape '[1, 1, 1, 128]' is invalid for input of size 512")
        except RuntimeError as exc:
            raise ValueError("cannot run on the input ...; give the full shape") from exc

    monkeypatch.setattr(benchmark, "count_flops", fails)
    settings = small_settings(models=(SMALL[0],), img_sizes=(32,), repeats=1, train=False)
    with pytest.raises(BenchError, match=r"\(RuntimeError: shape '\[1, 1, 1, 128\]' is inv"):
        run_benchmark(settings)


def test_without_warm_up_peak_memory_is_measured_after_the_weights_are_packed(monkeypatch):
    """``--warmup 0``: the first call packs the weights (copies as large as the weights), and
    it was the one peak memory measured: 10x SparseFormer-T's at 64 px."""
    from sparseformer.bench import throughput
    from sparseformer.layers import linear

    packs_seen = []
    measure = throughput.peak_memory_mb

    def noting(call, device):
        packs_seen.append(len(linear._PACKS.get() or {}))
        return measure(call, device)

    monkeypatch.setattr(throughput, "peak_memory_mb", noting)
    monkeypatch.setattr(linear, "FUSED_LINEAR", "always")  # packed, whatever a race chose
    run_benchmark(
        small_settings(
            models=("sparseformer_v1_nano",), img_sizes=(32,), warmup=0, repeats=1, train=False
        )
    )
    assert packs_seen and all(packs_seen) or not linear._CAN_PACK
