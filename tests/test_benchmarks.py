"""The benchmark scripts run end to end (shrunk): their figures come from code that works."""
import json
import os
import runpy
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(REPO, "benchmarks")


def _run(script: str, args: list[str], monkeypatch, capfd) -> dict:
    monkeypatch.syspath_prepend(BENCHMARKS)
    monkeypatch.setattr(sys, "argv", [script, *args])
    try:
        runpy.run_path(os.path.join(BENCHMARKS, script), run_name="__main__")
    except SystemExit as done:
        assert done.code in (0, None), capfd.readouterr().err[-2000:]
    out = capfd.readouterr().out
    [line] = out.splitlines()  # one JSON line and nothing else on stdout
    return json.loads(line)


@pytest.mark.slow
def test_gpu_check_runs_every_recipe_and_its_resume_then_the_throughput(tmp_path, monkeypatch, capfd):
    result = _run("gpu_check.py", ["--smoke", "--output", str(tmp_path)], monkeypatch, capfd)
    recipes = {r["recipe"]: r for r in result["recipes"]}
    assert set(recipes) == {"coco_xception_bert", "demo_cpu", "fashion_resnet_bert", "fashion_vit_bert",
                            "fashion_vit_gpt2", "large_fsdp"}
    for name, r in recipes.items():
        assert (r["exit_code"], r["resume_exit_code"], r["resumed_to_step"], r["exported"]) == (0, 0, 8, True), r
        assert r["precision"] == ("32-true" if name == "demo_cpu" else "bf16-mixed")  # auto is fp32 on a CPU
        assert any(k.startswith("zeroshot_") for k in r["metrics"]), r
    assert result["reproducible"]["same_metrics"] is True
    throughput = result["throughput"]
    assert throughput["samples_per_s"] > 0 and throughput["openclip_samples_per_s"] > 0
    assert throughput["gflop_per_step"] == throughput["openclip_gflop_per_step"]  # the same architecture both sides


def test_dcsm_scoring_benchmark_reports_both_scorings(monkeypatch, capfd):
    result = _run("dcsm_scoring.py", ["--items", "8", "--batch-size", "4", "--rounds", "1"], monkeypatch, capfd)
    assert set(result["pairs_per_s"]) == {"cosine_batched", "dcsm_batched", "cosine_cached", "dcsm_cached"}
    assert all(rate > 0 for rate in result["pairs_per_s"].values())
    # a dense image keeps one vector per token: the pooled one and the patches
    assert result["bytes_per_image"]["dcsm"] == result["image_tokens"] * result["bytes_per_image"]["cosine"]


@pytest.mark.slow  # 20-35 s on 2 shared cores: two models, two loaders, a tokenizer trained on the shards
def test_train_end_to_end_trains_both_sides_from_the_same_shards(monkeypatch, capfd):
    result = _run("train_end_to_end.py", ["--smoke"], monkeypatch, capfd)
    assert {"end_to_end_ratio", "samples_per_s", "openclip_samples_per_s", "padded_text_length",
            "openclip_padded_text_length", "loader_wait_share", "openclip_loader_wait_share", "batch_size", "workers",
            "steps", "rounds", "caption_words_mean", "context_length"} <= set(result)
    assert result["samples_per_s"] > 0 and result["openclip_samples_per_s"] > 0
    assert 0 <= result["loader_wait_share"] < 1 and 0 <= result["openclip_loader_wait_share"] < 1
    # ours pads each batch to its longest caption, open_clip every caption to the context
    assert result["padded_text_length"] < result["openclip_padded_text_length"] == result["context_length"]
