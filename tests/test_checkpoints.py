"""Loading weights: both official layouts, wrappers, conversion, and clear errors."""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys
import urllib.error

import pytest
import torch
from safetensors.torch import load_file, save_file

from sparseformer import CheckpointError, create_model, load_checkpoint
from sparseformer.weights.checkpoint import read_checkpoint
from sparseformer.weights.convert import detect_format

from .conftest import DATA

FIXTURE = DATA / "official-v1-small-config.safetensors"


def official(prefix: str) -> dict[str, torch.Tensor]:
    fx = load_file(str(FIXTURE))
    return {k[len(prefix) + 1 :]: v for k, v in fx.items() if k.startswith(prefix + ".")}


def fixture_model(**kw):
    import dataclasses

    from sparseformer import SparseFormer

    from .test_conformance import fixture_config

    return SparseFormer(dataclasses.replace(fixture_config(), **kw))


@pytest.mark.parametrize(
    "wrapper", [None, "model", "state_dict", "model_ema", "state_dict_ema", "model_state_dict"]
)
@pytest.mark.parametrize("fmt", ["imagenet", "v2"])
def test_official_layouts_load_from_pth_in_any_wrapper(tmp_path, fmt, wrapper):
    state = official(fmt)
    path = tmp_path / "ckpt.pth"
    torch.save(state if wrapper is None else {wrapper: state, "epoch": 299}, path)
    model = fixture_model()
    report = load_checkpoint(model, path)
    assert report.source_format == fmt
    assert report.wrapper == wrapper
    key = "token_roi.weight" if fmt == "imagenet" else "initial_roi.weight"
    torch.testing.assert_close(model.initial_rois.detach(), state[key])


def test_weights_under_a_key_of_ones_own_are_named_with_what_to_do(tmp_path):
    """``{"net": state}`` was refused as holding no tensors; the error names the key that
    holds them and how to make a file that loads."""
    path = tmp_path / "ckpt.pth"
    torch.save({"epoch": 3, "net": official("imagenet"), "optimizer": {"lr": 1.0}}, path)
    with pytest.raises(CheckpointError, match=r"tensors under 'net'.*checkpoint\['net'\]"):
        load_checkpoint(fixture_model(), path)
    torch.save({"epoch": 3, "note": "no weights"}, path)
    with pytest.raises(CheckpointError, match=r"no tensors \(its keys: 'epoch', 'note'\)"):
        load_checkpoint(fixture_model(), path)


def test_convert_then_load_roundtrip(tmp_path):
    src = tmp_path / "official.pth"
    torch.save({"model": official("imagenet")}, src)
    out = tmp_path / "ours.safetensors"
    subprocess.run(
        [sys.executable, "-m", "sparseformer", "convert", str(src), str(out)], check=True
    )
    converted = load_file(str(out))
    assert detect_format(list(converted)) == "sparseformer"
    assert out.stat().st_mode & 0o777 == src.stat().st_mode & 0o777  # as any new file
    out.chmod(0o600)  # the user's choice for the file it replaces is kept
    subprocess.run(
        [sys.executable, "-m", "sparseformer", "convert", str(src), str(out), "--overwrite"],
        check=True,
    )
    assert out.stat().st_mode & 0o777 == 0o600
    assert not any("tuo_proj" in k or "m_beta" in k for k in converted)
    model = fixture_model()
    report = load_checkpoint(model, out)
    assert report.source_format == "sparseformer" and not report.dropped
    assert set(model.state_dict()) == set(converted)


def test_num_classes_change_drops_classifier_with_a_note(tmp_path, caplog):
    path = tmp_path / "ckpt.pth"
    torch.save({"model": official("v2")}, path)
    model = fixture_model(num_classes=10)
    with caplog.at_level(logging.INFO, logger="sparseformer"):
        report = load_checkpoint(model, path)
    assert "classifier" in caplog.text
    assert report.dropped == ["head.bias", "head.weight"]  # said "0 dropped"
    assert model.head.weight.shape == (10, 64)
    torch.testing.assert_close(model.fc_norm.weight.detach(), official("v2")["norm.weight"])


def test_create_model_keeps_a_trained_classifier_unless_told_otherwise(tmp_path):
    trained = create_model("sparseformer_v1_nano", num_classes=10)
    torch.save({"model": trained.state_dict()}, tmp_path / "best.pt")
    model = create_model("sparseformer_v1_nano", checkpoint_path=tmp_path / "best.pt")
    assert model.num_classes == 10 and torch.equal(model.head.weight, trained.head.weight)
    fresh = create_model(
        "sparseformer_v1_nano", checkpoint_path=tmp_path / "best.pt", num_classes=3
    )  # fmt: skip  (fine-tuning: a new classifier)
    assert fresh.head.weight.shape[0] == 3
    # arguments are checked before any weights are read (or downloaded)
    with pytest.raises(TypeError, match="no config field"):
        create_model("sparseformer_v1_nano", checkpoint_path=tmp_path / "missing.pt", nope=1)


def write_deit(path):
    import timm

    torch.save({"model": timm.create_model("deit_tiny_patch16_224").state_dict()}, path)


BAD_FILES = {
    "deit": (write_deit, "looks like a ViT/DeiT"),
    "truncated": (None, "truncated"),
    "end_cut": (None, "failed finding central directory.\\); it may be truncated"),
    "text": (lambda p: p.write_text("hello, I am not a checkpoint\n"), "not a readable"),
    "empty": (lambda p: p.write_bytes(b""), "is empty"),
    "missing": (lambda p: None, "does not exist"),
    # what `sparseformer export` writes (ModelProto: ir_version, then producer "pytorch")
    "onnx": (lambda p: p.write_bytes(b"\x08\n\x12\x07pytorch\x1a\x052.9.0"), "an ONNX model"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_wrong_files_give_one_clear_error(tmp_path, case):
    path = tmp_path / f"{case}.pth"
    writer, message = BAD_FILES[case]
    if case in ("truncated", "end_cut"):  # the zip's start, or all but its directory
        torch.save({"model": official("imagenet")}, path)
        data = path.read_bytes()
        path.write_bytes(data[:5000] if case == "truncated" else data[:-300])
    else:
        writer(path)
    with pytest.raises(CheckpointError, match=message) as raised:
        create_model("sparseformer_v1_nano", checkpoint_path=path)
    assert "miniz" not in str(raised.value)  # torch's guesses, longer than the whole line


def test_truncated_safetensors(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file(official("v2"), str(path))
    path.write_bytes(path.read_bytes()[:3000])
    with pytest.raises(CheckpointError, match="safetensors"):
        create_model("sparseformer_v1_nano", checkpoint_path=path)
    # a header of 128 bytes: its length's first byte is a pickle's (0x80), not a pickle for that
    for pad in range(256):
        save_file({"w": torch.zeros(8)}, str(path), metadata={"x": "y" * pad})
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80
    path.write_bytes(path.read_bytes()[:64])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        read_checkpoint(path)


def test_checkpoint_of_another_size_lists_shapes(tmp_path, caplog):
    path = tmp_path / "small_cfg.pth"
    torch.save(official("imagenet"), path)
    with pytest.raises(CheckpointError, match="shape mismatches.*another model size"):
        create_model("sparseformer_v1_nano", checkpoint_path=path)
    # the same classes over another width: not a classifier to replace (no fine-tuning note)
    torch.save(create_model("sparseformer_v1_micro").state_dict(), path)
    with caplog.at_level(logging.INFO), pytest.raises(CheckpointError, match="head.weight"):
        create_model("sparseformer_v1_nano", checkpoint_path=path)
    assert "classifier does not fit" not in caplog.text


class _RunsOnLoad:
    """Unpickling calls exec on a command that leaves a file behind, unless it is refused."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


class _TrainingConfig(dict):  # a yacs-style config: a dict subclass with attributes
    def __setstate__(self, state):
        raise AssertionError("the checkpoint's own class must not run")


def test_pickled_code_never_runs_and_the_weights_still_load(tmp_path):
    marker = tmp_path / "ran.txt"
    path = tmp_path / "evil.pth"
    torch.save({"model": official("v2"), "fn": print, "payload": _RunsOnLoad(marker)}, path)
    model = fixture_model()
    load_checkpoint(model, path)
    assert not marker.exists()  # exec was named by the file but never called
    torch.testing.assert_close(model.initial_rois.detach(), official("v2")["initial_roi.weight"])
    assert "exec" in repr(read_checkpoint(path).extras["payload"])  # kept as inert data


def test_release_saved_with_its_training_args_loads(tmp_path, caplog):
    import argparse

    import numpy as np

    cfg = _TrainingConfig(MODEL={"NAME": "sparseformer"}, LR=1e-3)
    cfg.__dict__["frozen"] = True
    path = tmp_path / "release.pth"
    extras = {"args": argparse.Namespace(lr=1e-3, model="sf"), "config": cfg}
    extras |= {"max_accuracy": np.float64(81.0), "arr": np.arange(3), "epoch": 299}
    torch.save({"model": official("imagenet"), **extras}, path)
    model = fixture_model()
    with caplog.at_level(logging.INFO, logger="sparseformer.weights.reading"):
        load_checkpoint(model, path)
    assert "argparse.Namespace" in caplog.text and "inert data" in caplog.text
    torch.testing.assert_close(
        model.initial_rois.detach(), official("imagenet")["token_roi.weight"]
    )
    loaded = read_checkpoint(path).extras
    assert loaded["args"].lr == 1e-3 and loaded["config"]["LR"] == 1e-3 and loaded["epoch"] == 299


@pytest.mark.parametrize("case", ["module", "blocked"])
def test_what_cannot_be_read_safely_is_refused(tmp_path, case):
    import os

    path = tmp_path / "bad.pth"
    if case == "module":  # a whole pickled model: no state dict to take the weights from
        torch.save(torch.nn.Linear(2, 2), path)
        match = "model.state_dict"
    else:  # os is on torch's block list, stand-in or not
        torch.save({"model": official("v2"), "fn": os.getcwd}, path)
        match = "safely"
    with pytest.raises(CheckpointError, match=match):
        create_model("sparseformer_v1_nano", checkpoint_path=path)


def test_cli_reports_bad_checkpoint_in_one_line(tmp_path):
    path = tmp_path / "junk.pth"
    path.write_text("junk")
    proc = subprocess.run(
        [sys.executable, "-m", "sparseformer", "convert", str(path), str(tmp_path / "o")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "error" in proc.stderr


def test_convert_refuses_what_would_lose_weights(tmp_path, capsys):
    from sparseformer.cli import main

    src = tmp_path / "official.pth"  # a key no conversion maps: refused, nothing written
    torch.save({"model": {**official("imagenet"), "extra_proj.weight": torch.zeros(2)}}, src)
    assert main(["convert", str(src), str(tmp_path / "x.safetensors")]) == 1
    assert "no conversion maps: extra_proj.weight" in capsys.readouterr().err
    assert not list(tmp_path.glob("x.safetensors*"))
    torch.save({"model": official("imagenet")}, src)
    before = src.read_bytes()
    assert main(["convert", str(src), str(src)]) == 1  # would overwrite its own input
    assert "is the input file" in capsys.readouterr().err and src.read_bytes() == before
    assert main(["convert", str(src), str(tmp_path)]) == 1
    assert "is a folder" in capsys.readouterr().err
    assert not [p.name for p in tmp_path.iterdir() if ".tmp" in p.name]  # nothing left over
    assert main(["convert", str(src), str(src / "x.safetensors")]) == 1  # under a file
    assert f"{str(src)!r} is a file, not a folder" in capsys.readouterr().err


def test_compiled_and_ddp_state_dicts_load():
    model = fixture_model()
    state = {f"_orig_mod.{k}": v for k, v in model.state_dict().items()}  # torch.compile
    other = fixture_model()
    load_checkpoint(other, state)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 other.state_dict().values()))  # fmt: skip
    fresh = fixture_model()
    torch.nn.init.zeros_(fresh.head.weight)  # differs from model until loaded
    load_checkpoint(fresh, {f"module.{k}": v for k, v in state.items()})  # DDP around compile
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name


def test_pretrained_offline_says_how_to_pass_a_local_file(tmp_path, monkeypatch):
    import torch.hub

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    from sparseformer.weights.hub import DownloadError

    with pytest.raises(DownloadError, match="checkpoint_path"):
        create_model("sparseformer_v1_tiny", pretrained=True)


@pytest.mark.parametrize("fmt", ["imagenet", "v2"])
def test_official_checkpoint_with_an_unknown_key_is_refused(fmt):
    state = {**official(fmt), "layers.3.extra_gate.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match=r"no conversion maps: layers\.3\.extra_gate\.weight"):
        load_checkpoint(fixture_model(), state)


@pytest.mark.parametrize("fmt", ["imagenet", "v2"])
def test_plain_load_state_dict_and_timm_accept_official_layouts(tmp_path, fmt):
    import timm

    reference = fixture_model().eval()
    load_checkpoint(reference, official(fmt))
    model = fixture_model().eval()
    model.load_state_dict(official(fmt))  # strict, through the renaming pre-hook
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)
    wrapped = torch.nn.Sequential(fixture_model().eval())  # prefixed keys ("0.") too
    wrapped.load_state_dict({f"0.{k}": v for k, v in official(fmt).items()})
    torch.testing.assert_close(wrapped(x), reference(x), rtol=0, atol=0)
    # timm's own loader (checkpoint_path) goes through load_state_dict as well
    nano = create_model("sparseformer_v1_nano").eval()
    from .test_train_errors import to_official

    torch.save({"model": to_official(nano.state_dict(), fmt)}, tmp_path / "official.pth")
    loaded = timm.create_model(
        "sparseformer_v1_nano", checkpoint_path=str(tmp_path / "official.pth")
    )
    y = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(loaded.eval()(y), nano(y), rtol=0, atol=0)


def test_rgb_weights_adapt_to_other_input_channels():
    rgb = create_model("sparseformer_v1_nano").eval()
    gray = create_model("sparseformer_v1_nano", in_chans=1).eval()
    # the channels it takes, however built (it said 3 unless img_size was given)
    assert gray.pretrained_cfg["input_size"] == (1, 224, 224)
    sized = create_model("sparseformer_v1_nano", in_chans=1, img_size=64)
    assert sized.pretrained_cfg["input_size"] == (1, 64, 64)
    load_checkpoint(gray, {"model": rgb.state_dict()})  # timm's rule: the kernel summed
    x = torch.rand(2, 1, 32, 32)
    torch.testing.assert_close(gray(x), rgb(x.expand(2, 3, 32, 32)), atol=1e-5, rtol=1e-4)
    four = create_model("sparseformer_v1_nano", in_chans=4)
    load_checkpoint(four, {"model": rgb.state_dict()})
    from timm.models import adapt_input_conv  # RGB repeated, scaled by 3/4

    expected = adapt_input_conv(4, rgb.stem.conv.weight.detach())
    torch.testing.assert_close(four.stem.conv.weight.detach(), expected, rtol=0, atol=0)
    rgb_clip = create_model("video_sparseformer_v1_micro").eval()  # a 5-D stem kernel
    gray_clip = create_model("video_sparseformer_v1_micro", in_chans=1).eval()
    load_checkpoint(gray_clip, {"model": rgb_clip.state_dict()})
    clip = torch.rand(1, 1, 4, 32, 32)
    torch.testing.assert_close(
        gray_clip(clip), rgb_clip(clip.expand(1, 3, 4, 32, 32)), atol=1e-5, rtol=1e-4
    )
    two = create_model("sparseformer_v1_nano", in_chans=2).eval()  # to 1: summed, exactly
    gray = create_model("sparseformer_v1_nano", in_chans=1).eval()
    load_checkpoint(gray, {"model": two.state_dict()})
    torch.testing.assert_close(gray(x), two(x.expand(2, 2, 32, 32)), atol=1e-5, rtol=1e-4)
    for other in (3, 4):  # 2-channel weights to more channels: said in one line
        model = create_model("sparseformer_v1_nano", in_chans=other)
        with pytest.raises(CheckpointError, match="takes 2 input channel.* in_chans=2"):
            load_checkpoint(model, {"model": create_model("sparseformer_v1_nano", in_chans=2)
                                    .state_dict()})  # fmt: skip


def test_a_run_of_another_size_is_named_in_the_mismatch(tmp_path):
    path = tmp_path / "best.pt"
    nano = create_model("sparseformer_v1_nano")
    torch.save({"model": nano.state_dict(), "model_name": "sparseformer_v1_nano"}, path)
    with pytest.raises(CheckpointError, match=r"\(the checkpoint is a sparseformer_v1_nano run\)"):
        load_checkpoint(create_model("sparseformer_v1_micro"), path)
    # create_model refuses it before building, named: models of one shape (two bootstrapped
    # families) would otherwise take each other's weights with a classifier bias dropped
    with pytest.raises(CheckpointError, match="of 'sparseformer_v1_nano', not 'sparseformer_v1_m"):
        create_model("sparseformer_v1_micro", checkpoint_path=path)
    torch.save({"model": nano.state_dict(), "model_name": "sparseformer_btsp_augreg_base"}, path)
    with pytest.raises(CheckpointError, match="create it as 'sparseformer_btsp_augreg_base'"):
        create_model("sparseformer_btsp_openai_clip_base", checkpoint_path=path)
    torch.save({"model": nano.state_dict(), "model_name": "deit_small_patch16_224"}, path)
    with pytest.raises(CheckpointError, match="of 'deit_small_patch16_224', a timm model: load"):
        create_model("sparseformer_v1_nano", checkpoint_path=path)  # a timm model's run


def test_convert_writes_safetensors_only_to_a_safetensors_file_and_into_a_device(tmp_path, capsys):
    from sparseformer.cli import main

    src = tmp_path / "official.pth"
    torch.save({"model": official("imagenet")}, src)
    assert main(["convert", str(src), str(tmp_path / "x.pth")]) == 1  # timm would unpickle it
    assert "give a name ending in .safetensors, e.g." in capsys.readouterr().err
    assert not (tmp_path / "x.pth").exists()
    null = tmp_path / "null.safetensors"  # a link to a device: written into, never replaced
    null.symlink_to(os.devnull)
    assert main(["convert", str(src), str(null), "--overwrite"]) == 0, capsys.readouterr().err
    assert stat.S_ISCHR(os.stat(os.devnull).st_mode) and null.is_symlink()
    blob, link = tmp_path / "blobs" / "abc123", tmp_path / "link.safetensors"
    blob.parent.mkdir()
    blob.write_text("old")  # a cache's blob, named by a link (the suffix is the link's)
    link.symlink_to(blob)
    assert main(["convert", str(src), str(link)]) == 1
    assert f"OUT {str(link)!r} already exists" in capsys.readouterr().err  # the name given
    assert main(["convert", str(src), str(link), "--overwrite"]) == 0  # written through
    assert link.is_symlink() and detect_format(list(load_file(str(blob)))) == "sparseformer"
    checkpoint, wrong = tmp_path / "run.pth", tmp_path / "wrong.safetensors"
    checkpoint.write_bytes(b"a run's weights")  # a link named .safetensors to a checkpoint
    wrong.symlink_to(checkpoint)
    assert main(["convert", str(src), str(wrong), "--overwrite"]) == 1
    assert f"is a link to {str(checkpoint)!r}, a file of another kind" in capsys.readouterr().err
    assert checkpoint.read_bytes() == b"a run's weights"


def test_ema_weights_stay_ema_through_convert_and_torchvision_ema_loads(tmp_path, caplog):
    """torchvision's reference scripts keep EMA as AveragedModel's state dict (module.* and
    n_averaged); convert --ema records that its weights are EMA ones."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from sparseformer.cli import main

    model = fixture_model()
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.999))
    with torch.no_grad():
        for p in ema.module.parameters():
            p.add_(1.0)
    src = tmp_path / "tv_ref.pth"
    torch.save({"model": model.state_dict(), "model_ema": ema.state_dict(), "epoch": 3}, src)
    loaded = fixture_model()
    report = load_checkpoint(loaded, src, prefer_ema=True)
    assert report.wrapper == "model_ema"
    torch.testing.assert_close(loaded.initial_rois, ema.module.initial_rois)
    out = tmp_path / "ema.safetensors"
    assert main(["convert", str(src), str(out), "--ema"]) == 0
    back = read_checkpoint(out, prefer_ema=True)
    assert back.ema and not [r for r in caplog.records if "no EMA weights" in r.getMessage()]
    torch.testing.assert_close(back.state_dict["initial_rois"], ema.module.initial_rois)
    # a "model" entry that is a record, not weights: the weights beside it are found
    record = {"model": {"name": "sparseformer"}, "state_dict": model.state_dict()}
    assert read_checkpoint(record).report.wrapper == "state_dict"


def test_asking_for_ema_of_a_read_checkpoint_without_it_is_warned(caplog):
    """eval --ema reads the file first, then asks the read checkpoint for its EMA weights."""
    ckpt = read_checkpoint({"model": fixture_model().state_dict()})
    with caplog.at_level(logging.WARNING):
        assert read_checkpoint(ckpt, prefer_ema=True) is ckpt
    assert "the checkpoint has no EMA weights; using the model weights" in caplog.text


def test_checkpoint_metadata_that_does_not_fit_is_said(tmp_path, caplog):
    from sparseformer.engine.inputs import class_names

    with caplog.at_level(logging.WARNING):
        assert class_names({"class_names": ["a", "b"]}, 3) == ["class 0", "class 1", "class 2"]
    assert "names 2 classes but the model has 3 outputs" in caplog.text
    model = create_model("sparseformer_v1_nano", num_classes=3)
    record = {"model": model.state_dict(), "model_name": "sparseformer_v1_nano",
              "architecture": {"bogus_field": 1}}  # fmt: skip
    torch.save(record, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match=r"architecture field\(s\) \['bogus_field'\]"):
        create_model("sparseformer_v1_nano", checkpoint_path=tmp_path / "future.pt")


def test_a_diverged_checkpoint_is_said_and_its_nan_outputs_are_not_scored(tmp_path, capsys,
                                                                           caplog):  # fmt: skip
    """NaN weights load with a warning; predict reports such a file as failed, and eval
    refuses to turn all-NaN logits into a top-1 (topk of NaN ranks class 0 first)."""
    from PIL import Image

    from sparseformer.cli import main

    state = create_model("sparseformer_v1_nano", num_classes=3).state_dict()
    state["head.weight"] = torch.full_like(state["head.weight"], float("nan"))
    path = tmp_path / "diverged.pt"
    record = {"model_name": "sparseformer_v1_nano", "class_names": ["a", "b", "c"]}
    torch.save({"model": state, "preprocessing": {"img_size": 32}, **record}, path)
    for name in "abc":
        (tmp_path / "data" / "val" / name).mkdir(parents=True)
        Image.new("RGB", (40, 40), (90, 40, 10)).save(tmp_path / "data" / "val" / name / "0.png")
    image = str(tmp_path / "data" / "val" / "a" / "0.png")
    with caplog.at_level(logging.WARNING, logger="sparseformer"):
        assert main(["predict", "--checkpoint", str(path), image, "--json"]) == 1
    assert "holds NaN or infinite weights (1 tensor, e.g. head.weight)" in caplog.text
    assert "NaN or infinite" in json.loads(capsys.readouterr().out)["error"]
    assert main(["eval", "--checkpoint", str(path), "--data-dir", str(tmp_path / "data")]) == 1
    assert "NaN or infinite on all 3 images" in capsys.readouterr().err


def test_an_interpolation_no_resize_knows_is_said_and_set_aside(tmp_path, capsys, caplog):
    """An edited record's filter ended predict and eval in a KeyError inside timm."""
    from sparseformer.cli import main

    model = create_model("sparseformer_v1_nano", num_classes=3)
    path = tmp_path / "edited.pt"
    pre = {"img_size": 32, "interpolation": "cubic2", "crop_pct": 0.9, "mean": (0.5,) * 3,
           "std": (0.25,) * 3}  # fmt: skip
    torch.save({"model": model.state_dict(), "model_name": "sparseformer_v1_nano",
                "class_names": ["a", "b", "c"], "preprocessing": pre}, path)  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="sparseformer"):
        ckpt = read_checkpoint(path)
    assert ckpt.preprocessing == {**pre, "interpolation": "bicubic"}  # the rest of it stands
    assert ckpt.run_info()["preprocessing"]["img_size"] == 32  # complete: used as it is
    assert "interpolation 'cubic2' is not one of nearest, bilinear, bicubic" in caplog.text
    image = tmp_path / "a.png"
    from PIL import Image

    Image.new("RGB", (40, 40), (90, 40, 10)).save(image)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sparseformer"):
        assert main(["predict", "--checkpoint", str(path), str(image), "--json"]) == 0
    assert caplog.text.count("'cubic2'") == 1  # the file is read once
    assert json.loads(capsys.readouterr().out)["predictions"][0]["label"] in "abc"


@pytest.mark.parametrize(("size", "crop"), [(10**9, 0.9), (32, 1e-9), (2, float("nan"))])
def test_a_recorded_size_or_crop_no_command_can_use_is_said_and_set_aside(tmp_path, caplog,
                                                                          size, crop):  # fmt: skip
    """A file's record of 10**9 pixels asked predict for exabytes; a crop_pct of 1e-9 ended in
    an OverflowError: each is now warned and the model's own used, the rest of the record kept."""
    model = create_model("sparseformer_v1_nano", num_classes=3)
    path = tmp_path / "edited.pt"
    pre = {"img_size": size, "interpolation": "bilinear", "crop_pct": crop, "mean": (0.5,) * 3,
           "std": (0.25,) * 3}  # fmt: skip
    torch.save({"model": model.state_dict(), "model_name": "sparseformer_v1_nano",
                "preprocessing": pre}, path)  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="sparseformer"):
        kept = read_checkpoint(path).preprocessing
    assert ("img_size" in kept) == (size == 32) and ("crop_pct" in kept) == (crop == 0.9)
    assert kept["interpolation"] == "bilinear" and kept["std"] == (0.25,) * 3
    assert "is not within" in caplog.text


@pytest.mark.parametrize("name", ["sparseformer_v1_nano", "test_vit"])
def test_fine_tuning_matches_the_classifier_to_the_data_by_class_name(name, caplog):
    import timm

    from sparseformer.weights.loading import load_weights

    def build():
        if name.startswith("sparseformer"):
            return create_model(name, num_classes=3)
        return timm.create_model(name, num_classes=3)

    def head(model):
        return model.get_classifier().weight.detach().clone()

    source = build()
    ckpt = {"model": source.state_dict(), "class_names": ["cat", "dog", "emu"]}
    model = build()
    load_weights(model, ckpt, class_names=["cat", "dog", "emu"])  # the same classes: kept
    assert torch.equal(head(model), head(source))
    model = build()
    with caplog.at_level(logging.INFO):  # the same classes in another order: rows follow names
        load_weights(model, ckpt, class_names=["emu", "cat", "dog"])
    assert torch.equal(head(model), head(source)[[2, 0, 1]])
    assert torch.equal(model.get_classifier().bias, source.get_classifier().bias[[2, 0, 1]])
    assert "reordered by class name" in caplog.text
    model = build()
    fresh = head(model)
    with caplog.at_level(logging.INFO):  # other classes, as many: a fresh classifier, said
        load_weights(model, ckpt, class_names=["ant", "bee", "cat"])
    assert torch.equal(head(model), fresh)
    assert "of other classes ('dog', 'emu')" in caplog.text
    body = [k for k in source.state_dict() if not k.startswith("head.")]
    assert all(torch.equal(model.state_dict()[k], source.state_dict()[k]) for k in body)
    model = build()
    with caplog.at_level(logging.INFO):  # no names recorded: nothing to match by, said
        load_weights(model, {"model": source.state_dict()}, class_names=["ant", "bee", "cat"])
    assert torch.equal(head(model), head(source))
    assert "records no class names" in caplog.text


def test_create_model_takes_a_checkpoints_ema_weights_when_asked(tmp_path, caplog):
    plain, ema = create_model("sparseformer_v1_nano"), create_model("sparseformer_v1_nano")
    path = tmp_path / "run.pt"
    torch.save({"model": plain.state_dict(), "model_ema": ema.state_dict()}, path)
    loaded = create_model("sparseformer_v1_nano", checkpoint_path=path, prefer_ema=True)
    assert torch.equal(loaded.head.weight, ema.head.weight)
    loaded = create_model("sparseformer_v1_nano", checkpoint_path=path)
    assert torch.equal(loaded.head.weight, plain.head.weight)
    torch.save({"model": plain.state_dict()}, path)
    with caplog.at_level(logging.WARNING):  # none there: said, and the model's are taken
        loaded = create_model("sparseformer_v1_nano", checkpoint_path=path, prefer_ema=True)
    assert torch.equal(loaded.head.weight, plain.head.weight) and "no EMA weights" in caplog.text


def test_a_file_missing_its_classifier_weight_is_incomplete_not_headless():
    state = create_model("sparseformer_v1_nano", num_classes=3).state_dict()
    del state["head.weight"]  # the bias says there was a classifier of 3 outputs
    assert read_checkpoint(state).num_classes == 3
    with pytest.raises(CheckpointError, match="missing keys: head.weight"):
        create_model("sparseformer_v1_nano", checkpoint_path=state)


def test_a_recorded_class_count_that_disagrees_with_the_classifier_gives_way(tmp_path, caplog):
    """An edited record must not swap the trained classifier for a random one: the weights
    decide, and the disagreement is said."""
    trained = create_model("sparseformer_v1_nano", num_classes=3)
    path = tmp_path / "edited.pt"
    torch.save({"model": trained.state_dict(), "num_classes": 5}, path)
    with caplog.at_level(logging.WARNING, logger="sparseformer"):
        assert read_checkpoint(path).num_classes == 3
        model = create_model("sparseformer_v1_nano", checkpoint_path=path)
    said = "records 5 classes but its classifier has 3 outputs: taking 3, as the weights"
    assert said in caplog.text
    assert torch.equal(model.head.weight, trained.head.weight)
    record = {"model": {}, "model_name": "sparseformer_v1_nano", "num_classes": 5}
    assert read_checkpoint(record).num_classes == 5  # no classifier: the record stands


def test_a_file_is_read_by_what_it_holds_not_by_its_name(tmp_path):
    """A .pth renamed .safetensors was said to be a safetensors file "cut short"; a safetensors
    file renamed .pth was read already."""
    from safetensors.torch import save_file

    weights = {"w": torch.arange(6.0).reshape(2, 3)}
    torch.save(weights, tmp_path / "torch.safetensors")
    save_file(weights, tmp_path / "safetensors.pth")
    for name in ("torch.safetensors", "safetensors.pth"):
        torch.testing.assert_close(read_checkpoint(tmp_path / name).state_dict["w"], weights["w"])


def test_a_torchscript_archive_is_named_as_one_and_not_run(tmp_path):
    import warnings

    path = tmp_path / "clip.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated in favour of torch.export
        torch.jit.save(torch.jit.trace(torch.nn.Linear(2, 2), torch.randn(1, 2)), str(path))
    with pytest.raises(CheckpointError, match="is a TorchScript archive .*torch.jit.load") as info:
        read_checkpoint(path)
    assert "weights_only=False" not in str(info.value)  # not torch's advice to run it


def test_a_timm_model_takes_a_file_as_timm_maps_it():
    """timm's checkpoint_filter_fn runs first, as when timm loads a file: here a ViT trained at
    64 px has its position embedding resampled for one built at 32 px."""
    import timm

    from sparseformer.weights.loading import load_weights

    trained = timm.create_model("test_vit", img_size=64, num_classes=2)
    model = timm.create_model("test_vit", img_size=32, num_classes=2)
    load_weights(model, {"model": trained.state_dict()})
    assert torch.equal(model.head.weight, trained.head.weight)
    from timm.models.vision_transformer import checkpoint_filter_fn

    mapped = checkpoint_filter_fn(trained.state_dict(), model)  # timm's own resampling
    assert model.pos_embed.shape != trained.pos_embed.shape
    assert torch.equal(model.pos_embed, mapped["pos_embed"])


def test_the_model_weights_of_a_best_epoch_its_ema_scored_are_said(tmp_path, caplog, capsys):
    from sparseformer.cli import main

    nano, ema = create_model("sparseformer_v1_nano"), create_model("sparseformer_v1_nano")
    best = {"model": nano.state_dict(), "model_ema": ema.state_dict(), "epoch": 3,
            "model_name": "sparseformer_v1_nano", "best_epoch": 3, "best_source": "ema",
            "best_acc1": 50.0}  # fmt: skip
    path = tmp_path / "best.pt"
    said = "scored best (50.00% top-1) with its EMA weights; these are the model's: ask for"
    for change, warned in [({}, True), ({"best_source": "model"}, False), ({"epoch": 4}, False),
                           ({"epoch_progress": [1]}, False)]:  # fmt: skip
        torch.save({**best, **change}, path)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            create_model("sparseformer_v1_nano", checkpoint_path=path)
        assert (said in caplog.text) == warned, change
    torch.save(best, path)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        create_model("sparseformer_v1_nano", checkpoint_path=path, prefer_ema=True)
        assert main(["convert", str(path), str(tmp_path / "best.safetensors")]) == 0
    assert caplog.text.count(said) == 1  # convert's model weights; not the EMA's asked for
    import timm

    from sparseformer.weights.loading import load_weights

    tiny = timm.create_model("test_resnet", num_classes=2)
    torch.save({**best, "model": tiny.state_dict(), "model_ema": tiny.state_dict(),
                "model_name": "test_resnet"}, path)  # fmt: skip
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        load_weights(timm.create_model("test_resnet", num_classes=2), path)  # a timm baseline
    assert said in caplog.text
    torch.save(best, path)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert main(["info", "--checkpoint", str(path)]) == 0  # takes no --ema: no advice
    assert said not in caplog.text
    from PIL import Image

    Image.new("RGB", (40, 30), "red").save(tmp_path / "red.png")
    viz = ["viz", "--checkpoint", str(path), str(tmp_path / "red.png"), "--out", str(tmp_path)]
    for ema in ([], ["--ema"]):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert main([*viz, "--no-gif", *ema]) == 0
        assert (said in caplog.text) == (not ema)
    assert main(["train", "--model", "sparseformer_v1_nano", "--ema", "--dataset",
                 "fashion-mnist", "--output", str(tmp_path / "run")]) == 1  # fmt: skip
    assert "--ema starts from a checkpoint's EMA weights: give --checkpoint" in (
        capsys.readouterr().err
    )


def test_convert_names_a_timm_models_run(tmp_path, capsys):
    import timm

    from sparseformer.cli import main

    path = tmp_path / "best.pt"
    deit = timm.create_model("deit_tiny_patch16_224").state_dict()
    torch.save({"model": deit, "model_name": "deit_tiny_patch16_224"}, path)
    assert main(["convert", str(path), str(tmp_path / "x.safetensors")]) == 1
    err = capsys.readouterr().err
    assert "looks like a ViT/DeiT" in err
    assert "(the checkpoint is a deit_tiny_patch16_224 run)" in err


def test_a_classifier_of_other_classes_is_named_as_such_when_strict():
    """It said "Is it a checkpoint of another model size? Pass the matching --model / name":
    neither the problem (the number of classes) nor words for the Python API."""
    from sparseformer import create_model, load_checkpoint

    ten = create_model("sparseformer_v1_nano", num_classes=10).state_dict()
    model = create_model("sparseformer_v1_nano")
    said = "has a classifier of 10 classes where the model has 1000: build the model with "
    with pytest.raises(CheckpointError, match=said + "num_classes=10"):
        load_checkpoint(model, ten, allow_classifier_mismatch=False)


def test_convert_to_a_video_model_writes_the_weights_it_names(tmp_path):
    """Image weights converted ``--model video_...`` are written inflated, as that model
    holds them, where the file named the video model over the image model's tensors."""
    from sparseformer import create_model
    from sparseformer.cli import main

    torch.manual_seed(0)
    image = create_model("sparseformer_v1_micro", num_classes=5)
    torch.save({"model": image.state_dict()}, tmp_path / "image.pth")
    out = tmp_path / "video.safetensors"
    assert main(["convert", str(tmp_path / "image.pth"), str(out),
                 "--model", "video_sparseformer_v1_micro"]) == 0  # fmt: skip
    expected = create_model("video_sparseformer_v1_micro", num_classes=5,
                            checkpoint_path=str(tmp_path / "image.pth"))  # fmt: skip
    written = load_file(str(out))
    assert written.keys() == expected.state_dict().keys()
    for key, value in expected.state_dict().items():
        assert torch.equal(written[key], value), key
    video = create_model("video_sparseformer_v1_micro", num_classes=5, checkpoint_path=str(out))
    torch.testing.assert_close(video.state_dict(), expected.state_dict(), rtol=0, atol=0)
