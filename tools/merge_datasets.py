#!/usr/bin/env python3
"""Command-line entry point; see megatron_flash/data/merge.py and docs/data.md."""

import os
import sys

# Runnable from a checkout without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_flash.data.merge import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
