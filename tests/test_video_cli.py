"""``sparseformer train / eval / predict`` on a tiny folder of real-encoded videos."""

from __future__ import annotations

import json

import pytest
import torch

from sparseformer.cli import main

from .test_video_data import make_folder

pytest.importorskip("av")

MODEL = "video_sparseformer_v1_micro"
FAST = [
    "--recipe", "fashion-mnist-cpu", "--epochs", "2", "--batch-size", "2", "--img-size", "32",
    "--frames", "4", "--frame-stride", "2", "--quiet", "--set", "label_smoothing=0",
]  # fmt: skip


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
    assert "skipped 4 unreadable" in capsys.readouterr().out

    # eval with 2 clips x 3 crops per video: scores averaged per video
    code = main(
        ["eval", "--model", MODEL, "--checkpoint", str(out / "last.pt"), "--data-dir", str(data),
         "--frames", "4", "--frame-stride", "2", "--clips", "2", "--crops", "3", "--json",
         "--quiet"]
    )  # fmt: skip
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["images"] == 4 and 0 <= result["acc1"] <= 100

    video = data / "val" / "right" / "0.mp4"
    code = main(["predict", "--model", MODEL, "--checkpoint", str(out / "last.pt"), str(video),
                 "--json"])  # fmt: skip
    assert code == 0
    preds = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["predictions"]
    assert {p["label"] for p in preds} == {"left", "right"}
    assert abs(sum(p["probability"] for p in preds) - 1) < 1e-5

    bad = data / "train" / "left" / "notes.mp4"
    code = main(["predict", "--model", MODEL, "--checkpoint", str(out / "last.pt"), str(bad)])
    assert code == 1 and "cannot use this video" in capsys.readouterr().out
