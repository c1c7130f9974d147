"""``python -m swaa``: the same command as the ``swaa`` console script."""

import sys

from swaa.app.cli import main

sys.exit(main())
