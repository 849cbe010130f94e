"""A self-contained export (safetensors weights, JSON config, tokenizer files) and `load_model`, no Lightning needed."""
from __future__ import annotations

import json
import os
import pickle
from dataclasses import asdict, replace

import torch
from safetensors.torch import load_model as load_safetensors
from safetensors.torch import save_model as save_safetensors
from transformers import AutoConfig

from clipfromscratch.config import ModelConfig
from clipfromscratch.dcsm import DenseScorer
from clipfromscratch.errors import UsageError, first_line
from clipfromscratch.model import CLIP, build_model
from clipfromscratch.text_tokenizers import load_tokenizer, tokenizer_from_files, tokenizer_to_files

WEIGHTS, CONFIG, TOKENIZER_DIR = "model.safetensors", "config.json", "tokenizer"
# a DCSM head trained on a model of another family, and that model
HEAD_WEIGHTS, HEAD_CONFIG, BASE_DIR = "dcsm.safetensors", "dcsm.json", "base"


def rebuild_model(model_config: dict, tokenizer, text_config: dict) -> CLIP:
    """The architecture a saved model had, with random weights, built offline from what was saved."""
    # the weights come from the file: never fetch published ones again
    config = replace(ModelConfig(**model_config), pretrained_image=False, pretrained_text=False)
    text_config = dict(text_config)
    return build_model(config, tokenizer, AutoConfig.for_model(text_config.pop("model_type"), **text_config))


def checkpoint_entries(model: CLIP) -> dict:
    """What a Lightning checkpoint carries besides the weights to rebuild `model`: its config and exact tokenizer."""
    return {"clip_model_config": asdict(model.config), "clip_tokenizer_files": tokenizer_to_files(model.tokenizer),
            "clip_text_config": model.text_tower.backbone.config.to_dict()}


def read_checkpoint(path: str, map_location: str | torch.device = "cpu") -> dict:
    """A checkpoint's contents, read with `weights_only=True`: tensors and plain data only, never pickled code.

    Ours hold nothing else (the config as a dict, the tokenizer as JSON strings); a file that needs more is
    refused in one line, before anything in it runs.
    """
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
    if "clip_model_config" not in checkpoint:
        raise UsageError("not a clipfromscratch checkpoint (no model config inside)")
    return rebuild_model(checkpoint["clip_model_config"], tokenizer_from_files(checkpoint["clip_tokenizer_files"]),
                         checkpoint["clip_text_config"])


def export_model(model: CLIP, directory: str) -> None:
    """Write `directory/{model.safetensors, config.json, tokenizer/}`; a DCSM head goes with the weights."""
    os.makedirs(directory, exist_ok=True)
    save_safetensors(model, os.path.join(directory, WEIGHTS))
    saved = {"model": asdict(model.config), "text_config": model.text_tower.backbone.config.to_dict()}
    if model.dense_scorer is not None:
        saved["dcsm"] = dense_scorer_config(model.dense_scorer)
    with open(os.path.join(directory, CONFIG), "w", encoding="utf-8") as f:
        json.dump(saved, f, indent=2)
    model.tokenizer.save_pretrained(os.path.join(directory, TOKENIZER_DIR))


def dense_scorer_config(head: DenseScorer) -> dict:
    """What rebuilds a DCSM head before its weights are loaded."""
    return {"image_tokens": head.image_tokens, "text_tokens": head.text_tokens}


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
    with open(os.path.join(directory, HEAD_CONFIG), encoding="utf-8") as f:
        saved = json.load(f)
    family = saved.pop("family")
    head = DenseScorer(**saved)
    load_safetensors(head, os.path.join(directory, HEAD_WEIGHTS), device=str(device))
    return family, os.path.join(directory, BASE_DIR), head.to(device).eval()


def load_model(path: str, device: str | torch.device = "cpu") -> CLIP:
    """An exported model in eval mode: `encode_image(pixels)`, `encode_text(list_of_str)`, `preprocess(pil)`, and
    `score(pixels, list_of_str)`, by its DCSM head where the export has one."""
    config_path = os.path.join(path, CONFIG)
    if not os.path.isfile(config_path):
        raise UsageError(f"not an exported model (no {CONFIG}): {path}")
    with open(config_path, encoding="utf-8") as f:
        saved = json.load(f)
    model = rebuild_model(saved["model"], load_tokenizer(os.path.join(path, TOKENIZER_DIR)), saved["text_config"])
    if "dcsm" in saved:
        model.dense_scorer = DenseScorer(**saved["dcsm"])
    load_safetensors(model, os.path.join(path, WEIGHTS), device=str(device))
    return model.to(device).eval()
