"""Strict parsing of integers that arrive from outside (HTTP, ESL, environment, config).

Why not ``str.isdigit()`` + ``int()``: ``isdigit`` accepts superscripts
("²") that ``int`` then rejects with a ValueError nobody expected, ``int``
accepts Arabic-Indic or full-width digits ("٣", U+FF13), surrounding
whitespace, a sign and ``_`` separators, and refuses more than 4,300 digits
with yet another ValueError. Each of those turned a hostile number into a
500 or into a value the caller never meant. Here a number is 1 to
``max_digits`` ASCII digits, optionally a leading '-', inside explicit
bounds; anything else is a :class:`NumberError` the caller maps to its own
typed error (400/416 on the API, a refused frame on ESL, ConfigError).

Standard library only: config.py and the daemon (esl, systemd) import it.
"""

from __future__ import annotations

MAX_DIGITS = 19
"""Digits of 2**63 - 1: every byte offset, size, timestamp and count fits."""

_DIGITS = frozenset("0123456789")


class NumberError(ValueError):
    """A value that is not a canonical ASCII integer within its bounds."""


def parse_int(
    text: str | bytes | None,
    *,
    minimum: int | None = None,
    maximum: int | None = None,
    max_digits: int = MAX_DIGITS,
    allow_negative: bool = False,
) -> int:
    """``text`` as an int, or NumberError saying why not (never echoing the whole input).

    Accepted: ``[0-9]{1,max_digits}`` (``-`` first if ``allow_negative``),
    nothing else (no whitespace, '+', '_', NUL or non-ASCII digit), and the
    value must lie in ``[minimum, maximum]`` when those are given. The length
    is checked before any conversion, so a megabyte of digits costs nothing.
    """
    if text is None:
        raise NumberError("no value")
    if isinstance(text, bytes | bytearray):
        try:
            text = bytes(text).decode("ascii")
        except UnicodeDecodeError:
            raise NumberError("not an ASCII integer") from None
    if not isinstance(text, str):
        raise NumberError("not a string")
    digits = text[1:] if allow_negative and text.startswith("-") else text
    if not digits:
        raise NumberError("empty")
    if len(digits) > max_digits:
        raise NumberError(f"more than {max_digits} digits")
    if not set(digits) <= _DIGITS:
        raise NumberError("not an ASCII integer")
    value = int(text)
    if minimum is not None and value < minimum:
        raise NumberError(f"below the minimum {minimum}")
    if maximum is not None and value > maximum:
        raise NumberError(f"above the maximum {maximum}")
    return value
