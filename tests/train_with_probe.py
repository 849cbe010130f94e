"""`python tests/train_with_probe.py [train.py flags]`: train.py with one more callback, which writes what every rank
of a run must agree on to `$RANK_PROBE.rank<N>.json`: the fingerprint of the tokenizer the rank trains with, and
a hash of its parameters and the bytes of its parameters and optimizer state (its shards, under FSDP) when
training ends; and, as training starts, the rank's process id to
`$RANK_PROBE.rank<N>.pid` (for tests that kill a rank). Launchers re-run this script for every rank, so each rank
has it."""
import hashlib
import json
import os
import sys

import pytorch_lightning as pl
import torch
from torch.distributed.tensor import DTensor

from clipfromscratch import cli, trainer
from clipfromscratch.text_tokenizers import tokenizer_fingerprint


def local(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor as this rank holds it: an FSDP parameter's shard."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


class RankProbe(pl.Callback):
    def __init__(self, prefix: str):
        self.prefix = prefix
        self.record: dict[str, str] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.record["tokenizer"] = tokenizer_fingerprint(pl_module.model.tokenizer)
        with open(f"{self.prefix}.rank{trainer.global_rank}.pid", "w", encoding="utf-8") as f:
            f.write(str(os.getpid()))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        digest = hashlib.sha256()
        for name, tensor in sorted(pl_module.model.state_dict().items()):
            digest.update(name.encode())
            digest.update(local(tensor).detach().cpu().contiguous().numpy().tobytes())
        self.record["parameters"] = digest.hexdigest()
        # what this rank holds of the weights and of the optimizer's state (under FSDP, its shards)
        self.record["parameter_bytes"] = sum(local(p).nbytes for p in pl_module.model.parameters())
        self.record["optimizer_bytes"] = sum(local(v).nbytes for state in trainer.optimizers[0].state.values()
                                             for v in state.values() if torch.is_tensor(v) and v.dim() > 0)
        with open(f"{self.prefix}.rank{trainer.global_rank}.json", "w", encoding="utf-8") as f:
            json.dump(self.record, f)


if __name__ == "__main__":
    callbacks = trainer.callbacks
    trainer.callbacks = lambda config, output_dir: [*callbacks(config, output_dir), RankProbe(os.environ["RANK_PROBE"])]
    sys.exit(cli.main(["train", *sys.argv[1:]]))
