"""tools/gpu_check.sh, the first command on a GPU box (docs/gpu-runs/README.md), run on the CPU: its folder with one
stage, and (slow) every stage small on [cpu,cpu], the same steps a GPU box runs."""

import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "gpu_check.sh"
sys.path.insert(0, str(SCRIPT.parent))

import gpu_check as gpu_check_module  # noqa: E402


def gpu_check(out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), "--quick", "--devices", "cpu,cpu", "--out", str(out), *args],
                          capture_output=True, text=True, timeout=1800, env={**os.environ, "PYTHON": sys.executable})


def archived(folder: Path) -> set[str]:
    with tarfile.open(folder / "details.tar.gz") as archive:
        return set(archive.getnames())


def test_one_stage_writes_the_folder(tmp_path):
    done = gpu_check(tmp_path / "check", "--stages", "environment")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    folder = tmp_path / "check"
    assert sorted(p.name for p in folder.iterdir()) == ["console.log", "details.tar.gz", "summary.txt"]
    summary = (folder / "summary.txt").read_text().splitlines()
    assert "1 of 1 stages passed; devices cpu,cpu, quick (small sizes)" in summary[0]
    assert summary[2].startswith("PASS environment (") and "torch " in summary[2]
    assert {"details/environment.json", "details/summary.txt"} <= archived(folder)
    assert "== environment" in (folder / "console.log").read_text()


def test_a_bad_stage_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        gpu_check_module.main(["--stages", "environment,trainn", "--out", str(tmp_path)])
    assert stopped.value.code == 2 and "--stages is any of environment,preflight" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before anything was written


@pytest.mark.slow  # every stage on the CPU: 3-6 minutes on the 2-core machine
def test_every_stage_passes_small_on_the_cpu(tmp_path):
    done = gpu_check(tmp_path / "check")
    folder = tmp_path / "check"
    summary = (folder / "summary.txt").read_text()
    assert done.returncode == 0, summary + done.stdout[-3000:]
    assert "5 of 5 stages passed" in summary
    for layout in ("false", "true"):  # killed after its first checkpoint, resumed, the same as uninterrupted
        assert re.search(f"speed.grouped={layout} on cpu, cpu, batch 4: killed at step [2-5] of 6, then resumed;",
                         summary)
    assert summary.count("weight and velocity tensors bit-equal to the uninterrupted run's") == 2
    assert "different:" not in summary
    names = archived(folder)
    assert {"details/preflight/preflight.json", "details/bench/benchmarks.json", "details/bench/benchmarks.md",
            "details/resume-towers/killed/train.log", "details/resume-grouped/uninterrupted/metrics.json"} <= names
