"""``python -m train.stress``: the ``lbw-stress`` CLI."""

import sys

from train.stress.cli import main

sys.exit(main())
