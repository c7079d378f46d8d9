"""The playback server (``fsrecrypt serve``) and its API keys: where a Range request becomes frames.

Why the server decrypts and streams instead of handing out keys: the data key
of a recording never leaves this process. A browser gets audio bytes, each
frame authenticated before its first byte is sent, and a seek fetches only
the frames that hold the requested range (one ranged GET), so listening to
minute 55 of an hour-long call costs one frame's worth of latency, not the
whole object.

Who may do what: an API key (header ``X-API-Key``) or a bearer token from the
platform's identity provider (``Authorization: Bearer``, ``tokens``) names a
user of one tenant holding roles (``listen``, ``download``, ``ingest``,
``admin``); each route requires one of them, checked before its view
(``access.Access.authorize``). A recording of another tenant does not exist
for that user (404, never 403, so ids cannot be probed). Because
``<audio src=...>`` cannot send headers, ``/playback`` issues a short-lived
signed URL that the stream endpoint accepts instead. Every access, refused
and failed ones included, writes a row to the tenant's hash-chained access
log.

The modules, along a request's path:

- ``server``: the hardened gevent WSGI server (deadlines, connection caps,
  open-files limit, redacted logs) and ``run_server``;
- ``app``: the Flask app registering ``routes`` (the route table) with their
  ``views``; ``errors`` maps typed errors to statuses and codes;
- ``access``: API key, bearer token or signed URL (``auth``, ``tokens``,
  ``signing``), roles, tenant scoping, the access-log rows;
- ``views`` and ``admin``: the handlers (``admin``: holds, erasure, custody);
- ``ranges``: the Range header; ``stream``: the audited, authenticated relay;
- ``openapi``: the document, generated from ``routes`` and ``schemas``.

This package imports Flask and gevent: ``fsrecrypt.cli`` loads it only for
``serve`` and ``apikeys``, after gevent's monkey-patching for ``serve``. It
never imports click, ``fsrecrypt.cli`` or ``fsrecrypt.daemon``.
"""

from __future__ import annotations

from fsrecrypt.web.app import create_app
from fsrecrypt.web.auth import (
    API_KEY_HEADER,
    ROLES,
    ApiKeyRow,
    Principal,
    authenticate_api_key,
    create_api_key,
    list_api_keys,
    revoke_api_key,
)
from fsrecrypt.web.errors import ApiAuthError, ApiError, classify
from fsrecrypt.web.openapi import openapi_document
from fsrecrypt.web.ranges import BadRange, parse_range
from fsrecrypt.web.server import make_server, redact, run_server
from fsrecrypt.web.signing import UrlSigner, load_signing_key
from fsrecrypt.web.stream import AuditedStream, StreamAborted
from fsrecrypt.web.tokens import TokenVerifier

__all__ = [
    "API_KEY_HEADER",
    "ROLES",
    "ApiAuthError",
    "ApiError",
    "ApiKeyRow",
    "AuditedStream",
    "BadRange",
    "Principal",
    "StreamAborted",
    "TokenVerifier",
    "UrlSigner",
    "authenticate_api_key",
    "classify",
    "create_api_key",
    "create_app",
    "list_api_keys",
    "load_signing_key",
    "make_server",
    "openapi_document",
    "parse_range",
    "redact",
    "revoke_api_key",
    "run_server",
]
