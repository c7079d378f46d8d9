"""The ``[auth]`` section: bearer tokens (JWT) from the platform's identity provider.

Its own module so the configuration schema stays readable; ``fsrecrypt.config``
composes it into :class:`fsrecrypt.config.Config` like every other section
(same strict loading, environment overrides ``FSRECRYPT_AUTH_<KEY>``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

TOKEN_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA")
"""Asymmetric JWS algorithms only: 'none' and HMAC (HS*) are never accepted."""


@dataclass(frozen=True)
class AuthConfig:
    """Bearer tokens (JWT) from the platform's identity provider, beside API keys.

    Off unless ``jwks_url`` or ``jwks_file`` is set; then ``issuer`` and
    ``audience`` are required, so a token minted for another service or by
    another issuer is never accepted (see conf/fsrecrypt.toml).
    """

    jwks_url: str = ""
    jwks_file: str = ""
    issuer: str = ""
    audience: str = ""
    leeway: float = 30.0
    algorithms: tuple[str, ...] = ("RS256", "ES256", "EdDSA")
    tenant_claim: str = "tenant"
    roles_claim: str = "roles"
    jwks_timeout: float = 5.0
    jwks_max_bytes: int = 262144
    jwks_min_refresh: float = 30.0
    jwks_cache_ttl: float = 3600.0

    def validate(self) -> None:
        if self.jwks_url and self.jwks_file:
            raise ValueError("set jwks_url or jwks_file, not both")
        if self.jwks_url:
            host = re.match(r"^https?://(\[[^\]]*\]|[^/:?#]*)", self.jwks_url)
            local = host is not None and host[1] in ("127.0.0.1", "localhost", "[::1]")
            if not self.jwks_url.startswith("https://") and not local:
                raise ValueError("jwks_url must be an https:// URL (http only on loopback)")
        if self.jwks_file and not os.path.isabs(self.jwks_file):
            raise ValueError("jwks_file must be an absolute path")
        if self.enabled and not (self.issuer and self.audience):
            raise ValueError("bearer tokens need both issuer and audience")
        refused = [a for a in self.algorithms if a not in TOKEN_ALGORITHMS]
        if refused or not self.algorithms:
            raise ValueError(
                f"algorithms may only name {', '.join(TOKEN_ALGORITHMS)} "
                f"(never none or HS*), got {', '.join(a[:20] for a in refused) or 'none'}"
            )
        if not 0 <= self.leeway <= 600:
            raise ValueError("leeway must be between 0 and 600 seconds")
        if not (self.tenant_claim and self.roles_claim):
            raise ValueError("tenant_claim and roles_claim must not be empty")
        if not 0.1 <= self.jwks_timeout <= 60:
            raise ValueError("jwks_timeout must be between 0.1 and 60 seconds")
        if not 1024 <= self.jwks_max_bytes <= 16 * 1024 * 1024:
            raise ValueError("jwks_max_bytes must be between 1 KiB and 16 MiB")
        if not 0 <= self.jwks_min_refresh <= self.jwks_cache_ttl <= 7 * 86400:
            raise ValueError("need 0 <= jwks_min_refresh <= jwks_cache_ttl <= 7 days")

    @property
    def enabled(self) -> bool:
        """True if bearer tokens are accepted (a key set is configured)."""
        return bool(self.jwks_url or self.jwks_file)
