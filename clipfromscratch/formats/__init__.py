"""Our models in other libraries' formats (`clipfromscratch export`), and published models as our CLIP (`--init`).

A format is one entry of FORMATS: what it cannot hold is refused before anything is written, and what it writes
is loaded back by that library and compared with our model before the folder is put in place.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from clipfromscratch.errors import UsageError
from clipfromscratch.formats import hf, open_clip
from clipfromscratch.model import CLIP
from clipfromscratch.outputs import check_output_dir, write_dir_atomic


@dataclass(frozen=True)
class Format:
    check: Callable[[CLIP], None]  # a UsageError naming what the format cannot hold
    write: Callable[[CLIP, str], None]  # the files, into an existing empty folder
    verify: Callable[[CLIP, str], float]  # load the folder with the other library: the largest difference
    moved: Callable[[str, str], None] = lambda directory, final: None  # paths the files hold, set for the final place


FORMATS: dict[str, Format] = {
    "open_clip": Format(open_clip.check_open_clip, open_clip.write_open_clip, open_clip.verify_open_clip,
                        open_clip.point_at),
    "hf": Format(hf.check_hf, hf.write_hf, hf.verify_hf),
}


def check_export_output(output: str) -> None:
    """`--output` must be a new or empty folder that can be written (an export never replaces other files)."""
    if os.path.isdir(output) and os.listdir(output):
        raise UsageError(f"--output {output} exists and is not empty: give a new folder")
    if os.path.lexists(output) and not os.path.isdir(output):
        raise UsageError(f"--output {output} is a file: give a folder")
    check_output_dir(os.path.dirname(os.path.abspath(output)), "--output")  # the export is written beside it


def export_as(model: CLIP, format_name: str, output: str) -> float:
    """Write `model` in `format_name` to the folder `output`, whole or not at all; returns the largest difference
    between the other library's embeddings of the folder and ours."""
    chosen = FORMATS[format_name]
    chosen.check(model)
    largest = 0.0

    def write(partial: str) -> None:
        nonlocal largest
        chosen.write(model, partial)
        largest = chosen.verify(model, partial)
        chosen.moved(partial, output)

    write_dir_atomic(output, write)
    return largest
