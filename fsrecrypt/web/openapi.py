"""The OpenAPI 3.0 document (``/v1/openapi.json``), written out from the route table.

Nothing here describes the API on its own: paths, parameters and answers
come from :data:`fsrecrypt.web.routes.ROUTES` (what the app registers and
reads) and the body schemas from the dataclasses of :mod:`.schemas` (what the
views build), so the document cannot drift from the code.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, get_args, get_origin, get_type_hints

from fsrecrypt import __version__
from fsrecrypt.web import schemas
from fsrecrypt.web.auth import API_KEY_HEADER
from fsrecrypt.web.routes import ROUTES, Answer, Body, Param, Route

ERROR_DESCRIPTIONS = {
    400: "Bad request parameters",
    401: "Missing or invalid API key or bearer token",
    403: "The caller lacks the route's role, may not act for another user, "
    "or the signed URL is invalid or expired",
    404: "No such recording for this tenant",
    409: "The recording is not stored yet",
    410: "The recording was erased",
    416: "Range not satisfiable, malformed or multiple",
    500: "Integrity or internal failure (no details)",
    503: "A backing service is unavailable; retry",
}

_SECURITY: dict[str, list[dict[str, list[str]]]] = {
    "api_key": [{"ApiKey": []}, {"Bearer": []}],
    "api_key_or_signed_url": [{"ApiKey": []}, {"Bearer": []}, {}],
    "public": [],
}

_KINDS: dict[str, dict[str, Any]] = {
    "string": {"type": "string"},
    "uuid": {"type": "string", "format": "uuid"},
    "integer": {"type": "integer"},
    "date-time": {"type": "string", "format": "date-time"},
    "boolean": {"type": "boolean"},
}

_PLAIN_TYPES: dict[Any, dict[str, Any]] = {
    str: {"type": "string"},
    int: {"type": "integer"},
    float: {"type": "number"},
    bool: {"type": "boolean"},
}


def _ref(cls: type) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{cls.__name__}"}


def _type_schema(hint: Any, found: dict[str, type]) -> dict[str, Any]:
    """The schema of one annotation; dataclasses met on the way are collected in ``found``."""
    origin = get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        options = [a for a in get_args(hint) if a is not type(None)]
        if len(options) != 1:
            raise TypeError(f"only 'X | None' unions are described, not {hint}")
        return {**_type_schema(options[0], found), "nullable": True}
    if origin is Literal:
        return {"type": "string", "enum": list(get_args(hint))}
    if origin is list:
        return {"type": "array", "items": _type_schema(get_args(hint)[0], found)}
    if dataclasses.is_dataclass(hint):
        found[hint.__name__] = hint  # type: ignore[assignment]
        return _ref(hint)  # type: ignore[arg-type]
    if hint in _PLAIN_TYPES:
        return dict(_PLAIN_TYPES[hint])
    raise TypeError(f"no schema for {hint!r}")


def schema_of(cls: type, found: dict[str, type] | None = None) -> dict[str, Any]:
    """The object schema of a dataclass from :mod:`.schemas` (fields in order)."""
    found = {} if found is None else found
    hints = get_type_hints(cls)
    properties: dict[str, Any] = {}
    required = []
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        prop = _type_schema(hints[f.name], found)
        if "format" in f.metadata:
            prop["format"] = f.metadata["format"]
        if f.default is None:  # left out of the body when None (schemas.to_json), never null
            prop.pop("nullable", None)
        properties[f.name] = prop
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            required.append(f.name)
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        schema["required"] = required
    return schema


def _components(routes: tuple[Route, ...]) -> dict[str, Any]:
    """Every schema the routes answer with, and those they refer to, by class name."""
    pending: dict[str, type] = {"Error": schemas.Error}
    pending.update({a.body.__name__: a.body for r in routes for a in r.answers if a.body})
    pending.update(
        {r.body.schema.__name__: r.body.schema for r in routes if r.body and r.body.schema}
    )
    done: dict[str, Any] = {}
    while pending:
        name, cls = pending.popitem()
        if name not in done:
            found: dict[str, type] = {}
            done[name] = schema_of(cls, found)
            pending.update({k: v for k, v in found.items() if k not in done})
    return dict(sorted(done.items()))


def _parameter(param: Param) -> dict[str, Any]:
    schema = dict(_KINDS[param.kind])
    for key in ("minimum", "maximum", "default"):
        if getattr(param, key) is not None:
            schema[key] = getattr(param, key)
    out: dict[str, Any] = {"name": param.name, "in": param.location}
    if param.description:
        out["description"] = param.description
    if param.location == "path":
        out["required"] = True
    out["schema"] = schema
    return out


def _answer(answer: Answer) -> dict[str, Any]:
    if answer.body is not None:
        schema: dict[str, Any] = _ref(answer.body)
    elif answer.media_type == "application/json":
        schema = {"type": "object"}
    elif answer.media_type.startswith("audio/"):
        schema = {"type": "string", "format": "binary"}
    else:
        schema = {"type": "string"}
    return {"description": answer.description, "content": {answer.media_type: {"schema": schema}}}


def _request_body(body: Body) -> dict[str, Any]:
    content: dict[str, Any] = {}
    for media_type in body.media_types:
        if body.schema is not None and not media_type.startswith("audio/"):
            content[media_type] = {"schema": _ref(body.schema)}
        else:
            content[media_type] = {"schema": {"type": "string", "format": "binary"}}
    return {"description": body.description, "required": body.required, "content": content}


def _operation(route: Route) -> dict[str, Any]:
    op: dict[str, Any] = {"operationId": route.operation_id, "summary": route.summary}
    description = route.description or ""
    if route.roles:
        needed = " or ".join(f"'{r}'" for r in route.roles)
        description = f"{description}\n\nRequires the role {needed}.".strip()
        op["x-roles"] = list(route.roles)
    if description:
        op["description"] = description
    if route.security != "api_key":
        op["security"] = _SECURITY[route.security]
    if route.all_params:
        op["parameters"] = [_parameter(p) for p in route.all_params]
    if route.body is not None:
        op["requestBody"] = _request_body(route.body)
    responses = {str(a.status): _answer(a) for a in route.answers}
    error_ref = {"application/json": {"schema": _ref(schemas.Error)}}
    notes = dict(route.error_notes)
    for status in route.statuses:
        description = notes.get(status, ERROR_DESCRIPTIONS[status])
        responses[str(status)] = {"description": description, "content": error_ref}
    op["responses"] = responses
    return op


def openapi_document(routes: tuple[Route, ...] = ROUTES) -> dict[str, Any]:
    """The OpenAPI 3.0 description of the API, published at /v1/openapi.json."""
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route)
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "fsrecrypt playback API",
            "version": __version__,
            "description": (
                "Lists a tenant's encrypted call recordings and streams them with server-side "
                "decryption and HTTP Range support. Callers authenticate with an API key "
                "(X-API-Key) or a bearer token (JWT) from the platform's identity provider, "
                "and each operation names the roles it requires (x-roles: listen, download, "
                "ingest, admin). Every access is written to the tenant's "
                'hash-chained access log. Errors are JSON: {"error": {"code", "message", '
                '"hint"}} with a stable code.'
            ),
        },
        "servers": [{"url": "/"}],
        "security": _SECURITY["api_key"],
        "paths": paths,
        "components": {
            "securitySchemes": {
                "ApiKey": {"type": "apiKey", "in": "header", "name": API_KEY_HEADER},
                "Bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
            },
            "schemas": _components(routes),
        },
    }
