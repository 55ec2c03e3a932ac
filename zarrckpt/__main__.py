"""``python -m zarrckpt``: the command line (see ``zarrckpt.cli``)."""

import sys

from .cli import main

sys.exit(main())
