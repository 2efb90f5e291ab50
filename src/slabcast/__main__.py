"""``python -m slabcast``: the command-line interface."""

import sys

from ._cli import main

sys.exit(main())
