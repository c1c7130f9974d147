"""``python -m swaa``: the same command as the ``swaa`` console script."""

import sys

from swaa.cli import main

sys.exit(main())
