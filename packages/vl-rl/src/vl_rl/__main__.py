"""``python -m vl_rl``: the ``vl-rl`` command line (see :mod:`vl_rl.cli`)."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
