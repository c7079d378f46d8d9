"""Who the client is behind a reverse proxy: ``X-Forwarded-For``/``-Proto`` from trusted peers only.

Why: behind nginx or a load balancer every connection comes from the proxy,
so every access-log row would name the proxy instead of the person. But the
headers are written by whoever sends the request: believed from anyone, a
client could put any address into the audit log. So they are honoured only
when the connection comes from ``[playback] trusted_proxies`` (CIDRs), and
``X-Forwarded-For`` is read from the right: each trusted proxy appends the
address it saw, so the right-most address that is *not* a trusted proxy is
the client (anything left of it was written by the client and proves
nothing). A hop that is not an IP address stops the walk at the last address
known good; only the last :data:`MAX_HOPS` hops are read.

Applied as WSGI middleware, before Flask: ``REMOTE_ADDR`` and
``wsgi.url_scheme`` become the client's, so every part of the app (the
access log, the signed URLs' scheme, HSTS) sees one answer. The socket's own
address stays in ``environ["fsrecrypt.peer_addr"]``; the connection caps of
:mod:`.server` count sockets, not headers.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Sequence
from typing import Any

PEER_ADDR = "fsrecrypt.peer_addr"
MAX_HOPS = 32
_IP = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_ip(text: str) -> _IP | None:
    """An address as a proxy writes it (``[v6]`` brackets allowed), IPv4-mapped v6 unmapped."""
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if not text or len(text) > 64:
        return None
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


class TrustedProxies:
    """WSGI middleware: the client's address and scheme from trusted proxies' headers."""

    def __init__(self, app: Callable[..., Iterable[bytes]], cidrs: Sequence[str]) -> None:
        self.app = app
        self.networks = tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)

    def trusted(self, ip: _IP | None) -> bool:
        return ip is not None and any(ip.version == n.version and ip in n for n in self.networks)

    def client(self, peer: _IP, forwarded_for: str) -> _IP:
        """The right-most address of ``peer`` + ``X-Forwarded-For`` that is not a trusted proxy."""
        client = peer
        hops = forwarded_for.rsplit(",", MAX_HOPS)[-MAX_HOPS:] if forwarded_for else []
        for hop in reversed(hops):
            if not self.trusted(client):
                break
            ip = parse_ip(hop)
            if ip is None:
                break
            client = ip
        return client

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        peer_text = environ.get("REMOTE_ADDR") or ""
        environ[PEER_ADDR] = peer_text
        peer = parse_ip(peer_text)
        if self.networks and peer is not None and self.trusted(peer):
            forwarded_for = environ.get("HTTP_X_FORWARDED_FOR", "")
            environ["REMOTE_ADDR"] = str(self.client(peer, forwarded_for))
            proto = environ.get("HTTP_X_FORWARDED_PROTO", "").rsplit(",", 1)[-1].strip().lower()
            if proto in ("http", "https"):
                environ["wsgi.url_scheme"] = proto
        return self.app(environ, start_response)
