"""What a run needs from its surroundings: devices, determinism, the environment record, and atomic checkpoints."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

import repro
from repro.prepare import atomic_write


# The Hydra configs live beside the package in the source tree (an editable install keeps them there).
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


class RunError(Exception):
    """A problem the user can fix (configuration, devices, files), explained in words; the entry points print
    it without a traceback and exit non-zero."""


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


def save_checkpoint(path: Path, checkpoint: dict) -> None:
    """A kill at any moment leaves either the previous file or the new one, never a part of one."""
    atomic_write(path, lambda f: torch.save(checkpoint, f))


def load_checkpoint(path: Path) -> dict:
    """A checkpoint's contents on the CPU, read with `weights_only=True` (plain tensors and containers only)."""
    if not Path(path).is_file():
        raise RunError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a damaged or foreign file: say which and why
        raise RunError(f"checkpoint {path} could not be read ({type(error).__name__}: {error})") from None


def main() -> int:
    """`python -m repro.runtime`: say why and exit non-zero when the paper's two GPUs are not there (make
    train-imagenet runs it before preparing the data)."""
    try:
        resolve_devices(None, require_two_gpus=True)
    except RunError as error:
        print(f"error: {error} (with make: ARGS='devices=[...]')", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
