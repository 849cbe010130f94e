import pytest

from clipfromscratch.tokenizers import make_tokenizer, tokenize, tokenizer_from_files, tokenizer_to_files

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
