"""Hostile identifiers and dates given to ``recordings``/``retry`` stop at the command line.

Odd Unicode digits, NUL bytes (psycopg2 raises a bare ValueError on them),
braces, huge numbers: each is a usage error naming the value, before any
configuration is read or any row is touched.
"""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from fsrecrypt.cli import main

GOOD = "0bcc821d-8d99-41fd-bffd-1e3d56386eaa"
HOSTILE_IDS = [
    "\uff10bcc821d-8d99-41fd-bffd-1e3d56386eaa",  # fullwidth zero
    "\u0660bcc821d-8d99-41fd-bffd-1e3d56386eaa",  # Arabic-Indic zero
    GOOD[:-1] + "\x00",
    "{" + GOOD + "}",
    "urn:uuid:" + GOOD,
    GOOD + "\n",
    "9" * 5000,
    "' OR 1=1 --",
]


@pytest.mark.parametrize("value", HOSTILE_IDS)
@pytest.mark.parametrize("command", [["retry", "--recording"], ["recordings", "show"]])
def test_ops_hostile_recording_id_is_a_usage_error(command: list[str], value: str) -> None:
    res = CliRunner().invoke(main, ["-c", "/nonexistent/fsrecrypt.toml", *command, value])
    assert res.exit_code == 2, res.output
    assert "is not a recording id" in res.output


@pytest.mark.parametrize(
    "args",
    [
        ["--since", "\uff12\uff10\uff12\uff16-01-01"],
        ["--until", "2026-01-01\x00"],
        ["--since", "yesterday"],
        ["--limit", "1" + "0" * 40],
        ["--limit", "0"],
    ],
)
def test_ops_hostile_list_filters_are_usage_errors(args: list[str]) -> None:
    res = CliRunner().invoke(
        main, ["-c", "/nonexistent/fsrecrypt.toml", "recordings", "list", *args]
    )
    assert res.exit_code == 2, res.output
    assert "Invalid value" in res.output
