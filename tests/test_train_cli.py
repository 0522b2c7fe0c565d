"""``sparseformer train / eval / predict`` end to end on real Fashion-MNIST images.

Real training on a 2,000-image subset must learn, and a run killed after its first epoch and
resumed must give the same metrics as the run left alone. Needs the Fashion-MNIST files
(``make data`` installs the Debian package); skipped without them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sparseformer.cli import main
from sparseformer.data import DataError
from sparseformer.data.fashion_mnist import fashion_mnist

MICRO = "sparseformer_v1_micro"
SUBSET = ["--limit-train", "2000", "--limit-val", "500"]
# one thread: the same arithmetic in every run, whatever else the machine is doing
FAST = ["--epochs", "2", "--batch-size", "64", "--img-size", "32", "--quiet", "--threads", "1"]


@pytest.fixture(scope="session")
def fm_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("datasets")
    try:
        fashion_mnist(False, root=root, download=False)
    except DataError:
        pytest.skip("Fashion-MNIST is not installed (make data installs dataset-fashion-mnist)")
    return root


def train_cmd(fm_root: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "sparseformer", "train", "--model", MICRO, "--dataset",
            "fashion-mnist", "--data-root", str(fm_root), *SUBSET, *FAST, "--output", str(out),
            *extra]  # fmt: skip


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(fm_root, tmp_path_factory) -> Path:
    """The run left alone: 2 epochs on 2,000 real images."""
    out = tmp_path_factory.mktemp("runs") / "alone"
    subprocess.run(train_cmd(fm_root, out), check=True, capture_output=True, timeout=600)
    return out


def test_training_on_real_images_learns(trained):
    recs = records(trained)
    assert [r["epoch"] for r in recs] == [1, 2]
    assert recs[-1]["train_loss"] < recs[0]["train_loss"]
    assert recs[-1]["val_acc1"] > 50.0, recs  # 10 classes: chance is 10%
    summary = json.loads((trained / "summary.json").read_text())
    assert summary["best_val_acc1"] == max(r["val_acc1"] for r in recs)
    for key in ("roi/area_final", "roi/points_outside", "roi/collapsed_pairs_final"):
        assert key in recs[-1]  # RoI health of a fixed validation batch, every epoch
    assert (trained / "metrics.png").stat().st_size > 0


def test_killed_run_resumes_on_the_same_trajectory(trained, fm_root, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen(train_cmd(fm_root, out), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 600
    while not (out / "last.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # no chance to clean up: as a power cut
    proc.wait()
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["epoch"] == 1, "the run finished before it could be killed"
    # resumed with gradient checkpointing, which must not change a single figure
    subprocess.run(train_cmd(fm_root, out, "--resume", "auto", "--grad-checkpointing"),
                   check=True, capture_output=True, timeout=600)  # fmt: skip
    alone, resumed = records(trained), records(out)
    assert [r["epoch"] for r in resumed] == [1, 2]
    for a, b in zip(alone, resumed):
        for key in ("train_loss", "val_loss", "val_acc1", "val_acc5", "lr"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (key, a, b)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporaries


def test_eval_and_predict_use_what_the_checkpoint_stores(trained, fm_root, tmp_path, capsys):
    best = trained / "best.pt"
    assert main(["eval", "--model", MICRO, "--checkpoint", str(best), "--dataset",
                 "fashion-mnist", "--data-root", str(fm_root), "--limit-val", "500",
                 "--json", "--quiet"]) == 0  # fmt: skip
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    best_acc = max(r["val_acc1"] for r in records(trained))
    assert result["images"] == 500 and result["acc1"] == pytest.approx(best_acc, abs=1e-6)
    assert result["img_size"] == 32  # the training preprocessing, read from the checkpoint
    # predict real test images, saved as files
    test_set = fashion_mnist(False, root=fm_root, download=False)
    paths, labels = [], []
    for i in range(20):
        img, label = test_set[i]
        img.save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
        labels.append(label)
    assert main(["predict", "--model", MICRO, "--checkpoint", str(best), *paths,
                 "--topk", "3", "--json"]) == 0  # fmt: skip
    lines = capsys.readouterr().out.strip().splitlines()
    outs = [json.loads(line) for line in lines if line.startswith("{")]
    assert [o["image"] for o in outs] == paths
    names = torch.load(best, weights_only=True)["class_names"]
    for o in outs:
        probs = [p["probability"] for p in o["predictions"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
        assert {p["label"] for p in o["predictions"]} <= set(names)
    right = sum(o["predictions"][0]["label"] == names[y] for o, y in zip(outs, labels))
    assert right >= 6  # chance would be 2 of 20; the model scores > 50% on the val subset
    # our checkpoints also load through the library entry point
    from sparseformer import create_model

    model = create_model(MICRO, num_classes=10, checkpoint_path=best)
    assert model.num_classes == 10


def test_checkpoint_of_another_model_is_one_line(trained, capsys):
    code = main(["eval", "--model", "sparseformer_v1_nano", "--checkpoint",
                 str(trained / "best.pt"), "--dataset", "fashion-mnist"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 1 and "\n" not in err
    assert "is a checkpoint of 'sparseformer_v1_micro'" in err and "--model" in err
    code = main(["train", "--model", "sparseformer_v1_nano", "--dataset", "fashion-mnist",
                 "--output", str(trained), "--resume", str(trained / "last.pt")])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 1 and "\n" not in err and "sparseformer_v1_micro" in err


def test_grad_checkpointing_of_a_model_without_it_is_one_line():
    from sparseformer.engine.collaborators import enable_grad_checkpointing

    with pytest.raises(ValueError, match="mine does not support gradient checkpointing"):
        enable_grad_checkpointing(torch.nn.Linear(2, 2), "mine")
