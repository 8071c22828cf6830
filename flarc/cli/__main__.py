"""``python -m flarc.cli``: the same as the ``flarc`` command."""

import sys

from flarc.cli import main

sys.exit(main())
