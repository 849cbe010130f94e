"""`compare`'s report table, written out by hand for known results."""
from clipfromscratch.eval.compare import report_table
from clipfromscratch.eval.tasks import TaskResult


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
