"""Step time and peak memory of our Lightning training step as the global batch grows: a bigger batch, feature-cached
accumulation (accum_freq) at micro-batch 64, and 2-process gloo DDP against 1 process at equal global batch.

The model is the equal-FLOP pair of train_throughput.py (ViT 192x6 at 64 px + GPT-2 192x6, context 32, fp32,
fused AdamW), stepped by `trainer.fit` on pre-made in-memory batches; the median of `--steps` timed steps counts.
DDP against 1 process on the same 2 cores: 2 processes x 1 thread x batch B/2 against 1 process x 2 threads x B.

Memory on CPU: every setting runs in processes of its own (torch.multiprocessing spawn), so the peak resident set
(`ru_maxrss`) is that setting's; reported as the growth from just before `trainer.fit` (imports, model and batches
loaded) to the peak, i.e. what training adds: gradients, AdamW state, activations and allocator slack. The RSS is
what the operating system must provide (what runs out first), unlike tracemalloc, which does not see PyTorch's
allocations.

    python benchmarks/train_scaling.py [--steps 5] [--warmup 2]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
from dataclasses import asdict, dataclass

import torch
import torch.multiprocessing as mp
from train_throughput import (
    clip_module,
    lightning_step_times,
    pair_batches,
    pair_model,
    quiet_lightning,
    stdout_to_stderr,
)

MIB = 1024 * 1024


@dataclass(frozen=True)
class Setting:
    kind: str
    processes: int
    threads: int  # per process
    micro_batch: int  # per process and forward pass
    accum_freq: int = 1

    @property
    def global_batch(self) -> int:
        return self.processes * self.micro_batch * self.accum_freq


SETTINGS = [
    Setting("plain", 1, 2, 64),
    Setting("plain", 1, 2, 128),
    Setting("plain", 1, 2, 256),
    Setting("accum_freq", 1, 2, 64, 2),
    Setting("accum_freq", 1, 2, 64, 4),
    Setting("ddp", 2, 1, 64),
    Setting("ddp", 2, 1, 128),
]


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MIB


def worker(rank: int, setting: Setting, port: int, steps: int, warmup: int, results) -> None:
    torch.set_num_threads(setting.threads)
    quiet_lightning()
    if setting.processes > 1:  # Lightning joins a job whose processes exist already when LOCAL_RANK is set
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(setting.processes),
                          NODE_RANK="0", RANK=str(rank), LOCAL_RANK=str(rank))
    torch.manual_seed(0)
    with stdout_to_stderr():
        model = pair_model()
    module = clip_module(model, setting.accum_freq)
    # each rank its own samples; with accum_freq the module cuts a step's batch into micro-batches itself
    batches = pair_batches(2, setting.micro_batch * setting.accum_freq, seed=rank)
    before = rss_mib()
    times = lightning_step_times(module, batches, steps, warmup, devices=setting.processes)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    results.put({"step_s": statistics.median(times), "rss_growth_mib": peak - before, "peak_rss_mib": peak})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(setting: Setting, steps: int, warmup: int) -> dict:
    results = mp.get_context("spawn").SimpleQueue()
    mp.spawn(worker, args=(setting, free_port(), steps, warmup, results), nprocs=setting.processes)
    ranks = [results.get() for _ in range(setting.processes)]
    step_s = max(r["step_s"] for r in ranks)  # the ranks wait for each other every step: the slowest counts
    return {**asdict(setting), "global_batch": setting.global_batch, "step_s": round(step_s, 3),
            "samples_per_s": round(setting.global_batch / step_s, 1),
            "rss_growth_mib_per_process": round(max(r["rss_growth_mib"] for r in ranks)),
            "rss_growth_mib_total": round(sum(r["rss_growth_mib"] for r in ranks)),
            "peak_rss_mib_total": round(sum(r["peak_rss_mib"] for r in ranks))}


def markdown(rows: list[dict]) -> str:
    header = ("| setting | processes x threads | micro-batch | accum_freq | global batch | step (s) | samples/s "
              "| RSS growth / process (MiB) | RSS growth total (MiB) | peak RSS total (MiB) |")
    lines = [header, "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['kind']} | {r['processes']} x {r['threads']} | {r['micro_batch']} | {r['accum_freq']} "
                     f"| {r['global_batch']} | {r['step_s']:.3f} | {r['samples_per_s']:.1f} "
                     f"| {r['rss_growth_mib_per_process']} | {r['rss_growth_mib_total']} | {r['peak_rss_mib_total']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per setting")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    args = parser.parse_args()
    load_start = os.getloadavg()[0]
    rows = [measure(setting, args.steps, args.warmup) for setting in SETTINGS]
    print(markdown(rows))
    print(json.dumps({"rows": rows, "steps": args.steps, "warmup": args.warmup,
                      "load_avg_1m": [round(load_start, 2), round(os.getloadavg()[0], 2)]}))


if __name__ == "__main__":
    main()
