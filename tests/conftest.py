import subprocess
import sys
from pathlib import Path

import pytest

# The tests' own helpers (the independent grouped reference, the devkit writer) import as top-level modules.
sys.path.insert(0, str(Path(__file__).parent))

from helpers import command  # noqa: E402
from repro.demo_data import make_demo_data  # noqa: E402
from repro.prepare import prepare  # noqa: E402


@pytest.fixture(scope="session")
def demo_raw(tmp_path_factory) -> Path:
    """A small demo set in the ILSVRC-2012 distribution layout (tars and devkit), with its odd files."""
    raw = tmp_path_factory.mktemp("demo_raw")
    make_demo_data(raw, num_classes=4, train_per_class=12, val_per_class=4, seed=0)
    return raw


@pytest.fixture(scope="session")
def demo_store(demo_raw, tmp_path_factory) -> Path:
    """`demo_raw` prepared; its one truncated training file is skipped."""
    out = tmp_path_factory.mktemp("demo_store")
    prepare(demo_raw, out, skip_bad=True, workers=2)
    return out


@pytest.fixture(scope="session")
def demo_jpeg_store(demo_raw, tmp_path_factory) -> Path:
    """`demo_raw` prepared as JPEG records (quality 95), like `demo_store`."""
    out = tmp_path_factory.mktemp("demo_jpeg_store")
    prepare(demo_raw, out, skip_bad=True, workers=2, record_format="jpeg")
    return out


@pytest.fixture(scope="session")
def tiny_run(demo_store, tmp_path_factory):
    """A finished `experiment=tiny` run on `demo_store`, started through the real entry point: (run folder, the
    finished process)."""
    run_dir = tmp_path_factory.mktemp("tiny_run")
    result = subprocess.run(command("repro-train", "experiment=tiny", f"data.store={demo_store}",
                                    "data.limit_val=null", f"hydra.run.dir={run_dir}"),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, result
