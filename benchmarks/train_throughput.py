"""Training samples/s of our Lightning loop against open_clip's own training step, side by side in one process.

Contenders, alternated over rounds (the order flips every round) so that noise from other processes on the machine
hits all of them; each round times `--steps` steps after `--warmup` steps (its median step counts), figures are
medians over rounds, and ratios and fractions of peak are medians of the per-round ones (paired within a round):
- ours: `CLIPModule` through `pl.Trainer.fit` on an in-memory loader of pre-made batches (no logger, progress bar
  or checkpoints), step time read by a callback between consecutive `on_train_batch_end` calls;
- ours_plain: the same model, loss and fused AdamW in a bare Python loop, so ours - ours_plain is Lightning's cost;
- openclip: open_clip's CLIP + `open_clip.ClipLoss` + the same fused AdamW, stepped as `open_clip_train` does
  (cosine LR, zero_grad, forward, loss, backward, step, clamp the logit scale);
- demo: ours on the CPU demo config (configs/demo_cpu.yaml: tiny ViT + tiny BERT at 32 px) and its synthetic batches;
- the training options, each on its own copy of ours: ours_patch_dropout (`--patch-dropout 0.5`), ours_siglip
  (`--loss siglip`), ours_compiled (`--compile`: both towers compiled in place), and openclip_compiled (open_clip's
  model under `torch.compile`, as open_clip_train's `--torch-compile` does). Compilation happens in the warm-up
  steps of the first round.
The pairs, the same architecture on both sides (`--pair`): `small` (the default, equal FLOPs): ViT width 192,
6 layers, 3 heads, patch 16 at 64 px; causal text transformer width 192, 6 layers, 3 heads, context 32; embed 128.
`vit-b-16`: CLIP ViT-B/16's sizes: ViT width 768, 12 layers, 12 heads, patch 16 at 224 px; text width 512,
12 layers, 8 heads, context 77; embed 512. Every caption fills the context; vocabulary 49408 on both sides.
`--device cuda --precision bf16-mixed` runs both sides on a GPU under bf16 autocast (open_clip_train's
`--precision amp_bf16`), synchronising before each clock reading.
FLOPs of a step (forward + backward) come from FlopCounterMode; the peak is the best square matmul rate of each
round at the step's precision (2048 fp32 on CPU; 8192 on a GPU). Prints one JSON line.

    python benchmarks/train_throughput.py [--rounds 7] [--steps 6] [--warmup 2] [--batch-size 64]
    python benchmarks/train_throughput.py --device cuda --precision bf16-mixed --pair vit-b-16 --batch-size 256
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import logging
import math
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import open_clip
import pytorch_lightning as pl
import torch
from open_clip_train.scheduler import cosine_lr
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from clipfromscratch.config import ModelConfig, TrainConfig, load_config
from clipfromscratch.data.datamodule import Collate
from clipfromscratch.data.synthetic import SyntheticCaptions
from clipfromscratch.encoders.text import text_config
from clipfromscratch.lit_module import CLIPModule
from clipfromscratch.model import CLIP, build_model, resolve_image_size
from clipfromscratch.text_tokenizers import make_tokenizer
from clipfromscratch.training import compile_towers


@dataclass(frozen=True)
class Pair:
    """One model size, built alike on both sides: a ViT and a causal text transformer."""

    image_size: int
    vision_width: int
    vision_layers: int
    vision_heads: int
    text_width: int
    text_layers: int
    text_heads: int
    context_length: int
    embed_dim: int
    patch_size: int = 16

    def ours(self) -> ModelConfig:
        return ModelConfig(
            image_encoder="vit", image_size=self.image_size,
            image_overrides={"embed_dim": self.vision_width, "depth": self.vision_layers,
                             "num_heads": self.vision_heads, "patch_size": self.patch_size},
            text_encoder="gpt2",
            text_overrides={"n_embd": self.text_width, "n_layer": self.text_layers, "n_head": self.text_heads},
            context_length=self.context_length, embed_dim=self.embed_dim)


PAIRS = {"small": Pair(64, 192, 6, 3, 192, 6, 3, 32, 128), "vit-b-16": Pair(224, 768, 12, 12, 512, 12, 8, 77, 512)}
# open_clip's (CLIP's BPE) vocabulary on both sides: the token embedding is most of the small pair's 15M parameters,
# so it sets the optimizer's cost; our tokenizer trained on synthetic captions would have only a few hundred tokens
PAIR_VOCAB = 49408
DEFAULTS = TrainConfig()


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work: a GPU step is only over when its kernels are."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, precision: str):
    """The autocast of a Lightning precision, for the loops that step without Lightning."""
    if precision == "32-true":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16-mixed" else torch.float16)


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send standard output to stderr, Python's and file descriptor 1's: the tokenizers trainer (Rust) prints blank
    progress lines straight to the descriptor, Lightning's tables to sys.stdout, and stdout is for the results."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def quiet_lightning() -> None:
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    warnings.filterwarnings("ignore", ".*no `val_dataloader`.*")


def pair_model(pair: Pair = PAIRS["small"], **options) -> CLIP:
    """Our model of `pair`, built through `build_model` as the CLI builds it, with the open_clip vocabulary;
    `options` are ModelConfig fields (loss, patch_dropout)."""
    tokenizer = make_tokenizer("gpt2", False, "tiny", SyntheticCaptions("train", 1000, 0, 64).captions())
    special_ids = {f"{k}_token_id": getattr(tokenizer, f"{k}_token_id") for k in ("pad", "bos", "eos")}
    config = replace(pair.ours(), **options)
    hf_config = text_config("gpt2", "tiny", config.text_overrides, PAIR_VOCAB, special_ids)
    return build_model(config, tokenizer, hf_config)


def pair_batches(count: int, batch_size: int, seed: int = 0, pair: Pair = PAIRS["small"]) -> list[dict]:
    """Noise images and full-length captions ending in the highest token id: open_clip's argmax pooling and our
    last-real-token pooling read the same position, and both towers see every position."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        ids = torch.randint(0, PAIR_VOCAB - 1, (batch_size, pair.context_length), generator=generator)
        ids[:, -1] = PAIR_VOCAB - 1
        pixels = torch.randn(batch_size, 3, pair.image_size, pair.image_size, generator=generator)
        batches.append({"pixels": pixels, "input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return batches


def clip_module(model: CLIP, accum_freq: int = 1, lr_schedule: str = "cosine") -> CLIPModule:
    return CLIPModule(model, replace(DEFAULTS.optim, accum_freq=accum_freq, lr_schedule=lr_schedule))


class StepClock(pl.Callback):
    """Wall-clock time at the end of every training step: the gaps include Lightning's whole loop."""

    def __init__(self):
        self.ends: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        synchronize(pl_module.device)
        self.ends.append(time.perf_counter())


def lightning_step_times(module: CLIPModule, batches: list[dict], steps: int, warmup: int,
                         gradient_clip_val: float | None = None, devices: int = 1, accelerator: str = "cpu",
                         precision: str = "32-true") -> list[float]:
    """Seconds of each of `steps` steps of `trainer.fit` after `warmup` steps; a new Trainer (and optimizer) per call.

    With `devices` > 1 this process must already be one rank of a torch.distributed job (LOCAL_RANK etc. set);
    every rank steps through its own `batches`.
    """
    clock = StepClock()
    trainer = pl.Trainer(
        accelerator=accelerator, devices=devices, strategy="ddp" if devices > 1 else "auto", precision=precision,
        max_steps=warmup + steps, logger=False, enable_progress_bar=False, enable_checkpointing=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, gradient_clip_val=gradient_clip_val,
        callbacks=[clock], use_distributed_sampler=False)
    # the same few batches again and again, in one epoch: no epoch-end hooks inside the timed steps
    loader = DataLoader([batches[i % len(batches)] for i in range(warmup + steps)], batch_size=None)
    trainer.fit(module, loader)
    return [b - a for a, b in zip(clock.ends[warmup - 1:], clock.ends[warmup:])]


def timed_loop(step: Callable[[dict], None], batches: list[dict], steps: int, warmup: int,
               device: torch.device = torch.device("cpu")) -> list[float]:
    ends = []
    for i in range(warmup + steps):
        step(batches[i % len(batches)])
        synchronize(device)
        ends.append(time.perf_counter())
    return [b - a for a, b in zip(ends[warmup - 1:], ends[warmup:])]


def plain_step(model: CLIP, precision: str = "32-true") -> Callable[[dict], None]:
    """Our model, loss and fused AdamW (constant LR) in a bare loop: what the step costs without Lightning."""
    module = clip_module(model, lr_schedule="constant")
    optimizer = module.configure_optimizers()
    device = model.log_logit_scale.device

    def step(batch: dict) -> None:
        optimizer.zero_grad()
        with autocast(device, precision):
            loss = our_loss(module, batch)
        loss.backward()
        optimizer.step()
        model.clamp_logit_scale_()

    return step


def openclip_model(vocab_size: int, pair: Pair = PAIRS["small"]) -> open_clip.CLIP:
    vision = open_clip.CLIPVisionCfg(layers=pair.vision_layers, width=pair.vision_width,
                                     head_width=pair.vision_width // pair.vision_heads, patch_size=pair.patch_size,
                                     image_size=pair.image_size)
    text = open_clip.CLIPTextCfg(context_length=pair.context_length, vocab_size=vocab_size, width=pair.text_width,
                                 heads=pair.text_heads, layers=pair.text_layers)
    # output_dict as open_clip_train builds it: the loss takes the outputs by name
    return open_clip.CLIP(embed_dim=pair.embed_dim, vision_cfg=vision, text_cfg=text, output_dict=True)


def openclip_optimizer(model: open_clip.CLIP, steps: int) -> tuple[torch.optim.Optimizer, Callable[[int], float]]:
    """open_clip_train's AdamW parameter groups (no decay on gains, biases and the logit scale) with ours' fused
    AdamW and LR, and open_clip_train's cosine schedule over `steps`."""
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
    named = list(model.named_parameters())
    optim = DEFAULTS.optim
    optimizer = torch.optim.AdamW([
        {"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
        {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": optim.weight_decay},
    ], lr=optim.lr, fused=True)
    return optimizer, cosine_lr(optimizer, optim.lr, optim.warmup_steps, steps)


def openclip_step(model: open_clip.CLIP, precision: str = "32-true") -> Callable[[dict], None]:
    """open_clip_train's step without gradient clipping (its default), with our fused AdamW."""
    optimizer, scheduler = openclip_optimizer(model, DEFAULTS.run.max_steps)
    loss = open_clip.ClipLoss()
    model.train()
    counter = itertools.count()
    device = model.logit_scale.device

    def step(batch: dict) -> None:
        scheduler(next(counter))
        optimizer.zero_grad()
        with autocast(device, precision):
            losses = loss(**model(batch["pixels"], batch["input_ids"]), output_dict=True)
        sum(losses.values()).backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))

    return step


def demo_setup(batch_count: int) -> tuple[CLIPModule, list[dict], float | None]:
    """The CPU demo's module, `batch_count` of its synthetic training batches, and its gradient clipping."""
    config = load_config(["--config", os.path.join(os.path.dirname(__file__), "..", "configs", "demo_cpu.yaml")])
    model_config = resolve_image_size(config.model)
    dataset = SyntheticCaptions("train", config.data.synthetic_train_samples, config.run.seed, model_config.image_size)
    tokenizer = make_tokenizer(model_config.text_encoder, False, model_config.model_size, dataset.captions())
    model = build_model(model_config, tokenizer)
    dataset.transform = model.preprocess
    loader = DataLoader(dataset, batch_size=config.data.batch_size,
                        collate_fn=Collate(tokenizer, model_config.context_length))
    module = CLIPModule(model, config.optim)
    return module, list(itertools.islice(loader, batch_count)), config.optim.gradient_clip_val


def our_loss(module: CLIPModule, batch: dict) -> torch.Tensor:
    model = module.model
    return module.objective.loss(*module.embed(batch), model.logit_scale(), model.logit_bias, None)


def step_gflop(model: nn.Module, loss_of: Callable[[dict], torch.Tensor], batch: dict) -> float:
    """GFLOP of one forward + backward as FlopCounterMode counts them (CPU's fused attention kernel is not
    counted: a few percent of these steps, on both sides alike)."""
    with FlopCounterMode(display=False) as counter:
        loss_of(batch).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 1e9


def matmul_gflops(device: torch.device, precision: str, repeats: int = 3) -> float:
    """The best square matmul rate of a few tries at the step's precision: this machine's attainable peak now."""
    size, dtype = (2048, torch.float32) if device.type == "cpu" else (8192, torch.float32)
    if device.type != "cpu" and precision != "32-true":
        dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float16
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    best = math.inf
    for _ in range(repeats + 1):  # the first call warms the kernels up
        synchronize(device)
        start = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def millions(model: nn.Module) -> float:
    return round(sum(p.numel() for p in model.parameters()) / 1e6, 2)


def on(device: torch.device, batches: list[dict]) -> list[dict]:
    """The batches' tensors on `device` (the demo's label dict stays behind: training does not read it)."""
    return [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()} for batch in batches]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per contender and round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before them (at least 1)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--pair", choices=list(PAIRS), default="small", help="model size of ours and open_clip's")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--precision", choices=("32-true", "bf16-mixed", "16-mixed"), default="32-true")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    """The measurements, as the JSON line prints them."""
    quiet_lightning()
    device = torch.device(args.device)
    pair = PAIRS[args.pair]
    load_start = os.getloadavg()[0]
    torch.manual_seed(0)
    with stdout_to_stderr():
        ours_model, openclip = pair_model(pair).to(device), openclip_model(PAIR_VOCAB, pair).to(device)
        demo, demo_batches, demo_clip = demo_setup(4)
    ours = clip_module(ours_model)
    with stdout_to_stderr():
        options = {"ours_patch_dropout": clip_module(pair_model(pair, patch_dropout=0.5).to(device)),
                   "ours_siglip": clip_module(pair_model(pair, loss="siglip").to(device)),
                   "ours_compiled": clip_module(pair_model(pair).to(device))}
    compile_towers(options["ours_compiled"].model)
    openclip_compiled = torch.compile(openclip_model(PAIR_VOCAB, pair).to(device))
    batches = on(device, pair_batches(4, args.batch_size, pair=pair))
    demo_batches = on(device, demo_batches)
    demo.model.to(device)
    loss = open_clip.ClipLoss()
    gflop = {
        "ours": step_gflop(ours_model, functools.partial(our_loss, ours), batches[0]),
        "openclip": step_gflop(openclip, lambda b: loss(**openclip(b["pixels"], b["input_ids"])), batches[0]),
        # demo captions are padded to the longest of each batch: average over the batches it cycles through
        "demo": statistics.mean(step_gflop(demo.model, functools.partial(our_loss, demo), b) for b in demo_batches),
    }
    gflop["ours_plain"] = gflop["ours_compiled"] = gflop["openclip_compiled"] = gflop["ours"]
    gflop["ours_siglip"] = step_gflop(options["ours_siglip"].model, functools.partial(our_loss, options["ours_siglip"]),
                                      batches[0])
    # in training mode, as it trains: the vision tower sees half of its patches
    gflop["ours_patch_dropout"] = step_gflop(options["ours_patch_dropout"].model.train(),
                                             functools.partial(our_loss, options["ours_patch_dropout"]), batches[0])
    vision_gflop = step_gflop(ours_model, lambda b: ours_model.encode_image(b["pixels"]).sum(), batches[0])
    plain, openclip_train = plain_step(ours_model, args.precision), openclip_step(openclip, args.precision)
    fit = functools.partial(lightning_step_times, steps=args.steps, warmup=args.warmup, accelerator=args.device,
                            precision=args.precision)
    contenders = {
        "ours": lambda: fit(ours, batches),
        "ours_plain": lambda: timed_loop(plain, batches, args.steps, args.warmup, device),
        "openclip": lambda: timed_loop(openclip_train, batches, args.steps, args.warmup, device),
        "demo": lambda: fit(demo, demo_batches, gradient_clip_val=demo_clip),
        **{name: functools.partial(fit, module, batches) for name, module in options.items()},
        "openclip_compiled": lambda: timed_loop(openclip_step(openclip_compiled, args.precision), batches, args.steps,
                                                args.warmup, device),
    }
    rates: dict[str, list[float]] = {name: [] for name in contenders}
    peaks = []
    for round_ in range(args.rounds):
        peaks.append(matmul_gflops(device, args.precision))
        for name in list(contenders)[::1 if round_ % 2 == 0 else -1]:
            rates[name].append(args.batch_size / statistics.median(contenders[name]()))
    median = statistics.median
    rate = {name: median(values) for name, values in rates.items()}
    achieved = {name: gflop[name] * rate[name] / args.batch_size for name in rate}
    # other tenants' load changes within minutes: compare each figure with the others of its own round
    def paired(name: str, other: str) -> float:
        return round(median(a / b for a, b in zip(rates[name], rates[other])), 3)

    ratio = paired("ours", "openclip")
    fraction = {name: median(gflop[name] * r / args.batch_size / p for r, p in zip(values, peaks))
                for name, values in rates.items()}
    lightning_ms = median(1000 * args.batch_size * (1 / ours - 1 / plain)
                          for ours, plain in zip(rates["ours"], rates["ours_plain"]))
    return {
        "samples_per_s": round(rate["ours"], 1), "openclip_samples_per_s": round(rate["openclip"], 1),
        "ratio": ratio,
        "patch_dropout_speedup": paired("ours_patch_dropout", "ours"),
        "compile_speedup": paired("ours_compiled", "ours"),
        "compiled_ratio": paired("ours_compiled", "openclip_compiled"),
        "openclip_compile_speedup": paired("openclip_compiled", "openclip"),
        "siglip_ratio": paired("ours_siglip", "ours"),
        "vision_share_of_gflop": round(vision_gflop / gflop["ours"], 3),
        "patch_dropout_gflop_per_step": round(gflop["ours_patch_dropout"], 2),
        "siglip_gflop_per_step": round(gflop["ours_siglip"], 2),
        "achieved_gflops": round(achieved["ours"], 1), "peak_gflops": round(median(peaks), 1),
        "fraction_of_peak": round(fraction["ours"], 3),
        "openclip_achieved_gflops": round(achieved["openclip"], 1),
        "openclip_fraction_of_peak": round(fraction["openclip"], 3),
        "gflop_per_step": round(gflop["ours"], 2), "openclip_gflop_per_step": round(gflop["openclip"], 2),
        "params_m": millions(ours_model), "openclip_params_m": millions(openclip),
        "plain_loop_samples_per_s": round(rate["ours_plain"], 1),
        "lightning_ms_per_step": round(lightning_ms, 1),
        "demo_samples_per_s": round(rate["demo"], 1), "demo_gflop_per_step": round(gflop["demo"], 3),
        "demo_achieved_gflops": round(achieved["demo"], 1), "demo_fraction_of_peak": round(fraction["demo"], 3),
        "peak_gflops_per_round": [round(p, 1) for p in peaks],
        "samples_per_s_by_contender": {name: round(r, 1) for name, r in rate.items()},
        "samples_per_s_per_round": {name: [round(r, 1) for r in values] for name, values in rates.items()},
        "threads": torch.get_num_threads(), "batch_size": args.batch_size, "rounds": args.rounds,
        "steps": args.steps, "warmup": args.warmup, "pair": args.pair, "device": args.device,
        "precision": args.precision,
        "load_avg_1m": [round(load_start, 2), round(os.getloadavg()[0], 2)],
    }


def main(argv: list[str] | None = None) -> None:
    print(json.dumps(run(parse_args(argv))))


if __name__ == "__main__":
    main()
