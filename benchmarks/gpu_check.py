"""What a GPU user runs, checked on one GPU in a few minutes; prints one JSON line.

1. recipes: every configs/*.yaml with its own towers, batch size and precision (`auto` resolves on the GPU), for
   `--steps` steps on synthetic shards written here, validating (zero-shot on the shards' colours included),
   exporting, then resuming for 5 steps more; wall time, peak GPU memory and the final metrics of each;
2. reproducibility: one recipe twice with the same seed and `--deterministic`: are the metrics equal?
3. throughput: benchmarks/train_throughput.py on the GPU against open_clip at the ViT-B/16 pair, batch 256, bf16.

    python benchmarks/gpu_check.py [--steps 50] [--output gpu_check]
    python benchmarks/gpu_check.py --smoke    # the same code paths on a CPU: tiny towers, 3 steps, small batches
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time

import torch
import train_throughput
import yaml

from clipfromscratch.cli import main as train_main
from clipfromscratch.data.synthetic import write_shards
from clipfromscratch.encoders.image import IMAGE_ENCODERS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))
REPRODUCED = "fashion_vit_bert.yaml"
RESUME_STEPS = 5
# recipes shrunk for --smoke, so that a CPU runs every step of this check in about a minute
SMOKE_RECIPE = ["--model-size", "tiny", "--image-size", "32", "--batch-size", "8", "--num-workers", "0"]
SMOKE_THROUGHPUT = ["--rounds", "1", "--steps", "1", "--warmup", "1", "--batch-size", "4"]
GPU_THROUGHPUT = ["--device", "cuda", "--precision", "bf16-mixed", "--pair", "vit-b-16", "--batch-size", "256",
                  "--rounds", "3", "--steps", "10", "--warmup", "3"]


def shards(output: str, smoke: bool) -> dict[str, str]:
    """Synthetic train and val shards; the recipes resample training shards, so a few thousand samples will do."""
    side, counts = (32, {"train": 64, "val": 24}) if smoke else (256, {"train": 4096, "val": 512})
    folders = {split: os.path.join(output, "shards", split) for split in counts}
    for split, count in counts.items():
        write_shards(folders[split], split, count, seed=0, image_size=side, shard_size=max(16, count // 16))
    return folders


def train(args: list[str]) -> tuple[int, float, float]:
    """Exit code, seconds and peak GPU memory (GiB) of one `train.py` command, run in this process."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    with train_throughput.stdout_to_stderr():  # stdout is for the JSON line
        code = train_main(["train", *args])
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
    return code, round(time.perf_counter() - started, 1), round(peak, 2)


def metrics_of(run: str) -> dict:
    path = os.path.join(run, "metrics.json")
    return json.load(open(path, encoding="utf-8")) if os.path.isfile(path) else {}


def check_recipe(recipe: str, data: dict[str, str], output: str, steps: int, smoke: bool) -> dict:
    name = os.path.basename(recipe).removesuffix(".yaml")
    run = os.path.join(output, "runs", name)
    args = ["--config", recipe, "--max-steps", str(steps), "--val-every-n-steps", str(steps), "--output-dir", run,
            *(SMOKE_RECIPE if smoke else [])]
    if smoke and not IMAGE_ENCODERS.get(yaml.safe_load(open(recipe, encoding="utf-8"))["image_encoder"]):
        args += ["--image-enc", "vit"]  # a tower named by its timm name has no tiny preset: a tiny ViT stands in
    if "demo" not in name:  # the demo trains and validates on the embedded data itself
        args += ["--train-data", data["train"], "--val-data", data["val"], "--zeroshot-data", data["val"],
                 "--zeroshot-label", "colour"]
    code, seconds, peak = train(args)
    result = {"recipe": name, "exit_code": code, "seconds": seconds, "peak_gpu_gib": peak, "metrics": metrics_of(run)}
    saved = os.path.join(run, "config.yaml")
    if os.path.isfile(saved):  # the precision the run used, `auto` resolved
        result["precision"] = yaml.safe_load(open(saved, encoding="utf-8"))["precision"]
    result["exported"] = os.path.isfile(os.path.join(run, "final", "model.safetensors"))
    if code == 0:
        result["resume_exit_code"], result["resume_seconds"], _ = train(
            ["--resume", run, "--max-steps", str(steps + RESUME_STEPS)])
        result["resumed_to_step"] = metrics_of(run).get("step")
    return result


def check_reproducible(data: dict[str, str], output: str, steps: int, smoke: bool) -> dict:
    recipe = os.path.join(ROOT, "configs", REPRODUCED)
    runs = [os.path.join(output, "reproduce", str(i)) for i in range(2)]
    codes = [train(["--config", recipe, "--max-steps", str(steps), "--val-every-n-steps", str(steps),
                    "--train-data", data["train"], "--val-data", data["val"], "--deterministic", "--output-dir", run,
                    *(SMOKE_RECIPE if smoke else [])])[0] for run in runs]
    first, second = (metrics_of(run) for run in runs)
    return {"recipe": REPRODUCED, "steps": steps, "exit_codes": codes, "same_metrics": bool(first) and first == second,
            "metrics": [first, second]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50, help="training steps of each recipe")
    parser.add_argument("--output", default="gpu_check", help="folder for the shards and runs")
    parser.add_argument("--smoke", action="store_true", help="tiny towers, 3 steps and the CPU: the check's code "
                                                             "paths, not its figures")
    args = parser.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        print("error: no CUDA device here: this check is for a GPU (--smoke runs its code paths on a CPU)",
              file=sys.stderr)
        return 2
    steps = 3 if args.smoke else args.steps
    started = time.perf_counter()
    data = shards(args.output, args.smoke)
    recipes = [check_recipe(recipe, data, args.output, steps, args.smoke) for recipe in RECIPES]
    reproducible = check_reproducible(data, args.output, 3 if args.smoke else 10, args.smoke)
    throughput = train_throughput.run(train_throughput.parse_args(SMOKE_THROUGHPUT if args.smoke else GPU_THROUGHPUT))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(json.dumps({"date": time.strftime("%Y-%m-%d"), "device": device, "torch": torch.__version__,
                      "smoke": args.smoke, "recipes": recipes, "reproducible": reproducible,
                      "throughput": throughput, "seconds": round(time.perf_counter() - started)}))
    trained = all(r["exit_code"] == 0 and r.get("resume_exit_code") == 0 for r in recipes)
    return 0 if trained and reproducible["exit_codes"] == [0, 0] else 1


if __name__ == "__main__":
    sys.exit(main())
