"""The Flask application: the route table registered, errors mapped to JSON, headers set.

Each route of :data:`fsrecrypt.web.routes.ROUTES` becomes one URL rule whose
view gets a :class:`Params`: the route's declared parameters, parsed as
declared (ASCII integers within bounds, ISO 8601 times). A view cannot read
a parameter the document does not list, so the document and the code agree.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from flask import Flask, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException

from fsrecrypt.db import audit_context
from fsrecrypt.errors import FsrecryptError
from fsrecrypt.numbers import NumberError, parse_int
from fsrecrypt.web import schemas
from fsrecrypt.web.access import Access, client_ip, request_path, user_agent
from fsrecrypt.web.auth import API_KEY_HEADER
from fsrecrypt.web.errors import ApiError, classify
from fsrecrypt.web.openapi import openapi_document
from fsrecrypt.web.routes import ROUTES, Param, Route
from fsrecrypt.web.signing import UrlSigner, load_signing_key
from fsrecrypt.web.tokens import TokenVerifier
from fsrecrypt.web.views import Views

if TYPE_CHECKING:
    from fsrecrypt.pipeline import Services

log = logging.getLogger("fsrecrypt.web")
MAX_JSON_BODY = 65536
"""Bytes a JSON request body may have (a reason and a flag need a few hundred)."""


class Params:
    """The declared parameters of the current request's route, read as declared.

    Reading a name the route does not declare (at that location) is a bug
    and raises LookupError; the names read are kept in ``read`` (the tests
    check that every documented parameter is read by its view).
    """

    def __init__(self, route: Route, path_values: Mapping[str, str]) -> None:
        self._route = route
        self._declared = {(p.location, p.name): p for p in route.all_params}
        self._path = path_values
        self.read: set[str] = set()

    def _declared_param(self, location: str, name: str) -> Param:
        param = self._declared.get((location, name))
        if param is None:
            raise LookupError(f"{name!r} is not a declared {location} parameter of this route")
        self.read.add(name)
        return param

    def path(self, name: str) -> str:
        self._declared_param("path", name)
        return self._path[name]

    def header(self, name: str) -> str | None:
        self._declared_param("header", name)
        return request.headers.get(name)

    def has(self, name: str) -> bool:
        self._declared_param("query", name)
        return name in request.args

    def text(self, name: str) -> str | None:
        self._declared_param("query", name)
        return request.args.get(name)

    def integer(self, name: str, *, default: int, maximum: int | None = None) -> int:
        """An ASCII integer within the declared bounds (``maximum`` overrides), or 400."""
        param = self._declared_param("query", name)
        low = param.minimum if param.minimum is not None else 0
        high = maximum if maximum is not None else param.maximum
        if high is None:
            raise LookupError(f"query parameter {name!r} has no maximum")
        raw = request.args.get(name)
        if raw is None:
            return default
        try:
            return parse_int(raw, minimum=low, maximum=high)
        except NumberError:
            raise ApiError(
                f"{name} must be an integer between {low} and {high}",
                code="invalid_parameter",
                hint="Use ASCII digits only, e.g. " + f"{name}={default}.",
            ) from None

    def time(self, name: str) -> datetime | None:
        """An ISO 8601 date-time (UTC when it has no offset), or 400."""
        self._declared_param("query", name)
        value = request.args.get(name)
        if value is None or value == "":
            return None
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise ApiError(
                f"query parameter {name!r} is not an ISO 8601 date-time",
                code="invalid_parameter",
                hint="Use e.g. 2024-05-01T00:00:00Z.",
            ) from None
        return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)

    def body(self) -> Any:
        """The JSON request body as the route's declared ``Body.schema``, or 400 ``invalid_body``.

        At most MAX_JSON_BODY bytes are read; the media type must be
        application/json; fields are checked by :func:`.schemas.from_json`.
        """
        declared = self._route.body
        if declared is None or declared.schema is None:
            raise LookupError("this route declares no JSON body")

        def refused(why: str) -> ApiError:
            return ApiError(
                f"the request body is not valid: {why}",
                code="invalid_body",
                hint=f"Send a JSON object ({declared.description}).",
            )

        if request.mimetype != "application/json":
            raise refused("the media type must be application/json")
        if (request.content_length or 0) > MAX_JSON_BODY:
            raise refused(f"it exceeds {MAX_JSON_BODY} bytes")
        raw = request.stream.read(MAX_JSON_BODY + 1)
        if len(raw) > MAX_JSON_BODY:
            raise refused(f"it exceeds {MAX_JSON_BODY} bytes")
        try:
            return schemas.from_json(declared.schema, json.loads(raw))
        except RecursionError:
            raise refused("it is nested too deeply") from None
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise refused(str(exc)[:200]) from None


def error_response(
    status: int, code: str, message: str, hint: str | None, headers: Mapping[str, str]
) -> Response:
    response = jsonify(
        schemas.to_json(schemas.Error(schemas.ErrorDetail(code, message, hint or None)))
    )
    response.status_code = status
    response.headers.update(headers)
    return response


def _endpoint(
    route: Route, view: Callable[[Params], Response], access: Access
) -> Callable[..., Response]:
    """The view behind its route's checks: the caller authenticated and holding a role first."""

    def endpoint(**path_values: str) -> Response:
        g.params = Params(route, path_values)
        if route.security == "public":
            return view(g.params)
        principal = access.authorize(route, g.params)
        # Rows the view's domain calls write (holds, erasure, custody) name the credential too.
        with audit_context(
            principal.audit_details(), ip_address=client_ip(), user_agent=user_agent()
        ):
            return view(g.params)

    endpoint.__name__ = route.view
    return endpoint


def create_app(
    services: Services,
    *,
    now: Callable[[], float] = time.time,
    tokens: TokenVerifier | None = None,
) -> Flask:
    """The Flask application over the daemon's key provider, store and database.

    Bearer tokens are accepted when ``[auth]`` names a key set (or ``tokens``
    is given); otherwise only API keys and signed URLs.
    """
    app = Flask("fsrecrypt.web", static_folder=None)
    app.json.sort_keys = False  # type: ignore[attr-defined]
    signer = UrlSigner(load_signing_key(services.config.playback.signing_key_file))
    if tokens is None and services.config.auth.enabled:
        tokens = TokenVerifier(services)
    access = Access(services, signer, now, tokens)
    views = Views(services, access, openapi_document(), now)
    for route in ROUTES:
        app.add_url_rule(
            route.rule,
            endpoint=route.operation_id,
            view_func=_endpoint(route, getattr(views, route.view), access),
            methods=[route.method],
        )

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        code = (exc.name or "error").lower().replace(" ", "_")
        access.audit_unaudited_refusal(exc.code or 500, code)
        return error_response(exc.code or 500, code, exc.description or exc.name, None, {})

    @app.errorhandler(FsrecryptError)
    def typed_error(exc: FsrecryptError) -> Response:
        status, code, message, hint = classify(exc)
        headers = dict(getattr(exc, "headers", {}) or {})
        if status >= 500:
            log.error("%s %s failed: %s", request.method, request_path(), exc.one_line())
        if status == 401:
            challenge = f'ApiKey header="{API_KEY_HEADER}"'
            if access.tokens is not None:
                challenge += ', Bearer realm="fsrecrypt"'
            headers.setdefault("WWW-Authenticate", challenge)
        access.audit_unaudited_refusal(status, code)
        return error_response(status, code, message, hint, headers)

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> Response:
        log.exception("%s %s: unexpected error", request.method, request_path())
        status, code, message, hint = classify(exc)
        access.audit_unaudited_refusal(status, code)
        return error_response(status, code, message, hint, {})

    @app.after_request
    def security_headers(response: Response) -> Response:
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        response.headers.setdefault("Cache-Control", "no-store")
        response.headers.setdefault("X-Frame-Options", "DENY")
        return response

    return app
