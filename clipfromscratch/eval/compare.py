"""`compare`: the same tasks on several models with the same data -> report.md, results.json and plots.

The output folder is checked before any model is loaded; each (model, task) prints a line as it finishes, and
when a later one fails, what finished is written before the error is reported.
"""
from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict

from clipfromscratch.errors import UsageError, usage_message
from clipfromscratch.eval import plots
from clipfromscratch.eval.models import load_eval_model
from clipfromscratch.eval.tasks import EvalOptions, Evaluation, TaskResult, check_tasks, run_task
from clipfromscratch.outputs import check_output_dir, write_text_atomic

# descriptions, not scores: no "best" among them
UNRANKED = ("num_prompts", "max_entropy", "mean_entropy", "logreg_C", "n_items", "chance")


def is_ranked(metric: str) -> bool:
    return metric.rsplit("/", 1)[-1] not in UNRANKED


def in_report(metric: str) -> bool:
    """Per-class F1 stays in results.json: a hundred rows would bury the comparison."""
    return not metric.startswith("f1/")


def file_slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "_", name).strip("_")


def in_order_of_appearance(keys) -> list:
    return list(dict.fromkeys(keys))


def report_table(results: dict[str, dict[str, TaskResult]]) -> str:
    """Markdown: one row per task/metric that any model has, in order of first appearance, one column per model
    ("–" where a model lacks the metric), the best value of a ranked row in bold."""
    models = in_order_of_appearance(model for by_model in results.values() for model in by_model)
    lines = ["| task / metric | " + " | ".join(models) + " |", "|---|" + "---:|" * len(models)]
    for task, by_model in results.items():
        metrics = in_order_of_appearance(m for r in by_model.values() for m in r.metrics if in_report(m))
        for metric in metrics:
            values = [by_model[model].metrics.get(metric) if model in by_model else None for model in models]
            best = max((v for v in values if v is not None), default=None) if is_ranked(metric) else None
            cells = ["–" if v is None else (f"**{v:.4f}**" if v == best and len(models) > 1 else f"{v:.4f}")
                     for v in values]
            lines.append(f"| {task} / {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_outputs(results: dict[str, dict[str, TaskResult]], options: EvalOptions, output_dir: str) -> list[str]:
    """report.md, results.json, a bar chart per task, confusion matrices and the temperature curve; returns files.
    results.json and report.md are written whole or not at all."""
    os.makedirs(output_dir, exist_ok=True)
    written = []

    def path(name: str) -> str:
        written.append(os.path.join(output_dir, name))
        return written[-1]

    write_text_atomic(path("results.json"), json.dumps({
        "options": asdict(options),
        "results": {task: {m: r.metrics for m, r in by_model.items()} for task, by_model in results.items()},
        "temperature_curves": {m: r.temperature_curve for m, r in results.get("class_agnostic", {}).items()}},
        indent=2))
    for task, by_model in results.items():
        plots.metric_bars(path(f"{task}.png"), task, {
            model: {k: v for k, v in r.metrics.items() if in_report(k) and is_ranked(k)}
            for model, r in by_model.items()})
    if "zeroshot" in results:
        matrices = {model: (r.classnames, r.confusion) for model, r in results["zeroshot"].items()}
        plots.confusion_matrices(path("zeroshot_confusion.png"), matrices)
        for model, (classnames, confusion) in matrices.items():
            plots.write_confusion_csv(path(f"zeroshot_confusion_{file_slug(model)}.csv"), classnames, confusion)
    if "class_agnostic" in results:
        plots.temperature_curves(path("temperature.png"),
                                 {model: r.temperature_curve for model, r in results["class_agnostic"].items()})
    write_text_atomic(path("report.md"),
                      f"# Comparison on `{options.data}`" + (f" (label `{options.label}`)" if options.label else "")
                      + "\n\n" + report_table(results) + "\n"
                      + "Best value of each row in bold (entropies, prompt counts and the chosen C are not ranked). "
                        "Per-class F1 is in results.json.\n\n"
                      + "".join(f"![{os.path.splitext(os.path.basename(p))[0]}]({os.path.basename(p)})\n"
                                for p in written if p.endswith(".png")))
    return written


def compare(model_specs: list[str], task_names: list[str], options: EvalOptions, output_dir: str,
            device: str = "cpu") -> dict[str, dict[str, TaskResult]]:
    """{task: {model name: result}}, every model on the same data, written to `output_dir`; a line per (model,
    task) on stdout as it finishes."""
    check_tasks(task_names)
    if len(set(model_specs)) != len(model_specs):
        raise UsageError("a model is named twice in --models")
    check_output_dir(output_dir, "--output-dir")
    models = [load_eval_model(spec, device) for spec in model_specs]  # every SPEC checked before any long run
    results: dict[str, dict[str, TaskResult]] = {task: {} for task in task_names}
    try:
        for model in models:
            evaluation = Evaluation(model, options)
            for task in task_names:
                started = time.perf_counter()
                results[task][model.name] = run_task(task, evaluation)
                print(f"{model.name} / {task}: done in {time.perf_counter() - started:.1f} s", flush=True)
    except UsageError as err:
        finished = {task: by_model for task, by_model in results.items() if by_model}
        if not finished:
            raise
        write_outputs(finished, options, output_dir)
        raise UsageError(f"{usage_message(err)} (what finished is in {os.path.join(output_dir, 'report.md')})"
                         ) from None
    write_outputs(results, options, output_dir)
    return results
