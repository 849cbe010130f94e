"""`clipfromscratch eval | compare | search | export` (declared in clipfromscratch.cli).

Flags -> EvalOptions (its flags made and checked by clipfromscratch.config, as training's) and models -> results
on disk and stdout. Every flag and output location is checked before a model is loaded; a bad one is one line
`error: ...` on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

import torch
from transformers.utils import logging as transformers_logging

from clipfromscratch.config import add_flags, options_of, section_from
from clipfromscratch.errors import CommandLineParser, UsageError, report
from clipfromscratch.eval.compare import compare
from clipfromscratch.eval.models import load_clip, load_eval_model, parse_device
from clipfromscratch.eval.plots import confusion_matrices, failure_sheet, write_confusion_csv
from clipfromscratch.eval.search import SearchOptions, check_query, check_sheet, contact_sheet, search
from clipfromscratch.eval.tasks import TASKS, EvalOptions, Evaluation, check_tasks, run_task
from clipfromscratch.formats import FORMATS, check_export_output, export_as
from clipfromscratch.outputs import check_output_file, write_text_atomic

EVAL_OPTIONS = options_of([EvalOptions])
# search reads no DATA (its --images is the folder it searches): of the evaluation options it takes those of
# encoding
SEARCH_OPTIONS = {name: EVAL_OPTIONS[name] for name in ("batch_size", "num_workers")}
# flags renamed or emptied of meaning, still accepted for one release with a one-line warning:
# dest -> (flag, what to say)
DEPRECATED = {"images_deprecated": ("--images", "eval and compare's --images is now --image-root (search's "
                                                "--images, the folder searched, stays)"),
              "seed_deprecated": ("--seed", "search --seed does nothing (a search draws nothing at random)")}


def _option_flags(parser: argparse.ArgumentParser, options: dict, deprecated: str | None = None) -> None:
    """The flags of `options` (of EvalOptions), made as training's are, where the model runs, and the
    `deprecated` flag of DEPRECATED the command still accepts."""
    add_flags(parser, options)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the model runs (default: cuda when there is a GPU, else cpu)")
    if deprecated:
        flag, said = DEPRECATED[deprecated]
        parser.add_argument(flag, dest=deprecated, default=argparse.SUPPRESS,
                            help=f"deprecated, removed in the next release: {said}")


def _options(args: argparse.Namespace) -> EvalOptions:
    """The command's EvalOptions, a deprecated flag given warned about in one line (and --images taken)."""
    values = vars(args)
    for dest, (flag, said) in DEPRECATED.items():
        if dest in values:
            print(f"warning: {said}; {flag} goes in the next release", file=sys.stderr, flush=True)
    if "images_deprecated" in values:
        values.setdefault("image_root", values["images_deprecated"])
    return section_from(EvalOptions, values)


def parser() -> argparse.ArgumentParser:
    """The parsers of `eval`, `compare`, `search` and `export` (the commands clipfromscratch.cli routes here)."""
    root = CommandLineParser(prog="clipfromscratch")
    commands = root.add_subparsers(dest="command", required=True)
    model_help = "an export directory, a .ckpt, openai:<hub name or dir>, or openclip:<arch>/<tag> or <dir>"

    evaluate = commands.add_parser("eval")
    evaluate.add_argument("--model", required=True, help=model_help)
    evaluate.add_argument("--task", required=True, help=" | ".join(TASKS))
    evaluate.add_argument("--output", help="results JSON file (zeroshot: the confusion matrix goes beside it)")
    _option_flags(evaluate, EVAL_OPTIONS, "images_deprecated")

    comparison = commands.add_parser("compare")
    comparison.add_argument("--models", nargs="+", required=True, help=model_help)
    comparison.add_argument("--tasks", nargs="+", default=["zeroshot", "linear_probe"], help=" | ".join(TASKS))
    comparison.add_argument("--output-dir", required=True)
    _option_flags(comparison, EVAL_OPTIONS, "images_deprecated")

    finder = commands.add_parser("search")
    finder.add_argument("--model", required=True, help=model_help)
    finder.add_argument("--images", dest="folder", required=True, help="folder searched, with its subfolders")
    finder.add_argument("--query", required=True)
    add_flags(finder, options_of([SearchOptions]), short_flags={"k": "-k"})
    _option_flags(finder, SEARCH_OPTIONS, "seed_deprecated")

    exporter = commands.add_parser("export")
    exporter.add_argument("--model", required=True, help="a run folder (its final/ export), an export directory "
                                                         "or a .ckpt")
    exporter.add_argument("--format", required=True, choices=sorted(FORMATS),
                          help="open_clip: a folder open_clip loads as local-dir:DIR; hf: a folder transformers "
                               "loads with AutoModel.from_pretrained(DIR, trust_remote_code=True)")
    exporter.add_argument("--output", required=True, help="the new folder (must not exist, or be empty)")
    return root


def run_eval(args: argparse.Namespace) -> None:
    options, device = _options(args), parse_device(args.device)
    check_tasks([args.task])
    if args.output:
        check_output_file(args.output, "--output")
    model = load_eval_model(args.model, device)
    result = run_task(args.task, Evaluation(model, options))
    print(json.dumps(result.metrics, indent=2), flush=True)
    if args.output:
        write_text_atomic(args.output, json.dumps({
            "model": model.name, "task": args.task, "data": options.data, "label": options.label, **result.blocks,
            "metrics": result.metrics, "temperature_curve": result.temperature_curve}, indent=2))
        stem = os.path.splitext(args.output)[0]
        if result.confusion is not None:
            write_confusion_csv(stem + "_confusion.csv", result.classnames, result.confusion)
            confusion_matrices(stem + "_confusion.png", {model.name: (result.classnames, result.confusion)})
        for scoring, failures in result.failures.items():
            failure_sheet(f"{stem}_failures_{scoring}.png", failures, f"{model.name}: {scoring} scoring got these "
                                                                      f"wrong")


def run_compare(args: argparse.Namespace) -> None:
    compare(args.models, args.tasks, _options(args), args.output_dir,
            parse_device(args.device))
    print(f"report: {os.path.join(args.output_dir, 'report.md')}")


def run_search(args: argparse.Namespace) -> None:
    options, device = _options(args), parse_device(args.device)
    found = section_from(SearchOptions, vars(args))
    check_query(args.query)
    check_sheet(found.sheet)
    model = load_eval_model(args.model, device)
    hits = search(model, args.folder, args.query, found.k, found.cache_dir, options.batch_size, options.num_workers)
    print(json.dumps(hits, indent=2), flush=True)  # the ranking first: it is the answer, the sheet shows it
    contact_sheet(hits, args.query, found.sheet)


def run_export(args: argparse.Namespace) -> None:
    check_export_output(args.output)
    run_export_dir = os.path.join(args.model, "final")
    model = load_clip(run_export_dir if os.path.isdir(run_export_dir) else args.model, torch.device("cpu"))
    largest = export_as(model, args.format, args.output)
    print(f"{args.format} export: {args.output} (its embeddings differ from ours by at most {largest:.1e})")


COMMANDS = {"eval": run_eval, "compare": run_compare, "search": run_search, "export": run_export}


def main(argv: list[str]) -> int:
    # sklearn's convergence advice, transformers' bars for reading a local file and similar library chatter would
    # bury the results
    warnings.filterwarnings("ignore", module="sklearn")
    transformers_logging.disable_progress_bar()
    try:
        args = parser().parse_args(argv)
        COMMANDS[args.command](args)
    except UsageError as err:
        return report(err)
    return 0
