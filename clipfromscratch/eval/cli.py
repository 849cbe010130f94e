"""`clipfromscratch eval | compare | search` and the top-level help.

Flags -> EvalOptions and models -> results on disk and stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

import torch

from clipfromscratch.errors import UsageError
from clipfromscratch.eval.compare import compare
from clipfromscratch.eval.models import load_eval_model
from clipfromscratch.eval.plots import confusion_matrices, failure_sheet, write_confusion_csv
from clipfromscratch.eval.search import DEFAULT_CACHE_DIR, contact_sheet, search
from clipfromscratch.eval.tasks import TASKS, EvalOptions, Evaluation, run_task

DATA_HELP = ("synthetic | imagefolder:DIR | cifar10:ROOT | cifar100:ROOT | a .tsv/.csv caption table | "
             "webdataset shards (a .tar, a directory, a brace pattern); compositional: synthetic | synthetic:2way | "
             "whatsup:FILE | sugarcrepe:FILE | negbench:FILE | aro:FILE")


def _data_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default="synthetic", help=DATA_HELP)
    parser.add_argument("--label", help="synthetic: colour or shape; shards: the KEY.json field holding the class")
    parser.add_argument("--templates", help="zero-shot prompts: simple | openai_imagenet | cifar | a file with one "
                                            "template per line using {c} (default: the data's own, else simple)")
    parser.add_argument("--classnames", help="imagefolder: file of class names, one per folder in sorted order")
    parser.add_argument("--prompts", help="class-agnostic prompt file, one per line (default: 32 generic prompts)")
    parser.add_argument("--num-samples", type=int, help="images per split (synthetic default 1000; other data: a "
                                                        "seeded random subset; default all); compositional: items "
                                                        "(synthetic default 300)")
    parser.add_argument("--download", action="store_true", help="CIFAR: download into ROOT when missing (online)")
    parser.add_argument("--images", help="compositional: the folder the annotation file's image paths are relative "
                                         "to (default: the file's folder)")
    _run_flags(parser)


def _run_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=int, default=64, help="images per encoder call")
    parser.add_argument("--num-workers", type=int, default=0, help="data loader worker processes")
    parser.add_argument("--seed", type=int, default=0, help="seed for subsets, splits and k-means")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def _options(args: argparse.Namespace) -> EvalOptions:
    return EvalOptions(args.data, args.label, args.templates, args.classnames, args.prompts, args.num_samples,
                       args.batch_size, args.num_workers, args.seed, args.download, args.images)


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="clipfromscratch", description="Train CLIP models from scratch, evaluate "
                                   "and compare them. `clipfromscratch COMMAND --help` for a command's options.")
    commands = root.add_subparsers(dest="command", required=True)
    # listed for the help screen only: `train` is parsed by clipfromscratch.config (see clipfromscratch.cli)
    commands.add_parser("train", help="train a CLIP model (the default command; same as python train.py)")
    commands.add_parser("train-dcsm", help="train a DCSM head over a trained model's frozen towers")
    model_help = "an export directory, a .ckpt, openai:<hub name or dir>, or openclip:<arch>/<tag>"

    evaluate = commands.add_parser("eval", help="run one task on one model")
    evaluate.add_argument("--model", required=True, help=model_help)
    evaluate.add_argument("--task", required=True, help=" | ".join(TASKS))
    evaluate.add_argument("--output", help="results JSON file (zeroshot: the confusion matrix goes beside it)")
    _data_flags(evaluate)

    comparison = commands.add_parser("compare", help="the same tasks on several models: report.md and plots")
    comparison.add_argument("--models", nargs="+", required=True, help=model_help)
    comparison.add_argument("--tasks", nargs="+", default=["zeroshot", "linear_probe"], help=" | ".join(TASKS))
    comparison.add_argument("--output-dir", required=True)
    _data_flags(comparison)

    finder = commands.add_parser("search", help="text-to-image search in a folder of images")
    finder.add_argument("--model", required=True, help=model_help)
    finder.add_argument("--images", required=True, help="folder searched, with its subfolders")
    finder.add_argument("--query", required=True)
    finder.add_argument("-k", type=int, default=9, help="how many images to return")
    finder.add_argument("--sheet", default="search.png", help="contact sheet PNG of the top k")
    finder.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR, help="where the folder's embeddings are kept")
    _run_flags(finder)
    return root


def run_eval(args: argparse.Namespace) -> None:
    options = _options(args)
    model = load_eval_model(args.model, args.device)
    result = run_task(args.task, Evaluation(model, options))
    print(json.dumps(result.metrics, indent=2))
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump({"model": model.name, "task": args.task, "data": options.data, "label": options.label,
                       **result.blocks, "metrics": result.metrics, "temperature_curve": result.temperature_curve},
                      f, indent=2)
        stem = os.path.splitext(args.output)[0]
        if result.confusion is not None:
            write_confusion_csv(stem + "_confusion.csv", result.classnames, result.confusion)
            confusion_matrices(stem + "_confusion.png", {model.name: (result.classnames, result.confusion)})
        for scoring, failures in result.failures.items():
            failure_sheet(f"{stem}_failures_{scoring}.png", failures, f"{model.name}: {scoring} scoring got these "
                                                                      f"wrong")


def run_compare(args: argparse.Namespace) -> None:
    compare(args.models, args.tasks, _options(args), args.output_dir, args.device)
    print(f"report: {os.path.join(args.output_dir, 'report.md')}")


def run_search(args: argparse.Namespace) -> None:
    model = load_eval_model(args.model, args.device)
    hits = search(model, args.images, args.query, args.k, args.cache_dir, args.batch_size, args.num_workers)
    contact_sheet(hits, args.query, args.sheet)
    print(json.dumps(hits, indent=2))


COMMANDS = {"eval": run_eval, "compare": run_compare, "search": run_search}


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    # sklearn's convergence advice and similar library chatter would bury the results
    warnings.filterwarnings("ignore", module="sklearn")
    try:
        COMMANDS[args.command](args)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
