"""What DCSM scoring costs against cosine scoring, on the same image-caption pairs: pairs/s and memory per image.

The model is the CPU demo's (configs/demo_cpu.yaml: tiny ViT + tiny BERT at 32 px; weights do not change the
cost), with a DCSM head of its shape. Each item is an image and its 4 caption options, as in the compositional
task; a round scores `--items` items both ways, in alternating order over `--rounds` rounds (medians count):
- batched: from pixels and caption strings (towers included), `--batch-size` items per tower call;
- scoring alone, from features computed beforehand: the dot products of pooled embeddings, against the
  (image tokens x 30) maps and the head, i.e. what reranking costs when the features are cached.
Memory: the float32 features one image and one caption keep, pooled against dense. Prints one JSON line.

    python benchmarks/dcsm_scoring.py [--items 512] [--batch-size 64] [--rounds 5]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from clipfromscratch.config import load_config
from clipfromscratch.data.compositional import probe_items
from clipfromscratch.data.synthetic import SyntheticCaptions
from clipfromscratch.dcsm import TEXT_TOKENS, DenseScorer, encode_captions, similarity_maps
from clipfromscratch.eval.compositional import SYNTHETIC_SIDE
from clipfromscratch.model import build_model, resolve_image_size
from clipfromscratch.text_tokenizers import make_tokenizer

OPTIONS = 4


def demo_model():
    config = load_config(["--config", os.path.join(os.path.dirname(__file__), "..", "configs", "demo_cpu.yaml")])
    model_config = resolve_image_size(config.model)
    captions = SyntheticCaptions("train", config.data.synthetic_train_samples, 0, 32).captions()
    model = build_model(model_config, make_tokenizer(model_config.text_encoder, False, "tiny", captions)).eval()
    with torch.no_grad():
        image_tokens = model.encode_image_tokens(torch.zeros(1, 3, model_config.image_size, model_config.image_size))
    model.dense_scorer = DenseScorer(image_tokens.shape[1]).eval()
    return model


@torch.inference_mode()
def batched(model, pixels: torch.Tensor, options: list[list[str]], batch: int, dense: bool) -> None:
    """Items `batch` at a time: the towers run on the whole batch, each image meets its own options only."""
    for start in range(0, len(options), batch):
        texts = [t for item in options[start:start + batch] for t in item]
        if not dense:
            images, captions = model.encode_image(pixels[start:start + batch]), model.encode_text(texts)
            for k in range(len(images)):
                images[k] @ captions[k * OPTIONS:(k + 1) * OPTIONS].t()
            continue
        image_tokens = model.encode_image_tokens(pixels[start:start + batch])
        text_tokens, mask, functional = encode_captions(model.encode_text_tokens, model.tokenizer, texts, "cpu")
        for k in range(len(image_tokens)):
            part = slice(k * OPTIONS, (k + 1) * OPTIONS)
            model.dense_scorer(similarity_maps(image_tokens[k:k + 1], text_tokens[part], mask[part]), functional[part])


def timed(step) -> float:
    started = time.perf_counter()
    step()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=512, help="images, each with 4 caption options")
    parser.add_argument("--batch-size", type=int, default=64, help="items per tower call")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = demo_model()
    items = probe_items("eval", OPTIONS, args.items, 0, SYNTHETIC_SIDE)
    pixels = torch.stack([model.preprocess(item.load()) for item in items])
    options = [list(item.options) for item in items]
    texts = [t for item in options for t in item]
    with torch.inference_mode():  # features computed once, for the scoring-only contenders
        image_tokens = model.encode_image_tokens(pixels)
        text_tokens, mask, functional = encode_captions(model.encode_text_tokens, model.tokenizer, texts, "cpu")
        pooled_images, pooled_texts = model.encode_image(pixels), model.encode_text(texts)

    @torch.inference_mode()
    def cached(dense: bool) -> None:
        for k in range(args.items):
            part = slice(k * OPTIONS, (k + 1) * OPTIONS)
            if dense:
                model.dense_scorer(similarity_maps(image_tokens[k:k + 1], text_tokens[part], mask[part]),
                                   functional[part])
            else:
                pooled_images[k] @ pooled_texts[part].t()

    contenders = {
        "cosine_batched": lambda: batched(model, pixels, options, args.batch_size, dense=False),
        "dcsm_batched": lambda: batched(model, pixels, options, args.batch_size, dense=True),
        "cosine_cached": lambda: cached(dense=False),
        "dcsm_cached": lambda: cached(dense=True),
    }
    for step in contenders.values():  # warm-up
        step()
    seconds: dict[str, list[float]] = {name: [] for name in contenders}
    for round_ in range(args.rounds):
        for name in list(contenders)[::1 if round_ % 2 == 0 else -1]:
            seconds[name].append(timed(contenders[name]))
    pairs = args.items * OPTIONS
    rate = {name: round(pairs / statistics.median(values), 1) for name, values in seconds.items()}
    dim = pooled_images.shape[1]
    print(json.dumps({
        "pairs_per_s": rate,
        "dcsm_over_cosine_batched": round(rate["dcsm_batched"] / rate["cosine_batched"], 3),
        "dcsm_over_cosine_cached": round(rate["dcsm_cached"] / rate["cosine_cached"], 4),
        "image_tokens": image_tokens.shape[1], "text_tokens": TEXT_TOKENS, "embed_dim": dim,
        "bytes_per_image": {"cosine": 4 * dim, "dcsm": 4 * dim * image_tokens.shape[1]},
        "bytes_per_caption": {"cosine": 4 * dim, "dcsm": 4 * dim * TEXT_TOKENS},
        "head_params": sum(p.numel() for p in model.dense_scorer.parameters()),
        "items": args.items, "batch_size": args.batch_size, "rounds": args.rounds,
        "threads": torch.get_num_threads(), "load_avg_1m": round(os.getloadavg()[0], 2),
    }))


if __name__ == "__main__":
    main()
