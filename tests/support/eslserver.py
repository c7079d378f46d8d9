"""A replaying FreeSWITCH Event Socket server for tests and demos.

It speaks the real inbound ESL wire protocol and answers with the bytes
captured from FreeSWITCH 1.10.12 (``tests/fixtures/freeswitch``), so the
client is tested against what FreeSWITCH actually sends, not against what we
think it sends. It is built on plain threads and blocking sockets (never
gevent) so that it behaves like a separate peer even inside a gevent test
process, and so it can run as its own process::

    python -m tests.support.eslserver --port 8021 --password ClueCon

In process mode it prints one JSON line ``{"port": P, "control_port": C}`` on
stdout and then accepts JSON-line commands on the loopback control port
(``{"op": "emit_fixture", "name": "record_stop.esl", "overrides": {...}}``);
see :class:`EslServerProcess` for a client.
"""

from __future__ import annotations

import argparse
import base64
import collections
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest

FIXTURES_DIR = Path(
    os.environ.get(
        "FSRECRYPT_ESL_FIXTURES",
        Path(__file__).resolve().parents[1] / "fixtures" / "freeswitch",
    )
)

# The API event of ``uuid_record <uuid> mask <path>`` in the mask transcript:
# the template of the API event the server fires for each api command.
API_EVENT_TEMPLATE_INDEX = 30
MASK_TRANSCRIPT = "mask/transcript_mask.raw"

# FreeSWITCH's switch_url_encode(): bytes below 0x20, above 0x7e and these
# printable characters become %XX (upper-case hex). Everything else, including
# '/', ',', '-', '.', is sent as is (see "Sun,%2029%20Nov" in the captures).
_URL_UNSAFE = frozenset(b'\r\n "#%&+:;<=>?@[\\]^`{|}')


def fs_url_encode(value: str | bytes) -> bytes:
    """URL-encode one header value the way FreeSWITCH serialises events."""
    raw = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else value
    out = bytearray()
    for b in raw:
        if b < 0x20 or b > 0x7E or b in _URL_UNSAFE:
            out += b"%%%02X" % b
        else:
            out.append(b)
    return bytes(out)


def load_fixture(name: str) -> bytes:
    """Return one captured frame (or transcript) byte for byte."""
    return (FIXTURES_DIR / name).read_bytes()


def split_frame(frame: bytes) -> tuple[list[tuple[str, str]], bytes]:
    """Split a whole ESL frame into its envelope headers and its body."""
    head, sep, rest = frame.partition(b"\n\n")
    if not sep:
        raise ValueError("not an ESL frame: no blank line after the envelope")
    headers: list[tuple[str, str]] = []
    for line in head.decode("ascii").split("\n"):
        name, _, value = line.partition(": ")
        headers.append((name, value))
    length = int(dict(headers).get("Content-Length", "0"))
    return headers, rest[:length]


def join_frame(headers: Sequence[tuple[str, str]], body: bytes) -> bytes:
    """Build a frame from envelope headers (order kept) and a body, fixing Content-Length."""
    lines = []
    for name, value in headers:
        if name == "Content-Length":
            value = str(len(body))
        lines.append(f"{name}: {value}")
    if body and not any(name == "Content-Length" for name, _ in headers):
        lines.append(f"Content-Length: {len(body)}")
    return ("\n".join(lines) + "\n\n").encode("ascii") + body


def rewrite_event_body(
    body: bytes,
    overrides: Mapping[str, str | None] | None = None,
    event_body: str | None = None,
) -> bytes:
    """Rewrite an event-plain body: replace headers in place, append new ones, drop ``None``.

    Values are the *decoded* strings; they are URL-encoded here as FreeSWITCH
    would, so a test can put a raw newline into a caller-chosen value and get
    exactly the ``%0A`` FreeSWITCH would put on the wire.
    """
    overrides = dict(overrides or {})
    head, _, rest = body.partition(b"\n\n")
    inner: list[tuple[bytes, bytes]] = []
    for line in head.split(b"\n"):
        name, _, value = line.partition(b": ")
        inner.append((name, value))
    inner_length = next((int(v) for n, v in inner if n == b"Content-Length"), None)
    inner_body = rest[:inner_length] if inner_length is not None else b""
    if event_body is not None:
        inner_body = event_body.encode("utf-8", "surrogateescape")
    out: list[tuple[bytes, bytes]] = []
    seen: set[str] = set()
    for name, value in inner:
        key = name.decode("ascii", "surrogateescape")
        if key == "Content-Length":
            continue
        if key in overrides:  # every occurrence (FreeSWITCH repeats e.g. Hangup-Cause)
            seen.add(key)
            new = overrides[key]
            if new is None:
                continue
            value = fs_url_encode(new)
        out.append((name, value))
    for key, new in overrides.items():
        if key not in seen and new is not None and key != "Content-Length":
            out.append((key.encode("ascii"), fs_url_encode(new)))
    data = b"".join(n + b": " + v + b"\n" for n, v in out)
    if inner_body:
        data += b"Content-Length: %d\n\n" % len(inner_body) + inner_body
    else:
        data += b"\n"
    return data


def build_event_frame(
    fixture: str | bytes,
    overrides: Mapping[str, str | None] | None = None,
    event_body: str | None = None,
) -> bytes:
    """A captured event frame with its body headers rewritten and lengths recomputed."""
    frame = load_fixture(fixture) if isinstance(fixture, str) else fixture
    envelope, body = split_frame(frame)
    return join_frame(envelope, rewrite_event_body(body, overrides, event_body))


def split_transcript(data: bytes) -> list[bytes]:
    """Cut a ``transcript_*.raw`` (every byte one connection received) into whole frames."""
    frames: list[bytes] = []
    pos = 0
    while pos < len(data):
        end = data.index(b"\n\n", pos) + 2
        envelope = dict(
            line.partition(": ")[::2] for line in data[pos : end - 2].decode("ascii").split("\n")
        )
        end += int(envelope.get("Content-Length", "0") or 0)
        frames.append(data[pos:end])
        pos = end
    return frames


def mask_frames() -> list[bytes]:
    """The 37 event frames of ``mask/transcript_mask.raw``, in the order they arrived."""
    return split_transcript(load_fixture(MASK_TRANSCRIPT))


API_EVENT_TEMPLATE = mask_frames()[API_EVENT_TEMPLATE_INDEX]


def event_headers(frame: bytes) -> dict[str, str]:
    """The decoded body headers of an event frame (first occurrence wins), by lower-case name.

    FreeSWITCH looks headers up case-insensitively (``switch_event_get_header``).
    """
    _, body = split_frame(frame)
    headers: dict[str, str] = {}
    for line in body.split(b"\n\n", 1)[0].split(b"\n"):
        key, sep, value = line.partition(b": ")
        if sep:
            name = key.decode("ascii", "replace").lower()
            headers.setdefault(name, unquote(value.decode("ascii", "replace")))
    return headers


def _filter_matches(value: str, pattern: str) -> bool:
    """One filter value against one header value, as mod_event_socket compares them.

    ``/expr/flags`` is a regular expression (switch_regex_perform: PCRE, here
    Python's ``re``, the same for the patterns fsrecrypt sends); anything
    else is a case-insensitive equality (strcasecmp).
    """
    if pattern.startswith("/"):
        expr, flags = pattern[1:], 0
        if "/" in expr:
            expr, _, tail = expr.rpartition("/")
            flags |= re.IGNORECASE if "i" in tail else 0
            flags |= re.DOTALL if "s" in tail else 0
        try:
            return re.search(expr, value, flags) is not None
        except re.error:
            return False
    return value.lower() == pattern.lower()


def filters_pass(filters: Sequence[tuple[str, str]], headers: Mapping[str, str]) -> bool:
    """mod_event_socket's ``event_handler`` filter loop, line for line.

    No filter: everything subscribed passes. Otherwise an event passes only
    if a filter matches: filters are OR'd (same header or not), a value
    prefixed with ``-`` is a veto that wins, ``+`` (or nothing) is positive;
    a filter on a header the event lacks is skipped.
    """
    if not filters:
        return True
    send = False
    for name, raw in filters:
        hval = headers.get(name.lower())
        if hval is None:
            continue
        comp_to, positive = raw, True
        while comp_to and comp_to[0] in "+- ":
            if comp_to[0] != " ":
                positive = comp_to[0] == "+"
            comp_to = comp_to[1:]
        if send and positive:
            continue
        if not comp_to:
            continue
        cmp = (
            _filter_matches(hval, comp_to)
            if raw.startswith("/")
            else hval.lower() == comp_to.lower()
        )
        if cmp:
            if positive:
                send = True
            else:
                return False
    return send


@dataclass
class Command:
    """One command block a client sent, as the server parsed it."""

    client: int
    line: str
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


@dataclass
class _Client:
    """Server-side state of one connection."""

    cid: int
    sock: socket.socket
    lock: threading.Lock = field(default_factory=threading.Lock)
    authed: bool = False
    events: set[str] = field(default_factory=set)
    # ``filter`` pairs in the order they were added (duplicates allowed, as in
    # FreeSWITCH, whose filter list clears EF_UNIQ_HEADERS).
    filters: list[tuple[str, str]] = field(default_factory=list)
    hung: bool = False
    closed: bool = False
    # What this connection was sent: Event-Name (plus API-Command / Application).
    sent: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=100_000))
    sent_bytes: int = 0

    def send(self, data: bytes) -> bool:
        """Send bytes unless the connection is gone; report whether they went out."""
        with self.lock:
            if self.closed:
                return False
            try:
                self.sock.sendall(data)
            except OSError:
                return False
            return True

    def close(self) -> None:
        """Close both directions so a blocked reader on either side wakes up."""
        with self.lock:
            if self.closed:
                return
            self.closed = True
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                self.sock.close()

    def wants(self, headers: Mapping[str, str]) -> bool:
        """Subscribed (ALL, the name, or CUSTOM's subclass) and passing this client's filters?"""
        if not self.authed or not self.events:
            return False
        event_name = headers.get("event-name", "")
        subclass = headers.get("event-subclass")
        if "ALL" in self.events or event_name in self.events:
            subscribed = event_name != "CUSTOM" or subclass is None or subclass in self.events
        else:
            subscribed = event_name == "CUSTOM" and subclass is not None and subclass in self.events
        return subscribed and filters_pass(self.filters, headers)

    def note_sent(self, headers: Mapping[str, str], size: int) -> None:
        """Remember what went out (a test asks what the daemon was sent)."""
        detail = headers.get("api-command") or headers.get("application") or ""
        self.sent.append(f"{headers.get('event-name', '')} {detail}".strip())
        self.sent_bytes += size


class EslReplayServer:
    """In-process replaying ESL server (threads + blocking sockets)."""

    def __init__(self, password: str = "ClueCon", host: str = "127.0.0.1", port: int = 0) -> None:
        self.password = password
        self.host = host
        self.port = port
        self.received: list[Command] = []
        self.api_responses: dict[str, str] = {}
        self.hang_new_connections = False
        self.connections_total = 0
        self._clients: dict[int, _Client] = {}
        self._all_clients: list[_Client] = []
        self.api_events = True  # fire an API event per api command, as FreeSWITCH does
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._threads: list[threading.Thread] = []
        self._next_id = 0

    # --- lifecycle ---------------------------------------------------------

    def start(self) -> EslReplayServer:
        """Listen (again, on the same port after a stop: a FreeSWITCH restart)."""
        if self._listener is not None:
            return self
        lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsock.bind((self.host, self.port))
        lsock.listen(16)
        self.port = lsock.getsockname()[1]
        self._listener = lsock
        self._accept_thread = threading.Thread(
            target=self._accept_loop, args=(lsock,), name="esl-accept", daemon=True
        )
        self._accept_thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and drop every connection without a goodbye (a crash)."""
        lsock, self._listener = self._listener, None
        if lsock is not None:
            with contextlib.suppress(OSError):
                lsock.shutdown(socket.SHUT_RDWR)
            lsock.close()
        self.kill_connections()
        if self._accept_thread is not None:
            self._accept_thread.join(2)
            self._accept_thread = None
        for t in self._threads:
            t.join(2)
        self._threads = []

    def __enter__(self) -> EslReplayServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- fault injection ---------------------------------------------------

    def kill_connections(self) -> None:
        """Close every client socket abruptly; the listener keeps accepting."""
        with self._lock:
            clients = list(self._clients.values())
        for c in clients:
            c.close()

    def hang(self, new_connections: bool = False) -> None:
        """Stop answering on open connections (socket stays open); optionally on new ones too."""
        with self._lock:
            for c in self._clients.values():
                c.hung = True
        self.hang_new_connections = new_connections

    def unhang(self) -> None:
        """Answer again (commands received while hung stay unanswered)."""
        with self._lock:
            for c in self._clients.values():
                c.hung = False
        self.hang_new_connections = False

    def disconnect_notice(self, close: bool = True, shutdown: bool = True) -> int:
        """Send FreeSWITCH's disconnect notice to every authenticated client, then close."""
        name = (
            "shutdown_watcher_0_text_disconnect-notice.esl"
            if shutdown
            else "exit_1_text_disconnect-notice.esl"
        )
        frame = load_fixture(name)
        n = 0
        for c in self._authed_clients():
            n += c.send(frame)
            if close:
                c.close()
        return n

    def drop_mid_frame(self, fixture: str = "record_stop.esl") -> int:
        """Send the envelope and half of an event body to each subscriber, then close."""
        frame = build_event_frame(fixture)
        head_len = frame.index(b"\n\n") + 2
        cut = head_len + (len(frame) - head_len) // 2
        n = 0
        for c in self._subscribers(frame):
            n += c.send(frame[:cut])
            time.sleep(0.05)  # let the half frame arrive before the FIN
            c.close()
        return n

    # --- events ------------------------------------------------------------

    def emit_fixture(
        self,
        name: str,
        overrides: Mapping[str, str | None] | None = None,
        event_body: str | None = None,
    ) -> int:
        """Send a captured event (headers rewritten) to every subscribed client."""
        return self.emit_frame(build_event_frame(name, overrides, event_body))

    def emit_frame(self, frame: bytes) -> int:
        """Send a whole event frame to the clients whose subscription and filters take it."""
        headers = event_headers(frame)
        n = 0
        for c in self._subscribers(frame):
            if c.send(frame):
                c.note_sent(headers, len(frame))
                n += 1
        return n

    def emit_api_event(self, command: str, argument: str | None) -> int:
        """The ``API`` event FreeSWITCH fires for every API command (switch_api_execute)."""
        frame = build_event_frame(
            API_EVENT_TEMPLATE,
            {
                "API-Command": command,
                "API-Command-Argument": argument,
                "Event-Date-Timestamp": str(int(time.time() * 1_000_000)),
            },
        )
        return self.emit_frame(frame)

    def emit_raw(self, data: bytes) -> int:
        """Send arbitrary bytes to every authenticated client (hand-made malicious frames)."""
        n = 0
        for c in self._authed_clients():
            n += c.send(data)
        return n

    # --- observation -------------------------------------------------------

    @property
    def subscribed(self) -> int:
        """How many open connections have an event subscription."""
        with self._lock:
            return sum(1 for c in self._clients.values() if c.authed and c.events and not c.closed)

    def wait_subscribed(
        self,
        n: int = 1,
        timeout: float = 5.0,
        sleep: Callable[[float], Any] = time.sleep,
        min_connections: int = 0,
    ) -> bool:
        """Wait until ``n`` clients are subscribed (pass ``gevent.sleep`` from a gevent test).

        ``min_connections`` additionally waits until that many connections
        were ever accepted, so a test can wait for a *re*-subscription.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.subscribed >= n and self.connections_total >= min_connections:
                return True
            sleep(0.01)
        return False

    def commands(self, prefix: str = "") -> list[Command]:
        """Commands received so far whose first line starts with ``prefix``."""
        with self._lock:
            return [c for c in self.received if c.line.startswith(prefix)]

    # --- internals ---------------------------------------------------------

    def _authed_clients(self) -> list[_Client]:
        with self._lock:
            return [c for c in self._clients.values() if c.authed and not c.closed]

    def _subscribers(self, frame: bytes) -> list[_Client]:
        headers = event_headers(frame)
        with self._lock:
            return [c for c in self._clients.values() if not c.closed and c.wants(headers)]

    def sent_events(self) -> list[list[str]]:
        """Per connection (open or closed since start), what it was sent, in order."""
        with self._lock:
            return [list(c.sent) for c in self._all_clients]

    def _accept_loop(self, lsock: socket.socket) -> None:
        while True:
            try:
                sock, _ = lsock.accept()
            except OSError:
                return
            with self._lock:
                self._next_id += 1
                client = _Client(self._next_id, sock, hung=self.hang_new_connections)
                self._clients[client.cid] = client
                self._all_clients.append(client)
                self.connections_total += 1
            t = threading.Thread(
                target=self._serve, args=(client,), name=f"esl-client-{client.cid}", daemon=True
            )
            self._threads.append(t)
            t.start()

    def _serve(self, client: _Client) -> None:
        try:
            if not client.hung:
                client.send(load_fixture("auth_request.esl"))
            buf = b""
            while True:
                block, buf = self._read_block(client.sock, buf)
                if block is None:
                    return
                cmd = block
                if not cmd.line:
                    continue  # blank lines between commands are ignored, as in FreeSWITCH
                with self._lock:
                    self.received.append(cmd)
                if client.hung:
                    continue
                if not self._answer(client, cmd):
                    return
        finally:
            client.close()
            with self._lock:
                self._clients.pop(client.cid, None)

    def _read_block(self, sock: socket.socket, buf: bytes) -> tuple[Command | None, bytes]:
        """Read one command block (lines up to a blank line, then Content-Length bytes)."""
        while b"\n\n" not in buf.replace(b"\r\n", b"\n"):
            try:
                chunk = sock.recv(65536)
            except OSError:
                return None, b""
            if not chunk:
                return None, b""
            buf += chunk
        buf = buf.replace(b"\r\n", b"\n")
        head, _, buf = buf.partition(b"\n\n")
        lines = head.decode("utf-8", "surrogateescape").split("\n")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            key, _, value = line.partition(":")
            headers[key.strip()] = value.strip()
        body = b""
        length = int(headers.get("Content-Length", "0") or 0)
        while len(buf) < length:
            try:
                chunk = sock.recv(65536)
            except OSError:
                return None, b""
            if not chunk:
                return None, b""
            buf += chunk
        body, buf = buf[:length], buf[length:]
        return Command(0, lines[0].strip(), headers, body), buf

    def _answer(self, client: _Client, cmd: Command) -> bool:
        """Reply like FreeSWITCH; return False when the connection must close."""
        cmd.client = client.cid
        line = cmd.line
        verb, _, arg = line.partition(" ")
        verb = verb.lower()
        if verb == "auth":
            if arg == self.password:
                client.authed = True
                return client.send(load_fixture("auth_reply.esl"))
            client.send(_reply("-ERR invalid"))
            return False
        if verb == "exit":
            client.send(load_fixture("exit_0_command_reply.esl"))
            client.send(load_fixture("exit_1_text_disconnect-notice.esl"))
            return False
        if not client.authed:
            return client.send(_reply("-ERR command not found"))
        if verb == "event":
            words = arg.split()
            if words and words[0] in ("plain", "json", "xml"):
                words = words[1:]
            client.events.update(words)
            return client.send(load_fixture("event_subscribe_reply.esl"))
        if verb == "api":
            ok = client.send(self._api(arg))
            if self.api_events:
                api_cmd, _, api_arg = arg.partition(" ")
                self.emit_api_event(api_cmd, api_arg or None)
            return ok
        if verb == "filter":
            return client.send(_reply(self._filter(client, arg)))
        if verb == "bgapi":
            job = str(uuid.uuid4())
            ok = client.send(_reply(f"+OK Job-UUID: {job}", {"Job-UUID": job}))
            api_cmd, _, api_arg = arg.partition(" ")
            _, result = split_frame(self._api(arg))
            if self.api_events:  # bgapi runs switch_api_execute too
                self.emit_api_event(api_cmd, api_arg or None)
            self.emit_frame(
                build_event_frame(
                    "background_job.esl",
                    {"Job-UUID": job, "Job-Command": api_cmd, "Job-Command-Arg": api_arg or None},
                    event_body=result.decode("utf-8", "surrogateescape"),
                )
            )
            return ok
        if verb == "sendevent":
            return client.send(_reply(f"+OK {uuid.uuid4()}"))
        if verb in ("noevents", "nixevent", "linger", "nolinger", "log", "nolog"):
            return client.send(_reply("+OK"))
        return client.send(_reply("-ERR command not found"))

    @staticmethod
    def _filter(client: _Client, arg: str) -> str:
        """``filter [add] <header> <value>`` / ``filter delete all|<header> [<value>]``.

        As mod_event_socket parses them: the header is the first word, the
        value everything after the first space (it may hold spaces).
        """
        name, _, value = arg.strip(" ").partition(" ")
        if not value:
            return "-ERR invalid syntax"
        if name.lower() == "delete":
            name, _, value = value.partition(" ")
            if name.lower() == "all":
                client.filters.clear()
            else:
                client.filters[:] = [
                    (h, v)
                    for h, v in client.filters
                    if h.lower() != name.lower() or (value and v != value)
                ]
            return f"+OK filter deleted. [{name}][{value}]"
        if name.lower() == "add":
            name, _, value = value.partition(" ")
        client.filters.append((name, value))
        return f"+OK filter added. [{name}]=[{value}]"

    def _api(self, arg: str) -> bytes:
        """An api/response frame: captured for ``status``, canned or ``-ERR`` otherwise."""
        name = arg.split(" ", 1)[0]
        if name in self.api_responses:
            body = self.api_responses[name].encode("utf-8")
            return join_frame([("Content-Type", "api/response"), ("Content-Length", "")], body)
        if arg == "status":
            return load_fixture("api_status.esl")
        body = f"-ERR {name} Command not found!\n".encode()
        return join_frame([("Content-Type", "api/response"), ("Content-Length", "")], body)


def _reply(text: str, extra: Mapping[str, str] | None = None) -> bytes:
    """A command/reply frame (no body), as FreeSWITCH formats them."""
    lines = ["Content-Type: command/reply", f"Reply-Text: {text}"]
    lines += [f"{k}: {v}" for k, v in (extra or {}).items()]
    return ("\n".join(lines) + "\n\n").encode("utf-8")


# --- pytest fixture ------------------------------------------------------------


@pytest.fixture
def esl_server() -> Iterator[EslReplayServer]:
    """A started in-process replay server on a free loopback port, stopped after the test."""
    server = EslReplayServer().start()
    try:
        yield server
    finally:
        server.stop()


# --- separate process: control channel -----------------------------------------


def _control_op(server: EslReplayServer, msg: Mapping[str, Any]) -> Any:
    """Run one control command (the JSON-line protocol of process mode)."""
    op = msg.get("op")
    if op == "emit_fixture":
        return server.emit_fixture(msg["name"], msg.get("overrides"), msg.get("event_body"))
    if op == "emit_frame":
        return server.emit_frame(base64.b64decode(msg["data_b64"]))
    if op == "emit_frames":
        return sum(server.emit_frame(base64.b64decode(f)) for f in msg["frames_b64"])
    if op == "sent_events":
        return server.sent_events()
    if op == "emit_raw":
        return server.emit_raw(base64.b64decode(msg["data_b64"]))
    if op == "drop_mid_frame":
        return server.drop_mid_frame(msg.get("name", "record_stop.esl"))
    if op == "disconnect_notice":
        return server.disconnect_notice(bool(msg.get("close", True)))
    if op == "kill_connections":
        server.kill_connections()
        return True
    if op == "hang":
        server.hang(bool(msg.get("new_connections", False)))
        return True
    if op == "unhang":
        server.unhang()
        return True
    if op == "stop":
        server.stop()
        return True
    if op == "start":
        server.start()
        return server.port
    if op == "wait_subscribed":
        return server.wait_subscribed(
            int(msg.get("n", 1)),
            float(msg.get("timeout", 5.0)),
            min_connections=int(msg.get("min_connections", 0)),
        )
    if op == "status":
        return {
            "port": server.port,
            "subscribed": server.subscribed,
            "connections_total": server.connections_total,
        }
    if op == "received":
        return [
            {
                "client": c.client,
                "line": c.line,
                "headers": c.headers,
                "body": c.body.decode("utf-8", "replace"),
            }
            for c in server.commands(msg.get("prefix", ""))
        ]
    raise ValueError(f"unknown op {op!r}")


def _control_loop(server: EslReplayServer, lsock: socket.socket, done: threading.Event) -> None:
    while not done.is_set():
        try:
            conn, _ = lsock.accept()
        except OSError:
            return
        threading.Thread(target=_control_conn, args=(server, conn, done), daemon=True).start()


def _control_conn(server: EslReplayServer, conn: socket.socket, done: threading.Event) -> None:
    with conn, conn.makefile("rwb") as f:
        for raw in f:
            try:
                msg = json.loads(raw)
                if msg.get("op") == "quit":
                    reply: dict[str, Any] = {"ok": True, "result": None}
                    done.set()
                else:
                    reply = {"ok": True, "result": _control_op(server, msg)}
            except Exception as exc:  # report to the controller, keep serving
                reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            f.write(json.dumps(reply).encode() + b"\n")
            f.flush()
            if done.is_set():
                return


class EslServerProcess:
    """Run the replay server as a separate process and drive it over its control port."""

    def __init__(self, password: str = "ClueCon", port: int = 0) -> None:
        root = Path(__file__).resolve().parents[2]
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.support.eslserver",
                "--port",
                str(port),
                "--password",
                password,
            ],
            cwd=root,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        ready = json.loads(self.proc.stdout.readline())
        self.port: int = ready["port"]
        self.control_port: int = ready["control_port"]
        # Longer than any server-side wait (wait_subscribed takes up to 30 s).
        self._sock = socket.create_connection(("127.0.0.1", self.control_port), timeout=90)
        self._file = self._sock.makefile("rwb")
        # Tests drive the server from several threads (a generator emitting events
        # while the main thread waits for a reconnect): one request/reply at a
        # time, or a thread can read the reply meant for another.
        self._lock = threading.Lock()

    def call(self, op: str, **kwargs: Any) -> Any:
        """Send one control command and return its result (RuntimeError if it failed)."""
        with self._lock:
            self._file.write(json.dumps({"op": op, **kwargs}).encode() + b"\n")
            self._file.flush()
            reply = json.loads(self._file.readline())
        if not reply["ok"]:
            raise RuntimeError(reply["error"])
        return reply["result"]

    def close(self) -> None:
        """Ask the process to quit, then make sure it is gone."""
        with contextlib.suppress(OSError, ValueError):
            self.call("quit")
        with contextlib.suppress(OSError):
            self._file.close()
            self._sock.close()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m tests.support.eslserver``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8021, help="ESL port (0: a free one)")
    parser.add_argument("--password", default="ClueCon")
    parser.add_argument("--control-port", type=int, default=0, help="JSON-line control port")
    args = parser.parse_args(argv)
    server = EslReplayServer(args.password, args.host, args.port).start()
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("127.0.0.1", args.control_port))
    lsock.listen(4)
    done = threading.Event()
    threading.Thread(target=_control_loop, args=(server, lsock, done), daemon=True).start()
    print(json.dumps({"port": server.port, "control_port": lsock.getsockname()[1]}), flush=True)
    try:
        while not done.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        lsock.close()
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
