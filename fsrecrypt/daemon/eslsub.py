"""What the daemon asks FreeSWITCH to send: the event names and the ESL ``filter`` lines.

Pure data and text (no socket): :mod:`fsrecrypt.daemon.eslconn` sends the
lines, :mod:`fsrecrypt.daemon.supervisor` picks the subscription.

Why filters: masking is announced by two event types a busy switch fires
constantly. ``CHANNEL_EXECUTE`` comes with every dialplan application of
every call, and ``API`` with every API command anyone runs (including our
own liveness probe, ``api status``). Subscribing to the names alone would
make the daemon read and parse all of them to keep a handful. FreeSWITCH's
``filter <header> <value>`` (mod_event_socket) drops events on the switch,
before they are serialised onto our socket. Its semantics, which the replay
server in ``tests/support/eslserver.py`` reproduces:

* once any filter is set, only events that match a filter are sent, so the
  events we want whole (RECORD_START, RECORD_STOP) need a filter too
  (``Event-Name RECORD_STOP``);
* every filter is a (header, value) pair and the pairs are OR'd, whether
  they name the same header or not; header names and plain values compare
  case-insensitively; a value ``/.../`` is a regular expression;
* a value prefixed with ``-`` vetoes the events it matches.

So the mask subscription is: the record events by name, CHANNEL_EXECUTE only
for the two mask applications (``Application``), and API only for
``uuid_record`` (``API-Command``): start and stop come along (a few per
recording), every other API command stays on the switch.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "MASK_APPLICATIONS",
    "EslFilter",
    "Subscription",
    "filter_commands",
    "recording_subscription",
]

# The dialplan applications that mask / unmask a running record_session.
MASK_APPLICATIONS = ("record_session_mask", "record_session_unmask")


@dataclass(frozen=True)
class EslFilter:
    """One ``filter <header> <value>`` line (values are sent as written)."""

    header: str
    value: str

    def command(self) -> str:
        """The ESL command, checked: a line break or an empty part would be an injection."""
        for part, what in ((self.header, "filter header"), (self.value, "filter value")):
            if not part or "\n" in part or "\r" in part:
                raise ValueError(f"{what} must be a non-empty single line")
        if " " in self.header or ":" in self.header:
            raise ValueError(f"invalid filter header {self.header!r}")
        return f"filter {self.header} {self.value}"


@dataclass(frozen=True)
class Subscription:
    """Event names for ``event plain`` and the filters sent before it."""

    events: tuple[str, ...]
    filters: tuple[EslFilter, ...] = ()


def filter_commands(filters: tuple[EslFilter, ...]) -> list[str]:
    """The ``filter`` command lines, in order (each is answered ``+OK filter added``)."""
    return [f.command() for f in filters]


def recording_subscription(*, masks: bool, use_filters: bool = True) -> Subscription:
    """The daemon's subscription: RECORD_STOP alone, or with what announces masking.

    ``masks``: also RECORD_START (a recording's time zero and identity),
    CHANNEL_EXECUTE (``record_session_mask``/``unmask`` in the dialplan) and
    API (``uuid_record <uuid> mask|unmask <path>``). ``use_filters=False``
    exists for the measurement in ``bench/bench_esl_filters.py`` only.
    """
    if not masks:
        return Subscription(("RECORD_STOP",))
    events = ("RECORD_START", "RECORD_STOP", "CHANNEL_EXECUTE", "API")
    if not use_filters:
        return Subscription(events)
    filters = (
        EslFilter("Event-Name", "RECORD_START"),
        EslFilter("Event-Name", "RECORD_STOP"),
        *(EslFilter("Application", app) for app in MASK_APPLICATIONS),
        EslFilter("API-Command", "uuid_record"),
    )
    return Subscription(events, filters)
