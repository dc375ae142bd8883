#!/usr/bin/env python3
"""Command-line entry point; see megatron_flash/export/convert.py and docs/export.md."""

import os
import sys

# Runnable from a checkout without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_flash.export.convert import from_hf_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(from_hf_main())
