"""How an anchor is signed and checked: HMAC-SHA256, Ed25519, or an asymmetric AWS KMS key.

An anchor is only worth something if whoever can rewrite the database cannot
also forge the anchor. HMAC and Ed25519 keep the key in its own 0600 file
(``fsrecrypt.keyfile``); with ``kms-ecdsa-p256`` the private key never leaves
KMS (key spec ``ECC_NIST_P256``, usage ``SIGN_VERIFY``), every signature is a
CloudTrail event, and an auditor checks anchors offline with the public key
alone (``audit anchor --public-key``).

KMS signs at most 4096 bytes of a RAW message, and an anchor naming many
tenants is longer; the KMS signature therefore covers a short statement
holding the anchor body's SHA-256, which binds the body just as well.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_der_public_key,
)

from fsrecrypt import keys as key_providers
from fsrecrypt.config import AuditConfig, KeysConfig
from fsrecrypt.errors import ConfigError
from fsrecrypt.keyfile import KeyFileSpec, load_key_file

if TYPE_CHECKING:
    from fsrecrypt.keys import AwsKmsProvider

SIGNING_LABEL = b"fsrecrypt-audit-anchor-v1\n"
KMS_ALG = "kms-ecdsa-p256"

ANCHOR_KEY = KeyFileSpec(
    what="audit anchor signing key",
    setting="[audit] anchor_key_file",
    power="forge audit anchors",
    created_by="fsrecrypt audit anchor (anchors signed with the old key no longer verify)",
)


def canonical(value: Any) -> bytes:
    """The one byte form that is signed and hashed (sorted keys, no spaces, ASCII)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def anchor_hash(doc: Mapping[str, Any]) -> str:
    """sha256 of the whole signed anchor: what the next anchor names as its predecessor."""
    return hashlib.sha256(canonical(doc)).hexdigest()


def _kms_statement(body: Mapping[str, Any]) -> bytes:
    """What KMS signs: the label and the body's SHA-256 (under KMS's 4096-byte RAW limit)."""
    return SIGNING_LABEL + b"sha256:" + hashlib.sha256(canonical(body)).hexdigest().encode()


def public_key_from_text(text: str) -> tuple[str, bytes]:
    """(alg, key) from what ``audit anchor --public-key`` printed: Ed25519 raw or P-256 DER.

    Both are base64; a 32-byte key is Ed25519, anything else must be a
    SubjectPublicKeyInfo of a P-256 key (what KMS GetPublicKey returns).
    """
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except ValueError:
        raise ConfigError(
            "--public-key is not base64",
            hint="Pass the 'public_key' value 'fsrecrypt audit anchor --public-key' printed.",
        ) from None
    if len(raw) == 32:
        return "ed25519", raw
    _load_p256(raw)
    return KMS_ALG, raw


def _load_p256(der: bytes) -> ec.EllipticCurvePublicKey:
    try:
        key = load_der_public_key(der)
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError(
            "the anchor public key is neither an Ed25519 key nor a DER public key",
            hint="Pass the 'public_key' value 'fsrecrypt audit anchor --public-key' printed.",
        ) from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise ConfigError(
            "the anchor public key is not a P-256 (ECC_NIST_P256) key",
            hint="Use a KMS key with key spec ECC_NIST_P256 and usage SIGN_VERIFY.",
        )
    return key


class AnchorSigner:
    """Signs and checks anchors with an HMAC key, an Ed25519 key, or a KMS P-256 key.

    ``key_id`` is a hash of the (public) key, never the key: it tells an
    auditor which key to use without revealing anything. A checker built
    from a public key alone can check but not sign.
    """

    def __init__(
        self,
        alg: str,
        *,
        secret: bytes | None = None,
        public: bytes | None = None,
        kms: AwsKmsProvider | None = None,
        kms_key: str = "",
    ) -> None:
        self.alg = alg
        self._secret = secret
        self._public = public
        self._kms = kms
        self._kms_key = kms_key
        if alg == "hmac-sha256":
            if secret is None:
                raise ConfigError("an HMAC anchor key is needed to check HMAC-signed anchors")
            self.key_id = hashlib.sha256(b"fsrecrypt-anchor-key-id\n" + secret).hexdigest()[:16]
        elif alg == "ed25519":
            if secret is not None:
                private = Ed25519PrivateKey.from_private_bytes(secret[:32])
                self._public = private.public_key().public_bytes_raw()
            if self._public is None or len(self._public) != 32:
                raise ConfigError("an Ed25519 public key is 32 bytes (base64)")
            self.key_id = hashlib.sha256(self._public).hexdigest()[:16]
        elif alg == KMS_ALG:
            if self._public is None:
                if kms is None or not kms_key:
                    raise ConfigError(
                        "KMS-signed anchors need [audit] anchor_kms_key or the public key",
                        hint="Set anchor_kms_key, or pass --public-key to check offline.",
                    )
                self._public = kms.public_key(kms_key)
            point = _load_p256(self._public).public_bytes(
                Encoding.DER, PublicFormat.SubjectPublicKeyInfo
            )
            self._public = point
            self.key_id = hashlib.sha256(point).hexdigest()[:16]
        else:
            raise ConfigError(f"unknown anchor signature {alg[:40]!r}")

    def __repr__(self) -> str:
        return f"AnchorSigner({self.alg}, key_id={self.key_id})"

    @classmethod
    def from_config(
        cls, cfg: AuditConfig, *, create: bool = False, keys: KeysConfig | None = None
    ) -> AnchorSigner:
        """The configured signer; for KMS the key's region and endpoint default to ``[keys]``."""
        if cfg.anchor_signature == KMS_ALG:
            region = cfg.anchor_kms_region or (keys.region if keys else "") or "us-east-1"
            endpoint = cfg.anchor_kms_endpoint_url or (keys.endpoint_url if keys else "")
            provider = key_providers.AwsKmsProvider(region=region, endpoint_url=endpoint or None)
            return cls(KMS_ALG, kms=provider, kms_key=cfg.anchor_kms_key)
        return cls(
            cfg.anchor_signature,
            secret=load_key_file(cfg.anchor_key_file, ANCHOR_KEY, create=create),
        )

    @property
    def public_key(self) -> str | None:
        """The public key (base64: Ed25519 raw, P-256 DER) auditors need, or None for HMAC."""
        return base64.b64encode(self._public).decode() if self._public else None

    def sign(self, body: Mapping[str, Any]) -> dict[str, str]:
        message = SIGNING_LABEL + canonical(body)
        if self.alg == "hmac-sha256":
            assert self._secret is not None
            raw = hmac.new(self._secret, message, hashlib.sha256).digest()
        elif self.alg == "ed25519":
            if self._secret is None:
                raise ConfigError("signing an anchor needs the Ed25519 private key file")
            raw = Ed25519PrivateKey.from_private_bytes(self._secret[:32]).sign(message)
        else:
            if self._kms is None:
                raise ConfigError("signing an anchor needs [audit] anchor_kms_key")
            raw = self._kms.sign(self._kms_key, _kms_statement(body))
        return {"alg": self.alg, "key_id": self.key_id, "value": base64.b64encode(raw).decode()}

    def check(self, doc: Mapping[str, Any]) -> str | None:
        """None if ``doc``'s signature is ours and valid, else why not."""
        sig = doc.get("signature")
        if not isinstance(sig, Mapping):
            return "it carries no signature"
        if sig.get("alg") != self.alg or sig.get("key_id") != self.key_id:
            return (
                f"it is signed with {str(sig.get('alg'))[:20]} key {str(sig.get('key_id'))[:20]},"
                f" not the configured {self.alg} key {self.key_id}"
            )
        try:
            raw = base64.b64decode(str(sig.get("value", "")), validate=True)
        except ValueError:
            return "its signature is not base64"
        body = {k: v for k, v in doc.items() if k != "signature"}
        return (
            None
            if self._valid(raw, body)
            else ("its signature does not match its contents (forged or edited)")
        )

    def _valid(self, raw: bytes, body: Mapping[str, Any]) -> bool:
        message = SIGNING_LABEL + canonical(body)
        if self.alg == "hmac-sha256":
            assert self._secret is not None
            expected = hmac.new(self._secret, message, hashlib.sha256).digest()
            return hmac.compare_digest(expected, raw)
        assert self._public is not None
        try:
            if self.alg == "ed25519":
                Ed25519PublicKey.from_public_bytes(self._public).verify(raw, message)
            else:
                _load_p256(self._public).verify(
                    raw, _kms_statement(body), ec.ECDSA(hashes.SHA256())
                )
        except (InvalidSignature, ValueError):
            return False
        return True
