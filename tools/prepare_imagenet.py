#!/usr/bin/env python
"""Prepare ILSVRC-2012 (or the demo data) once: python tools/prepare_imagenet.py RAW OUT [--skip-bad]."""
import sys

from repro.prepare import main

if __name__ == "__main__":
    sys.exit(main())
