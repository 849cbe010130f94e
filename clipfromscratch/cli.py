"""The command line: `clipfromscratch COMMAND ...`, every command declared in COMMANDS.

`python train.py ...` is `clipfromscratch train ...`, and flags with no command train too. A command's options
are made and checked by clipfromscratch.config from its options section (training's four sections, EvalOptions,
DcsmOptions), so every help screen shows what a value accepts and its default; a command module is imported
only when its command runs. An unknown command gets one line with the closest name.
"""
from __future__ import annotations

import difflib
import sys
from collections.abc import Callable
from dataclasses import dataclass

from clipfromscratch.errors import CommandLineParser, UsageError, report


@dataclass(frozen=True)
class Command:
    help: str
    run: Callable[[list[str]], int]  # the arguments after the command's name -> exit code


def _train(argv: list[str]) -> int:
    from clipfromscratch.training import main

    return main(argv)


def _train_dcsm(argv: list[str]) -> int:
    from clipfromscratch.train_dcsm import main

    return main(argv)


def _evaluation(name: str) -> Callable[[list[str]], int]:
    def run(argv: list[str]) -> int:
        from clipfromscratch.eval.cli import main  # its plotting is not needed to train

        return main([name, *argv])
    return run


COMMANDS: dict[str, Command] = {
    "train": Command("train a CLIP model (the default command; same as python train.py)", _train),
    "train-dcsm": Command("train a DCSM head over a trained model's frozen towers", _train_dcsm),
    "eval": Command("run one task on one model", _evaluation("eval")),
    "compare": Command("the same tasks on several models: report.md and plots", _evaluation("compare")),
    "search": Command("text-to-image search in a folder of images", _evaluation("search")),
    "export": Command("write a model in open_clip's or Hugging Face's format", _evaluation("export")),
}


def parser() -> CommandLineParser:
    """The top-level help: the commands and what each does."""
    root = CommandLineParser(prog="clipfromscratch", description="Train CLIP models from scratch, evaluate and "
                             "compare them. `clipfromscratch COMMAND --help` for a command's options.")
    commands = root.add_subparsers(dest="command", metavar="COMMAND")
    for name, command in COMMANDS.items():
        commands.add_parser(name, help=command.help)
    return root


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["-h"], ["--help"]):
        parser().parse_args(argv[:1])  # prints the help and exits, as every command's --help does
    if not argv or argv[0].startswith("-"):  # flags alone: training, as `python train.py` takes them
        return _train(argv)
    name = argv[0]
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        return report(UsageError(f"unknown command '{name}': {hint}(commands: {', '.join(COMMANDS)}; see "
                                 f"clipfromscratch --help)"))
    return COMMANDS[name].run(argv[1:])
