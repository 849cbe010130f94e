"""Where results go: checked before the work starts, and written whole or not at all.

Every command checks its output locations first (a folder that can be made and written, a file whose folder
can), so a typo in a path costs a one-line error, not the results of a long run; results are then written
beside their final name and renamed into place, so a crash or a full disk leaves the previous version, never
half a file.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable

from clipfromscratch.errors import UsageError


def _nearest_existing(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def _probe_write(folder: str, flag: str, path: str) -> None:
    """Make `folder` (and its parents) and write a file in it: permission bits do not stop root, a read-only
    mount or a full disk does, so only trying tells."""
    try:
        os.makedirs(folder, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-test-")
        os.close(fd)
        os.remove(probe)
    except OSError as err:
        raise UsageError(f"{flag} {path}: cannot write there ({err.strerror or err})") from None


def check_output_dir(path: str, flag: str) -> None:
    """`path` is a folder that exists or can be made, and can be written; else one line naming `flag`."""
    existing = _nearest_existing(path)
    if not os.path.isdir(existing):
        where = "is a file" if existing == os.path.abspath(path) else f"is inside {existing}, which is a file"
        raise UsageError(f"{flag} {path} {where}: give a folder")
    _probe_write(path, flag, path)


def check_output_file(path: str, flag: str, overwrite: bool = True) -> None:
    """`path` can be written as a file: it is no folder, its folder exists or can be made and written, and with
    `overwrite` False it does not exist yet."""
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path} is a folder: give a file name")
    if not overwrite and os.path.exists(path):
        raise UsageError(f"{flag} {path} exists already: give a new name, or remove it first")
    check_output_dir(os.path.dirname(os.path.abspath(path)), flag)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_file_atomic(path: str, write: Callable[[str], None]) -> None:
    """`write(temporary path)` beside `path`, then renamed over it: readers see the old file or the whole new one."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, partial = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".partial")
    os.close(fd)
    os.chmod(partial, 0o666 & ~_umask())  # mkstemp's file is private; a result is as readable as open() makes it
    try:
        write(partial)
        os.replace(partial, path)
    except BaseException:
        if os.path.exists(partial):
            os.remove(partial)
        raise


def write_text_atomic(path: str, text: str) -> None:
    def write(partial: str) -> None:
        with open(partial, "w", encoding="utf-8") as f:
            f.write(text)

    write_file_atomic(path, write)


def write_dir_atomic(directory: str, write: Callable[[str], None]) -> None:
    """`write(temporary folder)` beside `directory`, then put in its place: an earlier `directory` is moved aside
    and removed only once the new one is there, so a failure leaves the old one."""
    parent = os.path.dirname(os.path.abspath(directory))
    os.makedirs(parent, exist_ok=True)
    partial = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(directory)}.", suffix=".partial")
    os.chmod(partial, 0o777 & ~_umask())  # mkdtemp's folder is private; an export is as readable as makedirs makes it
    try:
        write(partial)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    replace_dir(partial, directory, aside=partial.removesuffix(".partial") + ".old")  # a name as unique as partial's


def replace_dir(new: str, directory: str, aside: str) -> None:
    """Put the finished folder `new` at `directory`. A folder cannot be renamed over one that holds files, so an
    earlier `directory` is moved to `aside` first and removed only once the new one is in place: whenever this
    stops, a whole folder is at `directory` or, between the two moves, at `aside`."""
    replacing = os.path.lexists(directory)
    if replacing:
        os.rename(directory, aside)
    os.rename(new, directory)
    if replacing:
        shutil.rmtree(aside, ignore_errors=True)
