"""Native TLS for ``fsrecrypt serve`` without a proxy: a modern context, a handshake deadline.

Why a context of our own rather than gevent's ``certfile=``: the protocol
floor and the ciphers are stated here (TLS 1.2 or newer; for TLS 1.2 only
ECDHE key exchange with AES-GCM or ChaCha20-Poly1305, so forward secrecy
and AEAD; TLS 1.3's suites are all modern), compression and renegotiation
are off, and the handshake runs inside the server's connection caps with
the header deadline, so a client that opens connections and never finishes
a handshake is evicted like a slow-header client (gevent's own wrapping
would hold such a connection without a deadline).
"""

from __future__ import annotations

import contextlib
from typing import Any

import gevent
from gevent import ssl

from fsrecrypt.errors import ConfigError

TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!MD5:!DSS:!SHA1"


def server_context(cert_file: str, key_file: str) -> Any:
    """The server's SSLContext from a PEM certificate chain and key, or ConfigError."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_CIPHERS)
    context.options |= (
        ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_RENEGOTIATION
    )
    try:
        context.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None)
        reason = reason or type(exc).__name__
        raise ConfigError(
            f"cannot load the TLS certificate {cert_file} and key {key_file}: {reason}",
            hint="Check [playback] tls_cert_file/tls_key_file: PEM files the service user "
            "can read, the key matching the certificate.",
        ) from None
    return context


def handshake(context: Any, sock: Any, seconds: float) -> Any:
    """The TLS socket over ``sock`` once its handshake ended within ``seconds``; None if not.

    A failed or late handshake (a plain-HTTP client, a scanner, a stalled
    client) closes the connection without an answer.
    """
    tls = None
    try:
        with gevent.Timeout(seconds):
            tls = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            tls.do_handshake()
        return tls
    except (gevent.Timeout, OSError, ValueError):
        with contextlib.suppress(OSError):
            (tls or sock).close()
        return None
