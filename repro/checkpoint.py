"""Checkpoints: written atomically (the run's `last.pt` keeping the one it replaces as `last.prev.pt`), verified
before use (every zip member's CRC-32: `torch.load` checks none) and read back with `weights_only=True` (plain
tensors and containers only)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import torch

from repro.errors import RunError
from repro.io import atomic_write


def previous(path: Path) -> Path:
    """Where the checkpoint `path` replaced is kept: last.pt -> last.prev.pt."""
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def save_checkpoint(path: Path, checkpoint: dict, keep_previous: bool = False) -> None:
    """A kill at any moment leaves either the previous file or the new one, never a part of one; with
    `keep_previous` the file it replaces stays as `previous(path)`."""
    atomic_write(path, lambda f: torch.save(checkpoint, f), keep=previous(path) if keep_previous else None)


def damage(path: Path) -> str | None:
    """What is wrong with the checkpoint file `path`, or None when it is a complete zip whose members all match
    their CRC-32 (reading it all once)."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        return f"it is not a complete checkpoint ({error})"
    return f"the data of {bad} does not match its CRC-32" if bad else None


def intact_alternative(path: Path) -> str:
    """What the user can do when the checkpoint `path` is damaged: the newest intact one beside it, if any."""
    found = []
    for candidate in (previous(path), path.with_name("best.pt"), path.with_name("last.pt")):
        if candidate != path and candidate.is_file() and damage(candidate) is None:
            step = torch.load(candidate, map_location="cpu", weights_only=True, mmap=True)["global_step"]
            found.append((step, candidate))
    if not found:
        return "no intact checkpoint is left beside it: start again in a new folder"
    step, candidate = max(found)
    if path.name == "last.pt":
        return f"{candidate} (step {step}) is intact: `cp {candidate} {path}` and run the same command to resume"
    return f"{candidate} (step {step}) is intact: use it instead"


def load_checkpoint(path: Path) -> dict:
    """A checkpoint's contents on the CPU, after checking that the file is intact."""
    path = Path(path)
    if not path.is_file():
        raise RunError(f"checkpoint {path} does not exist")
    problem = damage(path)
    if problem:
        raise RunError(f"checkpoint {path} is damaged ({problem}); {intact_alternative(path)}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a foreign file: say which and why
        raise RunError(f"checkpoint {path} could not be read ({type(error).__name__}: {error})") from None


def check_classes(checkpoint: dict, path: Path, classes: list[str], store: Path) -> None:
    """Refuse a store whose classes are not the ones the checkpoint `path` was trained on (its label i would be
    another class): the lists where the checkpoint records one, else their numbers."""
    trained = checkpoint.get("classes")  # checkpoints before this version record only the number
    count = checkpoint["config"]["model"]["num_classes"]
    if (trained is not None and trained != classes) or count != len(classes):
        difference = (f"{count} classes, the store {len(classes)}" if count != len(classes) else
                      "the same number of classes, in another order or not the same ones")
        raise RunError(f"{path} was trained on other classes than the store {store} holds ({difference}); use "
                       f"the store it was trained on ({checkpoint['config']['data']['store']}) or one prepared "
                       "from the same classes")
