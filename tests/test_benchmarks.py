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
    with pytest.raises(SystemExit) as done:
        runpy.run_path(os.path.join(BENCHMARKS, script), run_name="__main__")
    out = capfd.readouterr().out
    assert done.value.code in (0, None), out[-2000:]
    [line] = out.splitlines()  # one JSON line and nothing else on stdout
    return json.loads(line)


def test_gpu_check_runs_every_recipe_and_its_resume_then_the_throughput(tmp_path, monkeypatch, capfd):
    result = _run("gpu_check.py", ["--smoke", "--output", str(tmp_path)], monkeypatch, capfd)
    recipes = {r["recipe"]: r for r in result["recipes"]}
    assert set(recipes) == {"coco_xception_bert", "demo_cpu", "fashion_resnet_bert", "fashion_vit_bert",
                            "fashion_vit_gpt2"}
    for name, r in recipes.items():
        assert (r["exit_code"], r["resume_exit_code"], r["resumed_to_step"], r["exported"]) == (0, 0, 8, True), r
        assert r["precision"] == ("32-true" if name == "demo_cpu" else "bf16-mixed")  # auto is fp32 on a CPU
        assert any(k.startswith("zeroshot_") for k in r["metrics"]), r
    assert result["reproducible"]["same_metrics"] is True
    throughput = result["throughput"]
    assert throughput["samples_per_s"] > 0 and throughput["openclip_samples_per_s"] > 0
    assert throughput["gflop_per_step"] == throughput["openclip_gflop_per_step"]  # the same architecture both sides
