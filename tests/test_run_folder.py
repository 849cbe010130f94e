"""A run folder belongs to one run at a time: a live run's lock stops a second one, a killed run's lock stops
nobody, a run's checkpoints are continued with --resume and never written over, and a worker that torchrun restarts
continues its folder by itself."""
import os
import subprocess
import sys

import pytest

from clipfromscratch.errors import UsageError
from clipfromscratch.run_folder import LOCK_FILE, TORCHRUN_RESTARTS_ENV, claim, plan

HOLD_LOCK = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, b"pid 4242 on node7 since 2026-12-03 10:00:00")
print("locked", flush=True)
time.sleep(60)
"""


@pytest.fixture
def held_lock(tmp_path):
    """The run folder `tmp_path/run` locked by another live process, as a running training holds it."""
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run / LOCK_FILE)], stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout.readline().strip() == "locked"
    yield run
    holder.kill()
    holder.wait()


def test_a_folder_another_run_holds_is_refused_naming_the_holder(held_lock):
    with pytest.raises(UsageError, match="is in use by another run .pid 4242 on node7 since 2026-12-03 10:00:00."):
        with claim(str(held_lock), resuming=True, rank=0):
            pass


def test_other_ranks_of_the_same_run_do_not_take_the_lock(held_lock):
    with claim(str(held_lock), resuming=True, rank=1):
        pass


def test_the_lock_of_a_killed_run_blocks_nobody_and_is_released_after_the_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_FILE).write_text("pid 1 on a node that died\n")  # left behind: the kernel released its lock
    with claim(str(run), resuming=True, rank=0):
        assert (run / LOCK_FILE).read_text().startswith(f"pid {os.getpid()} on ")
        with pytest.raises(UsageError, match="in use by another run"):  # the same process, a second run
            with claim(str(run), resuming=True, rank=0):
                pass
    with claim(str(run), resuming=True, rank=0):  # released when the first run ended
        pass


def test_a_new_run_never_writes_over_a_runs_checkpoints(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("{}")  # a run that died before its first checkpoint: start over there
    with claim(str(run), resuming=False, rank=0):
        pass
    (run / "last.ckpt").write_bytes(b"weights")
    for rank in (0, 1):  # every rank stops alike
        with pytest.raises(UsageError, match=f"holds a run already .last.ckpt.: continue it with --resume {run}"):
            with claim(str(run), resuming=False, rank=rank):
                pass
    with claim(str(run), resuming=True, rank=0):
        pass


def test_an_output_folder_that_cannot_be_written_stops_the_run_first(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(UsageError, match="--output-dir .*file is a file: give a folder"):
        with claim(str(tmp_path / "file"), resuming=False, rank=0):
            pass
    with pytest.raises(UsageError, match="is inside .*file, which is a file"):
        with claim(str(tmp_path / "file" / "run"), resuming=False, rank=0):
            pass


def test_a_worker_torchrun_restarts_continues_its_folder(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    run.mkdir()
    assert plan(str(run), None, None, "vit-bert") == (str(run), None, False)
    (run / "last.ckpt").write_bytes(b"")
    assert plan(str(run), None, None, "vit-bert") == (str(run), None, False)  # a first start: claim() refuses it
    monkeypatch.setenv(TORCHRUN_RESTARTS_ENV, "1")
    assert plan(str(run), None, None, "vit-bert") == (str(run), str(run / "last.ckpt"), False)
    assert f"torchrun restart 1: continuing from {run / 'last.ckpt'}" in capsys.readouterr().out

