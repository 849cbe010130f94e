"""The LightningModule: wires the CLIP model to the loss, the optimizer, the schedule, logging and validation."""
from __future__ import annotations

import math
from dataclasses import asdict

import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torch.nn.functional as F
from pytorch_lightning.strategies import ModelParallelStrategy
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

from clipfromscratch.config import OptimConfig
from clipfromscratch.errors import UsageError
from clipfromscratch.eval.retrieval import first_occurrences, retrieval_recall
from clipfromscratch.eval.zeroshot import zeroshot_accuracy, zeroshot_classifier
from clipfromscratch.export import checkpoint_entries, load_state_dict, rebuild_model
from clipfromscratch.model import CLIP
from clipfromscratch.objectives import OBJECTIVES
from clipfromscratch.text_tokenizers import tokenizer_fingerprint

MONITOR = "val/mean_recall@1"  # what "best" means for checkpoints, plateau and early stopping


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """LR multiplier: linear warm-up from 0 to 1, then cosine decay to 0 at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.5 * (1 + math.cos(math.pi * progress))


def total_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of all of `grads`, a plain tensor: under FSDP some are shards (DTensors, whose norm is gathered
    over the ranks) and some whole on every rank (the scale and bias)."""
    sharded = [g for g in grads if isinstance(g, DTensor)]
    parts = [torch.nn.utils.get_total_norm([g for g in grads if not isinstance(g, DTensor)])]
    if sharded:
        parts.append(torch.nn.utils.get_total_norm(sharded).full_tensor())
    return torch.linalg.vector_norm(torch.stack(parts))


def repeated_blocks(tower: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks a tower repeats, whatever the library calls them (timm's `blocks` and `stages`, transformers'
    `encoder.layer` and `h`): the members of every list of two or more modules of one class that hold
    parameters, inner lists before the lists holding them (a stage's blocks, then the stages), as FSDP wraps."""
    blocks: list[torch.nn.Module] = []

    def visit(module: torch.nn.Module) -> None:
        for child in module.children():
            visit(child)
            members = list(child.children())
            if (isinstance(child, (torch.nn.ModuleList, torch.nn.Sequential)) and len(members) > 1
                    and len({type(m) for m in members}) == 1
                    and all(any(True for _ in m.parameters()) for m in members)):
                blocks.extend(members)

    visit(tower)
    return blocks


def gather_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """(world, ...): every rank's `tensor` (of one shape on all), without gradient. torch.distributed's own
    all_gather: Lightning's `all_gather` goes through a deprecated autograd function."""
    if not (dist.is_available() and dist.is_initialized()):
        return tensor.unsqueeze(0)
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.stack(parts)


class CLIPModule(pl.LightningModule):
    """The CLIP model in training: the loss over every rank's batch, AdamW with its schedule, validation recall.

    `optim` is the run's optimisation section (learning rate, schedule, accumulation, NaN policy);
    `zeroshot_tasks` ({task: (class names, templates)}) are scored at each validation on the labels the
    validation batches carry; `batch_rows`, the most samples a rank's training batch holds (the loss gathers
    every rank's at that size, known in advance).
    """

    def __init__(self, model: CLIP, optim: OptimConfig, zeroshot_tasks: dict | None = None,
                 batch_rows: int | None = None):
        super().__init__()
        self.model = model
        self.objective = OBJECTIVES[model.config.loss]
        self.optim = optim
        self.batch_rows = batch_rows
        self.zeroshot_tasks = zeroshot_tasks or {}
        self._val_outputs: list[dict] = []
        # the non-finite policy's record, kept on the device and read by the host every few steps only:
        # (steps whose gradient was NaN or inf, the first such step, -1 if none)
        self._nonfinite: tuple[torch.Tensor, torch.Tensor] | None = None
        self._nonfinite_seen = 0
        self._unsharded: list[torch.nn.Parameter] | None = None  # under FSDP: the parameters left whole on every rank

    def configure_model(self) -> None:
        """Under --strategy fsdp (Lightning's ModelParallelStrategy, FSDP2): each block of each tower, then each
        tower, then the rest of the model (the heads), sharded over every rank, so that a rank gathers whole
        weights one block at a time. The learned scale and bias are single numbers, which FSDP2 does not
        shard: every rank holds them whole, and their gradients are averaged over ranks before each step
        (`_average_unsharded_gradients`). The encode_* methods, not `forward`, are what the steps call, so FSDP is
        told to gather the parameters for them too."""
        if not isinstance(self.trainer.strategy, ModelParallelStrategy) or self._unsharded is not None:
            return
        mesh, model = self.device_mesh["data_parallel"], self.model
        self._unsharded = [p for p in (model.log_logit_scale, model.logit_bias) if p is not None]
        for tower in (model.image_tower, model.text_tower):
            for block in repeated_blocks(tower):
                fully_shard(block, mesh=mesh)
            fully_shard(tower, mesh=mesh)
        fully_shard(model, mesh=mesh, ignored_params=set(self._unsharded))
        for method in ("encode_image", "encode_tokens", "encode_text", "encode_image_tokens", "encode_text_tokens"):
            register_fsdp_forward_method(model, method)

    def whole_model(self) -> CLIP | None:
        """The model with whole weights, for the export. Under FSDP every rank must call this: the shards are
        gathered onto rank 0, which gets a copy of the model holding them (the other ranks get None)."""
        if self._unsharded is None:
            return self.model
        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.global_rank != 0:
            return None
        model = self.model
        whole = rebuild_model(asdict(model.config), model.tokenizer, model.text_tower.architecture())
        load_state_dict(whole, state, "the weights gathered from the FSDP shards")
        return whole.eval()

    def _average_unsharded_gradients(self) -> None:
        """One collective a step for all of them (they are single numbers)."""
        grads = [p.grad for p in self._unsharded or () if p.grad is not None]
        if not grads or not dist.is_initialized():
            return
        summed = torch.stack(grads)
        dist.all_reduce(summed)  # a sum: gloo has no average
        for grad, total in zip(grads, summed / dist.get_world_size()):
            grad.copy_(total)

    def on_fit_start(self) -> None:
        # a token id must mean the same word piece on every rank: the embedding table is one shared parameter
        fingerprint = tokenizer_fingerprint(self.model.tokenizer)
        held = gather_ranks(torch.tensor(int(fingerprint[:15], 16), device=self.device))
        if self.trainer.world_size > 1 and bool((held != held[0]).any()):
            raise UsageError("the ranks hold different tokenizers: every rank must see one run folder, and a new "
                             "run needs a folder without an earlier run's tokenizer (a new --output-dir, or --resume)")

    def _encode_pair(self, pixels: torch.Tensor, input_ids: torch.Tensor,
                     attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.encode_image(pixels), self.model.encode_tokens(input_ids, attention_mask)

    def embed(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Image and text features of the whole batch, as the loss sees them.

        With accum_freq K the batch runs as K micro-batches whose activations are dropped after the forward
        pass and recomputed one micro-batch at a time during backward (feature-cached accumulation): the loss
        sees all K x B negatives, activation memory is that of one micro-batch, the gradient that of the big batch.
        """
        inputs = (batch["pixels"], batch["input_ids"], batch["attention_mask"])
        if self.optim.accum_freq == 1:
            return self._encode_pair(*inputs)
        chunks = zip(*(x.chunk(self.optim.accum_freq) for x in inputs))
        parts = [checkpoint(self._encode_pair, *chunk, use_reentrant=False) for chunk in chunks]
        return torch.cat([image for image, _ in parts]), torch.cat([text for _, text in parts])

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        # never an empty batch: the training data replaces unreadable samples (CaptionDataModule), so every rank
        # reaches the loss's collectives at every step
        image_features, text_features = self.embed(batch)
        scale, bias = self.model.logit_scale(), self.model.logit_bias
        loss = self.objective.loss(image_features, text_features, scale, bias, self.batch_rows)
        if bias is not None:
            self.log("train/logit_bias", bias)
        # logged as tensors: Lightning reads them on the host only every --log-every-n-steps
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/logit_scale", scale)
        self.log("train/temperature", 1 / scale)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self.model.clamp_logit_scale_()
        if self.global_step % self.trainer.log_every_n_steps == 0:
            self._check_nonfinite()

    def on_train_end(self) -> None:
        self._check_nonfinite()

    def _watch_nonfinite(self, optimizer: torch.optim.Optimizer, grad_norm: torch.Tensor) -> None:
        """Skip the update of a step whose gradient is NaN or inf, on the device: the fused AdamW leaves weights
        and moments as they were when its `found_inf` is 1 (the GradScaler's mechanism; under fp16 the scaler
        does it itself). The decision reads the gradient after DDP's reduction, which every rank holds alike, so
        every rank skips the same steps with no collective of its own; and no host sync: the record stays on the
        device until `_check_nonfinite`."""
        nonfinite = ~torch.isfinite(grad_norm)
        if self._nonfinite is None:
            self._nonfinite = (torch.zeros((), dtype=torch.long, device=grad_norm.device),
                               torch.full((), -1, dtype=torch.long, device=grad_norm.device))
        count, first = self._nonfinite
        count += nonfinite
        first.copy_(torch.where(nonfinite & (first < 0), self.global_step, first))
        if getattr(self.trainer.precision_plugin, "scaler", None) is None:
            optimizer.found_inf = nonfinite.float()

    @property
    def skipped_nonfinite(self) -> int:
        """Steps whose update was skipped for a NaN or inf gradient (one host sync)."""
        return 0 if self._nonfinite is None else int(self._nonfinite[0])

    def _check_nonfinite(self) -> None:
        """The policy, on the host, every --log-every-n-steps and at the end of training: stop the run at the first
        non-finite step since the last check (its update was skipped, so the weights are clean), or, with
        --skip-nonfinite, go on (the run's report says how many were skipped). Every rank reaches the same verdict
        at the same step."""
        skipped = self.skipped_nonfinite
        if skipped == self._nonfinite_seen:
            return
        if not self.optim.skip_nonfinite:
            raise FloatingPointError(f"non-finite loss at step {int(self._nonfinite[1])}")
        self._nonfinite_seen = skipped

    def validation_step(self, batch: dict | None, batch_idx: int) -> None:
        if batch is None:
            return
        self._val_outputs.append({
            "image": self.model.encode_image(batch["pixels"]),
            "text": self.model.encode_tokens(batch["input_ids"], batch["attention_mask"]),
            "image_id": batch["image_id"],
            "index": batch["index"],
            **{f"label_{k}": v for k, v in batch.get("labels", {}).items()},
        })

    def _local_outputs(self) -> dict[str, torch.Tensor]:
        """This rank's validation outputs concatenated; empty ones of the same shapes if it read no sample, so that
        it still joins the gathers below (a rank that skipped them would leave the others waiting)."""
        if self._val_outputs:
            return {k: torch.cat([o[k] for o in self._val_outputs]) for k in self._val_outputs[0]}
        features = torch.empty(0, self.model.config.embed_dim, device=self.device)
        ids = torch.empty(0, dtype=torch.long, device=self.device)
        return {"image": features, "text": features, "image_id": ids, "index": ids,
                **{f"label_{task}": ids for task in self.zeroshot_tasks}}

    def _gathered_outputs(self) -> dict[str, torch.Tensor]:
        """Every rank's validation outputs, gathered, padding duplicates dropped."""
        local = self._local_outputs()
        if self.trainer.world_size == 1:
            return local
        # ranks can hold different row counts (unreadable samples are dropped): pad to the largest, gather, cut
        counts = gather_ranks(torch.tensor(local["index"].size(0), device=self.device)).tolist()
        padded = {k: F.pad(v, (0, 0) * (v.dim() - 1) + (0, max(counts) - v.size(0))) for k, v in local.items()}
        gathered = {k: torch.cat([part[:count] for part, count in zip(gather_ranks(v), counts)])
                    for k, v in padded.items()}
        keep = first_occurrences(gathered["index"])[0].sort().values
        return {k: v[keep] for k, v in gathered.items()}

    def on_validation_epoch_end(self) -> None:
        out = self._gathered_outputs()
        self._val_outputs.clear()
        if not len(out["index"]):  # every rank knows: none of them read a validation sample
            raise UsageError("validation read no sample: every validation image was unreadable")
        # one row per image: its captions point at it through text_to_image
        first_row, text_to_image = first_occurrences(out["image_id"])
        images = out["image"][first_row]
        metrics = retrieval_recall(images, out["text"], text_to_image)
        for task, (classnames, templates) in self.zeroshot_tasks.items():
            labels = out[f"label_{task}"][first_row]
            classifier = zeroshot_classifier(self.model.encode_text, classnames, templates)
            metrics[f"zeroshot_{task}_acc1"] = zeroshot_accuracy(images, labels, classifier)
        self.log_dict({f"val/{k}": v for k, v in metrics.items()})
        self.log(MONITOR, (metrics["image_retrieval_recall@1"] + metrics["text_retrieval_recall@1"]) / 2, prog_bar=True)

    def lr_scales(self) -> dict[int, float]:
        """{id(parameter): lr multiplier} under --layer-decay F: a tower's layer group g of G (from the input up)
        trains at F ** (G - g), so its top group at F and its stem at F ** G; heads and the scale at 1."""
        scales: dict[int, float] = {}
        if self.optim.layer_decay == 1.0:
            return scales
        for tower in (self.model.image_tower, self.model.text_tower):
            groups = tower.layer_groups()
            scales.update({id(p): self.optim.layer_decay ** (len(groups) - g)
                           for g, group in enumerate(groups) for p in group})
        return scales

    def configure_optimizers(self):
        optim = self.optim
        scales = self.lr_scales()
        by_group: dict[tuple[bool, float], list[torch.nn.Parameter]] = {}
        for p in (p for p in self.model.parameters() if p.requires_grad):
            # no weight decay on biases, norms, the temperature and SigLIP's bias: decaying log(1/T) collapses it
            by_group.setdefault((p.ndim >= 2, scales.get(id(p), 1.0)), []).append(p)
        # decayed groups first, as without layer decay: clipping sums the gradient norm in group order, and the
        # order of a float sum moves the last digits of a run
        groups = [{"params": params, "weight_decay": optim.weight_decay if decay else 0.0, "lr": optim.lr * scale}
                  for (decay, scale), params in sorted(by_group.items(), key=lambda group: not group[0][0])]
        # fused: one kernel over all parameters instead of a loop of small ones, on CPU as on GPU
        optimizer = torch.optim.AdamW(groups, lr=optim.lr, fused=True)
        if optim.lr_schedule == "plateau":
            plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer, mode="max", factor=optim.plateau_factor, patience=optim.plateau_patience)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": plateau, "monitor": MONITOR}}
        if optim.lr_schedule == "constant":
            return optimizer
        total = self.trainer.estimated_stepping_batches
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, optim.warmup_steps, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """Clip the norm of the true gradient, under every precision, with the fused AdamW; and, with or without
        clipping, skip a step whose gradient is not finite (`_watch_nonfinite`). Lightning calls this after every
        backward pass.

        Lightning's mixed-precision plugin refuses to clip for an optimizer that unscales fp16 gradients inside
        its own step, as the fused AdamW does. Unscaling them here first is what the GradScaler allows: the
        step then finds them unscaled and leaves them. bf16 and fp32 have no scaler and nothing to undo.
        """
        self._average_unsharded_gradients()
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not gradient_clip_val:
            self._watch_nonfinite(optimizer, total_norm([p.grad for p in params]))
            return
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
            scaler.unscale_(optimizer)
        norm = total_norm([p.grad for p in params])
        torch.nn.utils.clip_grads_with_norm_(params, gradient_clip_val, norm)
        self._watch_nonfinite(optimizer, norm)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint.update(checkpoint_entries(self.model))
