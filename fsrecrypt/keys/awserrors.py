"""botocore failures of the branch key store (DynamoDB, KMS) as fsrecrypt's typed errors.

Why one place: the Hierarchical keyring reaches two services, and the MPL
hands their exceptions back raw or wrapped; the daemon's retry path depends
on telling a transient outage (``KeyProviderUnavailable``) from a refusal.
Messages carry the operation, identifiers and error codes only, never a
response body. Imported only by the hierarchy provider's modules (botocore).
"""

from __future__ import annotations

from typing import Any

from botocore.exceptions import (
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


def aws_error(exc: Any, where: str) -> KeyAccessError:
    """A botocore ``ClientError`` or ``BotoCoreError`` raised while doing ``where``."""
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", "Unknown"))[:80]
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        if code in _NOT_FOUND:
            return KeyNotFound(f"{where}: not found ({code})")
        if code in _BAD_CIPHERTEXT:
            return DataKeyAuthenticationFailed(f"{where}: {code}")
        if code in _TRANSIENT or status >= 500 or status == 429:
            return KeyProviderUnavailable(f"{where}: {code} (HTTP {status})")
        return KeyAccessError(f"{where}: {code}")
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
