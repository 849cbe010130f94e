"""`eval` and `compare` from the command line: outputs on disk, and one-line errors for bad input."""
import csv
import json
import os

import pytest
from PIL import Image
from test_eval_models import export_tiny_ours, save_tiny_openai

from clipfromscratch.cli import main
from clipfromscratch.config import section_from
from clipfromscratch.eval.cli import parser
from clipfromscratch.eval.tasks import EvalOptions

RED, BLUE = (220, 30, 30), (30, 40, 220)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return export_tiny_ours(root / "ours"), "openai:" + save_tiny_openai(root / "openai")


@pytest.fixture
def folder(tmp_path):
    """An ImageFolder of 2 classes x 8 images, the class in the colour (and class names with underscores)."""
    for name, colour in (("red_thing", RED), ("blue_thing", BLUE)):
        (tmp_path / "images" / name).mkdir(parents=True)
        for i in range(8):
            Image.new("RGB", (30 + i, 30), tuple(min(255, c + 3 * i) for c in colour)).save(
                tmp_path / "images" / name / f"{i}.png")
    return tmp_path / "images"


def test_compare_writes_a_report_for_two_models(models, tmp_path, capsys):
    ours, openai = models
    out = tmp_path / "cmp"
    code = main(["compare", "--models", ours, openai, "--tasks", "retrieval", "zeroshot", "class_agnostic",
                 "--data", "synthetic", "--label", "colour", "--num-samples", "48", "--output-dir", str(out)])
    printed, err = capsys.readouterr()
    assert code == 0, err
    # a line per model and task as it finishes, before the report
    progress = [line.split(": done in ")[0] for line in printed.splitlines() if ": done in " in line]
    assert progress == [f"{m} / {t}" for m in (ours, openai) for t in ("retrieval", "zeroshot", "class_agnostic")]
    report = (out / "report.md").read_text()
    header = next(line for line in report.splitlines() if line.startswith("| task / metric"))
    assert ours in header and openai in header
    assert "| zeroshot / acc1 |" in report and "| retrieval / text_retrieval_recall@5 |" in report
    assert "**" in report.split("| zeroshot / acc1 |")[1].splitlines()[0]  # a best value in bold
    assert "**" not in report.split("| class_agnostic / max_entropy |")[1].splitlines()[0]  # not a score
    results = json.loads((out / "results.json").read_text())
    assert set(results["results"]) == {"retrieval", "zeroshot", "class_agnostic"}
    assert set(results["results"]["zeroshot"]) == {ours, openai}
    assert all(0 <= v <= 1 for v in results["results"]["retrieval"][ours].values())
    assert [p["tau"] for p in results["temperature_curves"][ours]] == [1.0, 0.5, 0.07, 0.03, 0.02]
    for plot in ("retrieval.png", "zeroshot.png", "class_agnostic.png", "zeroshot_confusion.png", "temperature.png"):
        with Image.open(out / plot) as image:
            assert image.width > 100
    assert len(list(out.glob("zeroshot_confusion_*.csv"))) == 2


def test_eval_tasks_on_an_image_folder(models, folder, tmp_path, capsys):
    ours, _ = models
    output = tmp_path / "zs.json"
    assert main(["eval", "--model", ours, "--task", "zeroshot", "--data", f"imagefolder:{folder}",
                 "--templates", "cifar", "--output", str(output)]) == 0
    saved = json.loads(output.read_text())
    assert saved["task"] == "zeroshot" and set(saved["metrics"]) >= {"acc1", "macro_f1", "f1/red thing"}
    with open(tmp_path / "zs_confusion.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["true \\ predicted", "blue thing", "red thing"]
    assert sum(int(v) for row in rows[1:] for v in row[1:]) == 16
    assert (tmp_path / "zs_confusion.png").is_file()

    names = tmp_path / "names.txt"
    names.write_text("cobalt\n")
    assert main(["eval", "--model", ours, "--task", "zeroshot", "--data", f"imagefolder:{folder}",
                 "--classnames", str(names)]) == 2
    assert "has 1 class names, the data has 2 classes" in capsys.readouterr().err
    names.write_text("cobalt\ncrimson\n")  # in the sorted order of the folders: blue_thing, red_thing
    assert main(["eval", "--model", ours, "--task", "zeroshot", "--data", f"imagefolder:{folder}",
                 "--classnames", str(names)]) == 0
    assert {"f1/cobalt", "f1/crimson"} <= set(json.loads(capsys.readouterr().out))

    assert main(["eval", "--model", ours, "--task", "cluster", "--data", f"imagefolder:{folder}"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    # two colours that far apart: k-means on the embeddings, and on the class-agnostic logits, of even a random
    # model splits them exactly
    assert metrics == {f"{f}/{m}": 1.0 for f in ("image", "class_agnostic") for m in ("purity", "nmi", "ari")}


@pytest.mark.parametrize("args, message", [
    (["--task", "segmentation"], "unknown task 'segmentation'"),
    (["--task", "zeroshot", "--data", "imagefolder:/no/such/dir"], "imagefolder:/no/such/dir"),
    (["--task", "zeroshot", "--data", "synthetic"], "choose one with --label"),
    (["--task", "zeroshot", "--data", "synthetic", "--label", "shape", "--templates", "nope.txt"],
     "template file not found"),
    (["--task", "retrieval", "--data", "cifar10:/no/such/root"], "has labels but no captions"),
    (["--task", "zeroshot", "--data", "cifar10:/no/such/root"], "add --download"),
    (["--task", "zeroshot", "--num-samples", "0"], "option num_samples is 0: it must be at least 1"),
    (["--task", "zeroshot", "--batch-size", "many"], "option batch_size expects int, got 'many'"),
])
def test_bad_input_is_one_line_and_exit_2(models, args, message, capsys):
    assert main(["eval", "--model", models[0], *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1


def test_eval_flags_are_the_eval_options():
    args = vars(parser().parse_args(["eval", "--model", "m", "--task", "zeroshot", "--num-samples", "48",
                                     "--label", "shape", "--download", "--seed", "3"]))
    assert section_from(EvalOptions, args) == EvalOptions(label="shape", num_samples=48, seed=3, download=True)


@pytest.mark.parametrize("command", [["eval", "--model", "m", "--task", "zeroshot"],
                                     ["compare", "--models", "m", "--output-dir", "out"],
                                     ["search", "--model", "m", "--images", "x", "--query", "q"]],
                         ids=lambda command: command[0])
def test_every_command_checks_its_options_first_in_one_line(capsys, command):
    assert main([*command, "--num-workers", "-1"]) == 2
    assert capsys.readouterr().err.strip() == "error: option num_workers is -1: it must be at least 0"


def test_eval_output_in_a_new_folder_is_written_whole(models, tmp_path, capsys):
    output = tmp_path / "new" / "deeper" / "zs.json"
    assert main(["eval", "--model", models[0], "--task", "retrieval", "--num-samples", "8", "--output",
                 str(output)]) == 0
    assert json.loads(output.read_text())["metrics"] == json.loads(capsys.readouterr().out)
    assert os.listdir(output.parent) == ["zs.json"]  # nothing half-written beside it


def test_eval_output_that_cannot_be_written_stops_before_the_model_runs(models, unwritable_dir, capsys):
    assert main(["eval", "--model", models[0], "--task", "retrieval", "--output", f"{unwritable_dir}/zs.json"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(f"error: --output {unwritable_dir}") and "cannot write there" in err
