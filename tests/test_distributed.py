"""The losses under DDP see every rank's negatives: 2 gloo processes give the single-process loss and gradients,
for CLIP's loss and SigLIP's."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from clipfromscratch import lit_module
from clipfromscratch.config import ModelConfig, OptimConfig
from clipfromscratch.data.synthetic import write_shards
from clipfromscratch.errors import UsageError
from clipfromscratch.lit_module import CLIPModule
from clipfromscratch.model import build_model
from clipfromscratch.objectives import OBJECTIVES
from clipfromscratch.text_tokenizers import make_tokenizer, tokenize

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAPTIONS = ["a small red circle on the left", "a blue square above a green triangle", "one large yellow star",
            "there is an orange cross in the middle", "a purple diamond", "two pink circles",
            "a cyan star below a red square", "a tiny white triangle"]


class Towers(nn.Module):
    """What DDP wraps: one forward through both towers, as Lightning's training step does."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixels, input_ids, attention_mask):
        return self.model.encode_image(pixels), self.model.encode_tokens(input_ids, attention_mask)


def _loss_and_grads(towers: nn.Module, batch: dict, rows: int | None = None) -> tuple[torch.Tensor, dict]:
    """`towers` is a Towers, or a DDP wrapping one; `rows`, the largest batch of any rank."""
    model = towers.module.model if isinstance(towers, DistributedDataParallel) else towers.model
    model.zero_grad()
    images, texts = towers(batch["pixels"], batch["input_ids"], batch["attention_mask"])
    loss = OBJECTIVES[model.config.loss].loss(images, texts, model.logit_scale(), model.logit_bias, rows)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _rank(rank: int, workdir: str, sizes: list[int]) -> None:
    dist.init_process_group("gloo", init_method=f"file://{workdir}/store", rank=rank, world_size=len(sizes))
    towers = DistributedDataParallel(torch.load(f"{workdir}/towers.pt", weights_only=False))
    batch = torch.load(f"{workdir}/batch.pt")
    start = sum(sizes[:rank])
    local = {k: v[start:start + sizes[rank]] for k, v in batch.items()}
    loss, grads = _loss_and_grads(towers, local, max(sizes))
    dist.all_reduce(loss)  # DDP averages gradients, so the global loss is the mean of the ranks' values
    torch.save({"loss": loss / len(sizes), "grads": grads}, f"{workdir}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module", params=["clip", "siglip"])
def towers_and_batch(request):
    torch.manual_seed(0)
    tokenizer = make_tokenizer("bert", False, "tiny", CAPTIONS * 10)
    model = build_model(ModelConfig(image_encoder="vit", text_encoder="bert", image_size=32, embed_dim=16,
                                    loss=request.param), tokenizer)
    # float64 and no dropout: the two runs differ only in summation order
    towers = Towers(model).double().eval()
    batch = {"pixels": torch.randn(8, 3, 32, 32, dtype=torch.float64), **tokenize(tokenizer, CAPTIONS, 16)}
    return towers, batch


@pytest.mark.parametrize("sizes", [[4, 4], pytest.param([3, 5], marks=pytest.mark.slow)], ids=["equal", "unequal"])
def test_two_ranks_equal_one_process_on_the_global_batch(tmp_path, towers_and_batch, sizes):
    towers, batch = towers_and_batch
    torch.save(towers, tmp_path / "towers.pt")
    torch.save(batch, tmp_path / "batch.pt")
    mp.start_processes(_rank, args=(str(tmp_path), sizes), nprocs=len(sizes), start_method="spawn")

    expected_loss, expected_grads = _loss_and_grads(towers, batch)
    for rank in range(len(sizes)):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(result["loss"], expected_loss, rtol=1e-10, atol=0)
        assert result["grads"].keys() == expected_grads.keys()
        for name, grad in expected_grads.items():
            torch.testing.assert_close(result["grads"][name], grad, rtol=1e-7, atol=1e-12, msg=name)


def test_local_negatives_alone_give_a_different_gradient(towers_and_batch):
    """The proof above could pass trivially if the batch were too easy to tell the two apart: it is not."""
    towers, batch = towers_and_batch
    _, full = _loss_and_grads(towers, batch)
    halves = [_loss_and_grads(towers, {k: v[i:i + 4] for k, v in batch.items()})[1] for i in (0, 4)]
    local_mean = {n: (halves[0][n] + halves[1][n]) / 2 for n in full}
    for name in ("log_logit_scale", "logit_bias") if "logit_bias" in full else ("log_logit_scale",):
        assert not torch.allclose(local_mean[name], full[name], rtol=1e-3)



# --- 2-rank training from the command line, under each launcher ---

LAUNCHERS = ("lightning", "torchrun", "slurm")
PROBE = os.path.join(REPO, "tests", "train_with_probe.py")


@pytest.fixture(scope="module")
def val_table(tmp_path_factory) -> str:
    """11 validation rows over 2 ranks: the sampler pads one duplicate and one image is unreadable, so the ranks hold
    different row counts; the metrics must count each of the 10 readable samples exactly once."""
    root = tmp_path_factory.mktemp("val")
    colours = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black", "pink", "cyan"]
    rows = []
    for i, colour in enumerate(colours):
        Image.new("RGB", (32, 32), colour).save(root / f"{i}.png")
        rows.append(f"{i}.png\ta {colour} square")
    (root / "broken.png").write_bytes(b"not an image")
    rows.insert(3, "broken.png\ta broken picture")
    (root / "val.tsv").write_text("filepath\tcaption\n" + "\n".join(rows) + "\n")
    return str(root / "val.tsv")


def _launch(launcher: str, run: str, val_table: str) -> None:
    """2 ranks of `train.py` (with the rank probe) on CPU, started the way `launcher` starts them."""
    flags = ["--accelerator", "cpu", "--devices", "2", "--strategy", "ddp", "--output-dir", run, "--max-steps", "6",
             "--val-every-n-steps", "6", "--image-size", "32", "--batch-size", "8", "--embed-dim", "32",
             "--num-workers", "0", "--synthetic-train-samples", "256", "--val-data", val_table]
    env = {**os.environ, "RANK_PROBE": os.path.join(run, "probe")}
    if launcher == "lightning":  # one process; Lightning starts the second when training begins
        commands = [([sys.executable, PROBE, *flags], env)]
    elif launcher == "torchrun":  # both ranks at once, before any process group exists
        commands = [([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", PROBE,
                      *flags], env)]
    else:  # as `srun` starts 2 tasks on one node: both at once, each told its rank by SLURM's variables
        slurm = {"SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "1", "SLURM_JOB_NUM_NODES": "1",
                 "SLURM_NODEID": "0", "SLURM_JOB_NAME": "clipfromscratch", "SLURM_NODELIST": "127.0.0.1",
                 # Lightning takes the rendezvous port from the job id's last 4 digits
                 "SLURM_JOB_ID": str(10000 + os.getpid() % 10000)}
        commands = [([sys.executable, PROBE, *flags], {**env, **slurm, "SLURM_PROCID": str(rank),
                                                       "SLURM_LOCALID": str(rank)}) for rank in range(2)]
    procs = [subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True) for command, env in commands]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{launcher}: {err[-3000:]}"


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory, val_table) -> dict[str, Path]:
    """The same 2-rank run, same seed, under each launcher."""
    runs = {}
    for launcher in LAUNCHERS:
        runs[launcher] = tmp_path_factory.mktemp(launcher) / "run"
        _launch(launcher, str(runs[launcher]), val_table)
    return runs


@pytest.mark.slow
def test_ddp_validation_counts_every_sample_once(ddp_runs):
    metrics = json.loads((ddp_runs["lightning"] / "metrics.json").read_text())
    assert metrics["step"] == 6
    assert metrics["image_retrieval_recall@10"] == metrics["text_retrieval_recall@10"] == 1.0
    for name, value in metrics.items():  # whole tenths: not elevenths or twelfths
        if "recall" in name:
            assert abs(value * 10 - round(value * 10)) < 1e-3, (name, value)


@pytest.mark.slow
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_every_rank_trains_with_one_tokenizer_and_ends_with_the_same_weights(ddp_runs, launcher):
    ranks = [json.loads((ddp_runs[launcher] / f"probe.rank{rank}.json").read_text()) for rank in range(2)]
    assert ranks[0]["tokenizer"] == ranks[1]["tokenizer"]  # recorded inside the run, as training starts
    assert ranks[0]["parameters"] == ranks[1]["parameters"]


@pytest.mark.slow
def test_the_same_seed_gives_the_same_run_under_every_launcher(ddp_runs):
    first, *others = (ddp_runs[launcher] for launcher in LAUNCHERS)
    for run in others:
        assert (run / "metrics.json").read_text() == (first / "metrics.json").read_text()
        tokenizer = Path("tokenizer", "tokenizer.json")
        assert (run / tokenizer).read_bytes() == (first / tokenizer).read_bytes()
        assert (run / "probe.rank0.json").read_text() == (first / "probe.rank0.json").read_text()


def test_training_stops_in_one_line_if_ranks_hold_different_tokenizers(towers_and_batch, monkeypatch):
    """The check every run makes as it starts: here rank 1 reports another tokenizer than this rank's."""
    module = CLIPModule(towers_and_batch[0].model, OptimConfig())
    module._trainer = SimpleNamespace(world_size=2)
    monkeypatch.setattr(lit_module, "gather_ranks", lambda fingerprint: torch.stack([fingerprint, fingerprint + 1]))
    with pytest.raises(UsageError, match="the ranks hold different tokenizers"):
        module.on_fit_start()
    monkeypatch.setattr(lit_module, "gather_ranks", lambda fingerprint: torch.stack([fingerprint, fingerprint]))
    module.on_fit_start()


# --- faults under DDP: uneven and unreadable shards, a killed rank, torchrun restarts, two nodes ---

SMALL_DDP = ["--accelerator", "cpu", "--devices", "2", "--strategy", "ddp", "--image-size", "32", "--batch-size",
             "8", "--embed-dim", "32", "--num-workers", "0", "--synthetic-train-samples", "4096",
             "--synthetic-val-samples", "16", "--warmup-steps", "2"]


def _metrics(run) -> dict:
    return json.loads((Path(run) / "metrics.json").read_text())


@pytest.mark.slow
def test_a_rank_whose_shards_hold_nothing_trains_in_step_with_the_other(tmp_path):
    """Finite shards dealt out by rank: rank 0 or 1 gets the one that is no tar at all. Both ranks still run the same
    number of steps (the empty one borrows), so neither waits for the other at a step or at the epoch's end."""
    shards = tmp_path / "shards"
    write_shards(str(shards), "train", 40, seed=0, image_size=32, shard_size=40)
    (shards / "000001.tar").write_text("not a tar file")
    run = tmp_path / "run"
    env = {**os.environ, "RANK_PROBE": str(tmp_path / "probe")}
    done = subprocess.run([sys.executable, PROBE, *SMALL_DDP, "--train-data", str(shards), "--max-steps", "-1",
                           "--max-epochs", "1", "--output-dir", str(run)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _metrics(run)["step"] == 3  # 40 samples over 2 ranks in batches of 8: 3 steps each
    ranks = [json.loads((tmp_path / f"probe.rank{rank}.json").read_text()) for rank in range(2)]
    assert ranks[0]["parameters"] == ranks[1]["parameters"]


def _kill_rank_1_after_a_checkpoint(probe: Path, run: Path, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 300
    while not (Path(f"{probe}.rank1.pid").is_file() and (run / "last.ckpt").is_file()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.1)
    os.kill(int(Path(f"{probe}.rank1.pid").read_text()), signal.SIGKILL)


@pytest.mark.slow
def test_a_killed_rank_ends_the_job_in_one_line_and_resume_finishes_it(tmp_path):
    run, probe = tmp_path / "run", tmp_path / "probe"
    args = [*SMALL_DDP, "--max-steps", "40", "--val-every-n-steps", "40", "--checkpoint-every-n-steps", "5",
            "--ddp-timeout-s", "60", "--output-dir", str(run)]
    proc = subprocess.Popen([sys.executable, PROBE, *args], cwd=REPO, env={**os.environ, "RANK_PROBE": str(probe)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _kill_rank_1_after_a_checkpoint(probe, run, proc)  # as the OOM killer or a lost node would
    killed = time.monotonic()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and time.monotonic() - killed < 90  # well within --ddp-timeout-s plus start-up
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: rank 0 lost the other ranks (") and f"--resume {run}" in last, err[-3000:]
    assert "Traceback" not in err
    # the killed run's lock blocks nobody: --resume continues from the last checkpoint to the same final step
    done = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), "--resume", str(run)], cwd=REPO,
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _metrics(run)["step"] == 40


@pytest.mark.slow
def test_torchrun_restarts_a_killed_rank_and_the_run_continues_to_its_last_step(tmp_path):
    run, probe = tmp_path / "run", tmp_path / "probe"
    # a fresh rendezvous store per restart: the shared one hands restarted ranks stale addresses (pytorch#135712)
    env = {**os.environ, "RANK_PROBE": str(probe), "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "--max-restarts", "1", PROBE, *SMALL_DDP, "--max-steps", "40", "--val-every-n-steps",
                             "40", "--checkpoint-every-n-steps", "5", "--output-dir", str(run)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _kill_rank_1_after_a_checkpoint(probe, run, proc)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert out.count(f"torchrun restart 1: continuing from {run / 'last.ckpt'}") == 2  # both new ranks
    assert _metrics(run)["step"] == 40


@pytest.mark.slow
def test_two_nodes_on_one_machine_train_as_one_node_of_two(tmp_path, ddp_runs, val_table):
    """configs/cluster/torchrun.sh run twice, as on two nodes (node ranks 0 and 1, one process each), over
    localhost: the global batch spans the nodes, and the metrics equal the 1 node x 2 processes run's."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("image_encoder: vit\ntext_encoder: bert\n")
    flags = ["--accelerator", "cpu", "--precision", "32-true", "--max-steps", "6", "--val-every-n-steps", "6",
             "--image-size", "32", "--batch-size", "8", "--embed-dim", "32", "--num-workers", "0",
             "--synthetic-train-samples", "256", "--val-data", val_table]
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}", "NNODES": "2",
           "GPUS_PER_NODE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RUN": str(tmp_path / "run")}
    nodes = [subprocess.Popen(["bash", "configs/cluster/torchrun.sh", str(recipe), *flags], cwd=REPO,
                              env={**env, "NODE_RANK": str(rank)}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True) for rank in range(2)]
    for node in nodes:
        _, err = node.communicate(timeout=600)
        assert node.returncode == 0, err[-3000:]
    assert (tmp_path / "run" / "metrics.json").read_text() == (ddp_runs["torchrun"] / "metrics.json").read_text()
