#!/usr/bin/env python
"""The first command on a GPU box, `tools/gpu_check.sh` (which runs this once the packages the box lacks are
installed; docs/gpu-runs/README.md): at most 8 minutes on one GPU, everything it measures in one folder.

The stages, in this order, each with a time limit, each reported PASS or FAIL with its numbers:

- environment: the GPUs (nvidia-smi), torch, CUDA, cuDNN, NCCL and the packages repro uses.
- preflight: `repro-preflight` on `devices` (default [cuda:0,cuda:0], both towers on the one GPU: the tower path
  that training runs there), every check. The grouped layout is checked there too (numerics-grouped, and the
  `grouped` row of speed-step).
- resume-towers, resume-grouped: a run shaped like `experiment=paper` (the paper's network, recipe and batch 128,
  deterministic=true) on a synthetic store, once uninterrupted and once killed with SIGKILL after its first
  checkpoint and started again by the same command; the two must end with the same weights and velocities, bit
  for bit. Tower by tower, then with speed.grouped=true.
- bench: the compute section of `make bench` (tools/bench.py --sections compute) on the GPU.

The folder (`--out`; default OUT/gpu-check when OUT is set, else runs/gpu-check/<time>) ends up holding three files:
summary.txt (what ran where, each stage's status, time and numbers), console.log (everything the stages printed)
and details.tar.gz (preflight.json, the runs' train.log and metrics.json, benchmarks.json and .md,
environment.json). `--quick --devices cpu,cpu` runs the same stages small on the CPU (the tests do).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from repro.checkpoint import load_checkpoint
from repro.demo_data import make_demo_data
from repro.io import available_cores
from repro.preflight import same_training_state
from repro.prepare import prepare
from repro.runtime import environment as versions

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("environment", "preflight", "resume-towers", "resume-grouped", "bench")
# Seconds each stage may take on one GPU, 8 minutes in all: guesses, never timed on a GPU (the bench compiles a
# network). A quick run on a (shared, slow) CPU gets QUICK_LIMIT.
LIMITS = {"environment": 20, "preflight": 130, "resume-towers": 70, "resume-grouped": 70, "bench": 190}
QUICK_LIMIT = 900
# The synthetic store of the resume stages: (classes, training and validation images per class). Full: 640 training
# images, 5 steps of 128 an epoch; quick: 16, 4 steps of 4.
STORE = {False: (10, 64, 8), True: (4, 4, 2)}
KILL_AFTER_STEP = 2  # the first checkpoint (checkpoint_every)
# A repro command in a process of its own, whether or not repro's console scripts are installed.
COMMAND = "import sys; from repro.cli import {main}; sys.exit({main}())"


def repro(main: str, *args: str) -> list[str]:
    return [sys.executable, "-c", COMMAND.format(main=main), *args]


class Stages:
    """Runs the stages' commands with their time limits, everything they print going to console.log."""

    def __init__(self, folder: Path, quick: bool):
        self.folder, self.quick = folder, quick
        self.console = open(folder / "console.log", "a")
        self.results: list[tuple[str, str, float, str]] = []  # (stage, PASS or FAIL, seconds, what it found)
        self.deadline = 0.0

    def say(self, text: str) -> None:
        print(text, flush=True)
        self.console.write(text + "\n")
        self.console.flush()

    def run(self, name: str, work) -> None:
        """One stage: `work()` returns (passed, what it found); an exception or the time limit fails it."""
        limit = QUICK_LIMIT if self.quick else LIMITS[name]
        self.say(f"== {name} (at most {limit} s)")
        start, self.deadline = time.monotonic(), time.monotonic() + limit
        try:
            ok, found = work()
        except Exception as error:  # noqa: BLE001 (a stage that cannot run has failed; the others still run)
            ok, found = False, f"{type(error).__name__}: {error}"
        seconds = time.monotonic() - start
        self.results.append((name, "PASS" if ok else "FAIL", seconds, found))
        self.say(f"{'PASS' if ok else 'FAIL'} {name} ({seconds:.0f} s): {found}")

    def command(self, args: list[str], **kwargs) -> subprocess.CompletedProcess:
        """`args` in a session of its own, its output into console.log; killed (the whole session) at the stage's
        time limit, which raises TimeoutError."""
        self.say("$ " + " ".join(args))
        with subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True, cwd=ROOT, **kwargs) as process:
            try:
                output, _ = process.communicate(timeout=max(self.deadline - time.monotonic(), 1))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                output, _ = process.communicate()
                self.console.write(output)
                raise TimeoutError(f"{args[-1]}: still running at the stage's time limit") from None
        self.console.write(output)
        self.console.flush()
        return subprocess.CompletedProcess(args, process.returncode, output)


def environment(stages: Stages, details: Path, devices: list[str]) -> tuple[bool, str]:
    record = versions(devices)
    smi = shutil.which("nvidia-smi")
    record["nvidia_smi"] = stages.command([smi]).stdout if smi else "no nvidia-smi"
    record["packages"] = {}
    for name in ("torch", "torchvision", "numpy", "hydra-core", "omegaconf", "tensorboard", "pillow"):
        try:
            record["packages"][name] = version(name)
        except PackageNotFoundError:
            record["packages"][name] = "missing"
    (details / "environment.json").write_text(json.dumps(record, indent=1) + "\n")
    found = (f"{', '.join(f'{d} {n}' for d, n in record['devices'].items())}; torch {torch.__version__}, CUDA "
             f"{record['cuda']}, cuDNN {record['cudnn']}, {torch.cuda.device_count()} GPU(s) visible")
    return all(torch.device(d).type != "cuda" or torch.cuda.is_available() for d in devices), found


def preflight(stages: Stages, details: Path, devices: list[str]) -> tuple[bool, str]:
    size = ["batch_size=1", "steps=1", "repeats=1"] if stages.quick else []
    done = stages.command(repro("preflight_main", f"devices=[{','.join(devices)}]", f"out={details / 'preflight'}",
                                *size))
    lines = [line for line in done.stdout.splitlines() if line.startswith(("PASS ", "FAIL ", "SKIP ", "preflight:"))]
    return done.returncode == 0, "\n  " + "\n  ".join(lines or done.stdout.splitlines()[-5:])


def synthetic_store(scratch: Path, quick: bool) -> Path:
    """The resume stages' store (the demo generator's ILSVRC-2012 layout, prepared), made once."""
    store = scratch / "store"
    if not (store / "manifest.json").is_file():
        classes, train, val = STORE[quick]
        make_demo_data(scratch / "raw", num_classes=classes, train_per_class=train, val_per_class=val, seed=0)
        prepare(scratch / "raw", store, skip_bad=True, workers=min(8, available_cores()))
    return store


def resume(stages: Stages, details: Path, scratch: Path, devices: list[str], grouped: bool) -> tuple[bool, str]:
    """An uninterrupted run, and the same run killed after its first checkpoint and started again: the same
    weights and velocities at the end, bit for bit."""
    store = synthetic_store(scratch, stages.quick)
    layout = "grouped" if grouped else "towers"
    size = (["model.width=0.125", "data.batch_size=4", "eval_batch_size=4", "data.workers=0"] if stages.quick else
            ["data.workers=4", "eval_batch_size=64"])
    overrides = ["experiment=paper", f"data.store={store}", f"devices=[{','.join(devices)}]", "deterministic=true",
                 f"speed.grouped={str(grouped).lower()}", "schedule.max_epochs=2",
                 f"checkpoint_every={KILL_AFTER_STEP}", f"log_every={KILL_AFTER_STEP}", *size]
    runs = {name: scratch / layout / name for name in ("uninterrupted", "killed")}
    done = stages.command(repro("train_main", *overrides, f"hydra.run.dir={runs['uninterrupted']}"))
    if done.returncode != 0:
        return False, f"the uninterrupted run failed (exit status {done.returncode}): {last_line(done.stdout)}"
    killed = kill_after_first_checkpoint(stages, repro("train_main", *overrides, f"hydra.run.dir={runs['killed']}"),
                                         runs["killed"] / "checkpoints" / "last.pt")
    done = stages.command(repro("train_main", *overrides, f"hydra.run.dir={runs['killed']}"))
    for name, folder in runs.items():
        for file in ("train.log", "metrics.json"):
            if (folder / file).is_file():
                (details / f"resume-{layout}" / name).mkdir(parents=True, exist_ok=True)
                shutil.copy(folder / file, details / f"resume-{layout}" / name / file)
    if done.returncode != 0:
        return False, f"the resumed run failed (exit status {done.returncode}): {last_line(done.stdout)}"
    same = same_training_state(runs["uninterrupted"], runs["killed"])
    metrics = json.loads((runs["uninterrupted"] / "metrics.json").read_text())
    ok = same["resumed"] and not same["different"] and same["steps"][0] == same["steps"][1] > killed
    found = (f"speed.grouped={str(grouped).lower()} on {', '.join(devices)}, batch "
             f"{metrics['data_options']['batch_size']}: killed at step {killed} of {same['steps'][0]}, then "
             f"{'resumed' if same['resumed'] else 'NOT resumed'}; {same['compared'] - len(same['different'])} of "
             f"{same['compared']} weight and velocity tensors bit-equal to the uninterrupted run's"
             + (f" (different: {same['different'][:3]})" if same["different"] else "")
             + f"; {metrics['images_per_s'] or 0:.0f} training images/s uninterrupted")
    return ok, found


def kill_after_first_checkpoint(stages: Stages, args: list[str], checkpoint: Path) -> int:
    """Start the run `args`, SIGKILL it (its whole session) as soon as `checkpoint` exists; the step it holds."""
    stages.say("$ " + " ".join(args) + f"  (killed once {checkpoint} exists)")
    with open(stages.folder / "console.log", "a") as log:
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)
        while not checkpoint.is_file() and process.poll() is None:
            if time.monotonic() > stages.deadline:
                os.killpg(process.pid, signal.SIGKILL)
                raise TimeoutError("no checkpoint before the stage's time limit")
            time.sleep(0.01)
        if process.poll() is not None:
            raise RuntimeError(f"the run ended (status {process.returncode}) before it was killed")
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    return load_checkpoint(checkpoint)["global_step"]


def bench(stages: Stages, details: Path) -> tuple[bool, str]:
    size = ["--quick", "--batch", "2", "--steps", "1", "--repeats", "1"] if stages.quick else []
    done = stages.command([sys.executable, str(ROOT / "tools" / "bench.py"), "--sections", "compute",
                           "--out", str(details / "bench"), *size])
    if done.returncode != 0:
        return False, f"exit status {done.returncode}: {last_line(done.stdout)}"
    compute = json.loads((details / "bench" / "benchmarks.json").read_text())["compute"]
    rates = ", ".join(f"{label} {row['images_per_s']:.0f} img/s on {', '.join(row['devices'])}"
                      for label, row in compute["training"].items())
    return True, (f"batch {compute['batch']} on {compute['machine']}: {rates}; per FLOP against torchvision "
                  f"{compute['per_flop_vs_torchvision']:.2f}x")


def last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def default_folder() -> Path:
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"]) / "gpu-check"
    return ROOT / "runs" / "gpu-check" / time.strftime("%Y-%m-%d_%H-%M-%S")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", default="cuda:0,cuda:0", help="the towers' devices (default: one GPU, both)")
    parser.add_argument("--quick", action="store_true", help="every stage small (the tests, on the CPU)")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"any of {','.join(STAGES)} (default: all)")
    parser.add_argument("--out", type=Path, help="the folder (default: OUT/gpu-check, or runs/gpu-check/<time>)")
    args = parser.parse_args(argv)
    devices = args.devices.split(",")
    chosen = [stage for stage in args.stages.split(",") if stage]
    if len(devices) != 2 or not chosen or set(chosen) - set(STAGES):
        parser.error(f"--devices names two devices; --stages is any of {','.join(STAGES)}")
    folder = args.out or default_folder()
    details = folder / "details"
    details.mkdir(parents=True, exist_ok=True)
    stages = Stages(folder, args.quick)
    stages.say(f"gpu_check {time.strftime('%Y-%m-%d %H:%M:%S')}: devices {','.join(devices)}, "
               f"{'quick' if args.quick else 'full'}; stages {', '.join(chosen)}; into {folder}")
    scratch = Path(tempfile.mkdtemp(prefix="gpu-check-"))  # stores and checkpoints: large, not kept
    work = {"environment": lambda: environment(stages, details, devices),
            "preflight": lambda: preflight(stages, details, devices),
            "resume-towers": lambda: resume(stages, details, scratch, devices, grouped=False),
            "resume-grouped": lambda: resume(stages, details, scratch, devices, grouped=True),
            "bench": lambda: bench(stages, details)}
    started = time.monotonic()
    try:
        for stage in chosen:
            stages.run(stage, work[stage])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    passed = sum(status == "PASS" for _, status, _, _ in stages.results)
    summary = [f"gpu_check {time.strftime('%Y-%m-%d %H:%M:%S')} ({time.monotonic() - started:.0f} s): "
               f"{passed} of {len(stages.results)} stages passed; devices {','.join(devices)}, "
               f"{'quick (small sizes)' if args.quick else 'full'}", "",
               *(f"{status} {name} ({seconds:.0f} s): {found}" for name, status, seconds, found in stages.results)]
    (details / "summary.txt").write_text("\n".join(summary) + "\n")
    with tarfile.open(folder / "details.tar.gz", "w:gz") as archive:
        archive.add(details, arcname="details")
    shutil.move(details / "summary.txt", folder / "summary.txt")
    shutil.rmtree(details)
    stages.say("\n".join(summary))
    stages.console.close()
    return 0 if passed == len(stages.results) else 1


if __name__ == "__main__":
    sys.exit(main())
