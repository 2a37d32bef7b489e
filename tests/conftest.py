import sys
from pathlib import Path

import pytest

# The tests' own helpers (the independent grouped reference, the devkit writer) import as top-level modules.
sys.path.insert(0, str(Path(__file__).parent))

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
    prepare(demo_raw, out, skip_bad=True, workers=2, log=lambda *a: None)
    return out
