"""Checkpoints: written atomically, read back with `weights_only=True` (plain tensors and containers only)."""

from __future__ import annotations

from pathlib import Path

import torch

from repro.errors import RunError
from repro.io import atomic_write


def save_checkpoint(path: Path, checkpoint: dict) -> None:
    """A kill at any moment leaves either the previous file or the new one, never a part of one."""
    atomic_write(path, lambda f: torch.save(checkpoint, f))


def load_checkpoint(path: Path) -> dict:
    """A checkpoint's contents on the CPU."""
    if not Path(path).is_file():
        raise RunError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a damaged or foreign file: say which and why
        raise RunError(f"checkpoint {path} could not be read ({type(error).__name__}: {error})") from None
