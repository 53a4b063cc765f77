"""``python -m lbw.train.stress``: the ``lbw-stress`` CLI."""

import sys

from lbw.train.cli import stress_main

sys.exit(stress_main())
