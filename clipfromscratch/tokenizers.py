"""Tokenizers: the pretrained one of a text tower, or one trained from the training captions.

Whatever its origin, a tokenizer travels with the model as the files `save_pretrained` writes, so
evaluation reloads exactly the tokenizer training used.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerFast

from clipfromscratch.encoders.text import pretrained_source, text_family
from clipfromscratch.errors import UsageError

WORDPIECE_SPECIALS = dict(pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
                          mask_token="[MASK]")
# GPT-2 has no pad token: give it one of its own so padding never looks like the end of a caption
BPE_SPECIALS = dict(eos_token="<|endoftext|>", bos_token="<|endoftext|>", unk_token="<|endoftext|>", pad_token="<pad>")


def _wordpiece(captions: Iterator[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordPiece(unk_token=WORDPIECE_SPECIALS["unk_token"]))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = list(dict.fromkeys(WORDPIECE_SPECIALS.values()))
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    tok.train_from_iterator(captions, trainer)
    cls, sep = WORDPIECE_SPECIALS["cls_token"], WORDPIECE_SPECIALS["sep_token"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}", special_tokens=[(cls, tok.token_to_id(cls)), (sep, tok.token_to_id(sep))]
    )
    tok.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(tokenizer_object=tok, **WORDPIECE_SPECIALS)


def _byte_level_bpe(captions: Iterator[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    # a word is one token wherever it stands: without the prefix space, "a" first and " a" later differ
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    specials = list(dict.fromkeys(BPE_SPECIALS.values()))
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(captions, trainer)
    # frame every caption as CLIP does: a start token every position can attend to, and an end token, the same
    # symbol everywhere, whose state the tower pools
    eos = BPE_SPECIALS["eos_token"]
    tok.post_processor = processors.TemplateProcessing(single=f"{eos} $A {eos}",
                                                       special_tokens=[(eos, tok.token_to_id(eos))])
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, **BPE_SPECIALS)


TRAINERS = {"wordpiece": _wordpiece, "bpe": _byte_level_bpe}


def _ready(tok: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    # last-token pooling reads the position from the mask: padding must be on the right
    tok.padding_side = "right"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def make_tokenizer(text_encoder: str, pretrained: bool, size: str, captions: Iterable[str],
                   cache_dir: str | None = None) -> PreTrainedTokenizerFast:
    """The tower's own tokenizer when pretrained, else one trained on `captions` with the tower's vocabulary size.

    `cache_dir`: a folder named after the captions' source; a tokenizer trained there before is reused.
    """
    if pretrained:
        return load_tokenizer(pretrained_source(text_encoder))
    family = text_family(text_encoder)
    if family is None:
        # an unregistered architecture: retrain its own tokenizer pipeline on our captions
        base = load_tokenizer(pretrained_source(text_encoder))
        return _ready(base.train_new_from_iterator(iter(captions), vocab_size=base.vocab_size))
    vocab_size = family.presets[size].get("vocab_size") or AutoConfig.for_model(family.model_type).vocab_size
    cached = None if cache_dir is None else os.path.join(cache_dir, f"{family.tokenizer_kind}-{vocab_size}")
    if cached is not None and os.path.isdir(cached):
        return load_tokenizer(cached)
    tok = _ready(TRAINERS[family.tokenizer_kind](iter(captions), vocab_size))
    if cached is None:
        return tok
    try:
        os.makedirs(cache_dir, exist_ok=True)
        partial = tempfile.mkdtemp(dir=cache_dir, prefix=".partial-")
    except OSError:
        return tok  # a read-only dataset folder: no cache, train again next time
    tok.save_pretrained(partial)
    try:
        os.rename(partial, cached)  # whole or not at all
    except OSError:
        shutil.rmtree(partial)  # another rank or run cached the same tokenizer first
    return tok


def load_tokenizer(source: str) -> PreTrainedTokenizerFast:
    """A tokenizer from a Hugging Face name or a directory written by `save_pretrained`."""
    try:
        return _ready(AutoTokenizer.from_pretrained(source))
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot load tokenizer '{source}' (offline, or no tokenizer there?): "
                         f"{str(err).splitlines()[0]}") from None


def tokenize(tok: PreTrainedTokenizerFast, texts: list[str], context_length: int) -> dict[str, torch.Tensor]:
    """Captions -> right-padded (B, L) `input_ids` and `attention_mask`, L <= context_length."""
    encoded = tok(texts, padding="longest", truncation=True, max_length=context_length, return_tensors="pt",
                  return_token_type_ids=False)
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def tokenizer_to_files(tok: PreTrainedTokenizerFast) -> dict[str, str]:
    """The tokenizer as {file name: text}, small enough to store inside every checkpoint."""
    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        return {name: open(os.path.join(tmp, name), encoding="utf-8").read() for name in os.listdir(tmp)}


def tokenizer_from_files(files: dict[str, str]) -> PreTrainedTokenizerFast:
    """Inverse of `tokenizer_to_files`."""
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in files.items():
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                f.write(text)
        return load_tokenizer(tmp)
