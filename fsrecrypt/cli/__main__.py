"""``python -m fsrecrypt.cli``: the same as the ``fsrecrypt`` command."""

import sys

from fsrecrypt.cli import main

sys.exit(main(prog_name="fsrecrypt"))
