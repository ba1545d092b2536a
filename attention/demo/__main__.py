"""``python -m attention.demo``: the demo's command line (``attention/demo/__init__.py``)."""

import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
