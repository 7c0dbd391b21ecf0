"""The training-throughput benchmark: its CI-size run from the command line, and its reference loop's pieces."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from workflow_utils import REPO, environment

SCRIPT = REPO / "benchmarks" / "train_throughput.py"


def load_benchmark():
    """The benchmark script as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("train_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ci_size_run_reports_both_rates_and_their_ratio(tmp_path):
    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, str(SCRIPT), "--ci", "--device", "cpu", "--json", str(out)],
                         capture_output=True, text=True, env=environment(), timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    trainer, reference = result["trainer"], result["reference"]
    assert result["n"] == 256 and result["width"] == 8 and result["threads"] == 1 and result["workers"] == 1
    assert len(trainer["epoch_seconds"]) == 2 and len(reference["epoch_seconds"]) == 2
    # the first epoch is warm-up; the rate is N over the later epochs' time
    assert trainer["images_per_second"] == pytest.approx(256 / trainer["epoch_seconds"][1])
    assert reference["images_per_second"] == pytest.approx(256 / reference["epoch_seconds"][1])
    assert result["ratio"] == pytest.approx(trainer["images_per_second"] / reference["images_per_second"])
    assert trainer["settings"] == {"amp": False, "channels_last": False, "compile": False, "data_on_device": True}
    assert [line.split() for line in run.stdout.splitlines() if line.startswith("ratio")] == [
        ["ratio", f"{result['ratio']:.2f}x"]]


def test_steady_rate_skips_the_first_epoch():
    bench = load_benchmark()
    assert bench.steady_rate(300, [9.0, 1.0, 2.0, 3.0]) == pytest.approx(150.0)  # median of 1, 2, 3
    assert bench.steady_rate(300, [3.0]) == pytest.approx(100.0)


def test_reference_dataset_serves_pil_images_through_the_transform():
    bench = load_benchmark()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 6, 6, 3), dtype=np.uint8)
    dataset = bench.InMemoryImageDataset(images, np.array([4, 5, 6]), bench.reference_transform(6, padding=1))
    torch.manual_seed(0)
    x, label = dataset[1]
    assert label == 5 and x.dtype == torch.float32 and x.shape == (3, 6, 6)
    # the output is a 1-pixel-padded random crop of the image, maybe flipped, scaled to [0, 1]
    padded = F.pad(torch.from_numpy(images[1]).permute(2, 0, 1).float() / 255, (1, 1, 1, 1))
    crops = [padded[:, dy:dy + 6, dx:dx + 6] for dy in range(3) for dx in range(3)]
    closest = min(min(float((x - c).abs().max()), float((x - c.flip(2)).abs().max())) for c in crops)
    assert closest < 1e-6  # equal up to float rounding of /255


def test_trainer_spec_matches_the_reference_loop():
    bench = load_benchmark()
    args = bench.parse_args(["--ci", "--amp", "true", "--compile", "false"])
    spec = bench.trainer_spec(args)
    assert spec["augment"] == ["crop", "flip"] and spec["crop_padding"] == 4
    assert spec["optimizer"] == {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}
    assert spec["schedule"] == {"name": "constant"} and spec["batch_size"] == 64
    assert spec["amp"] is True and spec["compile"] is False and spec["channels_last"] == "auto"


# -- the prepared GPU benchmark (benchmarks/gpu.py), at its CPU-tiny size -------------------------

import math  # noqa: E402

GPU_SCRIPT = REPO / "benchmarks" / "gpu.py"


def load_gpu_benchmark():
    spec = importlib.util.spec_from_file_location("gpu_benchmark", GPU_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_benchmark_cpu_tiny_runs_every_section_and_every_figure_is_positive(tmp_path):
    run = subprocess.run([sys.executable, str(GPU_SCRIPT), "--size", "cpu-tiny", "--device", "cpu", "--out",
                          str(tmp_path)], capture_output=True, text=True, env=environment(), timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((tmp_path / "gpu-benchmark.json").read_text())
    gpu = load_gpu_benchmark()
    assert {"device", "device_type", "torch", "cuda", "cudnn", "size", "budget_s", "wall_s", "figures", "goals",
            "details", "skipped", "notes"} <= set(result)
    assert result["size"] == "cpu-tiny" and result["device_type"] == "cpu" and result["skipped"] == []
    assert set(result["figures"]) == set(gpu.FIGURES)  # every section measured all of its figures
    for key, value in result["figures"].items():
        assert isinstance(value, float) and math.isfinite(value) and value > 0, key
    assert set(result["details"]) == set(gpu.SECTIONS)
    assert {key: goal["value"] for key, goal in result["goals"].items()} == {
        key: result["figures"][key] for key in ("ratio.defaults", "epoch.compiled_s", "gradnorm.speedup")}
    # the ratios are the rates they divide
    figures = result["figures"]
    assert figures["ratio.defaults"] == pytest.approx(
        figures["trainer_defaults.images_per_s"] / figures["reference.images_per_s"])
    assert figures["epoch.compile_gain"] == pytest.approx(figures["epoch.eager_s"] / figures["epoch.compiled_s"])
    assert result["details"]["epoch"]["compiled"]["settings"]["compile"] is True
    assert result["details"]["epoch"]["eager"]["settings"]["compile"] is False
    assert result["details"]["trainer_plain"]["settings"] == {"amp": False, "channels_last": False, "compile": False,
                                                              "data_on_device": True}
    assert result["details"]["triggerue"]["extrapolated"] is True  # timed on a few images, scaled to 50k
    table = (tmp_path / "gpu-benchmark.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| section")]
    assert len(rows) == len(gpu.FIGURES) and "| skipped |" not in table
    assert run.stdout.strip() == table.strip()


def test_gpu_benchmark_reports_the_sections_it_skipped(tmp_path):
    gpu = load_gpu_benchmark()
    result = gpu.main(["--size", "cpu-tiny", "--device", "cpu", "--out", str(tmp_path), "--budget", "0",
                       "--sections", "gradnorm,pgd10"])
    assert result["figures"] == {}
    reasons = {item["section"]: item["reason"] for item in result["skipped"]}
    assert set(reasons) == set(gpu.SECTIONS)
    assert reasons["trainer_defaults"] == "not selected (--sections)"
    assert reasons["gradnorm"].startswith("0 s of the 0 s budget left")
    assert json.loads((tmp_path / "gpu-benchmark.json").read_text())["skipped"] == result["skipped"]
    assert "Skipped:" in (tmp_path / "gpu-benchmark.md").read_text()
