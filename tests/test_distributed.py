"""The loss under DDP sees every rank's negatives: 2 gloo processes give the single-process loss and gradients."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from clipfromscratch.config import ModelConfig
from clipfromscratch.loss import clip_loss
from clipfromscratch.model import build_model
from clipfromscratch.tokenizers import make_tokenizer, tokenize

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


def _loss_and_grads(towers: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`towers` is a Towers, or a DDP wrapping one."""
    model = towers.module.model if isinstance(towers, DistributedDataParallel) else towers.model
    model.zero_grad()
    images, texts = towers(batch["pixels"], batch["input_ids"], batch["attention_mask"])
    loss = clip_loss(images, texts, model.logit_scale())
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _rank(rank: int, workdir: str, sizes: list[int]) -> None:
    dist.init_process_group("gloo", init_method=f"file://{workdir}/store", rank=rank, world_size=len(sizes))
    towers = DistributedDataParallel(torch.load(f"{workdir}/towers.pt", weights_only=False))
    batch = torch.load(f"{workdir}/batch.pt")
    start = sum(sizes[:rank])
    local = {k: v[start:start + sizes[rank]] for k, v in batch.items()}
    loss, grads = _loss_and_grads(towers, local)
    dist.all_reduce(loss)  # DDP averages gradients, so the global loss is the mean of the ranks' values
    torch.save({"loss": loss / len(sizes), "grads": grads}, f"{workdir}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def towers_and_batch():
    torch.manual_seed(0)
    tokenizer = make_tokenizer("bert", False, "tiny", CAPTIONS * 10)
    model = build_model(ModelConfig(image_encoder="vit", text_encoder="bert", image_size=32, embed_dim=16), tokenizer)
    # float64 and no dropout: the two runs differ only in summation order
    towers = Towers(model).double().eval()
    batch = {"pixels": torch.randn(8, 3, 32, 32, dtype=torch.float64), **tokenize(tokenizer, CAPTIONS, 16)}
    return towers, batch


@pytest.mark.parametrize("sizes", [[4, 4], [3, 5]], ids=["equal", "unequal"])
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
    assert not torch.allclose(local_mean["log_logit_scale"], full["log_logit_scale"], rtol=1e-3)



def test_two_process_ddp_training_from_the_cli(tmp_path):
    # 11 validation rows over 2 ranks: the sampler pads one duplicate and one image is unreadable, so the ranks
    # hold different row counts; the metrics must count each of the 10 readable samples exactly once
    colours = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black", "pink", "cyan"]
    rows = []
    for i, colour in enumerate(colours):
        Image.new("RGB", (32, 32), colour).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png\ta {colour} square")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    rows.insert(3, "broken.png\ta broken picture")
    (tmp_path / "val.tsv").write_text("filepath\tcaption\n" + "\n".join(rows) + "\n")
    run = tmp_path / "run"
    command = [sys.executable, "train.py", "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp",
               "--output-dir", str(run), "--max-steps", "6", "--val-every-n-steps", "6", "--image-size", "32",
               "--batch-size", "8", "--embed-dim", "32", "--num-workers", "0", "--synthetic-train-samples", "256",
               "--val-data", str(tmp_path / "val.tsv")]
    done = subprocess.run(command, check=False, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["step"] == 6
    assert metrics["image_retrieval_recall@10"] == metrics["text_retrieval_recall@10"] == 1.0
    for name, value in metrics.items():  # whole tenths: not elevenths or twelfths
        if "recall" in name:
            assert abs(value * 10 - round(value * 10)) < 1e-3, (name, value)
