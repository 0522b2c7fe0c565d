"""A run folder belongs to one run; a failed write is one line and loses nothing; a stop by
signal is clean and resumable."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

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

FAST = ("--batch-size", "4", "--img-size", "32", "--quiet", "--recipe", "fashion-mnist-cpu")


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
    assert after == before and (out / LOCK_FILE).read_text() == ""
    assert run_cli(capsys, *_train(folder, out, "--epochs", "2", "--resume", "auto"))[0] == 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


def test_a_lock_left_by_a_killed_run_is_taken_over_and_logged(tmp_path, caplog):
    out = tmp_path / "run"
    killed = textwrap.dedent(f"""
        import os, signal
        from sparseformer.engine.run_folder import RunFolderLock
        RunFolderLock({str(out)!r}).acquire()
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    done = subprocess.run([sys.executable, "-c", killed], timeout=120)
    assert done.returncode == -9
    left = (out / LOCK_FILE).read_text()
    assert left.startswith("PID ") and str(done.args) and f"PID {os.getpid()} " not in left
    with caplog.at_level("WARNING"), RunFolderLock(out):  # not blocked
        assert f"PID {os.getpid()} on host" in (out / LOCK_FILE).read_text()
    assert "taking over from a run that is gone (PID " in caplog.text


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
