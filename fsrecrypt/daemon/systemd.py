"""systemd's side of the contract: ``sd_notify`` lines and the watchdog period."""

from __future__ import annotations

import os

import sdnotify

from fsrecrypt.numbers import NumberError, parse_int


class Notifier:
    """Sends READY/STATUS/STOPPING/WATCHDOG lines when systemd asked for them (NOTIFY_SOCKET)."""

    def __init__(self) -> None:
        self._notifier: sdnotify.SystemdNotifier | None = None

    def notify(self, *lines: str) -> None:
        if not os.environ.get("NOTIFY_SOCKET"):
            return
        if self._notifier is None:
            self._notifier = sdnotify.SystemdNotifier()
        self._notifier.notify("\n".join(lines))


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of systemd's WATCHDOG_USEC), or None if unset."""
    try:
        usec = parse_int(os.environ.get("WATCHDOG_USEC"), minimum=1)
    except NumberError:
        return None
    return usec / 1e6 / 2
