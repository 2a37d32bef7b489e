#!/usr/bin/env python
"""The paper's Figures 3 and 4 from a trained run: python tools/figures.py RUN_DIR_or_CHECKPOINT [--which ...]."""
import sys

from repro.figures import main

if __name__ == "__main__":
    sys.exit(main())
