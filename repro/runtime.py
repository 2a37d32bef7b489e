"""What a run needs from its surroundings: devices, determinism and the environment record."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch

import repro
from repro.errors import RunError
from repro.io import available_cores

# Loader processes by default: what the ILSVRC-2012 recipe used (six, beside the training process; the SLURM launcher's
# 8 CPUs are sized for them), fewer where the cores are fewer.
DEFAULT_WORKERS = 6


def resolve_devices(requested, require_two_gpus: bool) -> list[str]:
    """The two towers' devices: as requested, or what exists (two GPUs; one GPU for both towers; the CPU)."""
    gpus = torch.cuda.device_count()
    if requested is None:
        if require_two_gpus and gpus < 2:
            raise RunError(f"this experiment is the paper's two-GPU setting and needs two GPUs, but {gpus} "
                           f"{'is' if gpus == 1 else 'are'} visible. To run it anyway, name the devices, e.g. "
                           "devices=[cuda:0,cuda:0] (both towers on one GPU) or devices=[cpu,cpu]")
        return ["cuda:0", "cuda:1"] if gpus >= 2 else ["cuda:0", "cuda:0"] if gpus == 1 else ["cpu", "cpu"]
    devices = [str(d) for d in requested]
    if len(devices) != 2:
        raise RunError(f"devices must name two devices, one per tower (e.g. [cuda:0,cuda:1]), got {devices}")
    for device in devices:
        try:
            parsed = torch.device(device)
        except RuntimeError as error:
            raise RunError(f"devices: {device!r} is not a device name ({error})") from None
        if parsed.type == "cuda" and (parsed.index or 0) >= gpus:
            raise RunError(f"devices: {device} does not exist here ({gpus} GPU(s) visible); "
                           "use devices=[cpu,cpu] on a machine without GPUs")
    return devices


def use_devices(devices) -> None:
    """Make the first of `devices` the current CUDA device when it is a GPU. torch puts work that names no device
    on the current one, `cuda:0` unless set: the DataLoader's pin-memory thread, `tensor.pin_memory()`, the object
    collectives of a NCCL-only process group. Unset, a run on `devices=[cuda:2,cuda:3]` would create a context on
    GPU 0 (which fails when GPU 0 is exclusive or full), and under torchrun every process would pick GPU 0."""
    first = torch.device(devices[0])
    if first.type == "cuda":
        torch.cuda.set_device(first)


def worker_count(requested: int | None, processes: int = 1) -> int:
    """Loader processes: `requested`, or (None) DEFAULT_WORKERS where this process's share of the cores (among
    `processes` on this machine) leaves one core for itself, fewer where it does not."""
    if requested is not None:
        return requested
    return max(0, min(DEFAULT_WORKERS, available_cores() // processes - 1))


def set_determinism(deterministic: bool) -> None:
    """Deterministic kernels (bit-exact reruns and resumes). cuDNN's autotuner is set by repro.speed."""
    torch.use_deterministic_algorithms(deterministic, warn_only=False)
    torch.backends.cudnn.deterministic = deterministic
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def environment(devices: list[str]) -> dict:
    """Versions, devices and the git commit of the code, for the top of every log."""
    source = Path(repro.__file__).resolve().parents[1]

    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=source, capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    commit = git("rev-parse", "HEAD")
    names = {d: torch.cuda.get_device_name(torch.device(d)) if d.startswith("cuda") else platform.processor()
             or platform.machine() for d in devices}
    return {"repro": repro.__version__, "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available()
            else None, "devices": names, "threads": torch.get_num_threads(), "git_commit": commit,
            "git_dirty": bool(git("status", "--porcelain")) if commit else None, "host": platform.node()}
