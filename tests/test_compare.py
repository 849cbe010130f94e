"""`compare`'s report table, written out by hand for known results; its output folder checked first."""
import json

import pytest

from clipfromscratch.errors import UsageError
from clipfromscratch.eval import compare as compare_module
from clipfromscratch.eval.compare import compare, report_table, write_outputs
from clipfromscratch.eval.tasks import EvalOptions, TaskResult


def test_report_table_puts_the_best_of_each_ranked_row_in_bold():
    results = {
        "zeroshot": {"a": TaskResult({"acc1": 0.5, "f1/red": 0.25, "macro_f1": 0.4}),
                     "b": TaskResult({"acc1": 0.75, "f1/red": 0.5, "macro_f1": 0.4})},
        "class_agnostic": {"a": TaskResult({"max_entropy": 3.0, "svm_acc1": 0.2}),
                           "b": TaskResult({"max_entropy": 3.5})},
    }
    assert report_table(results) == (
        "| task / metric | a | b |\n"
        "|---|---:|---:|\n"
        "| zeroshot / acc1 | 0.5000 | **0.7500** |\n"
        "| zeroshot / macro_f1 | **0.4000** | **0.4000** |\n"  # a tie: both are the best
        "| class_agnostic / max_entropy | 3.0000 | 3.5000 |\n"  # a description, not a score: never bold
        "| class_agnostic / svm_acc1 | **0.2000** | – |\n"  # a model without the metric gets a dash
    )  # per-class F1 stays out of the table


def test_one_model_has_nothing_to_be_best_against():
    assert report_table({"zeroshot": {"a": TaskResult({"acc1": 0.5})}}) == (
        "| task / metric | a |\n|---|---:|\n| zeroshot / acc1 | 0.5000 |\n")


def test_rows_are_every_metric_of_any_model_in_order_of_first_appearance():
    # a model with a DCSM head has a second block of metrics the other lacks
    results = {"compositional": {"base": TaskResult({"cosine/acc": 0.25}),
                                 "base+dcsm": TaskResult({"cosine/acc": 0.25, "dcsm/acc": 0.5})}}
    assert report_table(results) == (
        "| task / metric | base | base+dcsm |\n"
        "|---|---:|---:|\n"
        "| compositional / cosine/acc | **0.2500** | **0.2500** |\n"
        "| compositional / dcsm/acc | – | **0.5000** |\n")


def test_the_output_folder_is_checked_before_any_model_is_loaded(unwritable_dir, monkeypatch):
    def load_eval_model(spec, device):
        raise AssertionError("a model was loaded before the output folder was checked")

    monkeypatch.setattr(compare_module, "load_eval_model", load_eval_model)
    with pytest.raises(UsageError, match="--output-dir .*: cannot write there"):
        compare(["m"], ["zeroshot"], EvalOptions(), f"{unwritable_dir}/cmp")


def test_results_are_written_whole(tmp_path, monkeypatch):
    write_outputs({"linear_probe": {"a": TaskResult({"acc1": 0.5})}}, EvalOptions(), str(tmp_path))
    before = (tmp_path / "results.json").read_text()

    def fail(*args, **kwargs):
        raise ValueError("simulated failure while the results are written")

    monkeypatch.setattr(json, "dumps", fail)
    with pytest.raises(ValueError, match="simulated"):
        write_outputs({"linear_probe": {"b": TaskResult({"acc1": 0.75})}}, EvalOptions(), str(tmp_path))
    assert (tmp_path / "results.json").read_text() == before  # the earlier results, not an emptied file
