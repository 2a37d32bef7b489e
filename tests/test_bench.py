"""`make bench` in miniature: tools/bench.py --quick writes both files with the compute and profile sections,
keeps the data section, and says what it skipped."""

import json
import shutil
import statistics
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[1] / "tools"
sys.path.insert(0, str(TOOLS))

import bench  # noqa: E402


def test_quick_bench_writes_every_section(tmp_path):
    shutil.copy(TOOLS.parent / "docs" / "benchmarks.json", tmp_path / "benchmarks.json")
    data_before = json.loads((tmp_path / "benchmarks.json").read_text())["data"]
    assert bench.main(["--sections", "compute,profile", "--quick", "--batch", "2", "--steps", "1", "--repeats", "1",
                       "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "benchmarks.json").read_text())
    assert results["data"] == data_before  # the data section (make bench-data) is kept
    compute = results["compute"]
    assert compute["matmul_peak_flops"]["fp32"] > 0 and compute["ten_patch_images_per_s"] > 0
    assert compute["precision"] == {"float32_convolutions": "ieee", "float32_matmuls": "ieee"}  # set, not torch's
    assert "torchvision alexnet" in compute["training"]
    for row in compute["training"].values():
        assert row["images_per_s"] > 0 and row["fraction_of_peak"] > 0  # quick: a 256x256 "peak", no bound
        assert row["achieved_flops"] == row["images_per_s"] * row["flops_per_image"]
    # counted, not copied: about 3x the forward pass (0.72 GMAC = 1.45 GFLOP), less conv1's input gradient
    assert 3e9 < compute["flops_per_image"]["two-tower"] < 5e9
    assert compute["flops_per_image"]["two-tower, LRN window sums included"] > compute["flops_per_image"]["two-tower"]
    assert set(compute["memory"]) == {"two-tower", "torchvision"}
    assert "skipped" in compute["gpu"] or "step_ms_synthetic" in compute["gpu"]
    assert set(compute["estimates"]["gpus"]) == {"2x A100 SXM 80GB", "2x H100 SXM", "2x RTX 4090"}
    text = (tmp_path / "benchmarks.md").read_text()
    for heading in ("## Data pipeline", "## Training and evaluation compute", "### On GPUs",
                    "### Estimates for dual-GPU boxes", "## Where a training step's time goes, layer by layer"):
        assert heading in text
    # every section names the devices it ran on: here the CPU, the towers on cpu, cpu
    assert compute["devices"] == ["cpu", "cpu"] and compute["matmul_device"] == "cpu"
    assert all(row["devices"] == ["cpu"] for row in compute["training"].values())
    assert "Measured on the CPU (" in text and "| two-tower, tower by tower (the default) | cpu | " in text
    assert "measured on cpu)" in text and "10-patch evaluation (measured on cpu, cpu," in text
    # the headline ratio: the median of the repeats' own ratios, with their range and the load of each repeat
    ratio, repeats = compute["per_flop_vs_torchvision"], compute["per_flop_vs_torchvision_repeats"]
    assert len(repeats) == 1 and ratio == statistics.median(repeats) and len(compute["load_average_per_repeat"]) == 2
    assert f"runs at {ratio:.2f}x torchvision's speed**: the median of the ratios of the 1 repeats" in text
    # the three targets, each with the ratio this run measured (--quick does not time the compiled net)
    assert (f"| default path, per FLOP | at least 0.95x | {ratio:.2f}x (median; {ratio:.2f}-{ratio:.2f} over the "
            f"repeats) | {'yes' if ratio >= 0.95 else 'no'} |") in text
    assert "| grouped + torch.compile, per FLOP | at least 1.0x | not measured (--quick) | |" in text
    memory = compute["memory"]["two-tower"]["peak_bytes_per_step"] / compute["memory"]["torchvision"]["peak_bytes_per_step"]
    assert f"| training-step memory | at most 1.5x | {memory:.2f}x |" in text
    profile = results["profile"]["networks"]
    assert {row["name"] for row in profile["two-tower (default options)"]["layers"]} >= {"lrn1", "lrn2", "pool5"}
    assert all(row["forward_ms"] > 0 for rows in profile.values() for row in rows["layers"])


def test_each_configuration_runs_where_training_would_and_is_compared_per_device():
    pair, one = ["cuda:0", "cuda:1"], ["cuda:0", "cuda:0"]
    assert bench.config_devices(bench.TRAIN_CONFIGS["two-tower, tower by tower (the default)"], pair) == pair
    assert bench.config_devices(bench.TRAIN_CONFIGS["two-tower, grouped"], pair) == one  # both towers on one GPU
    assert bench.config_devices(bench.TRAIN_CONFIGS["torchvision alexnet"], pair) == one
    # per repeat, from that repeat's two step times: 2 s on two GPUs against 1 s on one is 0.25x per device
    assert bench.ratio_per_flop([2.0, 1.0], 4.0, 2, [1.0, 1.0], 4.0) == [0.25, 0.5]


def test_the_data_sections_loader_rates_and_fidelity_cover_both_record_formats(demo_store, demo_jpeg_store):
    """The quick sibling of the next test: the pieces of the data section on the session's stores."""
    import bench_data

    rates = bench_data.interleaved({"raw": bench_data.store_work(demo_store, batch_size=8),
                                    "jpeg unchecked": bench_data.store_work(demo_jpeg_store, verify=False,
                                                                            batch_size=8)}, 0.1, rounds=1)
    assert all(rate > 0 for rate in rates.values())
    jpeg = bench_data.fidelity(demo_store, demo_jpeg_store)
    assert 0 < jpeg["mean_abs_diff"] < 3 and 0 < jpeg["max_abs_diff"] <= 255
    assert jpeg["bytes_per_image"] < bench_data.store_bytes(demo_store) / 47 / 6


@pytest.mark.slow
def test_the_data_section_measures_each_format_side_by_side(tmp_path, monkeypatch):
    import bench_data

    monkeypatch.setattr(bench_data, "MINI", tmp_path / "absent")  # the demo data: quick, and the same everywhere
    results = bench_data.measure(0.3)
    assert set(results["formats"]) == {"raw", "jpeg q90", "jpeg q95"}
    raw, jpeg = results["formats"]["raw"], results["formats"]["jpeg q95"]
    assert round(raw["bytes_per_image"]) == 196_609 and jpeg["bytes_per_image"] < raw["bytes_per_image"] / 6
    assert raw["images_per_s"] > 0 and jpeg["images_per_s_unchecked"] > 0 and "crc_us_per_image" in jpeg
    text = "\n".join(bench_data.render({"data": results}))
    assert "| **JPEG ratio, per core** |" in text and "Targets: the JPEG store at most 1/6" in text
