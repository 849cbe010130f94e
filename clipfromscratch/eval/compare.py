"""`compare`: the same tasks on several models with the same data -> report.md, results.json and plots."""
from __future__ import annotations

import json
import os
import re
from dataclasses import asdict

from clipfromscratch.errors import UsageError
from clipfromscratch.eval import plots
from clipfromscratch.eval.models import load_eval_model
from clipfromscratch.eval.tasks import EvalOptions, Evaluation, TaskResult, check_tasks, run_task

# descriptions, not scores: no "best" among them
UNRANKED = ("num_prompts", "max_entropy", "mean_entropy", "logreg_C", "n_items", "chance")


def is_ranked(metric: str) -> bool:
    return metric.rsplit("/", 1)[-1] not in UNRANKED


def in_report(metric: str) -> bool:
    """Per-class F1 stays in results.json: a hundred rows would bury the comparison."""
    return not metric.startswith("f1/")


def file_slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "_", name).strip("_")


def report_table(results: dict[str, dict[str, TaskResult]]) -> str:
    """Markdown: one row per task/metric, one column per model, the best value of a ranked row in bold."""
    models = list(next(iter(results.values())))
    lines = ["| task / metric | " + " | ".join(models) + " |", "|---|" + "---:|" * len(models)]
    for task, by_model in results.items():
        metrics = [m for m in by_model[models[0]].metrics if in_report(m)]
        for metric in metrics:
            values = [by_model[model].metrics.get(metric) for model in models]
            best = max((v for v in values if v is not None), default=None) if is_ranked(metric) else None
            cells = ["–" if v is None else (f"**{v:.4f}**" if v == best and len(models) > 1 else f"{v:.4f}")
                     for v in values]
            lines.append(f"| {task} / {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_outputs(results: dict[str, dict[str, TaskResult]], options: EvalOptions, output_dir: str) -> list[str]:
    """report.md, results.json, a bar chart per task, confusion matrices and the temperature curve; returns files."""
    os.makedirs(output_dir, exist_ok=True)
    written = []

    def path(name: str) -> str:
        written.append(os.path.join(output_dir, name))
        return written[-1]

    with open(path("results.json"), "w", encoding="utf-8") as f:
        json.dump({"options": asdict(options),
                   "results": {task: {m: r.metrics for m, r in by_model.items()} for task, by_model in results.items()},
                   "temperature_curves": {m: r.temperature_curve
                                          for m, r in results.get("class_agnostic", {}).items()}}, f, indent=2)
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
    with open(path("report.md"), "w", encoding="utf-8") as f:
        f.write(f"# Comparison on `{options.data}`" + (f" (label `{options.label}`)" if options.label else "")
                + "\n\n" + report_table(results) + "\n"
                + "Best value of each row in bold (entropies, prompt counts and the chosen C are not ranked). "
                  "Per-class F1 is in results.json.\n\n"
                + "".join(f"![{os.path.splitext(os.path.basename(p))[0]}]({os.path.basename(p)})\n"
                          for p in written if p.endswith(".png")))
    return written


def compare(model_specs: list[str], task_names: list[str], options: EvalOptions, output_dir: str,
            device: str = "cpu") -> dict[str, dict[str, TaskResult]]:
    """{task: {model name: result}}, every model on the same data, written to `output_dir`."""
    check_tasks(task_names)
    if len(set(model_specs)) != len(model_specs):
        raise UsageError("a model is named twice in --models")
    models = [load_eval_model(spec, device) for spec in model_specs]  # every SPEC checked before any long run
    results: dict[str, dict[str, TaskResult]] = {task: {} for task in task_names}
    for model in models:
        evaluation = Evaluation(model, options)
        for task in task_names:
            results[task][model.name] = run_task(task, evaluation)
    write_outputs(results, options, output_dir)
    return results
