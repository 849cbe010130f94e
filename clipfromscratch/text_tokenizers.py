"""Tokenizers: the pretrained one of a text tower, or one trained from the training captions.

Whatever its origin, a tokenizer travels with the model as the files `save_pretrained` writes, so
evaluation reloads exactly the tokenizer training used.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerFast

from clipfromscratch.encoders.text import pretrained_source, text_family
from clipfromscratch.errors import UsageError, error_summary, first_line

WORDPIECE_SPECIALS = dict(pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
                          mask_token="[MASK]")
# GPT-2 has no pad token: give it one of its own so padding never looks like the end of a caption
BPE_SPECIALS = dict(eos_token="<|endoftext|>", bos_token="<|endoftext|>", unk_token="<|endoftext|>", pad_token="<pad>")


def _continuation_pieces(tok: Tokenizer, captions: Iterable[str]) -> list[str]:
    """Sorted "##c" for every character c that follows another inside a word of `captions`, as the trainer sees them.

    tokenizers' WordPiece trainer creates these pieces lazily, in hash-map order, so their ids, and through
    the merge tie-break that compares ids even the merges, differ from one process to the next
    (huggingface/tokenizers#1794). Handing them to the trainer up front fixes their order.
    """
    words: set[str] = set()
    lines = iter(captions)
    while chunk := list(itertools.islice(lines, 1000)):  # one Rust call per thousand captions, not per caption
        text = tok.normalizer.normalize_str(" ".join(chunk))
        words.update(word for word, _ in tok.pre_tokenizer.pre_tokenize_str(text))
    return [f"##{c}" for c in sorted({c for word in words for c in word[1:]})]


def _wordpiece(captions: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """BERT's WordPiece, trained deterministically: the same captions give the same tokenizer.json."""
    tok = Tokenizer(models.WordPiece(unk_token=WORDPIECE_SPECIALS["unk_token"]))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = list(dict.fromkeys(WORDPIECE_SPECIALS.values()))
    captions = _reiterable(captions)
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, show_progress=False,
                                        special_tokens=specials + _continuation_pieces(tok, captions))
    tok.train_from_iterator(iter(captions), trainer)
    # the continuation pieces went in as special tokens only to be created first: rebuild with the same
    # vocabulary (ids included) and only the real special tokens, so decoding never drops them
    trained = tok
    tok = Tokenizer(models.WordPiece(trained.get_vocab(), unk_token=WORDPIECE_SPECIALS["unk_token"]))
    tok.normalizer, tok.pre_tokenizer = trained.normalizer, trained.pre_tokenizer
    tok.add_special_tokens(specials)
    cls, sep = WORDPIECE_SPECIALS["cls_token"], WORDPIECE_SPECIALS["sep_token"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}", special_tokens=[(cls, tok.token_to_id(cls)), (sep, tok.token_to_id(sep))]
    )
    tok.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(tokenizer_object=tok, **WORDPIECE_SPECIALS)


def _reiterable(captions: Iterable[str]) -> Iterable[str]:
    """`captions` if it can be read twice (a list, or an object whose __iter__ starts over), else a list of them."""
    return list(captions) if iter(captions) is captions else captions


def _byte_level_bpe(captions: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    # a word is one token wherever it stands: without the prefix space, "a" first and " a" later differ
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    specials = list(dict.fromkeys(BPE_SPECIALS.values()))
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(iter(captions), trainer)
    # frame every caption as CLIP does: a start token every position can attend to, and an end token, the same
    # symbol everywhere, whose state the tower pools
    eos = BPE_SPECIALS["eos_token"]
    tok.post_processor = processors.TemplateProcessing(single=f"{eos} $A {eos}",
                                                       special_tokens=[(eos, tok.token_to_id(eos))])
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, **BPE_SPECIALS)


TRAINERS = {"wordpiece": _wordpiece, "bpe": _byte_level_bpe}
# how long the other ranks wait for rank 0 to read the captions and train the tokenizer before giving up
SHARED_TOKENIZER_TIMEOUT_S = 3600


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
    tok = _ready(TRAINERS[family.tokenizer_kind](captions, vocab_size))
    if cached is None:
        return tok
    try:
        won = _save_whole(tok, cached, replace=False)
    except OSError:
        return tok  # a read-only dataset folder: no cache, train again next time
    # another run cached a tokenizer of the same captions first: take that one, as every later run will
    return tok if won else load_tokenizer(cached)


def _save_whole(tok: PreTrainedTokenizerFast, directory: str, replace: bool) -> bool:
    """Write `directory` whole or not at all (beside it, then renamed); False where another process was first."""
    parent = os.path.dirname(os.path.abspath(directory))
    os.makedirs(parent, exist_ok=True)
    partial = tempfile.mkdtemp(dir=parent, prefix=".partial-")
    tok.save_pretrained(partial)
    if replace and os.path.isdir(directory):
        shutil.rmtree(directory)
    try:
        os.rename(partial, directory)
    except OSError:
        shutil.rmtree(partial)
        return False
    return True


def shared_tokenizer(make: Callable[[], PreTrainedTokenizerFast], directory: str, rank: int,
                     timeout_s: float = SHARED_TOKENIZER_TIMEOUT_S) -> PreTrainedTokenizerFast:
    """One tokenizer for every rank of a run: global rank 0 makes it and writes it to `directory`, the others
    wait for that folder and load it.

    It needs no process group, so it holds for ranks that Lightning's launcher, torchrun or SLURM started
    before one exists; `directory` must be on storage that every node sees. Rank 0 reloads the files too, so
    every rank holds a tokenizer read from the same files.
    """
    if rank == 0:
        _save_whole(make(), directory, replace=True)
        return load_tokenizer(directory)
    started = time.monotonic()
    while not os.path.isdir(directory):
        if time.monotonic() - started > timeout_s:
            raise UsageError(f"rank {rank} waited {timeout_s / 60:.0f} min for the tokenizer rank 0 writes to "
                             f"{directory}: did rank 0 fail, or is the run folder not on storage all nodes share?")
        time.sleep(0.2)
    return load_tokenizer(directory)


def tokenizer_fingerprint(tok: PreTrainedTokenizerFast) -> str:
    """SHA-256 of what decides the token ids (vocabulary, merges, normalisation, special tokens), not of the
    padding and truncation state that encoding calls leave behind."""
    spec = json.loads(tok.backend_tokenizer.to_str())
    for transient in ("truncation", "padding"):
        spec.pop(transient, None)
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def load_tokenizer(source: str) -> PreTrainedTokenizerFast:
    """A tokenizer from a Hugging Face name or a directory written by `save_pretrained`."""
    try:
        return _ready(AutoTokenizer.from_pretrained(source))
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot load tokenizer '{source}' (offline, or no tokenizer there?): "
                         f"{first_line(err)}") from None
    except Exception as err:  # noqa: BLE001 - the tokenizers library reads a damaged file with errors of its own
        raise UsageError(f"cannot load tokenizer '{source}': its files are damaged ({error_summary(err)})") from None


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
