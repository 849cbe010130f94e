"""Text-to-image search: the planted image comes first, and the folder's embeddings are cached by mtime; a damaged
or unwritable cache never stops an answer."""
import json
import logging
import os

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import functional as TF

from clipfromscratch.cli import main
from clipfromscratch.errors import UsageError
from clipfromscratch.eval.models import EvalModel
from clipfromscratch.eval.search import cache_file, contact_sheet, folder_embeddings, search

COLOURS = {"red": (230, 20, 20), "green": (20, 200, 30), "blue": (20, 30, 230), "grey": (128, 128, 128)}


class ColourModel:
    """A model whose embedding of an image is its mean colour and of a word the colour it names."""

    def __init__(self):
        self.images_encoded = 0

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        self.images_encoded += len(pixels)
        return F.normalize(pixels.mean((2, 3)) - 0.5, dim=-1)

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        return F.normalize(torch.tensor([COLOURS[t] for t in texts], dtype=torch.float) / 255 - 0.5, dim=-1)

    def as_eval_model(self) -> EvalModel:
        return EvalModel("colours", self.encode_image, self.encode_text, TF.to_tensor, None, 1.0,
                         torch.device("cpu"), 0.0)


def _folder(tmp_path):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for i, colour in enumerate(["green", "blue", "grey", "green", "blue"]):
        Image.new("RGB", (24, 20), COLOURS[colour]).save(folder / f"{i}_{colour}.png")
    Image.new("RGB", (24, 20), (210, 40, 30)).save(folder / "sub" / "planted.jpg")  # nearly red
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_search_finds_the_planted_image_and_reuses_the_cache(tmp_path):
    folder, cache = _folder(tmp_path), tmp_path / "cache"
    colours = ColourModel()
    model = colours.as_eval_model()
    hits = search(model, str(folder), "red", k=3, cache_dir=str(cache))
    assert hits[0]["path"].endswith("planted.jpg") and hits[0]["rank"] == 1
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    assert colours.images_encoded == 6

    assert search(model, str(folder), "blue", k=2, cache_dir=str(cache))[0]["path"].endswith("blue.png")
    assert colours.images_encoded == 6  # the second query encoded nothing

    # a changed file is encoded again, and only that one
    Image.new("RGB", (24, 20), COLOURS["red"]).save(folder / "2_grey.png")
    os.utime(folder / "2_grey.png", (1e9, 1e9))
    paths, features = folder_embeddings(model, str(folder), str(cache))
    assert colours.images_encoded == 7 and len(paths) == len(features) == 6
    assert search(model, str(folder), "red", k=1, cache_dir=str(cache))[0]["path"].endswith("2_grey.png")

    # a corrupt file added later is left out; the rest still answers from the cache
    (folder / "corrupt.jpg").write_bytes(b"not a jpeg")
    assert search(model, str(folder), "red", k=9, cache_dir=str(cache))[0]["path"].endswith("2_grey.png")
    assert colours.images_encoded == 7

    sheet = tmp_path / "sheet.png"
    contact_sheet(hits, "red", str(sheet))
    with Image.open(sheet) as image:
        assert image.width == 2 * 192  # 3 hits -> 2 columns, 2 rows


def test_search_command_with_our_model(tmp_path, capsys):
    from test_eval_models import export_tiny_ours

    folder, export = _folder(tmp_path), export_tiny_ours(tmp_path / "export")
    sheet = tmp_path / "sheets" / "new" / "top.png"  # a folder that does not exist yet is made
    args = ["search", "--model", export, "--images", str(folder), "--query", "a red circle", "-k", "4",
            "--sheet", str(sheet), "--cache-dir", str(tmp_path / "cache")]
    assert main(args) == 0
    hits = json.loads(capsys.readouterr().out)
    assert [h["rank"] for h in hits] == [1, 2, 3, 4] and os.path.isfile(sheet)
    assert len(os.listdir(tmp_path / "cache")) == 1

    assert main([*args[:4], str(tmp_path / "nowhere"), *args[5:]]) == 2
    assert "error: image folder not found" in capsys.readouterr().err
    assert main([*args, "--seed", "3"]) == 0  # accepted for one release, with one line saying it does nothing
    assert "warning: search --seed does nothing" in capsys.readouterr().err


@pytest.mark.parametrize("damage", [b"not a cache", b"", None], ids=["garbage", "empty", "other-contents"])
def test_a_damaged_cache_is_rebuilt_with_one_warning(tmp_path, caplog, damage):
    folder, cache = _folder(tmp_path), tmp_path / "cache"
    colours = ColourModel()
    model = colours.as_eval_model()
    search(model, str(folder), "red", cache_dir=str(cache))
    path = cache_file(model, str(folder), str(cache))
    if damage is None:
        torch.save({"paths": ["only one"], "mtimes": [], "features": torch.zeros(3)}, path)
    else:
        with open(path, "wb") as f:
            f.write(damage)
    with caplog.at_level(logging.WARNING):
        assert search(model, str(folder), "red", cache_dir=str(cache))[0]["path"].endswith("planted.jpg")
    assert len(caplog.records) == 1 and "encoding the folder again" in caplog.records[0].getMessage()
    assert colours.images_encoded == 12
    assert len(torch.load(path, weights_only=True)["paths"]) == 6  # rebuilt


def test_a_cache_that_cannot_be_written_still_answers_with_one_warning(tmp_path, unwritable_dir, caplog):
    folder, model, cache = _folder(tmp_path), ColourModel().as_eval_model(), f"{unwritable_dir}/cache"
    with caplog.at_level(logging.WARNING):
        hits = search(model, str(folder), "red", cache_dir=cache)
    assert hits[0]["path"].endswith("planted.jpg")
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == [
        f"cannot write the search cache {cache_file(model, str(folder), cache)}"]


@pytest.mark.parametrize("query", ["", "   "])
def test_an_empty_query_is_refused_before_anything_is_encoded(tmp_path, query):
    colours = ColourModel()
    with pytest.raises(UsageError, match="--query is empty"):
        search(colours.as_eval_model(), str(_folder(tmp_path)), query, cache_dir=str(tmp_path / "cache"))
    assert colours.images_encoded == 0
