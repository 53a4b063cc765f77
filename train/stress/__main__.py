"""``python -m lbw.train.stress``: the ``lbw-stress`` CLI."""

import sys

from lbw.train.stress.cli import main

sys.exit(main())
