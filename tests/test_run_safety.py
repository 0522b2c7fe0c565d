"""A run folder belongs to one run; a failed write is one line and loses nothing; a stop by
signal is clean and resumable."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from sparseformer.engine.atomic import WriteError, temporary_for, write_atomic
from sparseformer.engine.run_folder import (
    LOCK_FILE,
    RunFolderBusy,
    RunFolderLock,
    prepare_output,
)

from .test_data import make_folder
from .test_train_errors import NANO, run_cli

# one thread everywhere: bit-exact comparisons need the same reduction order, and the default
# thread count follows the machine's load, which changes between runs
FAST = ("--batch-size", "4", "--img-size", "32", "--quiet", "--recipe", "fashion-mnist-cpu",
        "--threads", "1")  # fmt: skip


@pytest.fixture
def folder(tmp_path):
    return make_folder(tmp_path / "data", classes=("cat", "dog"), per_class=4)


def _train(folder, out, *extra: str) -> list[str]:
    return ["train", "--model", NANO, "--data-dir", str(folder), "--output", str(out), *FAST,
            *extra]  # fmt: skip


def test_a_second_run_in_a_held_folder_is_refused_naming_the_holder(tmp_path, folder, capsys):
    out = tmp_path / "run"
    assert run_cli(capsys, *_train(folder, out, "--epochs", "1"))[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with RunFolderLock(out):  # a first run, still writing (held on its own descriptor)
        with pytest.raises(RunFolderBusy, match=f"PID {os.getpid()} on host"):
            RunFolderLock(out).acquire()
        code, _, err = run_cli(capsys, *_train(folder, out, "--epochs", "2", "--resume", "auto"))
        assert code == 1 and err.count("\n") == 0, err
        assert f"is in use by another run (PID {os.getpid()} on host {socket.gethostname()}" in err
        assert "since" in err and "choose another folder" in err
    # the first run's files untouched; released cleanly, the folder is free again, silently
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert after == before and not (out / LOCK_FILE).exists()
    assert run_cli(capsys, *_train(folder, out, "--epochs", "2", "--resume", "auto"))[0] == 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


def test_a_system_without_flock_trains_unlocked_and_says_so(
    tmp_path, folder, capsys, caplog, monkeypatch
):
    # Windows has no fcntl: train, demo and bootstrap failed there with ModuleNotFoundError
    monkeypatch.setitem(sys.modules, "fcntl", None)
    out = tmp_path / "run"
    with caplog.at_level("WARNING", logger="sparseformer"):
        assert run_cli(capsys, *_train(folder, out, "--epochs", "1"))[0] == 0
    assert caplog.text.count("is not locked: this system has no flock") == 1  # not per check
    assert (out / "last.pt").is_file() and not (out / LOCK_FILE).exists()


def test_a_lock_still_held_by_a_killed_runs_workers_is_waited_for(tmp_path, caplog, monkeypatch):
    """kill -9 of a run leaves its forked data-loading workers holding the lock for a few
    seconds: a run started at once (a scheduler's requeue) waits for them, where it failed."""
    import fcntl
    import threading

    import sparseformer.engine.run_folder as run_folder

    out = tmp_path / "run"
    out.mkdir()
    dead = os.fork()
    if dead == 0:
        os._exit(0)
    os.waitpid(dead, 0)  # a process of this host that has ended
    fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT)  # its worker's inherited descriptor
    os.write(fd, f"PID {dead} on host {socket.gethostname()} since then".encode())
    fcntl.flock(fd, fcntl.LOCK_EX)
    worker_ends = threading.Timer(1.0, os.close, (fd,))
    worker_ends.start()
    with caplog.at_level("INFO"), RunFolderLock(out):
        assert f"PID {os.getpid()} on host" in (out / LOCK_FILE).read_text()
    worker_ends.join()
    assert f"the run that held it has ended (PID {dead} on host" in caplog.text
    monkeypatch.setattr(run_folder, "WORKERS_GRACE", 0.5)  # workers that never end
    fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT)
    os.write(fd, f"PID {dead} on host {socket.gethostname()} since then".encode())
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with pytest.raises(RunFolderBusy, match="has ended .* still hold it after 0 s: end them"):
            RunFolderLock(out).acquire()
    finally:
        os.close(fd)


def test_a_lock_left_by_a_killed_run_is_taken_over_and_logged(tmp_path, caplog):
    import signal

    out = tmp_path / "run"
    child = os.fork()
    if child == 0:  # a run that takes the folder and is killed with -9 while holding it
        RunFolderLock(out).acquire()
        os.kill(os.getpid(), signal.SIGKILL)
    _, status = os.waitpid(child, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert (out / LOCK_FILE).read_text().startswith(f"PID {child} on host ")
    with caplog.at_level("WARNING"), RunFolderLock(out):  # not blocked
        assert f"PID {os.getpid()} on host" in (out / LOCK_FILE).read_text()
    assert f"taking over from a run that is gone (PID {child} on host " in caplog.text


def test_temporaries_are_per_process_and_a_killed_runs_are_cleared(tmp_path):
    assert temporary_for(tmp_path / "metrics.png").name == f".metrics.png.tmp-{os.getpid()}"
    stale = [tmp_path / ".last.pt.tmp-4242", tmp_path / ".metrics.png.tmp-4243"]
    for path in stale:
        path.write_bytes(b"half")
    prepare_output(tmp_path)
    assert not any(p.exists() for p in stale)


def test_a_failed_write_names_the_file_and_keeps_the_old_one(tmp_path):
    path = tmp_path / "last.pt"
    path.write_bytes(b"old")

    def fails(f):
        f.write(b"new, half")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . file write failed")

    with pytest.raises(WriteError, match=r"could not write '.*last\.pt': file write failed"):
        write_atomic(path, fails)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["last.pt"]


# The CLI under a file-size limit (what `ulimit -f` sets), SIGXFSZ ignored as Python does.
_LIMITED = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), resource.RLIM_INFINITY))
from sparseformer.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.slow
def test_a_checkpoint_write_past_the_file_size_limit_is_one_line(tmp_path, folder, capsys):
    out = tmp_path / "run"
    assert run_cli(capsys, *_train(folder, out, "--epochs", "1"))[0] == 0
    first = torch.load(out / "last.pt", weights_only=True)
    limit = (out / "last.pt").stat().st_size // 2  # the next checkpoint cannot fit
    argv = _train(folder, out, "--epochs", "2", "--resume", "auto")
    done = subprocess.run([sys.executable, "-c", _LIMITED, str(limit), *argv],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    err = done.stderr.strip().splitlines()
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert err[-1].startswith("sparseformer train: error: could not write "), err
    assert "file too large" in err[-1] and "--resume auto" in err[-1]
    # the last good checkpoint loads, and metrics.jsonl is not ahead of it
    kept = torch.load(out / "last.pt", weights_only=True)
    assert kept["epoch"] == first["epoch"] == 1
    torch.testing.assert_close(kept["model"], first["model"])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1]
    assert not [p.name for p in out.iterdir() if ".tmp-" in p.name]


# The CLI in a process of its own that meets a signal at a chosen moment: SIGTERM to itself
# before step N's hook runs ("term N"), as validation N starts ("term-eval N") or after its
# Nth batch ("term-val N"), or kill -9
# right after the Nth mid-epoch checkpoint ("kill N"), or neither ("none"); the hooks are
# wrapped, nothing else changes.
_STOPPED = """
import os, signal, sys
from sparseformer.engine import epoch, step_saves
mode, n = sys.argv[1], int(sys.argv[2])
calls = [0]
if mode == "term":
    hook = step_saves.StepHook.__call__
    def call(self, progress, agree):
        calls[0] += 1
        if calls[0] == n:
            os.kill(os.getpid(), signal.SIGTERM)
        return hook(self, progress, agree)
    step_saves.StepHook.__call__ = call
elif mode == "term-eval":
    evaluate = epoch.evaluate
    def stopping(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            os.kill(os.getpid(), signal.SIGTERM)
        return evaluate(*args, **kwargs)
    epoch.evaluate = stopping
elif mode == "term-val":
    iterate = step_saves.UntilStopped.__iter__
    def stopping(self):
        for batch in iterate(self):
            yield batch
            calls[0] += 1
            if calls[0] == n:
                os.kill(os.getpid(), signal.SIGTERM)
    step_saves.UntilStopped.__iter__ = stopping
elif mode == "kill":
    save = epoch._save_checkpoints
    def saved(*args, **kwargs):
        save(*args, **kwargs)
        calls[0] += len(args) > 5 and args[5] is not None
        if calls[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
    epoch._save_checkpoints = saved
from sparseformer.cli import main
sys.exit(main(sys.argv[3:]))
"""


def _stopped_run(mode: str, n: int, argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _STOPPED, mode, str(n), *argv],
                          capture_output=True, text=True, timeout=300)  # fmt: skip


@pytest.fixture(scope="module")
def bigger(tmp_path_factory):  # 16 training images: 4 steps of 4 per epoch
    return make_folder(tmp_path_factory.mktemp("data16"), classes=("cat", "dog"), per_class=8)


@pytest.fixture(scope="module")
def plain(bigger, tmp_path_factory):
    """The uninterrupted run (2 epochs, no workers) that every stopped run must end as."""
    from sparseformer.cli import main

    out = tmp_path_factory.mktemp("plain") / "run"
    assert main(_train(bigger, out, "--epochs", "2", "--workers", "0")) == 0
    return out


def _final_weights(out) -> dict[str, torch.Tensor]:
    return torch.load(out / "last.pt", weights_only=True)["model"]


@pytest.mark.slow
def test_sigterm_mid_epoch_saves_and_the_resumed_run_ends_as_an_uninterrupted_one(
    tmp_path, bigger, plain, capsys
):
    out = tmp_path / "stopped"
    argv = _train(bigger, out, "--epochs", "2", "--workers", "2")
    done = _stopped_run("term", 6, argv)  # before the hook of epoch 2's second step
    assert done.returncode == 143 and "Traceback" not in done.stderr, done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("sparseformer train: stopped by SIGTERM (a checkpoint was saved)")
    assert "--resume auto" in line
    saved = torch.load(out / "last.pt", weights_only=True)
    assert (saved["epoch"], saved["epoch_step"], saved["step"]) == (1, 2, 6)
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    # resumed (with other workers: augmentation follows the sample, not the process)
    code, _, err = run_cli(capsys, *_train(bigger, out, "--epochs", "2", "--resume", "auto"))
    assert code == 0, err
    torch.testing.assert_close(_final_weights(out), _final_weights(plain), rtol=0, atol=0)
    ends = [(plain / "metrics.jsonl").read_text(), (out / "metrics.jsonl").read_text()]
    keys = ("epoch", "step", "train_loss", "val_loss", "val_acc1", "lr")
    a, b = ([{k: json.loads(r)[k] for k in keys} for r in t.splitlines()] for t in ends)
    assert a == b


@pytest.mark.slow
def test_a_kill_after_a_mid_epoch_checkpoint_resumes_to_the_same_weights(
    tmp_path, bigger, plain, capsys
):
    out = tmp_path / "killed"
    argv = _train(bigger, out, "--epochs", "2", "--workers", "0", "--checkpoint-every", "3")
    done = _stopped_run("kill", 2, argv)  # saved at step 3 of epochs 1 and 2: killed there
    assert done.returncode == -9, done.stderr
    saved = torch.load(out / "last.pt", weights_only=True)
    assert (saved["epoch"], saved["epoch_step"], saved["step"]) == (1, 3, 7)
    code, _, err = run_cli(capsys, *_train(bigger, out, "--epochs", "2", "--resume", "auto"))
    assert code == 0, err
    torch.testing.assert_close(_final_weights(out), _final_weights(plain), rtol=0, atol=0)


def test_checkpoint_every_takes_steps_or_a_duration(tmp_path, capsys):
    from sparseformer.engine.stopping import parse_checkpoint_every

    assert parse_checkpoint_every("500").steps == 500
    assert parse_checkpoint_every("30m").seconds == 1800
    assert parse_checkpoint_every("1.5h").seconds == 5400
    err = run_cli(capsys, "train", "--model", NANO, "--data-dir", str(tmp_path), "--output",
                  str(tmp_path / "o"), "--checkpoint-every", "10 min")[2]  # fmt: skip
    assert err == ("sparseformer train: error: --checkpoint-every '10 min': give a number of "
                   "steps (500) or a duration (90s, 30m, 2h)")  # fmt: skip


def test_a_ctrl_c_while_torch_imports_is_held_and_raised_after():
    """``import torch`` swallows a KeyboardInterrupt raised while it imports numpy: the CLI
    imports it with Ctrl-C held, and raises it once the import is whole."""
    import signal

    from sparseformer.cli import deferred_interrupt

    before = signal.getsignal(signal.SIGINT)
    went_on = []
    with pytest.raises(KeyboardInterrupt):
        with deferred_interrupt():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # Python runs the handler here: it only notes the signal
            went_on.append(True)
    assert went_on and signal.getsignal(signal.SIGINT) is before
    with deferred_interrupt():  # no signal: nothing raised
        pass
    from sparseformer.cli import _Terminated

    term = signal.getsignal(signal.SIGTERM)
    with pytest.raises(_Terminated):  # a scheduler's SIGTERM: held too, then said in a line
        with deferred_interrupt():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
    assert signal.getsignal(signal.SIGTERM) is term


@pytest.mark.slow
def test_ctrl_c_to_the_process_group_stops_cleanly_and_resumes(tmp_path, bigger, plain, capsys):
    """Ctrl-C (SIGINT to the whole group, data-loading workers included) at random moments
    of training (from the start line on; before it, Python's own start-up handles Ctrl-C):
    each run stops within 10 s, says how to continue, never reads as a worker crash and never
    goes on; resumed, it ends as an uninterrupted run. SPARSEFORMER_SIGINT_MOMENTS=20 for the
    full check (2 in the suite)."""
    import random
    import signal
    import time

    rng = random.Random(18)
    moments = int(os.environ.get("SPARSEFORMER_SIGINT_MOMENTS", "2"))
    stopped = 0
    for k in range(moments):
        out = tmp_path / f"run{k}"
        argv = [sys.executable, "-m", "sparseformer", *_train(bigger, out, "--epochs", "2",
                                                                "--workers", "2")]  # fmt: skip
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True, env=env)  # fmt: skip
        try:  # from the start line on: workers starting, steps, validation, saves
            while (line := proc.stdout.readline()) and not line.startswith("training "):
                pass
            time.sleep(rng.uniform(0.0, 2.0))  # the run takes about 4 s here
            os.killpg(proc.pid, signal.SIGINT)
            sent = time.monotonic()
            _, err = proc.communicate(timeout=60)
            took = time.monotonic() - sent
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        assert proc.returncode in (0, 130), err  # 0: it had finished before the signal
        assert "Traceback" not in err and "worker died" not in err, err
        if proc.returncode == 130:
            stopped += 1
            assert took < 10, took
            last = err.strip().splitlines()[-1]
            assert "stopped by SIGINT" in last or "interrupted" in last, last
            assert ("--resume auto" in last) == (out / "last.pt").is_file(), last
        resumed = _train(bigger, out, "--epochs", "2", "--workers", "2", "--resume", "auto")
        if not (out / "last.pt").is_file():  # stopped before its first checkpoint: start over
            resumed = [*resumed[:-2], "--overwrite"]
        assert run_cli(capsys, *resumed)[0] == 0
        torch.testing.assert_close(_final_weights(out), _final_weights(plain), rtol=0, atol=0)
    assert stopped >= min(moments, 1)  # the signal met a running run


@pytest.mark.slow
def test_mid_epoch_resume_under_torchrun_gives_the_uninterrupted_weights(tmp_path):
    """2 gloo ranks on CPU: rank 0 killed with -9 right after a mid-epoch checkpoint (torchrun
    then ends the other), resumed under torchrun: the same final weights, bit for bit."""
    data = make_folder(tmp_path / "data32", classes=("cat", "dog"), per_class=16)  # 4 steps
    script = tmp_path / "stopped.py"
    script.write_text(_STOPPED)

    def torchrun(out, *extra: str, mode: str = "none", n: int = 0):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", str(script), mode, str(n),
               *_train(data, out, "--epochs", "2", "--workers", "0", "--device", "cpu",
                       *extra)]  # fmt: skip
        return subprocess.run(cmd, capture_output=True, text=True, timeout=600)

    plain, out = tmp_path / "plain", tmp_path / "killed"
    assert torchrun(plain).returncode == 0
    killed = torchrun(out, "--checkpoint-every", "2", mode="kill", n=3)  # epoch 2, step 2
    assert killed.returncode != 0
    saved = torch.load(out / "last.pt", weights_only=True)
    assert (saved["epoch"], saved["epoch_step"], saved["world_size"]) == (1, 2, 2)
    assert len(saved["rng"]) == len(saved["epoch_progress"]) == 2  # every rank's
    done = torchrun(out, "--resume", "auto")
    assert done.returncode == 0, done.stderr[-3000:]
    torch.testing.assert_close(_final_weights(out), _final_weights(plain), rtol=0, atol=0)


def test_eval_predict_and_export_take_the_model_a_checkpoint_names(tmp_path, bigger, plain, capsys):
    # before, eval and predict required --model although our checkpoints name their model
    ckpt = str(plain / "last.pt")
    code, out, err = run_cli(capsys, "eval", "--checkpoint", ckpt, "--data-dir", str(bigger),
                             "--json", "--quiet")  # fmt: skip
    assert code == 0 and json.loads(out.strip().splitlines()[-1])["model"] == NANO, err
    image = str(next((bigger / "val" / "cat").iterdir()))
    code, out, err = run_cli(capsys, "predict", "--checkpoint", ckpt, image)
    assert code == 0 and out.strip(), err
    bare = tmp_path / "bare.pt"  # weights alone: nothing names the model
    torch.save(torch.load(ckpt, weights_only=True)["model"], bare)
    for command in (["eval", "--data-dir", str(bigger)], ["predict", image],
                    ["export", "--out", str(tmp_path / "x.onnx")]):  # fmt: skip
        code, _, err = run_cli(capsys, command[0], "--checkpoint", str(bare), *command[1:])
        assert code == 1 and err.count("\n") == 0, err
        assert err.endswith(
            "does not name its model (its weights are those of sparseformer_v1_nano); pass "
            "--model sparseformer_v1_nano"
        ), err  # told by its weights


def test_signals_are_noted_at_step_boundaries_and_sigterm_is_never_silent():
    import signal

    from sparseformer.engine.stopping import RunStopped, StopSignals, setup_signals

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with StopSignals() as signals:
        os.kill(os.getpid(), signal.SIGINT)  # noted, not raised: the loop stops at a boundary
        assert signals.requested and signals.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C: at once
            os.kill(os.getpid(), signal.SIGINT)
    with pytest.raises(RunStopped, match="stopped by SIGTERM") as stopped, setup_signals():
        os.kill(os.getpid(), signal.SIGTERM)  # while a command sets up: one line, not silence
    assert stopped.value.signum == signal.SIGTERM and not stopped.value.saved
    for signum, stop in ((signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, RunStopped)):
        with setup_signals():
            try:  # an import that swallows the exception (torch's lazy imports catch it)
                os.kill(os.getpid(), signum)
                time.sleep(0.05)
            except BaseException:
                pass
            with pytest.raises(stop), StopSignals():  # the run stops before training
                pass
        with pytest.raises(stop), setup_signals():  # a command without StopSignals: at its end
            try:
                os.kill(os.getpid(), signum)
                time.sleep(0.05)
            except BaseException:
                pass
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_eval_per_class_writes_each_classes_top1_and_the_confusion(tmp_path, bigger, plain, capsys):
    code, out, err = run_cli(capsys, "eval", "--checkpoint", str(plain / "last.pt"),
                             "--data-dir", str(bigger), "--json", "--quiet",
                             "--per-class", str(tmp_path / "pc"))  # fmt: skip
    assert code == 0, err
    overall = json.loads(out.strip().splitlines()[-1])
    report = json.loads((tmp_path / "pc" / "per_class.json").read_text())
    assert [c["class"] for c in report["classes"]] == report["class_names"] == ["cat", "dog"]
    assert [c["images"] for c in report["classes"]] == [8, 8]
    confusion = torch.tensor(report["confusion"])
    assert confusion.sum() == overall["images"] == 16
    assert 100 * confusion.diagonal().sum().item() / 16 == pytest.approx(overall["acc1"])
    for i, (c, row) in enumerate(zip(report["classes"], confusion)):  # row i: true class i
        assert c["acc1"] == pytest.approx(100 * row[i].item() / 8)
    assert (tmp_path / "pc" / "confusion.png").read_bytes()[:4] == b"\x89PNG"


def test_train_tensorboard_writes_each_epochs_numbers(tmp_path, bigger, capsys):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert run_cli(capsys, *_train(bigger, out, "--epochs", "2", "--tensorboard"))[0] == 0
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train_loss", "val_loss", "val_acc1", "lr", "images_per_second"} <= tags
    assert any(tag.startswith("roi/") for tag in tags)  # the RoI statistics
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    board = [(e.step, e.value) for e in events.Scalars("val_loss")]
    assert board == [(r["epoch"], pytest.approx(r["val_loss"])) for r in records]


def test_tensorboard_missing_is_said_before_the_data_or_the_folder(
    tmp_path, bigger, monkeypatch, capsys
):
    # before, it was said after the data scan and the model, leaving an empty metrics.jsonl
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if not installed
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, *_train(bigger, out, "--tensorboard"))
    assert code == 1 and err.splitlines()[-1] == ("sparseformer train: error: --tensorboard "
                                                  "needs TensorBoard: pip install "
                                                  "'sparseformer[tensorboard]'")  # fmt: skip
    assert not out.exists() and "data " not in err


def test_a_record_restored_on_resume_reaches_tensorboard_too(tmp_path, bigger, capsys):
    """Killed after the checkpoint, before the epoch's line and scalars: the resumed run
    writes that epoch's record from the checkpoint to metrics.jsonl and to TensorBoard."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert run_cli(capsys, *_train(bigger, out, "--epochs", "1", "--tensorboard"))[0] == 0
    (out / "metrics.jsonl").write_text("")  # as if killed right after last.pt
    shutil.rmtree(out / "tensorboard")
    resume = _train(bigger, out, "--epochs", "2", "--tensorboard", "--resume", "auto")
    assert run_cli(capsys, *resume)[0] == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    board = [(e.step, e.value) for e in events.Scalars("val_loss")]
    assert board == [(r["epoch"], pytest.approx(r["val_loss"])) for r in records]


@pytest.mark.slow
def test_sigterm_during_validation_saves_the_trained_epoch_and_resumes_exactly(
    tmp_path, bigger, plain, capsys
):
    out = tmp_path / "stopped"
    done = _stopped_run("term-eval", 1, _train(bigger, out, "--epochs", "2", "--workers", "0"))
    assert done.returncode == 143 and "Traceback" not in done.stderr, done.stderr
    assert "stopped by SIGTERM (a checkpoint was saved)" in done.stderr.strip().splitlines()[-1]
    assert "validation scored nothing" not in done.stderr  # cut short, not undecodable
    saved = torch.load(out / "last.pt", weights_only=True)
    assert (saved["epoch"], saved["epoch_step"], saved["step"]) == (0, 4, 4)  # trained, unscored
    assert not (out / "metrics.jsonl").read_text()
    code, _, err = run_cli(capsys, *_train(bigger, out, "--epochs", "2", "--resume", "auto"))
    assert code == 0, err
    torch.testing.assert_close(_final_weights(out), _final_weights(plain), rtol=0, atol=0)
    assert (out / "metrics.jsonl").read_text().count("\n") == 2


def test_sigterm_part_way_through_validation_resumes_exactly(tmp_path, bigger, capsys):
    """Validation draws from the random generators (its loader's seed): a stop part-way
    through it saves them as the epoch's training left them, so that a model that draws from
    them in training (drop path) resumes on the trajectory of the run left alone."""
    argv = ["--epochs", "2", "--workers", "0", "--drop-path", "0.3"]
    alone, out = tmp_path / "alone", tmp_path / "stopped"
    assert run_cli(capsys, *_train(bigger, alone, *argv))[0] == 0
    done = _stopped_run("term-val", 2, _train(bigger, out, *argv))
    assert done.returncode == 143 and "Traceback" not in done.stderr, done.stderr
    assert torch.load(out / "last.pt", weights_only=True)["epoch_step"] == 4  # trained, unscored
    code, _, err = run_cli(capsys, *_train(bigger, out, *argv, "--resume", "auto"))
    assert code == 0, err
    torch.testing.assert_close(_final_weights(out), _final_weights(alone), rtol=0, atol=0)


def test_a_kill_between_the_checkpoint_and_its_metrics_line_loses_no_record(tmp_path):
    """The checkpoint is written before its epoch's line: resumed from it, the line that the
    kill left out (or tore) comes from the record the checkpoint carries, exactly once."""
    from sparseformer.engine.metrics import MetricsLog

    path = tmp_path / "metrics.jsonl"
    one, two = {"epoch": 1, "val_acc1": 10.0}, {"epoch": 2, "val_acc1": 20.0}

    def resumed(text: str, saved: dict | None) -> list[dict]:
        path.write_text(text)
        log = MetricsLog(path, 2, saved)
        on_disk = [json.loads(line) for line in path.read_text().splitlines()]
        assert on_disk == log.records
        return log.records

    assert resumed(json.dumps(one) + "\n", two) == [one, two]  # killed before the line
    assert resumed(json.dumps(one) + '\n{"epoch": 2, "va', two) == [one, two]  # torn line
    lines = "".join(json.dumps(r) + "\n" for r in (one, two, {"epoch": 3}))
    assert resumed(lines, two) == [one, two]  # written: kept once; later epochs dropped
    assert resumed(json.dumps(one) + "\n", one) == [one]  # a record of another epoch: unused
    assert resumed(json.dumps(one) + "\n", None) == [one]


def test_a_folder_locked_by_a_run_still_starting_says_so(tmp_path):
    """The lock is taken before its holder is written: a second run in that moment names no
    empty holder."""
    import fcntl

    from sparseformer.engine.run_folder import LOCK_FILE, RunFolderBusy, check_run_folder_free

    fd = os.open(tmp_path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # locked, nothing written yet
        with pytest.raises(RunFolderBusy, match=r"in use by another run \(starting at this"):
            check_run_folder_free(tmp_path)
    finally:
        os.close(fd)


def test_a_sigterm_is_announced_without_offering_a_second_one(caplog):
    from sparseformer.engine.stopping import StopSignals

    for signum, offer in ((signal.SIGTERM, "(Ctrl-C to stop now)"),
                          (signal.SIGINT, "(Ctrl-C again to stop now)")):  # fmt: skip
        caplog.clear()
        with caplog.at_level("WARNING", logger="sparseformer"), StopSignals(announce=True):
            os.kill(os.getpid(), signum)
        assert f"{signum.name} received: stopping at the next step boundary {offer}" in caplog.text


def test_the_learning_rate_a_run_takes_is_said(tmp_path, folder, capsys, caplog):
    # --lr is per 512 images; the rate it came to at the run's batch was said nowhere
    with caplog.at_level(logging.INFO, logger="sparseformer"):
        assert run_cli(capsys, *_train(folder, tmp_path / "run", "--lr", "0.008"))[0] == 0
    assert "learning rate: peak 6.25e-05 at a total batch of 4 (0.008 per 512 images)" in (
        caplog.text
    )


def test_a_run_resumed_into_a_new_folder_keeps_its_history_and_best(tmp_path, folder, capsys):
    """``--resume other/last.pt --output new``: the new folder's metrics.jsonl held only the
    epochs trained there, and no best.pt unless the run beat its earlier best."""
    first, then = tmp_path / "first", tmp_path / "then"
    assert run_cli(capsys, *_train(folder, first, "--epochs", "2"))[0] == 0
    argv = _train(folder, then, "--epochs", "3", "--resume", str(first / "last.pt"))
    assert run_cli(capsys, *argv)[0] == 0
    earlier = (first / "metrics.jsonl").read_text().splitlines()
    lines = (then / "metrics.jsonl").read_text().splitlines()
    assert lines[:2] == earlier and [json.loads(r)["epoch"] for r in lines] == [1, 2, 3]
    best = torch.load(then / "best.pt", weights_only=True)
    summary = json.loads((then / "summary.json").read_text())
    assert best["epoch"] == summary["best_epoch"] and (first / "last.pt").is_file()
    # a best.pt newer than the last.pt resumed (killed between the two saves) is not its best
    newer = {**torch.load(first / "best.pt", weights_only=True), "epoch": 7}
    (first / "best.pt").unlink()  # a hard link to then/best.pt: replaced, not written into
    torch.save(newer, first / "best.pt")
    again = tmp_path / "again"
    argv = _train(folder, again, "--epochs", "3", "--resume", str(first / "last.pt"))
    assert run_cli(capsys, *argv)[0] == 0
    assert torch.load(again / "last.pt", weights_only=True)["best_epoch"] != 7
    if (again / "best.pt").is_file():  # only one the run wrote itself
        assert torch.load(again / "best.pt", weights_only=True)["epoch"] == 3


def test_a_run_continued_into_a_new_folder_resumes_there_from_where_it_was(
    tmp_path, folder, capsys
):
    """A run continued into a new folder, stopped before its first epoch there ends (here:
    nothing left to train), held only the carried best.pt: ``--resume auto`` took it and
    trained its later epochs again without a word. The resumed checkpoint is its last.pt."""
    first, then = tmp_path / "first", tmp_path / "then"
    assert run_cli(capsys, *_train(folder, first, "--epochs", "2"))[0] == 0
    argv = _train(folder, then, "--epochs", "2", "--resume", str(first / "last.pt"))
    assert run_cli(capsys, *argv)[0] == 0  # nothing to do, but the folder is the run's now
    assert (then / "last.pt").samefile(first / "last.pt")  # a link: no second copy on disk
    assert run_cli(capsys, *argv)[0] == 0  # the same command again: the same continuation
    assert run_cli(capsys, *_train(folder, then, "--epochs", "3", "--resume", "auto"))[0] == 0
    epochs = [json.loads(r)["epoch"] for r in (then / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3] and torch.load(then / "last.pt", weights_only=True)["epoch"] == 3
    assert torch.load(first / "last.pt", weights_only=True)["epoch"] == 2  # the first run's own


def test_links_planted_at_the_lock_and_the_temporaries_are_removed_not_followed(tmp_path, caplog):
    """A run folder copied with a `.lock` link to ~/.bashrc: the lock's record overwrote the
    file (the run then failed or not), and its first 512 bytes went raw into the log; links at
    the temporaries' names made export, viz and eval --per-class write through them."""
    from sparseformer.engine.atomic import staging_file

    victim = tmp_path / "victim"
    victim.write_text("precious \x1b[2J")
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_FILE).symlink_to(victim)
    with caplog.at_level("WARNING"), RunFolderLock(out):
        assert f"PID {os.getpid()} on host" in (out / LOCK_FILE).read_text()
    assert victim.read_text() == "precious \x1b[2J" and "removed, not followed" in caplog.text
    (out / LOCK_FILE).write_text("PID 1 on host elsewhere \x1b[2J")  # a planted holder record
    holder = RunFolderLock(out)
    with RunFolderLock(out), pytest.raises(RunFolderBusy) as busy:  # held by us, here
        holder.acquire()
    assert "\x1b" not in str(busy.value)
    target = out / "metrics.png"
    temporary_for(target).symlink_to(victim)
    write_atomic(target, lambda f: f.write(b"png"))
    assert target.read_bytes() == b"png" and victim.read_text() == "precious \x1b[2J"
    onnx = out / "model.onnx"
    temporary_for(onnx).with_name(temporary_for(onnx).name + ".onnx").symlink_to(victim)
    staged = staging_file(onnx, ".onnx")
    assert not staged.is_symlink() and staged.read_bytes() == b""
    staged.write_bytes(b"graph")  # as the exporter writes it, by name
    assert victim.read_text() == "precious \x1b[2J"


def test_a_staged_file_is_installed_when_written_and_gone_when_the_writer_fails(tmp_path):
    """What export, convert and bench's outputs are written through: the old file stays, and no
    temporary is left beside it, whether the writer fails, is interrupted or the install fails;
    a failed write names the file asked for (not the temporary) and the cause."""
    from sparseformer.engine.atomic import TEMPORARY_PATTERN, staged

    target = tmp_path / "model.onnx"
    target.write_bytes(b"old")
    for failure in (OSError(28, "No space left on device"), KeyboardInterrupt()):
        with pytest.raises(type(failure)) as raised, staged(target, ".onnx") as tmp:
            tmp.write_bytes(b"half")
            raise failure
        assert target.read_bytes() == b"old" and not list(tmp_path.glob(TEMPORARY_PATTERN))
    said = f"could not write {str(target)!r}: no space left on the device; free some space"
    assert isinstance(raised.value, KeyboardInterrupt)  # not turned into a write error
    with pytest.raises(WriteError, match=re.escape(said)), staged(target, ".onnx") as tmp:
        raise OSError(28, "No space left on device")
    with staged(target, ".onnx") as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".onnx"  # the writer's format
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new" and sorted(tmp_path.iterdir()) == [target]
    folder = tmp_path / "a folder"  # where the install's rename fails
    folder.mkdir()
    with pytest.raises(WriteError, match=re.escape(repr(str(folder)))), staged(folder) as tmp:
        tmp.write_bytes(b"new")
    assert sorted(tmp_path.iterdir()) == [folder, target]  # the temporary removed
    with pytest.raises(WriteError, match="could not write"):  # staging where nothing can be
        with staged(tmp_path / "missing" / "x.png"):
            pass


def test_a_staged_file_is_synced_to_disk_before_it_replaces_the_old_one(tmp_path, monkeypatch):
    """A power loss right after the rename must leave the whole new file, as write_atomic's
    checkpoints do: its data is synced first (the writers close it unsynced)."""
    from sparseformer.engine import atomic

    events, fsync, replace = [], os.fsync, os.replace
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: events.append("sync") or fsync(fd))
    monkeypatch.setattr(atomic.os, "replace", lambda a, b: events.append("rename") or replace(a, b))
    target = tmp_path / "model.onnx"
    with atomic.staged(target, ".onnx") as tmp:
        tmp.write_bytes(b"graph")
    assert events == ["sync", "rename"] and target.read_bytes() == b"graph"
