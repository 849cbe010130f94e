"""The run folder: where a run writes, which checkpoint it continues from, and that one run at a time owns it.

A folder that holds a run's checkpoints is continued with `--resume`, never written over by a new run; while a
run is under way its global rank 0 holds a lock on `run.lock` that names the holder. The lock is the kernel's
(`flock`), so it dies with the process: a run killed by `kill -9`, the OOM killer or a lost node leaves a file
that blocks nobody, and `--resume` takes the folder over. A worker that torchrun restarts (`--max-restarts`)
continues its run folder by itself, as a requeued SLURM job does through the template's `--resume`.
"""
from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import shutil
import socket
import time
from collections.abc import Iterator

from clipfromscratch.errors import UsageError
from clipfromscratch.outputs import check_output_dir, replace_dir

LAST_CKPT = "last.ckpt"
SHARDED_CHECKPOINT_META = "meta.pt"  # what Lightning writes beside the shards of a distributed checkpoint
# a sharded checkpoint moved aside while the one replacing it moves in (replace_sharded_checkpoint)
REPLACED_SUFFIX = ".replaced"
LOCK_FILE = "run.lock"
STAMP_ENV = "CLIPFROMSCRATCH_RUN_STAMP"
TORCHRUN_RESTARTS_ENV = "TORCHELASTIC_RESTART_COUNT"  # set by torchrun in every worker it (re)starts


def checkpoint_file(path: str) -> str:
    """The file that holds a checkpoint's step, config and tokenizer: the checkpoint itself, or for the folder of a
    sharded (FSDP) one, its SHARDED_CHECKPOINT_META (written last, beside a shard per rank)."""
    return os.path.join(path, SHARDED_CHECKPOINT_META) if os.path.isdir(path) else path


def is_checkpoint(path: str) -> bool:
    """A checkpoint file, or the folder of a sharded (FSDP) one."""
    return os.path.isfile(checkpoint_file(path))


def replace_sharded_checkpoint(new: str, path: str) -> None:
    """Move the whole sharded checkpoint `new` to `path`; between the two moves of `replace_dir` the old one is
    at `path` + REPLACED_SUFFIX, where checkpoints_in finds it. What an earlier stop left there goes first: `new`
    is whole."""
    aside = path + REPLACED_SUFFIX
    shutil.rmtree(aside, ignore_errors=True)
    replace_dir(new, path, aside)


def checkpoints_in(folder: str) -> list[str]:
    """The checkpoints a run left in `folder` that it can continue from: last.ckpt (or, where a sharded one's
    replacement stopped half-way, the one moved aside) and SLURM's hpc_ckpt_N.ckpt (a new name each time)."""
    last = os.path.join(folder, LAST_CKPT)
    if not is_checkpoint(last):
        last += REPLACED_SUFFIX
    found = [last] + glob.glob(os.path.join(glob.escape(folder), "hpc_ckpt_*.ckpt"))
    return [path for path in found if is_checkpoint(path)]


def resume_checkpoint(resume: str) -> str:
    """A checkpoint, or a run folder's newest: last.ckpt or the one SLURM pre-emption wrote (hpc_ckpt_N)."""
    if is_checkpoint(resume):
        return resume
    if not os.path.isdir(resume):
        raise UsageError(f"no checkpoint to resume from: {resume}")
    found = checkpoints_in(resume)
    if not found:
        raise UsageError(f"no checkpoint to resume from in {resume} (no {LAST_CKPT} or hpc_ckpt_*.ckpt)")
    return max(found, key=lambda path: os.path.getmtime(checkpoint_file(path)))


def plan(output_dir: str | None, run_name: str | None, resume: str | None, default_name: str
         ) -> tuple[str, str | None, bool]:
    """(run folder, checkpoint to continue from or None, whether the folder was named by this process's clock).

    The folder is `output_dir`, else the resumed checkpoint's, else checkpoints/<run_name or default_name>-<time>.
    A worker restarted by torchrun continues from its folder's newest checkpoint.
    """
    ckpt = resume_checkpoint(resume) if resume else None
    if output_dir:
        folder = output_dir
    elif ckpt:
        folder = os.path.dirname(ckpt)
    elif run_name:
        folder = os.path.join("checkpoints", os.path.basename(run_name))
    else:
        # Lightning's DDP launcher re-runs this script per rank: the ranks inherit rank 0's time stamp
        stamp = os.environ.setdefault(STAMP_ENV, time.strftime("%Y%m%d-%H%M%S"))
        return os.path.join("checkpoints", f"{default_name}-{stamp}"), None, True
    if ckpt is None and int(os.environ.get(TORCHRUN_RESTARTS_ENV, "0")) > 0 and checkpoints_in(folder):
        ckpt = resume_checkpoint(folder)
        print(f"torchrun restart {os.environ[TORCHRUN_RESTARTS_ENV]}: continuing from {ckpt}", flush=True)
    return folder, ckpt, False


def _holder() -> str:
    return f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"


@contextlib.contextmanager
def claim(folder: str, resuming: bool, rank: int) -> Iterator[None]:
    """Own `folder` for the run: it can be written, a new run does not write over a run's checkpoints, and (rank 0)
    no other run holds it. Every rank checks what it can see in the folder, so all of them stop alike."""
    check_output_dir(folder, "--output-dir")
    if not resuming and checkpoints_in(folder):
        raise UsageError(f"{folder} holds a run already ({os.path.basename(checkpoints_in(folder)[0])}): continue "
                         f"it with --resume {folder}, or give another --output-dir")
    if rank != 0:
        yield
        return
    fd = os.open(os.path.join(folder, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise UsageError(f"{folder} is in use by another run ({holder}): wait for it to end, or give another "
                             "--output-dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, (_holder() + "\n").encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the file releases the lock
