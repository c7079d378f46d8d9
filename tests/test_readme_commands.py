"""The README's command table lists every command ``fsrecrypt --help`` lists.

Before, half of them (run, health, serve, the lifecycle commands) were only
mentioned in passing elsewhere, so an operator reading the table missed them.
"""

from __future__ import annotations

import re
from pathlib import Path

from fsrecrypt.cli import LAZY_COMMANDS

README = Path(__file__).resolve().parents[1] / "README.rst"


def test_the_command_table_lists_every_command() -> None:
    text = README.read_text(encoding="utf-8")
    section = text.split("\nCommand line\n", 1)[1].split("\nOperations\n", 1)[0]
    table = re.search(r"^=+ =+\n.*?^=+ =+\n(.*?)^=+ =+$", section, re.S | re.M)
    assert table, "no command table under 'Command line'"
    listed = set(re.findall(r"^``fsrecrypt ([a-z-]+)", table.group(1), re.M))
    assert sorted(set(LAZY_COMMANDS) - listed) == []
    assert sorted(listed - set(LAZY_COMMANDS)) == []
