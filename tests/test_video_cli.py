"""``sparseformer train / eval / predict`` on a tiny folder of real-encoded videos."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from sparseformer.cli import main
from sparseformer.data.video import probe_video

from .test_video_data import make_folder

av = pytest.importorskip("av")

MODEL = "video_sparseformer_v1_micro"
RECIPE = [
    "--recipe", "fashion-mnist-cpu", "--epochs", "2", "--batch-size", "2", "--img-size", "32",
    "--quiet", "--set", "label_smoothing=0",
]  # fmt: skip
FAST = [*RECIPE, "--frames", "4", "--frame-stride", "2"]


def test_train_eval_predict_a_video_model_on_a_video_folder(tmp_path, capsys):
    data, out = tmp_path / "videos", tmp_path / "run"
    make_folder(data)  # 4 train + 4 val videos (moving squares) and 4 bad train files
    code = main(["train", "--model", MODEL, "--data-dir", str(data), "--output", str(out), *FAST])
    assert code == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(r["val_acc1"] >= 0 for r in records)
    assert torch.isfinite(torch.tensor([r["train_loss"] for r in records])).all()
    saved = torch.load(out / "last.pt", weights_only=True, map_location="cpu")
    assert saved["video"]["num_frames"] == 4 and saved["class_names"] == ["left", "right"]
    # the clip record holds what was used (32 px, the recipe's crop), not ClipSpec's defaults
    assert saved["video"]["size"] == 32 and saved["video"]["crop_pct"] == 1.0
    assert saved["preprocessing"]["interpolation"] == "bilinear"  # as clips are resized
    assert "skipped 4 unreadable or too-short video(s) (listed in " in capsys.readouterr().out
    listed = (out / "skipped_files.tsv").read_text().splitlines()
    assert listed[0] == "file\treason" and len(listed) == 5
    reasons = dict(line.split("\t") for line in listed[1:])
    assert reasons[str(data / "train" / "left" / "empty.mp4")] == "an empty file (0 bytes)"
    # resuming takes frames and stride from the run (8 frames 4 apart would not fit the videos)
    resume = ["--output", str(out), *RECIPE, "--resume", "auto", "--epochs", "3"]
    assert main(["train", "--model", MODEL, "--data-dir", str(data), *resume]) == 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
    capsys.readouterr()

    # eval with 2 clips x 3 crops per video: scores averaged per video. Frames and stride come
    # from the checkpoint (the defaults, 8 frames 4 apart, need longer videos than these)
    code = main(
        ["eval", "--model", MODEL, "--checkpoint", str(out / "last.pt"), "--data-dir", str(data),
         "--clips", "2", "--crops", "3", "--json", "--quiet"]
    )  # fmt: skip
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["images"] == 4 and 0 <= result["acc1"] <= 100
    # how each video was scored, from the flags and the checkpoint
    assert result["views"] == {"clips": 2, "crops": 3, "frames": 4, "sampling": "dense",
                               "stride": 2}  # fmt: skip
    code = main(
        ["eval", "--model", MODEL, "--checkpoint", str(out / "last.pt"), "--data-dir", str(data),
         "--sampling", "uniform", "--json", "--quiet"]
    )  # fmt: skip
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and result["views"]["stride"] is None  # uniform segments have no stride

    video = data / "val" / "right" / "0.mp4"
    code = main(["predict", "--model", MODEL, "--checkpoint", str(out / "last.pt"), str(video),
                 "--json"])  # fmt: skip
    assert code == 0
    preds = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["predictions"]
    assert {p["label"] for p in preds} == {"left", "right"}
    assert abs(sum(p["probability"] for p in preds) - 1) < 1e-5

    bad = data / "train" / "left" / "notes.mp4"
    code = main(["predict", "--model", MODEL, "--checkpoint", str(out / "last.pt"), str(bad)])
    err = capsys.readouterr().err
    assert code == 1 and "cannot use this video" in err and err.count(str(bad)) == 1
    photo = tmp_path / "photo.png"
    Image.new("RGB", (40, 40), "red").save(photo)
    code = main(["predict", "--model", MODEL, "--checkpoint", str(out / "last.pt"), str(photo)])
    err = capsys.readouterr().err
    assert code == 1 and "an image, but video_sparseformer_v1_micro is a video model" in err


def test_predict_and_eval_inflate_a_checkpoint_of_the_image_model(tmp_path, capsys):
    from sparseformer import create_model

    data = tmp_path / "videos"
    make_folder(data, bad=False)
    image = create_model("sparseformer_v1_micro", num_classes=2)
    ckpt = tmp_path / "image.pt"
    torch.save(
        {"model": image.state_dict(), "model_name": "sparseformer_v1_micro",
         "class_names": ["left", "right"]},
        ckpt,
    )  # fmt: skip
    video = data / "val" / "right" / "0.mp4"
    common = ["--checkpoint", str(ckpt), "--frames", "4", "--frame-stride", "2", "--json"]
    assert main(["predict", "--model", MODEL, str(video), *common]) == 0
    preds = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["predictions"]
    assert {p["label"] for p in preds} == {"left", "right"}
    code = main(["eval", "--model", MODEL, "--data-dir", str(data), "--quiet", *common])
    assert code == 0 and json.loads(capsys.readouterr().out.strip().splitlines()[-1])["images"] == 4
    assert main(["models", "video_sparseformer_v1_*"]) == 0
    listed = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines())
    assert "pretrained=True inflates sparseformer_v1_tiny's" in listed["video_sparseformer_v1_tiny"]
    assert "[no released weights]" in listed["video_sparseformer_v1_micro"]
    other = "video_sparseformer_v1_tiny"  # another image model's video twin: refused
    code = main(["predict", "--model", other, str(video), *common])
    assert code == 1 and "is a checkpoint of 'sparseformer_v1_micro'" in capsys.readouterr().err


def test_a_broken_val_video_is_left_out_of_eval_not_scored_as_another(tmp_path, capsys):
    data, out = tmp_path / "videos", tmp_path / "run"
    make_folder(data, bad=False)
    assert main(["train", "--model", MODEL, "--data-dir", str(data), "--output", str(out),
                 *FAST, "--epochs", "1"]) == 0  # fmt: skip
    # passes the folder scan (a readable header, 10 frames), fails when its clip is decoded
    broken = data / "val" / "right" / "0.mp4"
    with av.open(str(broken), "w", options={"movflags": "faststart"}) as f:
        stream = f.add_stream("mpeg4", rate=25)
        stream.width = stream.height = 32
        for a in np.random.default_rng(0).integers(0, 256, (10, 32, 32, 3), dtype=np.uint8):
            for packet in stream.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                f.mux(packet)
        for packet in stream.encode():
            f.mux(packet)
    raw = broken.read_bytes()
    broken.write_bytes(raw[: raw.index(b"mdat") + (len(raw) - raw.index(b"mdat")) // 3])
    assert probe_video(broken) == 10  # the scan keeps it
    capsys.readouterr()
    argv = ["eval", "--model", MODEL, "--checkpoint", str(out / "last.pt"), "--data-dir",
            str(data), "--json", "--quiet"]  # fmt: skip
    for workers in ("0", "1"):  # a data-loading process's failures count too
        assert main([*argv, "--workers", workers]) == 0
        result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        counts = (result["images"], result["skipped_files"], result["left_out"])
        assert counts == (3, 0, 1), workers


def test_model_and_data_of_different_kinds_fail_with_a_clear_message(tmp_path, capsys):
    data = tmp_path / "videos"
    make_folder(data, bad=False)
    image_run = ["--output", str(tmp_path / "run"), *FAST]
    code = main(["train", "--model", "sparseformer_v1_micro", "--data-dir", str(data), *image_run])
    err = capsys.readouterr().err
    assert code == 1 and "is an image model but the data folder holds videos" in err
    assert "Traceback" not in err
    # decided before the folder is scanned: without --frames these 10-frame clips are too
    # short for the default 8 frames 4 apart, which must not hide the real mistake
    image_model = ["--model", "sparseformer_v1_micro", "--data-dir", str(data)]
    code = main(["train", *image_model, "--output", str(tmp_path / "r2"), *RECIPE])
    assert code == 1 and "is an image model" in capsys.readouterr().err
    code = main(["eval", *image_model, "--checkpoint", str(tmp_path / "any.pt")])
    assert code == 1 and "is an image model" in capsys.readouterr().err
    images = tmp_path / "images"
    for split in ("train", "val"):
        for name in ("a", "b"):
            (images / split / name).mkdir(parents=True)
            Image.new("RGB", (40, 40), name == "a" and "red" or "blue").save(
                images / split / name / "0.png"
            )
    code = main(["train", "--model", MODEL, "--data-dir", str(images), *image_run])
    assert code == 1 and "is a video model but the data are images" in capsys.readouterr().err
    shutil.rmtree(data / "val")  # a video folder's layout is told in videos
    code = main(["train", "--model", MODEL, "--data-dir", str(data), *image_run])
    err = capsys.readouterr().err
    assert code == 1 and "has no val/ folder; expected DIR/train/CLASS/*.mp4" in err


def test_video_training_takes_the_recipes_flip_and_crop_scale(tmp_path):
    from sparseformer.cli import build_parser
    from sparseformer.cli.common import data_source, recipe_flags
    from sparseformer.data import Preprocessing, build_datasets
    from sparseformer.engine.recipe import recipe_from_flags

    data = tmp_path / "videos"
    make_folder(data, bad=False)
    args = build_parser().parse_args(
        ["train", "--model", MODEL, "--data-dir", str(data), "--output", str(tmp_path / "r"),
         *FAST, "--set", "hflip=0", "augmentation.scale=[0.5,1.0]"]
    )  # fmt: skip
    recipe = recipe_from_flags(recipe_flags(args), args.dataset)
    assert recipe.augmentation.hflip == 0 and recipe.augmentation.scale == (0.5, 1.0)
    # the other augmentation fields keep the recipe's values, not the dataclass defaults
    assert recipe.augmentation.auto_augment is None and recipe.label_smoothing == 0
    bundle = build_datasets(data_source(args, views=False), Preprocessing(32), recipe.augmentation)
    assert bundle.train.spec.hflip == 0 and bundle.train.spec.scale == (0.5, 1.0)
    assert bundle.val.spec.num_frames == 4 and bundle.val.spec.stride == 2


def test_resuming_a_video_run_with_its_own_flags_warns_of_nothing(tmp_path, caplog):
    data = tmp_path / "videos"
    make_folder(data, bad=False)
    # CutMix is turned off for clips: the recipe the flags ask for must compare after that too
    argv = ["train", "--model", MODEL, "--data-dir", str(data), "--output", str(tmp_path / "r"),
            *FAST, "--set", "cutmix=1.0"]  # fmt: skip
    assert main(argv) == 0
    with caplog.at_level("WARNING"):
        assert main([*argv, "--resume", "auto", "--epochs", "3"]) == 0
    assert "ignored" not in caplog.text
    # other clip flags on resume: named and ignored, as recipe changes are
    caplog.clear()
    with caplog.at_level("INFO"):
        assert main([*argv, "--resume", "auto", "--epochs", "4", "--frames", "2"]) == 0
    assert "--frames (asked 2, the run's 4)" in caplog.text and "ignored" in caplog.text
    saved = torch.load(tmp_path / "r" / "last.pt", weights_only=True)
    assert saved["epoch"] == 4 and saved["video"]["num_frames"] == 4
    # fine-tuning from the run takes its clips too (the default 8 x 4 would need 29 frames)
    caplog.clear()
    with caplog.at_level("INFO"):
        assert main(["train", "--model", MODEL, "--data-dir", str(data), "--output",
                     str(tmp_path / "ft"), *RECIPE, "--checkpoint",
                     str(tmp_path / "r" / "best.pt"), "--set",
                     "auto_augment=rand-m9-mstd0.5-inc1"]) == 0  # fmt: skip
    tuned = torch.load(tmp_path / "ft" / "last.pt", weights_only=True)
    assert (tuned["video"]["num_frames"], tuned["video"]["stride"]) == (4, 2)
    assert "video clips: the recipe's RandAugment: not applied" in caplog.text
