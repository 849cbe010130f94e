"""Checkpoints from elsewhere: every path that loads a `.ckpt` (`--resume`, `eval`, `compare`) reads tensors and plain
data only, and refuses a file carrying a pickled payload in one line, before the payload can run."""
import os

import pytest
import torch
from test_eval_models import export_tiny_ours

from clipfromscratch import load_model
from clipfromscratch.cli import main
from clipfromscratch.config import OptimConfig
from clipfromscratch.eval.models import load_eval_model
from clipfromscratch.lit_module import CLIPModule


class Payload:
    """Unpickling this calls os.mkdir(marker): proof that the file's code ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.fixture
def checkpoints(tmp_path):
    """A checkpoint of ours, and the same checkpoint with a payload beside its tensors."""
    module = CLIPModule(load_model(export_tiny_ours(tmp_path / "export")), OptimConfig())
    checkpoint = {"state_dict": module.state_dict(), "global_step": 1, "epoch": 0}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "clean.ckpt")
    marker = tmp_path / "payload-ran"
    (tmp_path / "run").mkdir()
    torch.save({**checkpoint, "extra": Payload(str(marker))}, tmp_path / "run" / "last.ckpt")
    return tmp_path / "clean.ckpt", tmp_path / "run" / "last.ckpt", marker


@pytest.mark.parametrize("command", [
    ["--resume", "{run}", "--max-steps", "2"],
    ["--resume", "{ckpt}", "--max-steps", "2"],
    ["eval", "--model", "{ckpt}", "--task", "zeroshot", "--data", "synthetic", "--label", "colour"],
    ["compare", "--models", "{ckpt}", "--tasks", "zeroshot", "--data", "synthetic", "--label", "colour",
     "--output-dir", "{out}"],
], ids=["resume-run", "resume-file", "eval", "compare"])
def test_a_checkpoint_with_a_payload_is_refused_before_it_runs(checkpoints, tmp_path, capsys, command):
    clean, poisoned, marker = checkpoints
    args = [a.format(run=poisoned.parent, ckpt=poisoned, out=tmp_path / "out") for a in command]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: refused checkpoint {poisoned}: it holds more than tensors and plain data, and "
                          "loading it could run code") and "mkdir" in err and len(err.splitlines()) == 1, err
    assert not marker.exists()
    assert load_eval_model(str(clean)).encode_text(["a red square"]).shape == (1, 32)  # the rest of it was fine


def test_a_file_that_is_no_checkpoint_is_one_line(tmp_path, capsys):
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint at all")
    assert main(["eval", "--model", str(tmp_path / "junk.ckpt"), "--task", "zeroshot", "--data", "synthetic",
                 "--label", "colour"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: cannot read checkpoint {tmp_path / 'junk.ckpt'}") and len(err.splitlines()) == 1
