"""What a CLIP understands: generated and benchmark-format compositional probes, dense features, the DCSM head,
`eval --task compositional`, `compare --tasks compositional` and `train-dcsm`, on tiny models made here."""
import csv
import json
import logging
import random

import numpy as np
import pytest
import torch
from PIL import Image
from test_eval_models import export_tiny_ours, save_tiny_openai

from clipfromscratch import load_model, train_dcsm
from clipfromscratch.cli import main
from clipfromscratch.config import ModelConfig
from clipfromscratch.data.compositional import VOCABULARIES, probe_items, training_pairs
from clipfromscratch.data.samples import SHOWN_PER_REASON
from clipfromscratch.data.synthetic import COLOURS
from clipfromscratch.dcsm import FUNCTIONAL_WORDS, TEXT_TOKENS, DenseScorer, dense_tokens, similarity_maps
from clipfromscratch.errors import UsageError
from clipfromscratch.eval.compositional import credit, open_probes, score_items
from clipfromscratch.eval.models import load_eval_model
from clipfromscratch.model import build_model
from clipfromscratch.text_tokenizers import make_tokenizer

CAPTIONS = ["a red circle above a blue square", "a green star without a red circle", "no blue square"] * 10


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return export_tiny_ours(root / "ours"), "openai:" + save_tiny_openai(root / "openai")


# dense features and the map


@pytest.mark.parametrize("text_enc", ["bert", "gpt2"])
def test_dense_tokens_pad_to_the_map_and_mark_functional_words(text_enc):
    tokenizer = make_tokenizer(text_enc, False, "tiny", CAPTIONS)
    tokens = dense_tokens(tokenizer, ["a red circle above a blue square", "no blue square."])
    assert tokens["input_ids"].shape == tokens["functional"].shape == (2, TEXT_TOKENS)
    words = [tokenizer.convert_ids_to_tokens(ids) for ids in tokens["input_ids"].tolist()]
    marked = [[w for w, f in zip(row, flags) if f] for row, flags in zip(words, tokens["functional"].tolist())]
    assert [w.lstrip("Ġ") for w in marked[0]] == ["above"] and [w.lstrip("Ġ") for w in marked[1]] == ["no"]
    assert tokens["functional"][0].max() == FUNCTIONAL_WORDS.index("above") + 1
    assert tokens["attention_mask"][1].sum() < TEXT_TOKENS  # padded, not truncated


def test_a_word_split_into_characters_marks_each_of_them(models):
    tokenizer = load_eval_model(models[1]).tokenizer  # character-level for words outside its vocabulary
    tokens = dense_tokens(tokenizer, ["a circle below a star"])
    assert tokens["functional"][0].tolist().count(FUNCTIONAL_WORDS.index("below") + 1) == len("below")


@pytest.mark.parametrize("image_enc", ["vit", "resnet", "xception"])
def test_dense_tokens_begin_with_the_pooled_embeddings(image_enc):
    torch.manual_seed(0)
    model = build_model(ModelConfig(image_encoder=image_enc, text_encoder="bert", image_size=32, embed_dim=16),
                        make_tokenizer("bert", False, "tiny", CAPTIONS)).eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        image_tokens = model.encode_image_tokens(pixels)
        torch.testing.assert_close(image_tokens[:, 0], model.encode_image(pixels))
        tokens = dense_tokens(model.tokenizer, CAPTIONS[:2])
        text_tokens = model.encode_text_tokens(tokens["input_ids"], tokens["attention_mask"])
        # BERT pools [CLS], the first token, padding or not
        torch.testing.assert_close(text_tokens[:, 0], model.encode_text(CAPTIONS[:2]), atol=1e-5, rtol=1e-4)
    assert image_tokens.shape[1] > 1 and torch.allclose(image_tokens.norm(dim=-1), torch.ones(image_tokens.shape[:2]))


def test_openai_image_tokens_begin_with_its_pooled_embedding(models):
    model = load_eval_model(models[1])
    pixels = torch.stack([model.preprocess(Image.new("RGB", (40, 40), c)) for c in ("red", "blue")])
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image_tokens(pixels)[:, 0], model.encode_image(pixels))


def test_the_head_writes_functional_rows_and_scores_each_pair_alone():
    torch.manual_seed(0)
    head = DenseScorer(image_tokens=5, text_tokens=6).eval()
    maps = torch.rand(3, 4, 5, 6) * 2 - 1
    functional = torch.zeros(4, 6, dtype=torch.long)
    functional[1, 2] = FUNCTIONAL_WORDS.index("no") + 1
    written = head.with_functional_rows(maps, functional)
    assert torch.equal(written[:, 1, :, 2], head.functional_rows[FUNCTIONAL_WORDS.index("no")].expand(3, 5))
    assert torch.equal(written[:, 0], maps[:, 0]) and torch.equal(written[:, 1, :, 3], maps[:, 1, :, 3])
    head.set_normalisation(maps, functional)
    with torch.no_grad():
        scores = head(maps, functional)
        # fixed normalisation: a pair's score does not depend on the pairs scored beside it
        torch.testing.assert_close(head(maps[:1, 2:], functional[2:]), scores[:1, 2:])
    assert scores.shape == (3, 4)
    with pytest.raises(ValueError, match="maps of 5 x 7 tokens for a head of 5 x 6"):
        head(torch.zeros(1, 1, 5, 7), torch.zeros(1, 7, dtype=torch.long))


def test_similarity_maps_are_cosines_with_padding_zeroed():
    image = torch.nn.functional.normalize(torch.randn(2, 3, 8), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(1, 4, 8), dim=-1)
    maps = similarity_maps(image, text, torch.tensor([[1, 1, 1, 0]]))
    torch.testing.assert_close(maps[1, 0, 2, 1], image[1, 2] @ text[0, 1])
    assert maps.shape == (2, 1, 3, 4) and bool((maps[..., 3] == 0).all())


# the probes


def _near(image: Image.Image, colour: str) -> np.ndarray:
    """Where the pixels are within the renderer's jitter of `colour`."""
    return np.abs(np.asarray(image).astype(int) - np.array(COLOURS[colour])).max(-1) <= 25


def _centre(image: Image.Image, colour: str) -> np.ndarray:
    """Mean (x, y) of the pixels of `colour`."""
    ys, xs = _near(image, colour).nonzero()
    return np.array([xs.mean(), ys.mean()])


def test_generated_items_draw_what_their_first_caption_says():
    items = probe_items("eval", ways=4, count=30, seed=3, image_size=64)
    assert [i.category for i in items[:3]] == ["binding", "spatial", "negation"]
    assert all(len(i.options) == 4 and len(set(i.options)) == 4 for i in items)
    words = {"left": (-1, 0), "right": (1, 0), "above": (0, -1), "below": (0, 1)}
    for item in (i for i in items if i.category == "spatial"):
        true = item.options[0].split()
        first, second = [w for w in true if w in COLOURS]
        offset = _centre(item.load(), first) - _centre(item.load(), second)
        direction = next(np.array(d) for w, d in words.items() if w in true)
        assert offset @ direction > 10, (item.options[0], offset)  # pixels, at 64 px
    for item in (i for i in items if i.category == "negation"):
        present = [w for w in item.options[1].split() if w in COLOURS]  # "... {a} ... and {b}": a is there
        assert _near(item.load(), present[0]).any()
    assert [i.options for i in probe_items("eval", 4, 30, 3)] == [i.options for i in items]  # deterministic


def test_two_way_negation_cannot_be_read_from_the_captions_alone():
    items = [i for i in probe_items("eval", ways=2, count=600, seed=1) if i.category == "negation"]
    negated_true = [any(w in i.options[0].replace(",", "").split() for w in ("no", "without")) for i in items]
    assert 0.4 < sum(negated_true) / len(items) < 0.6
    for item, negated in zip(items[:40], negated_true):
        shown = {c for c in COLOURS if _near(item.load(), c).any()}
        named = [[w for w in o.split() if w in COLOURS] for o in item.options]
        if negated:  # the negated object is not there
            assert named[0][-1] not in shown
        else:  # every object the true caption names is there
            assert set(named[0]) <= shown


def test_training_and_evaluation_vocabularies_are_disjoint():
    train, held_out = VOCABULARIES["train"], VOCABULARIES["eval"]
    assert not set(train.colours) & set(held_out.colours) and not set(train.shapes) & set(held_out.shapes)
    assert not set(train.prefixes) & set(held_out.prefixes)
    _, captions, false_of_both = training_pairs(random.Random(0), 32, 30)
    seen = {w for c in captions + false_of_both for w in c.replace(",", "").split()}
    assert not seen & (set(held_out.colours) | set(held_out.shapes))
    items = probe_items("eval", 4, 60)
    assert not {w for i in items for o in i.options for w in o.split()} & (set(train.colours) | set(train.shapes))


def test_ties_share_the_credit():
    assert credit(torch.tensor([2.0, 1.0, 0.5])) == 1.0
    assert credit(torch.tensor([1.0, 1.0, 0.0, 0.0])) == 0.5  # a model that cannot tell them apart
    assert credit(torch.tensor([0.9, 1.0])) == 0.0


# benchmark files, in their published formats


@pytest.fixture
def benchmarks(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for name, colour in (("red.png", "red"), ("blue.png", "blue")):
        Image.new("RGB", (40, 30), colour).save(images / name)
    files = {}
    files["whatsup"] = tmp_path / "whatsup.json"
    files["whatsup"].write_text(json.dumps([
        {"image_path": "red.png", "caption_options": ["a mug left of a plate", "a mug right of a plate",
                                                      "a mug above a plate", "a mug below a plate"]},
        {"image_path": "missing.png", "caption_options": ["a", "b", "c", "d"]},
        {"caption_options": ["no image path"]}]))
    files["sugarcrepe"] = tmp_path / "swap_att.json"
    files["sugarcrepe"].write_text(json.dumps({
        "17": {"filename": "red.png", "caption": "a red square", "negative_caption": "a blue square"},
        "903": {"filename": "blue.png", "caption": "a blue square", "negative_caption": "a red square"}}))
    files["negbench"] = tmp_path / "mcq.csv"
    with open(files["negbench"], "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["correct_answer", "caption_0", "caption_1", "caption_2", "caption_3",
                         "correct_answer_template", "image_path"])
        writer.writerow(["2", "a dog", "a cat and no dog", "a red square and no cat", "no red square", "hybrid",
                         "red.png"])
        writer.writerow(["x", "a", "b", "c", "d", "affirmation", "red.png"])  # no true option
    files["aro"] = tmp_path / "visual_genome_relation.json"
    files["aro"].write_text(json.dumps([
        {"image_path": "red.png", "bbox_x": 5, "bbox_y": 4, "bbox_w": 20, "bbox_h": 10,
         "true_caption": "the square is on the table", "false_caption": "the table is on the square",
         "relation_name": "on"},
        {"image_path": "blue.png", "bbox_x": 0, "bbox_y": 0, "bbox_w": 8, "bbox_h": 8,
         "true_caption": "the blue square", "false_caption": "the square blue"}]))
    return tmp_path, files


def test_benchmark_files_are_read_in_their_formats(benchmarks):
    root, files = benchmarks
    whatsup = open_probes(f"whatsup:{files['whatsup']}", str(root / "images"))
    assert len(whatsup) == 2 and whatsup[0].options[0] == "a mug left of a plate" and whatsup[1].load() is None
    sugarcrepe = open_probes(f"sugarcrepe:{files['sugarcrepe']}", str(root / "images"))
    assert [i.options for i in sugarcrepe] == [("a red square", "a blue square"), ("a blue square", "a red square")]
    assert {i.category for i in sugarcrepe} == {"swap_att"}
    [negbench] = open_probes(f"negbench:{files['negbench']}", str(root / "images"))
    assert negbench.options[0] == "a red square and no cat" and len(negbench.options) == 4
    assert negbench.category == "hybrid"
    aro = open_probes(f"aro:{files['aro']}", str(root / "images"))
    assert aro[0].load().size == (20, 10) and [i.category for i in aro] == ["on", "attribution"]
    assert aro[0].options == ("the square is on the table", "the table is on the square")


@pytest.mark.parametrize("spec, message", [
    ("whatsup:/no/such.json", "annotation file not found: /no/such.json"),
    ("clevr:x.json", "compositional data 'clevr:x.json': give synthetic, synthetic:2way, or one of whatsup:FILE"),
])
def test_bad_compositional_data_is_one_line(spec, message):
    with pytest.raises(UsageError, match=message):
        open_probes(spec)


# the commands


def test_eval_compositional_writes_a_block_per_scoring_and_a_sheet_of_failures(models, tmp_path, capsys):
    ours, openai = models
    for model in (ours, openai):
        out = tmp_path / model.replace(":", "_").replace("/", "_") / "out.json"
        assert main(["eval", "--model", model, "--task", "compositional", "--data", "synthetic", "--num-samples",
                     "24", "--output", str(out)]) == 0, capsys.readouterr().err
        result = json.loads(out.read_text())
        block = result["cosine"]
        assert (block["n_items"], block["chance"]) == (24, 0.25) and "dcsm" not in result
        assert {"acc/binding", "acc/spatial", "acc/negation"} <= set(block) and 0 <= block["acc"] <= 1
        assert (out.parent / "out_failures_cosine.png").is_file()


def test_eval_compositional_on_benchmark_files(models, benchmarks, capsys):
    root, files = benchmarks
    for kind, path in files.items():
        assert main(["eval", "--model", models[0], "--task", "compositional", "--data", f"{kind}:{path}",
                     "--image-root", str(root / "images")]) == 0, capsys.readouterr().err
        metrics = json.loads(capsys.readouterr().out)
        assert metrics["cosine/n_items"] >= 1, (kind, metrics)
    # the flag's old name, for one release: the same answer, and one line saying so
    kind, path = next(iter(files.items()))
    assert main(["eval", "--model", models[0], "--task", "compositional", "--data", f"{kind}:{path}",
                 "--images", str(root / "images")]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["cosine/n_items"] >= 1
    assert err.count("warning: eval and compare's --images is now --image-root") == 1


def test_compare_compositional_reports_each_category(models, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--models", *models, "--tasks", "compositional", "--data", "synthetic:2way",
                 "--num-samples", "12", "--output-dir", str(out)]) == 0, capsys.readouterr().err
    report = (out / "report.md").read_text()
    for row in ("compositional / cosine/acc |", "compositional / cosine/acc/binding |",
                "compositional / cosine/chance |"):
        assert row in report, report
    assert (out / "compositional.png").is_file()


@pytest.mark.slow
def test_train_dcsm_exports_a_model_whose_score_uses_the_head(models, tmp_path, capsys):
    out = tmp_path / "with-head"
    assert main(["train-dcsm", "--model", models[0], "--output", str(out), "--max-steps", "15",
                 "--eval-items", "12"]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "scoring the head on 12 held-out items" in printed and "dcsm    acc" in printed
    model = load_model(str(out))
    assert model.dense_scorer is not None
    pixels = torch.stack([model.preprocess(Image.new("RGB", (40, 40), c)) for c in ("red", "blue")])
    texts = ["a red circle above a blue square", "no red circle"]
    with torch.no_grad():
        scores = model.score(pixels, texts)
        maps = similarity_maps(model.encode_image_tokens(pixels), *_text_tokens(model, texts))
        torch.testing.assert_close(scores, model.dense_scorer(maps, dense_tokens(model.tokenizer, texts)["functional"]))
    assert scores.shape == (2, 2)
    held_out = json.loads((out / "dcsm_held_out.json").read_text())
    assert held_out["dcsm"]["n_items"] == 12 and held_out["cosine"]["n_items"] == 12
    assert main(["eval", "--model", str(out), "--task", "compositional", "--num-samples", "12"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["dcsm/acc"] == held_out["dcsm"]["acc"]  # reloaded, the head scores as it did when trained


def _text_tokens(model, texts):
    tokens = dense_tokens(model.tokenizer, texts)
    return model.encode_text_tokens(tokens["input_ids"], tokens["attention_mask"]), tokens["attention_mask"]


@pytest.mark.slow
def test_train_dcsm_on_an_openai_model_and_on_captions(models, benchmarks, tmp_path, capsys):
    out = tmp_path / "openai-with-head"
    assert main(["train-dcsm", "--model", models[1], "--output", str(out), "--max-steps", "5",
                 "--eval-items", "6"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert main(["eval", "--model", str(out), "--task", "compositional", "--num-samples", "6"]) == 0
    assert "dcsm/acc/binding" in json.loads(capsys.readouterr().out)
    root, _ = benchmarks
    (root / "captions.tsv").write_text("filepath\tcaption\nimages/red.png\ta red square on grey\n"
                                       "images/blue.png\ta blue square on grey\n")
    assert main(["train-dcsm", "--model", models[0], "--output", str(tmp_path / "from-captions"), "--data",
                 str(root / "captions.tsv"), "--max-steps", "3", "--eval-items", "6"]) == 0, capsys.readouterr().err
    assert load_model(str(tmp_path / "from-captions")).dense_scorer is not None


@pytest.mark.parametrize("args, message", [
    (["--model", "openclip:ViT-B-32/x"], "train-dcsm takes our exports and checkpoints, and openai: models"),
    (["--max-steps", "0"], "option max_steps is 0: it must be at least 1"),
    (["--max-steps", "ten"], "option max_steps expects int, got 'ten'"),
    (["--batch-size", "1"], "option batch_size is 1: it must be at least 2"),
    (["--lr", "-1"], "option lr is -1.0: it must be above 0"),
    (["--lr", "inf"], "option lr is inf: it must be above 0"),
    (["--seed", "-3"], "option seed is -3: it must be at least 0 and at most 4294967295"),
    (["--eval-items", "0"], "option eval_items is 0: it must be at least 1"),
    (["--device", "cuda:7"], "--device cuda:7"),
    (["--data", "/no/such/shards.tar"], "shard not found: /no/such/shards.tar"),
])
def test_train_dcsm_bad_input_is_one_line_before_a_model_is_loaded(models, tmp_path, capsys, monkeypatch, args,
                                                                    message):
    def load(*args):
        raise AssertionError("a model was loaded before every value was checked")

    monkeypatch.setattr(train_dcsm, "load_clip", load)
    monkeypatch.setattr(train_dcsm, "load_openai", load)
    argv = ["train-dcsm", "--model", models[0], "--output", str(tmp_path / "x"), *args]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1, err


def test_train_dcsm_bad_model_is_one_line(tmp_path, capsys):
    assert main(["train-dcsm", "--model", "/no/such/model", "--output", str(tmp_path / "x")]) == 2
    assert "unknown model '/no/such/model'" in capsys.readouterr().err


def test_train_dcsm_refuses_an_output_that_would_replace_other_work(models, tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "last.ckpt").write_text("hours of training")
    (tmp_path / "head").write_text("an earlier head")
    for output, message in ((tmp_path / "run", "holds files that are not a model"),
                            (tmp_path / "head", "is a file: give a folder")):
        assert main(["train-dcsm", "--model", models[0], "--output", str(output), "--max-steps", "1"]) == 2
        assert message in capsys.readouterr().err
    assert (tmp_path / "run" / "last.ckpt").read_text() == "hours of training"
    assert (tmp_path / "head").read_text() == "an earlier head"


def test_unreadable_benchmark_images_are_counted_and_the_first_few_named(models, tmp_path, caplog):
    records = [{"image_path": f"missing{i}.png", "caption_options": ["a", "b"]} for i in range(6)]
    (tmp_path / "images").mkdir()
    Image.new("RGB", (40, 30), "red").save(tmp_path / "images" / "red.png")
    records.append({"image_path": "red.png", "caption_options": ["a red square", "a blue square"]})
    (tmp_path / "whatsup.json").write_text(json.dumps(records))
    items = open_probes(f"whatsup:{tmp_path / 'whatsup.json'}", str(tmp_path / "images"))
    with caplog.at_level(logging.WARNING):
        scored = score_items(load_eval_model(models[0]), items)
    assert scored["cosine"].metrics["n_items"] == 1
    messages = [r.getMessage() for r in caplog.records]
    assert sum(m.startswith("skipping image") for m in messages) == SHOWN_PER_REASON
    assert messages[SHOWN_PER_REASON:] == ["skipping more samples for unreadable image: counted, not shown",
                                           "skipped 6 items whose image could not be read"]
