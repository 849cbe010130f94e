import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from clipfromscratch import text_tokenizers
from clipfromscratch.errors import UsageError
from clipfromscratch.text_tokenizers import (
    make_tokenizer,
    shared_tokenizer,
    tokenize,
    tokenizer_fingerprint,
    tokenizer_from_files,
    tokenizer_to_files,
)

CAPTIONS = ["a small red circle on the left", "a blue square above a green triangle", "one large yellow star"] * 30


@pytest.mark.parametrize("text_enc", ["bert", "gpt2"])
def test_trained_tokenizer_round_trips(text_enc):
    tok = make_tokenizer(text_enc, False, "tiny", iter(CAPTIONS))
    assert 30 < len(tok) <= 8192
    ids = tok("a blue circle above a red star")["input_ids"]
    assert tok.unk_token_id not in ids or text_enc == "gpt2"  # byte-level BPE has no unknowns at all
    assert tok.decode(ids, skip_special_tokens=True).strip() == "a blue circle above a red star"
    restored = tokenizer_from_files(tokenizer_to_files(tok))
    assert restored("a blue circle above a red star")["input_ids"] == ids
    assert restored.padding_side == "right"


def test_bert_wraps_in_cls_sep_and_gpt2_in_its_own_start_and_end():
    bert = make_tokenizer("bert", False, "tiny", CAPTIONS)
    assert bert.convert_ids_to_tokens(bert("a red star")["input_ids"]) == ["[CLS]", "a", "red", "star", "[SEP]"]
    gpt2 = make_tokenizer("gpt2", False, "tiny", CAPTIONS)
    # a word is the same token first in a caption and later in one
    assert gpt2.convert_ids_to_tokens(gpt2("red star")["input_ids"]) == ["<|endoftext|>", "Ġred", "Ġstar",
                                                                         "<|endoftext|>"]
    assert gpt2.convert_ids_to_tokens(tokenize(gpt2, ["a red star"], 4)["input_ids"][0])[-1] == "<|endoftext|>"
    assert gpt2.pad_token_id != gpt2.eos_token_id


def test_tokenize_pads_right_and_truncates():
    tok = make_tokenizer("bert", False, "tiny", CAPTIONS)
    batch = tokenize(tok, ["a red star", "a small red circle on the left"], context_length=5)
    assert batch["input_ids"].shape == (2, 5)
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
    batch = tokenize(tok, ["a red", "a small red circle"], context_length=77)
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]]


# the same captions give the same tokenizer, made once for every rank

VARIED = [f"{size} {colour} {shape} {where}, photographed {when}" for size in ("a small", "one large", "two tiny")
          for colour in ("red", "ochre", "turquoise", "magenta") for shape in ("zigzag", "quadrilateral", "sphinx")
          for where in ("on the left", "beneath a jukebox") for when in ("today", "in 1999")]
TRAIN_AND_PRINT = ("import sys; from clipfromscratch.text_tokenizers import make_tokenizer; "
                   "print(*(make_tokenizer(name, False, 'tiny', sys.argv[1:]).backend_tokenizer.to_str() "
                   "for name in ('bert', 'gpt2')), sep='\\n')")


def test_training_in_another_process_gives_a_byte_identical_tokenizer():
    # tokenizers' trainers iterate hash maps seeded per process: only another process can show a difference
    there = subprocess.run([sys.executable, "-c", TRAIN_AND_PRINT, *VARIED], capture_output=True, text=True,
                           check=True, timeout=120).stdout.splitlines()
    here = [make_tokenizer(name, False, "tiny", VARIED).backend_tokenizer.to_str() for name in ("bert", "gpt2")]
    assert there == here and min(map(len, here)) > 1000


def test_other_ranks_wait_for_rank_zeros_tokenizer_and_load_it(tmp_path):
    made = make_tokenizer("bert", False, "tiny", CAPTIONS)
    folder = str(tmp_path / "run" / "tokenizer")
    with ThreadPoolExecutor(1) as pool:
        rank_1 = pool.submit(shared_tokenizer, lambda: pytest.fail("rank 1 made a tokenizer"), folder, 1)
        time.sleep(0.5)  # rank 1 is waiting: nothing is there yet
        assert not rank_1.done()
        rank_0 = shared_tokenizer(lambda: made, folder, 0)
        assert tokenizer_fingerprint(rank_1.result(timeout=30)) == tokenizer_fingerprint(rank_0)
    assert tokenizer_fingerprint(rank_0) == tokenizer_fingerprint(made)
    assert sorted(os.listdir(tmp_path / "run")) == ["tokenizer"]  # written whole, then renamed: no partial left


def test_a_rank_that_waits_in_vain_says_why(tmp_path):
    with pytest.raises(UsageError, match="rank 3 waited 0 min for the tokenizer rank 0 writes to .*storage all nodes"):
        shared_tokenizer(lambda: None, str(tmp_path / "tokenizer"), 3, timeout_s=0.3)


def test_a_run_that_loses_the_cache_race_takes_the_winners_tokenizer(tmp_path, monkeypatch):
    cache = tmp_path / "tokenizers" / "abc"
    winner = make_tokenizer("bert", False, "tiny", ["a winner made this one"] * 5)
    train = text_tokenizers.TRAINERS["wordpiece"]

    def train_while_another_run_caches(captions, vocab_size):
        tok = train(captions, vocab_size)
        winner.save_pretrained(str(cache / f"wordpiece-{vocab_size}"))  # the other run renames its copy first
        return tok

    monkeypatch.setitem(text_tokenizers.TRAINERS, "wordpiece", train_while_another_run_caches)
    ours = make_tokenizer("bert", False, "tiny", CAPTIONS, str(cache))
    assert tokenizer_fingerprint(ours) == tokenizer_fingerprint(winner)
    assert [p for p in os.listdir(cache) if p.startswith(".partial")] == []
