"""The one exception type that means "the user asked for something we cannot do", and how it is printed."""
from __future__ import annotations

import argparse
import sys
from typing import NoReturn


class UsageError(Exception):
    """Bad input from the user (unknown name, missing file, bad config): reported as one line, no traceback."""


def first_line(err: BaseException, limit: int | None = 200) -> str:
    """An exception's message cut to its first line (and to `limit` characters), for one-line errors; its type's
    name when it has no message."""
    line = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return line if limit is None or len(line) <= limit else line[:limit] + "..."


def usage_message(err: UsageError) -> str:
    """The message of a UsageError, also of one raised in a DataLoader worker: torch re-raises those in the main
    process with the worker's whole traceback as the message, whose last line is the original one."""
    text = str(err).strip()
    if text.startswith("Caught ") and "Original Traceback" in text:
        text = text.splitlines()[-1].split(f"{UsageError.__name__}: ", 1)[-1]
    return text


def report(err: UsageError) -> int:
    """Print `err` as `error: ...` on stderr; the exit code of a usage error."""
    print(f"error: {usage_message(err)}", file=sys.stderr, flush=True)
    return 2


def error_summary(err: BaseException) -> str:
    """`Type: message` in one line: the message's first line, and the next where the first only introduces it
    (transformers' "Validation error for field 'x':", torch's "Error(s) in loading state_dict for CLIP:")."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = " ".join(lines[:2]) if len(lines) > 1 and lines[0].endswith(":") else (lines[0] if lines else "")
    text = text if len(text) <= 300 else text[:300] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


class CommandLineParser(argparse.ArgumentParser):
    """An ArgumentParser (sub-commands made from it are too) whose errors are UsageErrors pointing to --help: a
    command line that does not parse is one line, not a screen of usage."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")
