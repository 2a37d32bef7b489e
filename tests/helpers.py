"""What many test files share: the project's commands as subprocesses, and configs composed as the commands do."""

import sys
from pathlib import Path

from omegaconf import DictConfig

from repro.config import composed

BIN = Path(sys.executable).parent  # the virtualenv's console scripts


def command(name: str, *args) -> list[str]:
    """A console script of setup.cfg (e.g. "repro-train") with its arguments, for subprocess."""
    return [str(BIN / name), *map(str, args)]


def train_config(*overrides: str) -> DictConfig:
    """conf/train.yaml with `overrides`, as `repro-train` composes it."""
    return composed("train", overrides)


def tiny_cfg(store, run_dir, *overrides: str) -> DictConfig:
    """`experiment=tiny` on `store` into `run_dir`."""
    return train_config("experiment=tiny", f"data.store={store}", f"run_dir={run_dir}", *overrides)
