"""`train.py` against everyday mistakes and faults, run as users run it: each case ends in one line (`error: ...`),
exit code 2, no traceback and no hang, before any training starts, and loses nothing that was there."""
import json
import os
import subprocess
import sys

import pytest
import webdataset as wds
from PIL import Image

from clipfromscratch.cli import main
from clipfromscratch.errors import UsageError
from clipfromscratch.trainer import resolve_devices

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--image-size", "32", "--batch-size", "8", "--embed-dim", "32", "--num-workers", "0",
        "--synthetic-train-samples", "64", "--synthetic-val-samples", "16", "--max-steps", "2", "--warmup-steps", "1"]


def _png(path, colour="red") -> None:
    Image.new("RGB", (16, 16), colour).save(path)


def _shard(path, samples: list[dict]) -> None:
    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)


def _table(folder, rows: list[str], name="t.tsv") -> str:
    (folder / name).write_text("filepath\tcaption\n" + "".join(f"{row}\n" for row in rows))
    return str(folder / name)


def not_a_tar(tmp):
    (tmp / "x.tar").write_text("a text file named .tar")
    return ["--train-data", str(tmp / "x.tar")]


def shard_of_broken_images(tmp):
    _shard(tmp / "s.tar", [{"__key__": f"{i}", "jpg": b"\xff\xd8 not a jpeg", "txt": f"caption {i}"}
                           for i in range(20)])
    return ["--train-data", str(tmp / "s.tar")]


def shard_smaller_than_a_batch(tmp):
    _png(tmp / "a.png")
    data = (tmp / "a.png").read_bytes()
    _shard(tmp / "s.tar", [{"__key__": f"{i}", "png": data, "txt": f"caption {i}"} for i in range(5)])
    return ["--train-data", str(tmp / "s.tar")]


def table_smaller_than_a_batch(tmp):
    _png(tmp / "a.png")
    return ["--train-data", _table(tmp, [f"a.png\tcaption {i}" for i in range(5)])]


def table_images_all_missing(tmp):
    return ["--train-data", _table(tmp, [f"img/{i}.png\tcaption {i}" for i in range(30)])]


def table_images_all_broken(tmp):
    (tmp / "a.png").write_bytes(b"not an image")
    return ["--train-data", _table(tmp, [f"a.png\tcaption {i}" for i in range(30)])]


def synthetic_smaller_than_a_batch(tmp):
    return ["--synthetic-train-samples", "5"]


def table_smaller_than_a_batch_per_rank(tmp):
    _png(tmp / "a.png")
    return ["--train-data", _table(tmp, [f"a.png\tcaption {i}" for i in range(12)]), "--accelerator", "cpu",
            "--devices", "2", "--strategy", "ddp"]


def output_dir_is_a_file(tmp):
    (tmp / "out").write_text("")
    return ["--output-dir", str(tmp / "out")]


def output_dir_inside_a_file(tmp):
    (tmp / "out").write_text("")
    return ["--output-dir", str(tmp / "out" / "run")]


def output_dir_cannot_be_written(tmp, unwritable):
    return ["--output-dir", os.path.join(unwritable, "run")]


def output_dir_holds_a_finished_run(tmp):
    (tmp / "run").mkdir()
    (tmp / "run" / "last.ckpt").write_bytes(b"finished work")
    return ["--output-dir", str(tmp / "run")]


def max_steps_zero(tmp):
    return ["--max-steps", "0"]


def devices_beyond_the_machine(tmp):
    return ["--accelerator", "cpu", "--devices", "999"]


def device_list_on_a_cpu(tmp):
    return ["--accelerator", "cpu", "--devices", "0,1"]


def gpu_asked_for_without_one(tmp):
    if torch_cuda():
        pytest.skip("this machine has a GPU")
    return ["--accelerator", "gpu"]


def tensorboard_not_installed(tmp):
    import importlib.util
    if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
        pytest.skip("tensorboard is installed here")
    return ["--logger", "tensorboard"]


def resume_from_a_damaged_checkpoint(tmp):
    (tmp / "run").mkdir()
    (tmp / "run" / "last.ckpt").write_bytes(b"PK\x03\x04 truncated")
    return ["--resume", str(tmp / "run")]


def remote_shards_with_workers_and_no_epoch_size(tmp):
    return ["--train-data", "pipe:cat a.tar::pipe:cat b.tar", "--num-workers", "2"]


def torch_cuda() -> bool:
    import torch
    return torch.cuda.is_available()


CASES = [  # (make the fault, what the one line says)
    (not_a_tar, "0 readable samples, fewer than one batch of 8 (1 of 1 shards unreadable)"),
    (shard_of_broken_images, "0 readable samples, fewer than one batch of 8 (skipped unreadable image: 20)"),
    (shard_smaller_than_a_batch, "5 readable samples, fewer than one batch of 8"),
    (table_smaller_than_a_batch, "5 usable samples, fewer than one batch of 8 per rank: lower --batch-size"),
    (table_images_all_missing, "no usable rows: 30 rows whose image file does not exist"),
    (table_images_all_broken, "0 of 30 rows have an image that can be read, fewer than one batch of 8"),
    (synthetic_smaller_than_a_batch, "5 usable samples, fewer than one batch of 8"),
    (table_smaller_than_a_batch_per_rank, "12 usable samples, fewer than one batch of 8 per rank (2 ranks)"),
    (output_dir_is_a_file, "is a file: give a folder"),
    (output_dir_inside_a_file, "which is a file: give a folder"),
    (output_dir_cannot_be_written, "cannot write there"),
    (output_dir_holds_a_finished_run, "holds a run already (last.ckpt): continue it with --resume"),
    (max_steps_zero, "option max_steps is 0: a run trains at least 1 step"),
    (devices_beyond_the_machine, "option devices is '999', and this machine has"),
    (device_list_on_a_cpu, "a list names GPUs; on a CPU give a number of processes"),
    (gpu_asked_for_without_one, "cannot set up training: "),
    (tensorboard_not_installed, "pip install 'clipfromscratch[tensorboard]'"),
    (resume_from_a_damaged_checkpoint, "cannot read checkpoint"),
    (remote_shards_with_workers_and_no_epoch_size, "give --train-num-samples"),
]


@pytest.mark.parametrize("make, message", CASES, ids=[make.__name__ for make, _ in CASES])
def test_bad_input_ends_in_one_line_before_any_work(tmp_path, capsys, unwritable_dir, make, message):
    args = make(tmp_path, unwritable_dir) if make is output_dir_cannot_be_written else make(tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    if "--output-dir" not in args and "--resume" not in args:
        args += ["--output-dir", str(tmp_path / "new-run")]
    assert main([*TINY, *args]) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1], err
    assert len(lines) <= 3 and "Traceback" not in out + err, err
    assert not (tmp_path / "new-run" / "config.yaml").exists()  # stopped before the run began
    assert all(p.read_bytes() == data for p, data in before.items())  # nothing that was there is lost


def test_devices_minus_one_means_every_core_of_a_cpu():
    assert resolve_devices("-1", "cpu") == len(os.sched_getaffinity(0))
    assert resolve_devices("auto", "cpu") == 1
    with pytest.raises(UsageError, match=r"option devices is '0,7'"):
        resolve_devices("0,7", "gpu")


def test_a_second_run_on_a_folder_in_use_is_refused_and_the_first_keeps_it(tmp_path, capsys):
    """The first run is stood in for by a process holding the folder's lock, as a live training holds it."""
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(run / 'run.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\nos.write(fd, b'pid 77 on gpu-node-3 since 2026-12-03 09:00:00')\n"
        "print('locked', flush=True)\ntime.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main([*TINY, "--output-dir", str(run)]) == 2
        err = capsys.readouterr().err.strip()
        assert err == (f"error: {run} is in use by another run (pid 77 on gpu-node-3 since 2026-12-03 09:00:00): "
                       "wait for it to end, or give another --output-dir")
        assert sorted(os.listdir(run)) == ["run.lock"]  # the second run wrote nothing there
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.slow
def test_progress_reaches_a_log_file(tmp_path):
    """stdout to a file, as SLURM's .out and nohup have it: lines at every N steps and after each validation."""
    log = tmp_path / "train.out"
    with open(log, "w") as stdout:
        done = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), *TINY, "--max-steps", "20",
                               "--val-every-n-steps", "10", "--progress-every-n-steps", "5", "--output-dir",
                               str(tmp_path / "run")], cwd=tmp_path, stdout=stdout, stderr=subprocess.PIPE,
                              text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    lines = log.read_text().splitlines()
    steps = [line for line in lines if line.startswith("step ")]
    assert [line.split()[1] for line in steps] == ["5/20", "10/20", "15/20", "20/20"], lines
    assert all(" loss " in line and " samples/s" in line for line in steps)
    assert all("  ETA " in line for line in steps)
    assert [line.split(":")[0] for line in lines if line.startswith("validation")] == [
        "validation at step 10", "validation at step 20"]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    validation = next(line for line in lines if line.startswith("validation at step 20"))
    assert f"caption->image {metrics['image_retrieval_recall@1']:.4f}" in validation


@pytest.mark.slow
def test_a_run_ending_inside_its_warmup_says_so(tmp_path, capsys):
    assert main([*TINY, "--max-steps", "4", "--warmup-steps", "10", "--val-every-n-steps", "4", "--output-dir",
                 str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    assert ("warning: --max-steps 4 ends inside the 10-step warm-up: the learning rate peaks at 0.0002, never at "
            "--lr 0.0005") in err


def test_zeroshot_data_that_cannot_be_read_stops_the_run_before_its_first_step(tmp_path, capsys, monkeypatch):
    steps = []
    monkeypatch.setattr("clipfromscratch.lit_module.CLIPModule.training_step",
                        lambda self, batch, index: steps.append(index))
    assert main([*TINY, "--output-dir", str(tmp_path / "run"), "--zeroshot-data", f"imagefolder:{tmp_path / 'no'}",
                 "--zeroshot-label", "x"]) == 2
    assert "error: imagefolder:" in capsys.readouterr().err and steps == []
