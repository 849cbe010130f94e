"""End to end: train on the synthetic data, check it learned, export, reload, resume; and the one-line errors."""
import json
import os

import pytest
import torch

from clipfromscratch import load_model
from clipfromscratch.cli import main
from clipfromscratch.data.synthetic import SyntheticCaptions
from clipfromscratch.eval.zeroshot import zeroshot_accuracy, zeroshot_classifier

VAL_SAMPLES = 200
# small enough for seconds on 2 CPU cores, long enough to learn colours and some shapes
QUICK = ["--image-size", "32", "--batch-size", "64", "--lr", "5e-4", "--warmup-steps", "20", "--max-steps", "250",
         "--val-every-n-steps", "250", "--synthetic-val-samples", str(VAL_SAMPLES), "--num-workers", "0",
         "--embed-dim", "64"]
CHANCE = 1 / VAL_SAMPLES


def _train(tmp_path_factory, text_enc: str, *extra: str) -> str:
    out = str(tmp_path_factory.mktemp(text_enc) / "run")
    assert main(["--image-enc", "vit", "--text-enc", text_enc, "--output-dir", out, *QUICK, *extra]) == 0
    return out


@pytest.fixture(scope="module")
def bert_run(tmp_path_factory):
    # also watches zero-shot accuracy on a named labelled set during training (the eval suite's data forms)
    return _train(tmp_path_factory, "bert", "--zeroshot-data", "synthetic", "--zeroshot-label", "colour")


@pytest.fixture(scope="module")
def gpt2_run(tmp_path_factory):
    return _train(tmp_path_factory, "gpt2")


def _metrics(run: str) -> dict:
    with open(os.path.join(run, "metrics.json")) as f:
        return json.load(f)


@pytest.mark.slow
def test_bert_learns_far_above_chance(bert_run):
    m = _metrics(bert_run)
    assert m["step"] == 250
    for key in ("image_retrieval_recall@10", "text_retrieval_recall@10"):
        assert m[key] > 4 * 10 * CHANCE, m
    assert m["image_retrieval_recall@10"] >= m["image_retrieval_recall@5"] >= m["image_retrieval_recall@1"]
    assert m["zeroshot_colour_acc1"] > 0.6, m  # 8 colours: chance is 0.125
    assert m["zeroshot_synthetic_acc1"] > 0.6, m  # the zero-shot callback, on its own 1,000 samples
    assert all(0.0 <= v <= 1.0 for k, v in m.items() if k != "step")
    assert {"last.ckpt", "config.yaml", "metrics.json", "final"} <= set(os.listdir(bert_run))
    assert any(name.startswith("best-") for name in os.listdir(bert_run))


@pytest.mark.slow
def test_gpt2_learns_about_as_well_as_bert(bert_run, gpt2_run):
    bert, gpt2 = _metrics(bert_run), _metrics(gpt2_run)
    for key in ("image_retrieval_recall@10", "text_retrieval_recall@10"):
        assert gpt2[key] > 4 * 10 * CHANCE, gpt2
    assert gpt2["zeroshot_colour_acc1"] > 0.6, gpt2
    bert_r10 = bert["image_retrieval_recall@10"] + bert["text_retrieval_recall@10"]
    gpt2_r10 = gpt2["image_retrieval_recall@10"] + gpt2["text_retrieval_recall@10"]
    assert gpt2_r10 > 0.6 * bert_r10, (bert, gpt2)


@pytest.mark.slow
def test_export_reloads_the_trained_model(bert_run):
    model = load_model(os.path.join(bert_run, "final"))
    val = SyntheticCaptions("val", VAL_SAMPLES, seed=0, image_size=32, transform=model.preprocess)
    samples = [val[i] for i in range(VAL_SAMPLES)]
    with torch.no_grad():
        images = model.encode_image(torch.stack([s["pixels"] for s in samples]))
        names, templates = SyntheticCaptions.zeroshot_tasks["colour"]
        accuracy = zeroshot_accuracy(images, torch.tensor([s["labels"]["colour"] for s in samples]),
                                     zeroshot_classifier(model.encode_text, names, templates))
    # the same weights, tokenizer and preprocessing as in training give the same figure
    assert accuracy == pytest.approx(_metrics(bert_run)["zeroshot_colour_acc1"], abs=1e-3)


@pytest.mark.slow
def test_resume_continues_the_run(bert_run):
    ckpt = torch.load(os.path.join(bert_run, "last.ckpt"), weights_only=True)
    assert "clip_tokenizer_files" in ckpt and ckpt["global_step"] == 250
    assert main(["--resume", bert_run, "--max-steps", "260", "--val-every-n-steps", "10"]) == 0
    assert _metrics(bert_run)["step"] == 260


@pytest.mark.parametrize("args, message", [
    (["--image-enc", "vgg-nope"], "unknown image encoder 'vgg-nope': choose one of clip_vision, resnet, vit, "
                                     "xception"),
    (["--text-enc", "./no/such/model"], "text encoder directory not found: ./no/such/model"),
    (["--train-data", "missing.tsv"], "caption table not found: missing.tsv"),
    (["--train-data", "no/such/shards-{000..002}.tar"], "shard not found"),
    (["--train-data", "imagefolder:~/pets"], "imagefolder:~/pets is imagefolder data: train data takes captioned"),
    (["--resume", "no/such/run"], "no checkpoint to resume from"),
    (["--model-size", "huge"], "option model_size is 'huge': choose one of tiny, base"),
    (["--lr-schedule", "plateau", "--train-data", "{table}"], "plateau and early stopping watch validation"),
    (["--image-size", "7"], "timm model 'vit_base_patch16_224' at 7 px cannot be built or run: "),
    (["--image-size", "0"], "option image_size is 0: it must be at least 1"),
    (["--precision", "fp8"], "option precision is 'fp8': choose one of auto, 32-true, bf16-mixed, 16-mixed"),
    (["--lr", "-1"], "option lr is -1.0: it must be above 0"),
    (["--image-overrides", '{"mlp_ratio": "x"}'], 'with image_overrides {"mlp_ratio": "x"} cannot be built or run'),
    (["--image-overrides", "[1, 2]"], "option image_overrides expects a mapping of names to values, got '[1, 2]'"),
    (["--text-overrides", '{"hidden_size": "x"}'], "bad text_overrides {\"hidden_size\": \"x\"} for bert: "),
    (["--embed-dim", "0"], "option embed_dim is 0: it must be at least 1"),
    (["--warmup-steps", "-5"], "option warmup_steps is -5: it must be at least 0"),
    (["--context-length", "500"], "option context_length is 500: text tower bert has 128 positions"),
    (["--devices", "two"], "option devices is 'two': give a number, a list like 0,1, or auto"),
    (["--dataset-resampled", "--train-data", "{table}"], "--dataset-resampled needs --train-num-samples"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, args, message):
    table = tmp_path / "t.tsv"
    table.write_text("filepath\tcaption\nimg.png\ta caption\n")
    args = [a.replace("{table}", str(table)) for a in args]
    # few synthetic captions: the tokenizer trains in no time before the model fails to build
    assert main([*args, "--output-dir", str(tmp_path / "run"), "--max-steps", "1",
                 "--synthetic-train-samples", "64"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_ranks_started_apart_need_a_run_folder_they_can_share(tmp_path, capsys, monkeypatch):
    """Under torchrun every rank runs this command by itself: time-stamped default folders would differ."""
    monkeypatch.chdir(tmp_path)
    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "GROUP_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999", "TORCHELASTIC_RUN_ID": "test"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr("pytorch_lightning.Trainer.fit", lambda *a, **k: pytest.fail("got past the folder check"))
    assert main(["--accelerator", "cpu", "--devices", "2", "--strategy", "ddp", "--max-steps", "1"]) == 2
    assert "give --output-dir or --run-name" in capsys.readouterr().err
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.slow
def test_the_same_seed_gives_the_same_run(tmp_path):
    """Byte for byte: the tokenizer trained from the captions, and every metric (loader workers included)."""
    runs = [tmp_path / "first", tmp_path / "second"]
    for run in runs:
        assert main(["--output-dir", str(run), "--max-steps", "30", "--val-every-n-steps", "30", "--batch-size", "16",
                     "--synthetic-val-samples", "64", "--num-workers", "1", "--seed", "3"]) == 0
    for name in ("tokenizer/tokenizer.json", "final/tokenizer/tokenizer.json", "metrics.json"):
        assert (runs[0] / name).read_bytes() == (runs[1] / name).read_bytes(), name
