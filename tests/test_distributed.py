"""``torchrun --nproc_per_node=2 -m sparseformer train`` on CPU (gloo): ranks stay identical,
one set of files is written, the learning rate follows the total batch."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sparseformer.data import DataError
from sparseformer.data.fashion_mnist import fashion_mnist
from sparseformer.engine.recipe import load_recipe

# Runs the real CLI under torchrun; afterwards every rank saves the weights it ended with.
SCRIPT = """
import os, sys, torch
import sparseformer.engine.trainer as trainer
from sparseformer.cli import main

dump = sys.argv[1]
original_fit = trainer.fit

def fit_and_dump(model, *args, **kwargs):
    summary = original_fit(model, *args, **kwargs)
    torch.save(model.state_dict(), os.path.join(dump, f"rank{os.environ['RANK']}.pt"))
    return summary

trainer.fit = fit_and_dump
sys.exit(main(sys.argv[2:]))
"""


def test_two_cpu_processes_train_as_one(tmp_path):
    root = tmp_path / "datasets"
    try:
        fashion_mnist(False, root=root, download=False)
    except DataError:
        pytest.skip("Fashion-MNIST is not installed (make data installs dataset-fashion-mnist)")
    script = tmp_path / "ddp_run.py"
    script.write_text(SCRIPT)
    dump, out = tmp_path / "weights", tmp_path / "run"
    dump.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(script), str(dump), "train", "--model", "sparseformer_v1_nano", "--dataset",
           "fashion-mnist", "--data-root", str(root), "--limit-train", "256", "--limit-val", "64",
           "--epochs", "1", "--batch-size", "32", "--img-size", "28", "--quiet", "--device", "cpu",
           "--set", "warmup_epochs=100", "--output", str(out)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    ranks = [torch.load(dump / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys()
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), key

    # one set of files, written by rank 0 only
    assert sorted(p.name for p in out.iterdir()) == [
        "best.pt", "last.pt", "metrics.jsonl", "metrics.png", "summary.json",
    ]  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["ranks_in_sync"] is True
    (record,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert record["step"] == 4  # 256 images / (2 ranks x 32) per step
    state = torch.load(out / "last.pt", weights_only=True)
    assert len(state["rng"]) == 2  # each rank's generators, to resume every rank exactly
    for key in ranks[0]:
        assert torch.equal(state["model"][key], ranks[0][key])
    # the LR is scaled by the total batch of 64: warm-up step 3 of 400 towards lr * 64 / 512
    recipe = load_recipe("fashion-mnist-cpu")
    peak, start, _ = recipe.scaled_lr(64)
    assert record["lr"] == pytest.approx(start + (peak - start) * 3 / 400)
    assert record["images_per_second"] > 0 and Path(summary["metrics"]).exists()


BUFFERS = """
import sys, torch, torch.distributed as dist
from sparseformer.engine.distributed import broadcast_buffers, setup_distributed

info = setup_distributed("cpu")
norm = torch.nn.BatchNorm1d(3)
norm.running_mean.fill_(float(info.rank + 1))  # each rank's own statistics
broadcast_buffers(norm, info)
torch.save(norm.state_dict(), sys.argv[1] + f"/rank{info.rank}.pt")
dist.destroy_process_group()
"""


def test_every_rank_evaluates_with_rank_0s_buffers(tmp_path):
    # evaluation runs the bare module (DDP's own broadcast hangs a rank with no batch), so
    # BatchNorm statistics must come from rank 0, whose weights are the ones saved
    script = tmp_path / "buffers.py"
    script.write_text(BUFFERS)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(script), str(tmp_path)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):
        state = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert torch.equal(state["running_mean"], torch.ones(3)), rank


# Builds an image folder under torchrun, recording which files this rank checked.
SCAN_SCRIPT = """
import json, os, sys
import sparseformer.data.folder as folder
from sparseformer.engine.distributed import cleanup_distributed, setup_distributed

checked = []
real = folder.check_image_header

def spy(path):
    checked.append(path)
    return real(path)

folder.check_image_header = spy
setup_distributed("cpu")
rank = int(os.environ["RANK"])
root = sys.argv[1] if rank == 0 or len(sys.argv) < 4 else sys.argv[3]
if rank == 0:  # built by one process only: no collective, so no wait for the other
    folder.CheckedImageFolder(root)
    checked.clear()
try:
    ds = folder.CheckedImageFolder(root, share_check=True)
    out = {"checked": checked, "samples": list(ds.samples), "skipped": ds.skipped}
except folder.DataError as exc:  # both processes must say it, and neither wait for the other
    out = {"error": str(exc)}
with open(os.path.join(sys.argv[2], f"rank{rank}.json"), "w") as f:
    json.dump(out, f)
cleanup_distributed()
"""


def test_two_processes_share_the_folder_check_and_agree(tmp_path):
    import shutil

    from PIL import Image

    from sparseformer.data import CheckedImageFolder

    root = tmp_path / "train"
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for k in range(5):
            Image.new("RGB", (8, 8), (40 * k, 0, 0)).save(root / c / f"{k}.png")
    (root / "cat" / "2.png").write_bytes(b"not an image")
    (root / "dog" / "9.jpg").write_bytes(b"")
    script = tmp_path / "scan.py"
    script.write_text(SCAN_SCRIPT)

    def run(*roots):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", str(script), str(roots[0]), str(tmp_path),
               *map(str, roots[1:])]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)], done

    ranks, _ = run(root)
    alone = CheckedImageFolder(root)
    # each file checked once, by one of the two processes; both end with the whole result
    assert not set(ranks[0]["checked"]) & set(ranks[1]["checked"])
    assert len(ranks[0]["checked"]) + len(ranks[1]["checked"]) == 11
    for r in ranks:
        assert [tuple(s) for s in r["samples"]] == alone.samples and len(alone) == 9
        assert [tuple(s) for s in r["skipped"]] == alone.skipped and len(alone.skipped) == 2
    # processes that list different files (node-local copies that differ) would train on
    # wrongly paired samples and hang when their epochs differ in length: a clear error
    other = tmp_path / "other"
    shutil.copytree(root, other)
    Image.new("RGB", (8, 8)).save(other / "dog" / "5.png")
    ranks, _ = run(root, other)
    for r in ranks:
        assert "processes see different files (11 on rank 0, 12 on rank 1)" in r["error"]


# A torchrun worker's stand-in: asks for the launcher's death signal, says it is ready, waits.
WORKER = """
import os, signal, sys, time
from sparseformer.engine.distributed import end_with_launcher

signal.signal(signal.SIGTERM, lambda *_: (open(sys.argv[1], "w").close(), os._exit(0)))
os.environ["TORCHELASTIC_RUN_ID"] = "test"
end_with_launcher()
print("ready", flush=True)
time.sleep(60)
"""


@pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's"
)
def test_a_worker_gets_sigterm_when_its_launcher_is_killed(tmp_path):
    # before, a torchrun killed with -9 left its workers training, unseen, holding the lock
    marker = tmp_path / "terminated"
    launcher = subprocess.Popen(  # a parent that starts the worker and waits, as torchrun does
        [sys.executable, "-c", "import subprocess, sys; subprocess.run(sys.argv[1:])",
         sys.executable, "-c", WORKER, str(marker)], stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert launcher.stdout.readline().strip() == "ready"
    launcher.kill()
    launcher.wait()
    for _ in range(100):
        if marker.exists():
            break
        time.sleep(0.1)
    assert marker.exists(), "the worker outlived its killed launcher"


# Rank 1 of 2 with a Python SIGTERM handler (the CLI has one), joining a group whose rank 0
# never comes (it refused a busy --output): torchrun then sends it SIGTERM.
JOINER = """
import os, signal, sys
from sparseformer.engine.distributed import setup_distributed

signal.signal(signal.SIGTERM, lambda *_: sys.exit("handled: too late to matter"))
os.environ.update(RANK="1", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
print("joining", flush=True)
setup_distributed("cpu")
"""


def test_sigterm_ends_a_process_waiting_to_join_its_group_at_once():
    # it waited in C++, where the handler never ran, until torchrun killed it 30 s later
    import socket

    with socket.socket() as s:  # a port nobody listens on: rank 0 never comes
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    joiner = subprocess.Popen([sys.executable, "-c", JOINER, str(port)], stdout=subprocess.PIPE,
                              text=True)  # fmt: skip
    assert joiner.stdout.readline().strip() == "joining"
    time.sleep(2)  # inside init_process_group
    joiner.terminate()
    try:
        assert joiner.wait(timeout=10) == -15
    finally:
        joiner.kill()
    assert signal_handler_restored_after_joining()


def signal_handler_restored_after_joining() -> bool:
    """Whether the handler is back after the join (in a fresh process: its signals are its
    own)."""
    code = (
        "import os, signal\n"
        "from sparseformer.engine.distributed import _sigterm_ends_at_once\n"
        "mine = lambda *_: None\n"
        "signal.signal(signal.SIGTERM, mine)\n"
        "with _sigterm_ends_at_once():\n"
        "    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL\n"
        "assert signal.getsignal(signal.SIGTERM) is mine\n"
    )
    return subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


@pytest.mark.parametrize("command", ["train", "bootstrap"])
@pytest.mark.parametrize("rank, said", [(0, True), (1, False)])
def test_the_plans_warnings_are_said_by_the_first_rank_only(
    monkeypatch, caplog, command, rank, said
):
    """Every rank plans the run (recipe, resume) and met the same warnings: with 4 processes
    each was printed 4 times."""
    import importlib
    import logging

    import sparseformer.engine.distributed as distributed
    from sparseformer.cli import build_parser

    def plan(args, read=None):
        logging.getLogger("sparseformer.engine.recipe").warning("a recipe field left out")
        return None  # the run is finished: nothing more to do

    cli = importlib.import_module(f"sparseformer.cli.{command}")
    root = logging.getLogger()
    monkeypatch.setattr(root, "level", root.level)  # restored after the test
    monkeypatch.setattr(distributed, "launched_rank", lambda: (rank, 2))
    monkeypatch.setattr(cli, "_plan", plan)
    argv = {"train": ["--model", "sparseformer_v1_nano"], "bootstrap": ["--teacher", "t"]}
    args = build_parser().parse_args([command, *argv[command], "--output", "unused"])
    with caplog.at_level(logging.NOTSET, logger="sparseformer.engine.recipe"):
        assert cli.run(args) == 0
    assert ("a recipe field left out" in caplog.text) is said
