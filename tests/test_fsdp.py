"""--strategy fsdp on 2 CPU ranks (gloo), through the command line: the same losses and weights as DDP, each rank
holding half of the parameters and optimizer state, sharded checkpoints that resume (on the same and on another
number of ranks), and a whole export."""
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from clipfromscratch.cli import main
from clipfromscratch.eval.models import load_clip
from clipfromscratch.lit_module import repeated_blocks, total_norm
from clipfromscratch.run_folder import SHARDED_CHECKPOINT_META, replace_sharded_checkpoint, resume_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = os.path.join(REPO, "tests", "train_with_probe.py")
TWO_RANKS = ["--accelerator", "cpu", "--devices", "2", "--image-size", "32", "--batch-size", "8", "--embed-dim",
             "32", "--num-workers", "0", "--synthetic-train-samples", "256", "--synthetic-val-samples", "16",
             "--warmup-steps", "1", "--lr", "1e-3", "--log-every-n-steps", "1"]

# what touches the sharded parameters beyond a plain step: feature-cached accumulation, recomputed activations, a
# locked text tower with its last layer training (frozen and trained parameters in one FSDP unit), and a learning
# rate per layer; a lock FSDP ignored would show, as Adam moves every trained weight by about the learning rate
OPTIONS = ["--accum-freq", "2", "--grad-checkpointing", "--lock-text", "--lock-text-unlocked-layers", "1",
           "--layer-decay", "0.8"]


def _train(run: Path, probe: Path, *flags: str) -> None:
    done = subprocess.run([sys.executable, PROBE, *TWO_RANKS, "--output-dir", str(run), *flags], cwd=REPO,
                          env={**os.environ, "RANK_PROBE": str(probe)}, capture_output=True, text=True, timeout=600,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]


def _largest_difference(a: Path, b: Path) -> float:
    first, second = load_file(str(a / "final" / "model.safetensors")), load_file(str(b / "final" / "model.safetensors"))
    assert first.keys() == second.keys()
    return max((first[k] - second[k]).abs().max().item() for k in first)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """The same run under DDP and under FSDP, each stopped at step 2 and resumed to step 4, and a DDP control
    with another learning rate; all with OPTIONS."""
    root = tmp_path_factory.mktemp("fsdp")
    runs = {name: root / name for name in ("ddp", "fsdp", "control")}
    for strategy in ("ddp", "fsdp"):
        _train(runs[strategy], root / f"{strategy}-first", "--strategy", strategy, "--max-steps", "2",
               "--val-every-n-steps", "4", *OPTIONS)
        _train(runs[strategy], root / strategy, "--strategy", strategy, "--max-steps", "4", "--val-every-n-steps",
               "4", "--resume", str(runs[strategy]), *OPTIONS)
    _train(runs["control"], root / "control", "--strategy", "ddp", "--max-steps", "4", "--val-every-n-steps", "4",
           "--lr", "2e-3", *OPTIONS)
    runs["root"] = root
    return runs


@pytest.mark.slow
def test_fsdp_trains_as_ddp_does(runs):
    ddp, fsdp = (json.loads((runs[name] / "metrics.json").read_text()) for name in ("ddp", "fsdp"))
    assert fsdp["step"] == ddp["step"] == 4
    assert fsdp == pytest.approx(ddp, abs=1e-3)
    assert _largest_difference(runs["fsdp"], runs["ddp"]) < 1e-4  # fp32 sums in another order, nothing more
    assert _largest_difference(runs["control"], runs["ddp"]) > 1e-3  # what a real difference looks like
    losses = {name: [float(row["train/loss"]) for row in _logged(runs[name]) if row.get("train/loss")]
              for name in ("ddp", "fsdp")}
    assert len(losses["fsdp"]) == 4 and losses["fsdp"] == pytest.approx(losses["ddp"], abs=1e-5)


def _logged(run: Path) -> list[dict]:
    rows = []
    for path in sorted(run.glob("logs/**/metrics.csv")):
        with open(path, newline="", encoding="utf-8") as f:
            rows += list(csv.DictReader(f))
    return rows


@pytest.mark.slow
def test_each_rank_holds_half_of_the_weights_and_optimizer_state(runs):
    ddp = [json.loads((runs["root"] / f"ddp.rank{rank}.json").read_text()) for rank in range(2)]
    fsdp = [json.loads((runs["root"] / f"fsdp.rank{rank}.json").read_text()) for rank in range(2)]
    for key in ("parameter_bytes", "optimizer_bytes"):
        assert ddp[0][key] == ddp[1][key]  # DDP: a whole copy on every rank
        # FSDP: the shards of both ranks make the whole, up to the padding of odd sizes (and the scale, kept whole)
        assert sum(rank[key] for rank in fsdp) == pytest.approx(ddp[0][key], rel=0.01)
        assert all(rank[key] == pytest.approx(ddp[0][key] / 2, rel=0.02) for rank in fsdp)


@pytest.mark.slow
def test_a_sharded_checkpoint_resumes_on_one_rank_with_the_same_weights(runs, tmp_path):
    """Resuming on another number of ranks re-shards the checkpoint: at its own step, the whole weights exported
    from one rank are those the two ranks exported."""
    assert (runs["fsdp"] / "last.ckpt" / "meta.pt").is_file()  # a folder: one shard per rank and the rest
    moved = tmp_path / "one-rank"
    moved.mkdir()
    os.symlink(runs["fsdp"] / "last.ckpt", moved / "last.ckpt")
    assert main(["--resume", str(moved / "last.ckpt"), "--strategy", "fsdp", "--devices", "1", "--max-steps", "4",
                 "--output-dir", str(moved), "--synthetic-val-samples", "16", *OPTIONS]) == 0
    assert _largest_difference(moved, runs["fsdp"]) == 0


def test_ema_with_fsdp_is_refused_in_one_line(capsys):
    assert main(["--strategy", "fsdp", "--ema-decay", "0.99", "--max-steps", "1"]) == 2
    assert capsys.readouterr().err.startswith("error: --ema-decay with --strategy fsdp")


def test_the_memory_table_counts_the_towers_parameters():
    """benchmarks/fsdp_memory.py's count of the base pair: ViT-B/16 (85.8M) and BERT-base without its pooler
    (108.9M), plus the two 512-d heads and the scale."""
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    from fsdp_memory import parameters

    assert parameters("vit", 224, 512) == 85_798_656 + 108_891_648 + 512 * (768 + 768) + 1


def test_the_gradient_norm_of_shards_and_whole_parameters():
    grads = [torch.tensor([3.0]), torch.tensor([[4.0, 0.0]])]
    assert total_norm(grads).item() == pytest.approx(5.0)


def test_fsdp_shards_a_tower_block_by_block():
    """What is gathered whole at once is one block: timm's ViT blocks, BERT's and GPT-2's layers, a stage's blocks
    and then the stage (the stem, norms and heads are left to the tower's own unit)."""
    import timm
    from transformers import BertConfig, BertModel

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    assert repeated_blocks(vit) == list(vit.blocks)
    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64))
    assert repeated_blocks(bert) == list(bert.encoder.layer)
    convnext = timm.create_model("convnext_atto", pretrained=False)
    inner = [block for stage in convnext.stages for block in stage.blocks]
    assert repeated_blocks(convnext) == inner + list(convnext.stages)  # inner units first, as FSDP wraps


def test_a_run_leaves_its_process_as_it_found_it(tmp_path):
    """An in-process FSDP run (a notebook, gpu_check) takes down its process group and takes back what Lightning
    wrote into the environment (LOCAL_RANK, MASTER_PORT, ...), which would make a run started next, even in a
    child process, take itself for an already launched rank and wait for peers that never come."""
    environment = dict(os.environ)
    assert main(["--strategy", "fsdp", "--devices", "1", "--accelerator", "cpu", "--max-steps", "1", "--image-size",
                 "32", "--batch-size", "8", "--num-workers", "0", "--synthetic-train-samples", "16",
                 "--synthetic-val-samples", "8", "--output-dir", str(tmp_path / "run")]) == 0
    assert not torch.distributed.is_initialized()
    assert dict(os.environ) == environment


def test_a_sharded_checkpoint_is_replaced_whole(tmp_path):
    """The new folder moves in only once whole; stopped between moving the old one aside and the new one in, the
    run folder still offers the old one to --resume."""
    def sharded(path: Path, step: int) -> Path:
        path.mkdir()
        (path / SHARDED_CHECKPOINT_META).write_text(str(step))
        return path

    last = sharded(tmp_path / "last.ckpt", 1)
    replace_sharded_checkpoint(str(sharded(tmp_path / "last.ckpt.partial", 2)), str(last))
    assert sorted(os.listdir(tmp_path)) == ["last.ckpt"] and (last / SHARDED_CHECKPOINT_META).read_text() == "2"
    last.rename(tmp_path / "last.ckpt.replaced")  # as a save stopped half-way leaves it
    assert resume_checkpoint(str(tmp_path)) == str(tmp_path / "last.ckpt.replaced")


@pytest.mark.slow
def test_eval_and_export_read_a_sharded_checkpoint_whole(runs, tmp_path, capsys):
    """A sharded last.ckpt is a model spec like any checkpoint (its shards re-assembled in one process); a missing
    shard is named in one line."""
    sharded = load_clip(str(runs["fsdp"] / "last.ckpt"), torch.device("cpu")).state_dict()
    final = load_file(str(runs["fsdp"] / "final" / "model.safetensors"))
    assert sharded.keys() == final.keys() and all(torch.equal(sharded[k], final[k]) for k in final)
    damaged = tmp_path / "last.ckpt"
    shutil.copytree(runs["fsdp"] / "last.ckpt", damaged)
    (damaged / "__1_0.distcp").unlink()
    assert main(["export", "--model", str(damaged), "--format", "hf", "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot read the shards of checkpoint {damaged}") and "__1_0.distcp" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
