"""Runs that lose nothing: kill -9 then --resume, checkpoints that a crash mid-save cannot corrupt, NaN losses."""
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import fsspec.implementations.local
import pytest
import torch

from clipfromscratch.cli import main
from clipfromscratch.objectives import OBJECTIVES
from clipfromscratch.run_folder import checkpoint_file, checkpoints_in, resume_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--image-size", "32", "--batch-size", "16", "--embed-dim", "32", "--num-workers", "0",
        "--synthetic-train-samples", "512", "--synthetic-val-samples", "32", "--warmup-steps", "2"]


def _step(ckpt: str) -> int:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"]


def _final_step(run: str) -> int:
    with open(os.path.join(run, "metrics.json")) as f:
        return json.load(f)["step"]


@pytest.mark.slow
def test_kill_9_then_resume_completes_the_run(tmp_path):
    run = str(tmp_path / "run")
    args = ["--output-dir", run, "--max-steps", "80", "--val-every-n-steps", "80", "--checkpoint-every-n-steps", "5",
            *TINY]
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "train.py"), *args], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = os.path.join(run, "last.ckpt")
    try:
        deadline = time.monotonic() + 120
        while not os.path.isfile(last):
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it was killed"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert 5 <= _step(last) < 80
    assert os.path.isfile(os.path.join(run, "run.lock"))  # left by the killed run, whose lock died with it
    assert main(["--resume", run]) == 0
    assert _final_step(run) == 80 == _step(last)


@pytest.mark.slow
def test_sigterm_saves_the_step_it_stopped_at(tmp_path):
    run = str(tmp_path / "run")
    log = tmp_path / "stdout.txt"
    args = ["--output-dir", run, "--max-steps", "5000", "--val-every-n-steps", "5000", "--checkpoint-every-n-steps",
            "7", *TINY]
    with open(log, "w") as stdout:
        proc = subprocess.Popen([sys.executable, os.path.join(REPO, "train.py"), *args], cwd=tmp_path, stdout=stdout,
                                stderr=subprocess.DEVNULL)
        last = os.path.join(run, "last.ckpt")
        deadline = time.monotonic() + 120
        while not os.path.isfile(last):  # training is under way
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 143
    message = next(line for line in log.read_text().splitlines() if line.startswith("SIGTERM at step"))
    assert message.split()[3].rstrip(":") == str(_step(last))
    assert _step(last) >= 7


@pytest.mark.slow
@pytest.mark.parametrize("strategy,signalled", [("ddp", "rank 0"), ("fsdp", "every rank")])
def test_sigterm_stops_every_rank_after_the_same_step_and_saves_it(strategy, signalled, tmp_path):
    """`kill` on the launching rank, or SLURM's SIGTERM to every rank, arriving wherever a step is: Lightning's own
    handler ran a collective inside the signal handler and the job hung or died of a collective mismatch."""
    run = tmp_path / "run"
    log = tmp_path / "stdout.txt"
    args = ["--strategy", strategy, "--devices", "2", "--accelerator", "cpu", "--output-dir", str(run),
            "--max-steps", "5000", "--val-every-n-steps", "5000", "--checkpoint-every-n-steps", "7",
            "--log-every-n-steps", "5", *TINY, "--synthetic-train-samples", "100000"]
    with open(log, "w") as stdout:
        proc = subprocess.Popen([sys.executable, os.path.join(REPO, "train.py"), *args], cwd=tmp_path, stdout=stdout,
                                stderr=subprocess.DEVNULL, start_new_session=True)  # its ranks: one process group
        try:
            deadline = time.monotonic() + 180
            while not checkpoints_in(str(run)):  # training is under way
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.05)
            if signalled == "rank 0":
                proc.send_signal(signal.SIGTERM)
            else:
                os.killpg(proc.pid, signal.SIGTERM)
            assert proc.wait(timeout=120) == 143
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
    message = next(line for line in log.read_text().splitlines() if line.startswith("SIGTERM at step"))
    saved = torch.load(checkpoint_file(str(run / "last.ckpt")), map_location="cpu", weights_only=True)["global_step"]
    assert message.split()[3].rstrip(":") == str(saved) and saved >= 7


@pytest.mark.slow
def test_a_crash_while_saving_leaves_the_previous_checkpoint_usable(tmp_path, monkeypatch):
    run = str(tmp_path / "run")
    real_write = fsspec.implementations.local.LocalFileOpener.write
    saves = []

    def write_then_crash_on_the_second_save(self, data):
        saves.append(len(data))
        if len(saves) == 2:
            real_write(self, data[:len(data) // 2])
            raise OSError("disk full")
        return real_write(self, data)

    monkeypatch.setattr(fsspec.implementations.local.LocalFileOpener, "write", write_then_crash_on_the_second_save)
    with pytest.raises(OSError, match="disk full"):
        main(["--output-dir", run, "--max-steps", "20", "--val-every-n-steps", "20", "--checkpoint-every-n-steps", "5",
              *TINY])
    assert _step(os.path.join(run, "last.ckpt")) == 5
    assert sorted(os.listdir(run)) == ["config.yaml", "last.ckpt", "logs", "run.lock", "tokenizer"]  # no half file


@pytest.fixture
def nan_at_step_3(monkeypatch):
    real = OBJECTIVES["clip"]
    calls = []

    def loss_with_one_nan(*args):
        calls.append(1)
        loss = real.loss(*args)
        return loss * float("nan") if len(calls) == 4 else loss

    monkeypatch.setitem(OBJECTIVES, "clip", replace(real, loss=loss_with_one_nan))


@pytest.mark.slow
def test_a_nan_loss_stops_the_run_with_one_line_naming_the_step(tmp_path, capsys, nan_at_step_3):
    assert main(["--output-dir", str(tmp_path / "run"), "--max-steps", "8", "--val-every-n-steps", "8", *TINY]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: non-finite loss at step 3") and len(err.splitlines()) == 1, err


@pytest.mark.slow
def test_skip_nonfinite_skips_and_counts_the_step(tmp_path, capsys, nan_at_step_3):
    run = str(tmp_path / "run")
    assert main(["--output-dir", run, "--max-steps", "8", "--val-every-n-steps", "8", "--skip-nonfinite",
                 *TINY]) == 0
    assert _final_step(run) == 8  # the step's update was skipped on the device; the step clock went on
    assert "skipped 1 step with a non-finite loss" in capsys.readouterr().out


def test_resume_takes_the_newest_of_last_and_a_preemption_checkpoint(tmp_path):
    (tmp_path / "last.ckpt").write_bytes(b"")
    (tmp_path / "hpc_ckpt_3.ckpt").write_bytes(b"")
    os.utime(tmp_path / "last.ckpt", (1, 1))
    assert resume_checkpoint(str(tmp_path)) == str(tmp_path / "hpc_ckpt_3.ckpt")
    os.utime(tmp_path / "hpc_ckpt_3.ckpt", (0, 0))
    assert resume_checkpoint(str(tmp_path)) == str(tmp_path / "last.ckpt")
