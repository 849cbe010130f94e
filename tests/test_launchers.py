"""The cluster templates in configs/cluster/ launch `train.py` with options it accepts: `torchrun` and `srun` are
replaced by stand-ins that record their command line, which must then load as a config."""
import os
import subprocess

import pytest

from clipfromscratch.config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(REPO, "configs", "coco_xception_bert.yaml")


@pytest.fixture
def stand_in(tmp_path):
    """A folder for PATH holding `torchrun` and `srun` that write their arguments, one per line, to a file."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("torchrun", "srun"):
        (bin_dir / name).write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > "{tmp_path}/{name}.args"\n')
        (bin_dir / name).chmod(0o755)
    return bin_dir


def _launched(tmp_path, name: str) -> list[str]:
    """The `train.py` flags the stand-in `name` was asked to run."""
    args = (tmp_path / f"{name}.args").read_text().splitlines()
    return args[args.index("train.py") + 1:]


def test_torchrun_template_launches_valid_options(tmp_path, stand_in):
    env = {**os.environ, "PATH": f"{stand_in}:{os.environ['PATH']}", "NODE_RANK": "1", "MASTER_ADDR": "node0"}
    subprocess.run(["bash", "configs/cluster/torchrun.sh", RECIPE, "--batch-size", "128"], cwd=REPO, env=env,
                   check=True, timeout=60)
    config = load_config(_launched(tmp_path, "torchrun"))
    # the recipe's strategy stands (none named: DDP over the 16 ranks)
    assert (config.run.devices, config.run.num_nodes, config.run.strategy) == ("8", 2, "auto")
    assert config.run.precision == "bf16-mixed" and config.data.batch_size == 128
    assert config.run.output_dir == "checkpoints/coco_xception_bert"  # the same folder on every node
    subprocess.run(["bash", "configs/cluster/torchrun.sh", os.path.join(REPO, "configs", "large_fsdp.yaml")],
                   cwd=REPO, env=env, check=True, timeout=60)
    assert load_config(_launched(tmp_path, "torchrun")).run.strategy == "fsdp"


@pytest.mark.parametrize("requeued", [False, True])
def test_slurm_template_launches_valid_options_and_resumes_when_requeued(tmp_path, stand_in, requeued):
    env = {**os.environ, "PATH": f"{stand_in}:{os.environ['PATH']}", "SLURM_JOB_NAME": "clipfromscratch",
           "SLURM_JOB_ID": "4242", "SLURM_NTASKS_PER_NODE": "8", "SLURM_JOB_NUM_NODES": "2"}
    run = tmp_path / "checkpoints" / "clipfromscratch-4242"
    if requeued:  # a pre-empted job finds its own checkpoint when SLURM starts it again
        run.mkdir(parents=True)
        (run / "hpc_ckpt_1.ckpt").write_bytes(b"")
    # the template writes to checkpoints/ under the folder it is started in
    subprocess.run(["bash", os.path.join(REPO, "configs", "cluster", "slurm.sbatch"), RECIPE], cwd=tmp_path, env=env,
                   check=True, timeout=60)
    flags = _launched(tmp_path, "srun")
    assert ("--resume" in flags) == requeued
    if requeued:
        at = flags.index("--resume")
        assert flags[at + 1] == str(run.relative_to(tmp_path))
        del flags[at:at + 2]  # load_config would read the resumed run's config.yaml, which no run wrote here
    config = load_config(flags)
    assert (config.run.devices, config.run.num_nodes, config.run.precision) == ("8", 2, "bf16-mixed")
    assert config.run.output_dir == "checkpoints/clipfromscratch-4242"
