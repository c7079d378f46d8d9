"""Failures of the branch key store (DynamoDB, KMS, the MPL) as fsrecrypt's typed errors.

Why one place: the Hierarchical keyring reaches two services, and the MPL
hands their exceptions back raw or wrapped; the daemon's retry path depends
on telling a transient outage (``KeyProviderUnavailable``) from a refusal.
Messages carry the operation, identifiers and error codes only, never a
response body. The MPL's own exceptions are recognised by their class names
and messages (this module does not import the MPL). Imported only by the
hierarchy provider's modules (botocore).
"""

from __future__ import annotations

from typing import Any

from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    NoCredentialsError,
    NoRegionError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from fsrecrypt.errors import KeyAccessError, KeyNotFound, KeyProviderUnavailable
from fsrecrypt.keys.base import DataKeyAuthenticationFailed

_NOT_FOUND = {"NotFoundException", "ResourceNotFoundException"}
_BAD_CIPHERTEXT = {"InvalidCiphertextException", "IncorrectKeyException"}
_TRANSIENT = {
    "ThrottlingException",
    "Throttling",
    "RequestLimitExceeded",
    "TooManyRequestsException",
    "LimitExceededException",
    "DependencyTimeoutException",
    "KMSInternalException",
    "KeyUnavailableException",
    "ServiceUnavailable",
    "InternalFailure",
    "InternalServerError",
    "ProvisionedThroughputExceededException",
}


# What the key store says (GetActiveBranchKey, GetBranchKeyVersion) when an
# item is wrapped by another KMS key than the one it is configured with.
ARN_MISMATCH = (
    "does not match Key Store's configured KMS Key ARN",
    "AWS KMS Key ARN does not match configured value",
)
NOT_FOUND_TEXT = "No item found"


def client_error(exc: Any, where: str, *, not_found: str = "not found") -> KeyAccessError:
    """A botocore ``ClientError`` as the matching typed error (codes only, never bodies).

    Shared by the KMS provider and the branch key store: the same AWS codes
    mean the same thing to both (missing, not authentic, try again later).
    """
    err = exc.response.get("Error", {}) if hasattr(exc, "response") else {}
    code = str(err.get("Code", "Unknown"))[:80]
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    if code in _NOT_FOUND:
        return KeyNotFound(f"{where}: {not_found} ({code})")
    if code in _BAD_CIPHERTEXT:
        return DataKeyAuthenticationFailed(f"{where}: {code}")
    if code in _TRANSIENT or status >= 500 or status == 429:
        return KeyProviderUnavailable(f"{where}: {code} (HTTP {status})")
    return KeyAccessError(f"{where}: {code}")


def aws_error(exc: Any, where: str) -> KeyAccessError:
    """A botocore ``ClientError`` or ``BotoCoreError`` raised while doing ``where``."""
    if isinstance(exc, ClientError):
        return client_error(exc, where)
    if isinstance(exc, HTTPClientError | BotoConnectionError):  # timeouts, refused, reset
        return KeyProviderUnavailable(
            f"{where}: cannot reach the branch key store or KMS ({type(exc).__name__})",
            hint="Check network access to DynamoDB and KMS ([keys] endpoint_url, region); "
            "the operation can be retried.",
        )
    if isinstance(exc, NoCredentialsError | NoRegionError):
        return KeyAccessError(
            f"{where}: {type(exc).__name__}",
            hint="Give the fsrecrypt service AWS credentials (role, environment) and a region.",
        )
    return KeyAccessError(f"{where}: {type(exc).__name__}")


def _walk(exc: BaseException) -> list[Any]:
    """``exc`` and everything the MPL wrapped inside it (args, ``list``, causes)."""
    seen: list[Any] = []
    todo: list[Any] = [exc]
    while todo and len(seen) < 50:
        item = todo.pop()
        if any(item is s for s in seen):
            continue
        seen.append(item)
        if isinstance(item, BaseException):
            todo.extend(a for a in item.args if isinstance(a, BaseException))
            todo.extend(e for e in (item.__cause__, item.__context__) if e is not None)
        for attr in ("list", "message", "obj"):
            inner = getattr(item, attr, None)
            if isinstance(inner, list):
                todo.extend(inner)
            elif isinstance(inner, BaseException):
                todo.append(inner)
    return seen


def _is_auth_failure(errors: list[Any]) -> bool:
    """Every nested error is the primitives' AES-GCM tag failure (wrong context, tampering)."""
    leaves = [e for e in errors if type(e).__name__ == "AwsCryptographicPrimitives"]
    return bool(leaves) and type(errors[0]).__name__ in (
        "CollectionOfErrors",
        "AwsCryptographicPrimitives",
    )


def _detail(errors: list[Any]) -> str:
    """The innermost message the MPL wrapped (a collection's own text says nothing)."""
    for e in reversed(errors):
        if type(e).__name__ != "CollectionOfErrors" and str(e):
            return f"{type(e).__name__}: {str(e)[:300]}"
    return f"{type(errors[0]).__name__}: {str(errors[0])[:300]}"


def mentions(exc: BaseException, texts: tuple[str, ...]) -> bool:
    return any(t in str(e) for e in _walk(exc) for t in texts)


def map_mpl_error(exc: BaseException, where: str) -> KeyAccessError:
    """An MPL or botocore failure as our typed error; identifiers and codes only."""
    errors = _walk(exc)
    for e in errors:
        if isinstance(e, ClientError | BotoCoreError):
            return aws_error(e, where)
    if _is_auth_failure(errors):
        return DataKeyAuthenticationFailed(f"{where}: the wrapped data key did not authenticate")
    detail = _detail(errors)
    if NOT_FOUND_TEXT in detail:
        return KeyNotFound(f"{where}: branch key not in the key store")
    if "InFlightTTLExceeded" in detail or "inFlightTTL exceeded" in detail:
        return KeyProviderUnavailable(f"{where}: branch key fetch still in flight")
    if any(t in detail for t in ARN_MISMATCH):
        return KeyAccessError(
            f"{where}: the branch key is protected by another KMS key than the one expected",
            hint="If it was moved with 'fsrecrypt rotate', run it again to finish; otherwise "
            "check [keys] key_store_kms_key and who wrote to the key store table.",
        )
    return KeyAccessError(f"{where}: {detail}")
