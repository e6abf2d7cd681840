"""``python -m vl_train``: the ``vl-train`` command line (see :mod:`vl_train.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
