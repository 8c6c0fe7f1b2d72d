"""Megatron/MindSpeed-style entry point: ``python preprocess_data.py --help``.

Thin wrapper around :mod:`mindspeed_dsv.data.preprocess` (same flags as ``python -m mindspeed_dsv.data.preprocess``).
"""

import sys

from mindspeed_dsv.data.preprocess import main

if __name__ == "__main__":
    sys.exit(main())
