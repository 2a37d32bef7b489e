"""What many test files share: the project's commands as subprocesses, and configs composed as the commands do."""

import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from repro.config import CONF_DIR

BIN = Path(sys.executable).parent  # the virtualenv's console scripts


def command(name: str, *args) -> list[str]:
    """A console script of setup.cfg (e.g. "repro-train") with its arguments, for subprocess."""
    return [str(BIN / name), *map(str, args)]


def train_config(*overrides: str) -> DictConfig:
    """conf/train.yaml with `overrides`, as `repro-train` composes it."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("train", overrides=list(overrides))


def tiny_cfg(store, run_dir, *overrides: str) -> DictConfig:
    """`experiment=tiny` on `store` into `run_dir`."""
    return train_config("experiment=tiny", f"data.store={store}", f"run_dir={run_dir}", *overrides)
