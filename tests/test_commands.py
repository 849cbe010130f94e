"""`--help` of every command the README shows, run as users run them: the screen appears, lists what each command
takes, and says what each training option accepts."""
import glob
import os
import runpy
import subprocess
import sys

import pytest

from clipfromscratch.cli import main
from clipfromscratch.config import OPTIONS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(glob.glob(os.path.join(REPO, "data_prep", "*.py")) +
                 glob.glob(os.path.join(REPO, "benchmarks", "*.py")))


def _help_of(capsys, run) -> str:
    with pytest.raises(SystemExit) as done:
        run()
    out, err = capsys.readouterr()
    assert done.value.code == 0, err
    assert out.startswith("usage:"), out
    return out


def test_train_help_lists_every_option_with_what_it_accepts(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train.py", "--help"])
    out = _help_of(capsys, lambda: runpy.run_path(os.path.join(REPO, "train.py"), run_name="__main__"))
    for name in OPTIONS:
        assert f"--{name.replace('_', '-')}" in out, name
    flat = " ".join(out.split())
    assert "--precision {auto,32-true,bf16-mixed,16-mixed}" in flat
    assert "(none: no clipping) (above 0; default: 1.0)" in flat
    assert "(at least 1; default: 256)" in flat  # embed_dim
    assert _help_of(capsys, lambda: main(["train", "--help"])) == out  # the same command


@pytest.mark.parametrize("command, expected", [
    ([], ["train", "train-dcsm", "eval", "compare", "search", "export"]),
    (["export"], ["--model", "--format", "{hf,open_clip}", "--output"]),
    (["train-dcsm"], ["--model", "--output", "--data", "--max-steps"]),
    (["eval"], ["--model", "--task", "--data"]),
    (["compare"], ["--models", "--tasks", "--output-dir"]),
    (["search"], ["--model", "--images", "--query"]),
])
def test_clipfromscratch_help(capsys, command, expected):
    out = _help_of(capsys, lambda: main([*command, "--help"]))
    assert all(word in out for word in expected), out


def test_an_unknown_command_is_one_line_with_the_closest_name(capsys):
    assert main(["evaluate", "--model", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown command 'evaluate': did you mean 'eval'?") and err.count("\n") == 1, err
    assert main(["frobnicate"]) == 2
    assert "did you mean" not in capsys.readouterr().err


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: os.path.relpath(p, REPO))
def test_script_help(capsys, monkeypatch, script):
    monkeypatch.syspath_prepend(os.path.dirname(script))  # benchmarks import each other, as `python X.py` lets them
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    _help_of(capsys, lambda: runpy.run_path(script, run_name="__main__"))


def test_console_script_help():
    """The installed entry point itself (pyproject's [project.scripts])."""
    script = os.path.join(os.path.dirname(sys.executable), "clipfromscratch")
    done = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: clipfromscratch") and "train" in done.stdout
