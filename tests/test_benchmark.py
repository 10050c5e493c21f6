"""benchmarks/throughput.py measures; these tests only check that what it counts is counted right and
that it runs end to end (no timing is asserted: machines here are shared and noisy). Also
benchmarks/reencode_jpeg.py, the JPEG copies that measure what compression costs a row."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from benchmarks.reencode_jpeg import main as reencode_main
from benchmarks.reencode_jpeg import psnr
from benchmarks.throughput import OpCounter, TimedLoader, ops_per_step

import data
from conftest import REPO, require_cifar10_sample


def test_op_counter_counts_computing_operations_not_views():
    x = torch.randn(4, 3)
    with OpCounter() as counter:
        y = x.view(12).unsqueeze(0).t()  # three views: free
        z = (y * 2).sum()  # two kernels
    assert counter.count == 2 and z.item() == 2 * x.sum().item()


def test_ops_per_step_cancels_the_setup():
    def epoch(steps):
        torch.zeros(8).add_(1)  # setup: the same in both epochs
        for _ in range(steps):
            torch.ones(8).mul(3).exp()  # three per step
    assert ops_per_step(epoch) == 3


def test_timed_loader_times_the_steps_between_batches_after_warmup():
    class Batches(list):
        num_samples = 3

    loader = TimedLoader(Batches([1, 2, 3]), torch.device("cpu"))
    for _ in range(3):  # a warm-up epoch and two measured ones
        assert list(loader) == [1, 2, 3]
    assert len(loader) == 3 and loader.num_samples == 3
    steps = loader.step_seconds()
    assert len(steps) == 4 and all(seconds >= 0 for seconds in steps)  # 2 gaps in each measured epoch


def test_benchmark_runs_end_to_end_and_writes_its_table(tmp_path):
    dataset = require_cifar10_sample()
    out = tmp_path / "throughput.json"
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "throughput.py"), "--methods", "tna,fdl",
                             "--models", "convnet", "--steps", "2", "--repeats", "1", "--profile", "fdl",
                             "--dataset", str(dataset), "--amp", "off", "--out", str(out)],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    results = json.loads(out.read_text())
    rows = {row["method"]: row for row in results["methods"]}
    assert set(rows) == {"tna", "fdl"}
    for row in rows.values():
        assert math.isfinite(row["ratio"]) and row["ratio"] > 0 and row["peak_memory_mb"] > 0
        assert row["ops_per_step"] > 0 and math.isfinite(row["floor"]["drift"])
    # FDL runs four sub-steps, three with a backward: far more operations than TNA's one step of two networks
    assert rows["fdl"]["ops_ratio"] > 2 * rows["tna"]["ops_ratio"]
    assert "convolution" in rows["fdl"]["top_ops"] and "where the time goes: fdl" in result.stdout
    assert results["data"]["speedup"] > 0 and 0 < results["data"]["loader_share_of_step"]
    assert results["formats"][0]["flags"] == ["--channels-last"]
    # the targets are reported, met or not (timing is not asserted here); FDL has none: its extra work is inherent
    assert set(results["targets"]) == {"tna convnet step <= 1.10x floor", "device loader >= 10x the DataLoader",
                                       "device loader < 5% of a step"}
    assert "# targets: " in result.stdout


def test_reencode_jpeg_writes_a_loadable_copy_and_never_overwrites(tmp_path, capsys):
    """benchmarks/reencode_jpeg.py: the same images and labels through PIL's JPEG encoder, a dataset data.py reads."""
    out = tmp_path / "q50.npz"
    reencode_main(["sample", str(out), "--quality", "50"])
    source, copy = data.build_data("sample", augment="none"), np.load(out)
    images = source.train.images.permute(0, 2, 3, 1).numpy()
    assert np.array_equal(copy["y_train"], source.train.labels.numpy()) and copy["x_train"].shape == images.shape
    loss = psnr(images, copy["x_train"])
    assert 20 < loss < 40 and f"PSNR {loss:.2f} dB" in capsys.readouterr().out
    reread = data.build_data(str(out), augment="none")
    assert reread.class_names == source.class_names and len(reread.test.labels) == len(source.test.labels)
    before = out.read_bytes()
    with pytest.raises(SystemExit, match="exists"):
        reencode_main(["sample", str(out), "--quality", "90"])
    assert out.read_bytes() == before
