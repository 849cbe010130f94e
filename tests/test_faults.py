"""Bad input and damaged files for eval, compare, search, train-dcsm and data_prep, run as a user runs them: each
is one line `error: ...` on stderr, exit code 2, no traceback, and finished work is kept (or never started)."""
import json
import os
import runpy
import shutil
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_eval_models import export_tiny_ours, save_tiny_openai

from clipfromscratch import load_model
from clipfromscratch.cli import main
from clipfromscratch.data.samples import SHOWN_PER_REASON
from clipfromscratch.export import checkpoint_entries

REPO = Path(__file__).resolve().parents[1]


def truncate(path: Path, size: int | None = None) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2 if size is None else size])


def edit_json(path: Path, change) -> None:
    value = json.loads(path.read_text())
    change(value)
    path.write_text(json.dumps(value))


def variant(root: Path, source: str, name: str, damage) -> str:
    """A copy of the model at `source`, damaged by `damage(folder)`."""
    folder = root / name
    shutil.copytree(source, folder)
    damage(folder)
    return str(folder)


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict[str, str]:
    """Good and damaged models and data, by name (the {names} of the cases)."""
    root = tmp_path_factory.mktemp("faults")
    ours, openai = export_tiny_ours(root / "ours"), save_tiny_openai(root / "openai")
    model = load_model(ours)
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    state.pop("model.image_head.weight")
    torch.save({"state_dict": state, **checkpoint_entries(model)}, root / "mismatch.ckpt")
    (root / "garbage.ckpt").write_bytes(b"not a checkpoint")
    dcsm = root / "dcsm"  # what train-dcsm writes for an openai: model, with the head's files damaged below
    dcsm.mkdir()
    (dcsm / "dcsm.json").write_text(json.dumps({"family": "openai", "image_tokens": 17, "text_tokens": 30}))
    (dcsm / "dcsm.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    shutil.copytree(openai, dcsm / "base")
    (root / "not_a.tar").write_text("hi\n")
    (root / "empty.tar").write_bytes(b"")
    for name in ("red_thing", "blue_thing"):
        (root / "broken" / name).mkdir(parents=True)
        for i in range(2):
            (root / "broken" / name / f"{i}.png").write_bytes(b"not a png")
    for name, colour in (("red_thing", (200, 30, 30)), ("blue_thing", (30, 30, 200))):
        (root / "one_each" / name).mkdir(parents=True)
        Image.new("RGB", (20, 20), colour).save(root / "one_each" / name / "0.png")
    (root / "templates.bin").write_bytes(b"\xff\xfe\x00a photo of {c}")
    (root / "photos").mkdir()
    Image.new("RGB", (20, 20), (200, 30, 30)).save(root / "photos" / "red.png")
    (root / "pairs.tsv").write_text("filepath\tcaption\nphotos/red.png\ta red square\n")
    (root / "a_file").write_text("finished work")
    (root / "other").mkdir()
    (root / "other" / "notes.txt").write_text("not a model")
    return {
        "root": str(root), "ours": ours, "openai": openai, "mismatch_ckpt": str(root / "mismatch.ckpt"),
        "garbage_ckpt": str(root / "garbage.ckpt"), "not_a_tar": str(root / "not_a.tar"),
        "empty_tar": str(root / "empty.tar"), "broken": str(root / "broken"), "photos": str(root / "photos"),
        "one_each": str(root / "one_each"), "templates_bin": str(root / "templates.bin"),
        "pairs": str(root / "pairs.tsv"), "a_file": str(root / "a_file"), "other": str(root / "other"),
        "truncated_weights": variant(root, ours, "truncated_weights", lambda d: truncate(d / "model.safetensors")),
        "empty_weights": variant(root, ours, "empty_weights", lambda d: truncate(d / "model.safetensors", 0)),
        "no_weights": variant(root, ours, "no_weights", lambda d: os.remove(d / "model.safetensors")),
        "config_not_json": variant(root, ours, "config_not_json", lambda d: (d / "config.json").write_text("{oops")),
        "config_wrong_type": variant(root, ours, "config_wrong_type", lambda d: edit_json(
            d / "config.json", lambda c: c["model"].update(embed_dim="wide"))),
        "config_missing_key": variant(root, ours, "config_missing_key", lambda d: edit_json(
            d / "config.json", lambda c: c.pop("text_config"))),
        "no_tokenizer": variant(root, ours, "no_tokenizer", lambda d: shutil.rmtree(d / "tokenizer")),
        "tokenizer_damaged": variant(root, ours, "tokenizer_damaged",
                                     lambda d: (d / "tokenizer" / "tokenizer.json").write_text("garbage")),
        "weights_misfit": variant(root, ours, "weights_misfit", lambda d: edit_json(
            d / "config.json", lambda c: c["model"].update(embed_dim=16))),
        "openai_config_damaged": variant(root, openai, "openai_config_damaged",
                                         lambda d: (d / "config.json").write_text("garbage")),
        "openai_weights_truncated": variant(root, openai, "openai_weights_truncated",
                                            lambda d: truncate(d / "model.safetensors")),
        "dcsm_json_damaged": variant(root, str(dcsm), "dcsm_json_damaged",
                                     lambda d: (d / "dcsm.json").write_text("{")),
        "dcsm_sizes_wrong": variant(root, str(dcsm), "dcsm_sizes_wrong", lambda d: edit_json(
            d / "dcsm.json", lambda c: c.update(image_tokens="many"))),
        "dcsm_weights_damaged": str(dcsm),
    }


EVAL = ["eval", "--task", "retrieval", "--num-samples", "8", "--model"]
DCSM = ["train-dcsm", "--model", "{ours}", "--max-steps", "2", "--eval-items", "4"]
SEARCH = ["search", "--images", "{photos}", "--cache-dir", "{root}/cache", "--model"]
EXPORT = ["export", "--format", "hf", "--model"]


def nothing_ran(out: str, files: dict) -> None:
    assert out == "", out  # no model was run: eval prints its metrics, compare a line per finished task


def file_kept(out: str, files: dict) -> None:
    assert Path(files["a_file"]).read_text() == "finished work"


def other_files_kept(out: str, files: dict) -> None:
    assert os.listdir(files["other"]) == ["notes.txt"]


def finished_results_written(out: str, files: dict) -> None:
    results = json.loads(Path(files["root"], "kept", "results.json").read_text())["results"]
    assert set(results) == {"retrieval"} and 0 <= results["retrieval"][files["ours"]]["image_retrieval_recall@1"] <= 1
    assert "| retrieval / image_retrieval_recall@1 |" in Path(files["root"], "kept", "report.md").read_text()
    assert f"{files['ours']} / retrieval: done in" in out


# (id, command line with {paths}, phrase of the error, check of what was kept)
COMMANDS = [
    ("eval-data-not-a-tar", [*EVAL, "{ours}", "--data", "{not_a_tar}"], "no readable shards in", None),
    ("eval-data-zero-byte-tar", [*EVAL, "{ours}", "--data", "{empty_tar}"], "do not open as tar files", None),
    ("eval-images-all-unreadable", ["eval", "--model", "{ours}", "--task", "zeroshot", "--data",
                                    "imagefolder:{broken}"], "no readable images to encode: all 4 samples", None),
    ("eval-probe-on-too-few-images", ["eval", "--model", "{ours}", "--task", "linear_probe", "--data",
                                      "imagefolder:{one_each}"], "too few images or classes to fit a probe", None),
    ("eval-templates-file-not-text", ["eval", "--model", "{ours}", "--task", "zeroshot", "--data",
                                      "imagefolder:{one_each}", "--templates", "{templates_bin}"],
     "cannot read template file", None),
    ("eval-output-unwritable", [*EVAL, "{ours}", "--output", "{unwritable}/r.json"], "cannot write there",
     nothing_ran),
    ("eval-output-is-a-folder", [*EVAL, "{ours}", "--output", "{root}"], "is a folder: give a file name",
     nothing_ran),
    ("eval-weights-truncated", [*EVAL, "{truncated_weights}"], "model.safetensors is damaged or incomplete", None),
    ("eval-weights-zero-bytes", [*EVAL, "{empty_weights}"], "model.safetensors is damaged or incomplete", None),
    ("eval-weights-missing", [*EVAL, "{no_weights}"], "the weights are missing", None),
    ("eval-config-not-json", [*EVAL, "{config_not_json}"], "config.json is not valid JSON", None),
    ("eval-config-wrong-type", [*EVAL, "{config_wrong_type}"], "option embed_dim expects int, got 'wide'", None),
    ("eval-config-missing-key", [*EVAL, "{config_missing_key}"], "config.json has no 'text_config'", None),
    ("eval-tokenizer-missing", [*EVAL, "{no_tokenizer}"], "tokenizer not found", None),
    ("eval-tokenizer-damaged", [*EVAL, "{tokenizer_damaged}"], "cannot load tokenizer", None),
    ("eval-weights-do-not-fit-config", [*EVAL, "{weights_misfit}"], "does not fit its config: RuntimeError", None),
    ("eval-checkpoint-state-dict-mismatch", [*EVAL, "{mismatch_ckpt}"], "do not fit its model config", None),
    ("eval-checkpoint-garbage", [*EVAL, "{garbage_ckpt}"], "cannot read checkpoint", None),
    ("eval-openai-config-damaged", [*EVAL, "openai:{openai_config_damaged}"], "is not a valid JSON file", None),
    ("eval-openai-weights-truncated", [*EVAL, "openai:{openai_weights_truncated}"], "is damaged or incomplete",
     None),
    ("eval-dcsm-json-damaged", [*EVAL, "{dcsm_json_damaged}"], "dcsm.json is not valid JSON", None),
    ("eval-dcsm-sizes-wrong", [*EVAL, "{dcsm_sizes_wrong}"], "a DCSM head needs image_tokens and text_tokens", None),
    ("eval-dcsm-weights-damaged", [*EVAL, "{dcsm_weights_damaged}"], "dcsm.safetensors is damaged", None),
    ("eval-device-unknown", [*EVAL, "{ours}", "--device", "tpu"], "--device tpu", nothing_ran),
    ("eval-unknown-flag", [*EVAL, "{ours}", "--bogus"], "unrecognized arguments: --bogus", nothing_ran),
    ("compare-output-dir-unwritable", ["compare", "--models", "{ours}", "--tasks", "retrieval", "--output-dir",
                                       "{unwritable}/cmp"], "cannot write there", nothing_ran),
    ("compare-output-dir-is-a-file", ["compare", "--models", "{ours}", "--output-dir", "{a_file}"],
     "is a file: give a folder", file_kept),
    ("compare-second-model-damaged", ["compare", "--models", "{ours}", "{truncated_weights}", "--output-dir",
                                      "{root}/cmp"], "is damaged or incomplete", nothing_ran),
    ("compare-later-task-fails-keeps-finished", ["compare", "--models", "{ours}", "--tasks", "retrieval", "zeroshot",
                                                 "--num-samples", "8", "--output-dir", "{root}/kept"],
     "choose one with --label", finished_results_written),
    ("search-empty-query", [*SEARCH, "{ours}", "--query", ""], "--query is empty", nothing_ran),
    ("search-blank-query", [*SEARCH, "{ours}", "--query", "   "], "--query is empty", nothing_ran),
    ("search-k-zero", [*SEARCH, "{ours}", "--query", "red", "-k", "0"], "option k is 0: it must be at least 1",
     nothing_ran),
    ("search-sheet-unwritable", [*SEARCH, "{ours}", "--query", "red", "--sheet", "{unwritable}/s.png"],
     "cannot write there", nothing_ran),
    ("search-sheet-not-an-image-name", [*SEARCH, "{ours}", "--query", "red", "--sheet", "{root}/sheet.txt"],
     "give an image file name", nothing_ran),
    ("search-model-config-damaged", [*SEARCH, "{config_not_json}", "--query", "red"], "is not valid JSON", None),
    ("dcsm-output-is-a-file", [*DCSM, "--output", "{a_file}"], "is a file: give a folder", file_kept),
    ("dcsm-output-holds-other-files", [*DCSM, "--output", "{other}"], "holds files that are not a model",
     other_files_kept),
    ("dcsm-output-unwritable", [*DCSM, "--output", "{unwritable}/head"], "cannot write there", nothing_ran),
    ("dcsm-max-steps-not-a-number", [*DCSM, "--output", "{root}/head", "--max-steps", "many"],
     "option max_steps expects int, got 'many'", nothing_ran),
    ("dcsm-batch-size-one", [*DCSM, "--output", "{root}/head", "--batch-size", "1"],
     "option batch_size is 1: it must be at least 2", nothing_ran),
    ("dcsm-lr-nan", [*DCSM, "--output", "{root}/head", "--lr", "nan"], "option lr is nan: it must be above 0",
     nothing_ran),
    ("dcsm-eval-items-zero", [*DCSM, "--output", "{root}/head", "--eval-items", "0"],
     "option eval_items is 0: it must be at least 1", nothing_ran),
    ("dcsm-model-weights-truncated", ["train-dcsm", "--model", "{truncated_weights}", "--output", "{root}/head"],
     "is damaged or incomplete", nothing_ran),
    ("dcsm-data-not-a-tar", [*DCSM, "--output", "{root}/head", "--data", "{not_a_tar}"], "no readable shards",
     nothing_ran),
    # export: every location checked before the model is read; a model a format cannot hold leaves nothing
    ("export-output-unwritable", [*EXPORT, "{ours}", "--output", "{unwritable}/hf"], "cannot write there",
     nothing_ran),
    ("export-output-is-a-file", [*EXPORT, "{ours}", "--output", "{a_file}"], "is a file: give a folder", file_kept),
    ("export-output-holds-other-files", [*EXPORT, "{ours}", "--output", "{other}"], "exists and is not empty",
     other_files_kept),
    ("export-model-missing", [*EXPORT, "{root}/no-such-run", "--output", "{root}/hf"], "unknown model", nothing_ran),
    ("export-weights-truncated", [*EXPORT, "{truncated_weights}", "--output", "{root}/hf"], "is damaged or incomplete",
     nothing_ran),
    ("export-checkpoint-garbage", [*EXPORT, "{garbage_ckpt}", "--output", "{root}/hf"], "cannot read checkpoint",
     nothing_ran),
    ("export-format-unknown", ["export", "--model", "{ours}", "--format", "onnx", "--output", "{root}/x"],
     "invalid choice: 'onnx'", nothing_ran),
    ("export-open-clip-cannot-hold-it", ["export", "--model", "{ours}", "--format", "open_clip", "--output",
                                         "{root}/oc"], "tiny vit preset is built with timm arguments", nothing_ran),
]


def fill(args: list[str], paths: dict) -> list[str]:
    return [arg.format(**paths) for arg in args]


def assert_one_line_error(code: int, out: str, err: str, phrase: str, logged: list) -> None:
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert 1 <= len(lines) <= 3 and lines[0].startswith("error: ") and phrase in lines[0], err
    assert "Traceback" not in out + err
    # what the log adds on a terminal: a few examples of skipped samples and one line that counts the rest
    assert len(logged) <= SHOWN_PER_REASON + 2, logged


@pytest.mark.parametrize("args, phrase, kept", [case[1:] for case in COMMANDS], ids=[case[0] for case in COMMANDS])
def test_commands_answer_in_one_line(paths, unwritable_dir, capsys, caplog, args, phrase, kept):
    files = {**paths, "unwritable": unwritable_dir}
    code = main(fill(args, files))
    out, err = capsys.readouterr()
    assert_one_line_error(code, out, err, phrase, caplog.records)
    if kept:
        kept(out, files)


# data_prep scripts, run as files the way a user runs them
PREP = [
    ("prep-tsv-output-unwritable", "tsv_to_shards.py", ["--input", "{pairs}", "--output", "{unwritable}/shards"],
     "--output {unwritable}/shards: cannot write there"),
    ("prep-coco-output-unwritable", "coco.py", ["--annotations", "{root}", "--images", "{root}", "--output",
                                                "{unwritable}/coco"], "cannot write there"),
    ("prep-fashion-output-unwritable", "fashion.py", ["--styles", "{pairs}", "--images", "{photos}", "--output",
                                                      "{unwritable}/fashion"], "cannot write there"),
    ("prep-output-is-a-file", "tsv_to_shards.py", ["--input", "{pairs}", "--output", "{a_file}"],
     "is a file: give a folder"),
    ("prep-workers-not-a-number", "tsv_to_shards.py", ["--input", "{pairs}", "--output", "{root}/s", "--workers",
                                                       "all"], "argument --workers: invalid int value: 'all'"),
    ("prep-missing-input-flag", "tsv_to_shards.py", ["--output", "{root}/s"],
     "the following arguments are required: --input"),
]


@pytest.mark.parametrize("script, args, phrase", [case[1:] for case in PREP], ids=[case[0] for case in PREP])
def test_data_prep_scripts_answer_in_one_line(paths, unwritable_dir, monkeypatch, capsys, caplog, script, args,
                                              phrase):
    files = {**paths, "unwritable": unwritable_dir}
    monkeypatch.setattr(sys, "argv", [script, *fill(args, files)])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(REPO / "data_prep" / script), run_name="__main__")
    out, err = capsys.readouterr()
    assert_one_line_error(exit_.value.code, out, err, phrase.format(**files), caplog.records)
    assert Path(files["a_file"]).read_text() == "finished work"
