"""A self-contained export (safetensors weights, JSON config, tokenizer files) and `load_model`, no Lightning needed.

An export is written whole or not at all (beside its final name, then moved into place); reading a damaged one
(a truncated file, a config that is not JSON or lacks a field, weights that do not fit it) is a one-line
UsageError naming the file and what is wrong with it.
"""
from __future__ import annotations

import glob
import json
import os
import pickle
from dataclasses import asdict, replace

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model as load_safetensors
from safetensors.torch import save_model as save_safetensors
from transformers import AutoConfig

from clipfromscratch.config import ModelConfig, section_from
from clipfromscratch.dcsm import DenseScorer
from clipfromscratch.errors import UsageError, error_summary, first_line
from clipfromscratch.model import CLIP, build_model
from clipfromscratch.outputs import write_dir_atomic
from clipfromscratch.run_folder import checkpoint_file
from clipfromscratch.text_tokenizers import load_tokenizer, tokenizer_from_files, tokenizer_to_files

WEIGHTS, CONFIG, TOKENIZER_DIR = "model.safetensors", "config.json", "tokenizer"
# a DCSM head trained on a model of another family, and that model
HEAD_WEIGHTS, HEAD_CONFIG, BASE_DIR = "dcsm.safetensors", "dcsm.json", "base"


def rebuild_model(model_config: dict, tokenizer, text_config: dict) -> CLIP:
    """The architecture a saved model had, with random weights, built offline from what was saved; a UsageError
    saying what is wrong when the saved config cannot describe a model."""
    if not isinstance(model_config, dict) or not isinstance(text_config, dict):
        raise UsageError("its model config or text config is not a mapping")
    # each value checked as a flag's would be; the weights come from the file: never fetch published ones again
    config = replace(section_from(ModelConfig, model_config), pretrained_image=False, pretrained_text=False, init=None)
    text_config = dict(text_config)
    if "model_type" not in text_config:
        raise UsageError("its text config has no model_type")
    try:
        return build_model(config, tokenizer, AutoConfig.for_model(text_config.pop("model_type"), **text_config))
    except UsageError:
        raise
    except Exception as err:  # noqa: BLE001 - transformers, timm and torch reject a bad value with errors of their own
        raise UsageError(f"cannot build the model it describes ({error_summary(err)})") from None


def _load_tokenizer(directory: str):
    """An export's tokenizer; a missing or damaged one is a one-line UsageError naming its folder."""
    if not os.path.isdir(directory):
        raise UsageError(f"{directory} not found: the export has no tokenizer")
    return load_tokenizer(directory)


def check_safetensors(path: str) -> None:
    """A safetensors file whose header reads and covers the file exactly, else a one-line UsageError."""
    try:
        with safe_open(path, "pt"):
            pass
    except SafetensorError as err:
        raise UsageError(f"{path} is damaged or incomplete: {first_line(err)}") from None


def check_safetensors_in(directory: str) -> None:
    """Every safetensors file of a model folder another library will read, checked here so that a damaged one is
    named in one line, not in that library's words."""
    for path in glob.glob(os.path.join(glob.escape(directory), "*.safetensors")):
        check_safetensors(path)


def load_weights(module: torch.nn.Module, path: str, device: str | torch.device = "cpu") -> None:
    """Safetensors weights into `module`, or a one-line UsageError: the file is missing, damaged, or does not fit."""
    if not os.path.isfile(path):
        raise UsageError(f"{path} not found: the weights are missing")
    check_safetensors(path)
    try:
        load_safetensors(module, path, device=str(device))
    except RuntimeError as err:
        raise UsageError(f"{path} does not fit its config: {error_summary(err)}") from None


def load_state_dict(module: torch.nn.Module, state_dict: dict, path: str) -> None:
    """A checkpoint's weights into `module`, or a one-line UsageError naming `path` when they do not fit."""
    try:
        module.load_state_dict(state_dict)
    except RuntimeError as err:
        raise UsageError(f"the weights in {path} do not fit its model config: {error_summary(err)}") from None


def read_json_object(path: str) -> dict:
    """A JSON file that holds an object, else a one-line UsageError naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except OSError as err:
        raise UsageError(f"cannot read {path}: {err.strerror or err}") from None
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise UsageError(f"{path} is not valid JSON: {first_line(err)}") from None
    if not isinstance(value, dict):
        raise UsageError(f"{path} holds a JSON {type(value).__name__}, not an object")
    return value


def checkpoint_entries(model: CLIP) -> dict:
    """What a Lightning checkpoint carries besides the weights to rebuild `model`: its config and exact tokenizer."""
    return {"clip_model_config": asdict(model.config), "clip_tokenizer_files": tokenizer_to_files(model.tokenizer),
            "clip_text_config": model.text_tower.architecture()}


def read_checkpoint(path: str, map_location: str | torch.device = "cpu") -> dict:
    """A checkpoint's contents, read with `weights_only=True`: tensors and plain data only, never pickled code.

    Ours hold nothing else (the config as a dict, the tokenizer as JSON strings); a file that needs more is
    refused in one line, before anything in it runs.
    """
    path = checkpoint_file(path)  # of a sharded (FSDP) one: everything but the weights
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        reason = next((line for line in lines if "GLOBAL" in line), None)
        if reason is not None:
            raise UsageError(f"refused checkpoint {path}: it holds more than tensors and plain data, and loading it "
                             f"could run code ({reason})") from None
        detail = next((line for line in lines if line.lower().startswith("unsupported")), lines[-1] if lines else "")
        raise UsageError(f"cannot read checkpoint {path}: not tensors and plain data ({detail})") from None
    except (RuntimeError, EOFError, OSError) as err:
        raise UsageError(f"cannot read checkpoint {path}: {first_line(err, limit=None)}") from None


def model_from_checkpoint(checkpoint: dict) -> CLIP:
    """The architecture a checkpoint with `checkpoint_entries` describes, with random weights."""
    if not isinstance(checkpoint, dict) or "clip_model_config" not in checkpoint:
        raise UsageError("not a clipfromscratch checkpoint (no model config inside)")
    files = checkpoint.get("clip_tokenizer_files")
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        raise UsageError("its tokenizer files are missing or damaged")
    return rebuild_model(checkpoint["clip_model_config"], tokenizer_from_files(files),
                         checkpoint.get("clip_text_config"))


def export_model(model: CLIP, directory: str) -> None:
    """Write `directory/{model.safetensors, config.json, tokenizer/}`, whole or not at all: it replaces an earlier
    `directory` only once complete. A DCSM head goes with the weights."""
    write_dir_atomic(directory, lambda partial: write_export(model, partial))


def write_export(model: CLIP, directory: str) -> None:
    """The files of `export_model` into an existing folder, as they come (for a caller that adds its own files and
    moves the folder into place itself)."""
    save_safetensors(model, os.path.join(directory, WEIGHTS))
    saved = {"model": asdict(model.config), "text_config": model.text_tower.architecture()}
    if model.dense_scorer is not None:
        saved["dcsm"] = dense_scorer_config(model.dense_scorer)
    with open(os.path.join(directory, CONFIG), "w", encoding="utf-8") as f:
        json.dump(saved, f, indent=2)
    model.tokenizer.save_pretrained(os.path.join(directory, TOKENIZER_DIR))


def dense_scorer_config(head: DenseScorer) -> dict:
    """What rebuilds a DCSM head before its weights are loaded."""
    return {"image_tokens": head.image_tokens, "text_tokens": head.text_tokens}


def _dense_scorer(saved: dict, path: str) -> DenseScorer:
    """The head `dense_scorer_config` describes, or a one-line UsageError naming the file it was read from."""
    sizes = {key: saved.get(key) for key in ("image_tokens", "text_tokens")} if isinstance(saved, dict) else {}
    if not sizes or not all(type(size) is int and size >= 1 for size in sizes.values()):
        raise UsageError(f"{path}: a DCSM head needs image_tokens and text_tokens, whole numbers of at least 1, "
                         f"got {saved!r:.80}")
    return DenseScorer(**sizes)


def export_head_beside(head: DenseScorer, directory: str, family: str) -> str:
    """For a model of another family (openai:): `directory/{dcsm.json, dcsm.safetensors}`, the base model to be
    saved in `directory/base` by its own library. Returns that base folder."""
    os.makedirs(directory, exist_ok=True)
    save_safetensors(head, os.path.join(directory, HEAD_WEIGHTS))
    with open(os.path.join(directory, HEAD_CONFIG), "w", encoding="utf-8") as f:
        json.dump({"family": family, **dense_scorer_config(head)}, f, indent=2)
    return os.path.join(directory, BASE_DIR)


def load_head_beside(directory: str, device: str | torch.device = "cpu") -> tuple[str, str, DenseScorer]:
    """(family, base model folder, head) of what `export_head_beside` wrote."""
    config_path = os.path.join(directory, HEAD_CONFIG)
    saved = read_json_object(config_path)
    family = saved.get("family")
    if not isinstance(family, str):
        raise UsageError(f"{config_path} does not say which family the base model is of (no 'family')")
    head = _dense_scorer(saved, config_path)
    load_weights(head, os.path.join(directory, HEAD_WEIGHTS), device)
    return family, os.path.join(directory, BASE_DIR), head.to(device).eval()


def load_model(path: str, device: str | torch.device = "cpu") -> CLIP:
    """An exported model in eval mode: `encode_image(pixels)`, `encode_text(list_of_str)`, `preprocess(pil)`, and
    `score(pixels, list_of_str)`, by its DCSM head where the export has one."""
    config_path = os.path.join(path, CONFIG)
    if not os.path.isfile(config_path):
        raise UsageError(f"not an exported model (no {CONFIG}): {path}")
    saved = read_json_object(config_path)
    missing = [key for key in ("model", "text_config") if key not in saved]
    if missing:
        raise UsageError(f"{config_path} has no {' or '.join(repr(key) for key in missing)}: not a model config")
    tokenizer = _load_tokenizer(os.path.join(path, TOKENIZER_DIR))
    try:
        model = rebuild_model(saved["model"], tokenizer, saved["text_config"])
    except UsageError as err:
        raise UsageError(f"{config_path}: {err}") from None
    if "dcsm" in saved:
        model.dense_scorer = _dense_scorer(saved["dcsm"], config_path)
    load_weights(model, os.path.join(path, WEIGHTS), device)
    return model.to(device).eval()
