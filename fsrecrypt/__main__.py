"""``python -m fsrecrypt``: the same as the ``fsrecrypt`` command."""

from fsrecrypt.cli import main

main(prog_name="fsrecrypt")
