#!/usr/bin/env python
"""Write the synthetic demo set in the ILSVRC-2012 distribution layout: python tools/make_demo_data.py --out DIR."""
import sys

from repro.demo_data import main

if __name__ == "__main__":
    sys.exit(main())
