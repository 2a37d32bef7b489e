"""Sweeps through Hydra's launchers (docs/ablations.md): the GPU pair of each job of LAUNCHER=pairs with a faked GPU
count (no plugin needed), the Makefile's LAUNCHER argument, and, with hydra-submitit-launcher installed
(pip install -e '.[cluster]'), the SLURM job array that `make ablate-lrn LAUNCHER=slurm` submits through a fake
sbatch before it returns, and a LAUNCHER=pairs sweep run end to end by submitit's local executor, one of its jobs
preempted (SIGUSR2), requeued and resumed to exactly the weights of an uninterrupted run."""

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from helpers import command
from repro import launchers
from repro.config import CONF_DIR
from repro.reports.ablation import summarise

REPO = Path(CONF_DIR).parent
VENV = Path(sys.executable).parent.parent


def plugin_installed() -> bool:
    try:
        return importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is not None
    except ModuleNotFoundError:  # no hydra_plugins package at all
        return False


# a mark rather than importorskip, so that a skipped test does not build its fixtures (a tiny run) first
needs_plugin = pytest.mark.skipif(not plugin_installed(), reason="needs hydra-submitit-launcher, the optional extra: "
                                                                 ".venv/bin/pip install -e '.[cluster]'")


def job(num: int, sweep_dir: Path):
    """What own_gpu_pair reads of a job's Hydra config."""
    return OmegaConf.create({"job": {"num": num}, "sweep": {"dir": str(sweep_dir)}})


@pytest.fixture
def eight_gpus(monkeypatch):
    """A sweep command on a box with 8 GPUs, in a job of submitit's local executor (which set CUDA_VISIBLE_DEVICES
    to nothing: gpus_per_node is not set)."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv(launchers.SWEEP_GPUS, raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    launchers.share_visible_gpus()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "local")


def test_each_job_of_a_box_with_four_pairs_sees_its_own_pair(eight_gpus, tmp_path):
    seen = []
    for num in range(4):  # the jobs run at once: each holds its pair until it ends
        with launchers.own_gpu_pair(job(num, tmp_path)):
            seen.append(os.environ["CUDA_VISIBLE_DEVICES"])
    assert seen == ["0,1", "2,3", "4,5", "6,7"]


def test_a_job_waits_while_the_earlier_job_of_its_pair_runs(eight_gpus, tmp_path):
    # Job 5 of 4 pairs runs on pair 1, after job 1: started while job 1 holds the pair, it must wait for its end.
    later = [sys.executable, "-c", "import os, sys\nfrom omegaconf import OmegaConf\nfrom repro.launchers import "
             "own_gpu_pair\nwith own_gpu_pair(OmegaConf.create({'job': {'num': 5}, 'sweep': {'dir': sys.argv[1]}})):"
             "\n    print(os.environ['CUDA_VISIBLE_DEVICES'])", str(tmp_path)]
    with launchers.own_gpu_pair(job(1, tmp_path)):
        waiting = subprocess.Popen(later, stdout=subprocess.PIPE, text=True)
        with pytest.raises(subprocess.TimeoutExpired):
            waiting.communicate(timeout=5)
    out, _ = waiting.communicate(timeout=60)
    assert waiting.returncode == 0 and out.split()[-1] == "2,3"


@pytest.mark.parametrize("gpus", [2, 0])
def test_with_one_pair_or_none_the_jobs_run_one_at_a_time_on_what_the_command_saw(gpus, monkeypatch, tmp_path):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv(launchers.SWEEP_GPUS, raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    launchers.share_visible_gpus()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "local")
    for num in range(3):
        with launchers.own_gpu_pair(job(num, tmp_path)):
            assert os.environ["CUDA_VISIBLE_DEVICES"] == ",".join(map(str, range(gpus)))
    assert [p.name for p in tmp_path.iterdir()] == [".gpu-pair-0.lock"]  # one pair: one job at a time


def test_the_pairs_are_those_of_the_gpus_the_sweep_command_was_given(monkeypatch, tmp_path):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    monkeypatch.delenv(launchers.SWEEP_GPUS, raising=False)
    launchers.share_visible_gpus()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")  # submitit's with gpus_per_node=2: the first two of the box
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "local")
    with launchers.own_gpu_pair(job(3, tmp_path)):
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "6,7"


@pytest.mark.parametrize("executor", [None, "slurm"])
def test_other_launchers_keep_the_devices(executor, monkeypatch, tmp_path):
    # the basic launcher runs the jobs in its own process; SLURM gives each job its own two GPUs
    monkeypatch.setenv(launchers.SWEEP_GPUS, "0,1,2,3")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    if executor:
        monkeypatch.setenv("SUBMITIT_EXECUTOR", executor)
    else:
        monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    with launchers.own_gpu_pair(job(1, tmp_path)):
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert not list(tmp_path.iterdir())


def make(*args, **kwargs) -> subprocess.CompletedProcess:
    """The Makefile's target, with this virtualenv taken as installed (no reinstall when setup.cfg is newer)."""
    return subprocess.run(["make", "--no-print-directory", "-C", str(REPO), f"VENV={VENV}", "-o", f"{VENV}/.installed",
                           *args], capture_output=True, text=True, **kwargs)


def test_make_refuses_an_unknown_launcher():
    result = make("ablate-lrn", "LAUNCHER=cloud", timeout=60)
    assert result.returncode == 2 and "LAUNCHER=cloud: one of basic, pairs, slurm" in result.stderr


FAKE_SLURM = {  # on PATH: what submitit calls (srun only has to exist)
    "srun": "#!/bin/sh\nexit 0\n",
    "sbatch": '#!/bin/sh\ncp "$1" "$FAKE_SBATCH_RECORD"\necho "Submitted batch job 4242"\n',
    "sacct": "#!/bin/sh\nexit 0\n",  # nothing known yet: the driver keeps waiting
}


@needs_plugin
def test_make_ablations_on_slurm_submits_a_job_array_of_gpu_pairs_and_returns(demo_store, tmp_path):
    bin_dir, record, sweep_dir = tmp_path / "bin", tmp_path / "sbatch.sh", tmp_path / "sweep"
    bin_dir.mkdir()
    for name, text in FAKE_SLURM.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_SBATCH_RECORD": str(record)}
    started = time.time()
    result = make("ablate-lrn", "LAUNCHER=slurm", f"STORE={demo_store}", f"SWEEP={sweep_dir}",
                  "ARGS=hydra.launcher.partition=gpu hydra.launcher.account=proj hydra.launcher.timeout_min=2880",
                  env=env, timeout=60, start_new_session=True)
    try:
        assert result.returncode == 0 and time.time() - started < 30, result.stderr
        assert f"{sweep_dir}/sweep.log" in result.stdout and "make ablation-report SWEEP=" in result.stdout
        deadline = time.time() + 120
        while not record.exists() and time.time() < deadline:  # the driver, in the background, submits the array
            time.sleep(0.2)
        script = record.read_text()
    finally:  # the driver would wait for the jobs (sacct) for ever: end it and its shell
        driver = re.search(r"pid (\d+)", result.stdout)
        if driver and os.path.exists(f"/proc/{driver[1]}"):
            os.killpg(os.getpgid(int(driver[1])), signal.SIGTERM)
    flags = dict(re.findall(r"#SBATCH --([\w-]+)(?:=(\S+))?", script))
    assert flags["array"] == "0-1%2"  # the two jobs of the sweep, at once
    assert (flags["nodes"], flags["ntasks-per-node"], flags["gpus-per-node"]) == ("1", "1", "2")  # one GPU pair
    assert (flags["cpus-per-task"], flags["mem"], flags["time"]) == ("8", "32GB", "2880")
    assert (flags["partition"], flags["account"]) == ("gpu", "proj")
    assert flags["signal"] == "USR2@300" and "requeue" in flags  # preemption and time limits: docs/ablations.md
    assert f"-m submitit.core._submit {sweep_dir}/.submitit/%j" in script
    assert len(list(sweep_dir.glob(".submitit/4242_*/4242_*_submitted.pkl"))) == 2
    summary = summarise(sweep_dir)  # before any job has started: both planned, neither started
    assert [(j["variant"], j["status"]) for j in summary["jobs"]] == [("ablation=baseline", "not started"),
                                                                      ("ablation=no_lrn", "not started")]


def job_processes(sweep_dir: Path) -> list[int]:
    """The processes of submitit's local executor that run (or wait to run) a job of the sweep."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"submitit.core._submit" in cmdline and any(str(sweep_dir).encode() in part for part in cmdline):
            pids.append(int(proc.name))
    return pids


@pytest.mark.slow
@needs_plugin
def test_pairs_sweep_end_to_end_with_a_job_preempted_and_resumed_exactly(demo_store, tiny_run, tmp_path):
    process = subprocess.Popen(command("repro-train", "--multirun", "hydra/launcher=pairs", "experiment=tiny",
                                       f"data.store={demo_store}", "ablation=baseline,no_lrn", "log_every=1",
                                       f"hydra.sweep.dir={tmp_path}"), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    log, deadline = tmp_path / "ablation=baseline" / "train.log", time.time() + 600
    while process.poll() is None and time.time() < deadline and not re.search(
            r"epoch 0 step [2-4]/4", log.read_text() if log.exists() else ""):
        time.sleep(0.1)
    # As SLURM signals a job before its time limit (submitit's SIGUSR2): the running job stops after its step and
    # is requeued; the job waiting for the one pair of this GPU-less box is requeued by submitit at once.
    for pid in job_processes(tmp_path):
        os.kill(pid, signal.SIGUSR2)
    out, _ = process.communicate(timeout=900)
    assert process.returncode == 0, out[-3000:]
    text = log.read_text()
    assert re.search(r"stopped by SIGUSR2 at epoch 0 step \d", text) and "resuming" in text
    assert "Requeued job" in "".join(p.read_text() for p in tmp_path.glob(".submitit/*/*_log.*"))
    summary = summarise(tmp_path)
    assert [(j["variant"], j["status"]) for j in summary["jobs"]] == [("ablation=baseline", "done"),
                                                                      ("ablation=no_lrn", "done")]
    a = torch.load(tiny_run[0] / "checkpoints" / "last.pt", weights_only=True)  # experiment=tiny, uninterrupted
    b = torch.load(tmp_path / "ablation=baseline" / "checkpoints" / "last.pt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 8
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for i, state in a["optimizer"]["state"].items():
        assert torch.equal(state["velocity"], b["optimizer"]["state"][i]["velocity"])
    assert json.loads((tmp_path / "ablation=baseline" / "metrics.json").read_text())["step"] == 8
