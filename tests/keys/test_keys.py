"""Key providers: the local keyring (file safety, ESDK raw-AES interop) and KMS on moto."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fsrecrypt.config import KeysConfig
from fsrecrypt.errors import (
    KeyAccessError,
    KeyExists,
    KeyNotFound,
    KeyProviderUnavailable,
    KeyringPermissionError,
    NoUsableDataKey,
)
from fsrecrypt.format import EncryptedDataKey
from fsrecrypt.keys import (
    LOCAL_PROVIDER_ID,
    AwsKmsProvider,
    DataKey,
    DataKeyAuthenticationFailed,
    LocalKeyring,
    build_key_provider,
)

CTX = {"tenant": "acme", "recording": "rec-0001"}
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def keyring(tmp_path: Path) -> LocalKeyring:
    return LocalKeyring(tmp_path / "keys" / "keyring.json")


def _material(kr: LocalKeyring, key_id: str) -> bytes:
    doc = json.loads(kr.path.read_text())
    return base64.b64decode(doc["keys"][key_id]["material"])


# --- local keyring ------------------------------------------------------------------


def test_create_list_generate_decrypt(keyring: LocalKeyring) -> None:
    assert keyring.list_keys() == []
    assert keyring.create_key("tenant-a") == "tenant-a"
    st = os.lstat(keyring.path)
    assert stat.S_IMODE(st.st_mode) == 0o600
    doc = json.loads(keyring.path.read_text())
    assert set(doc["keys"]) == {"tenant-a"}
    assert len(_material(keyring, "tenant-a")) == 32
    assert doc["keys"]["tenant-a"]["created_at"].startswith("20")

    infos = keyring.list_keys()
    assert [i.key_id for i in infos] == ["tenant-a"]
    assert infos[0].created_at == doc["keys"]["tenant-a"]["created_at"]
    assert doc["keys"]["tenant-a"]["material"] not in repr(infos)

    dk = keyring.generate_data_key("tenant-a", CTX)
    assert len(dk.plaintext) == 32
    assert dk.key_id == "tenant-a"
    edk = dk.encrypted
    assert edk.provider_id == LOCAL_PROVIDER_ID
    # key name || u32 128 || u32 12 || 12-byte IV; 32-byte ciphertext + 16-byte tag
    assert edk.provider_info[:8] == b"tenant-a"
    assert edk.provider_info[8:16] == bytes.fromhex("000000800000000c")
    assert len(edk.provider_info) == 8 + 8 + 12
    assert len(edk.ciphertext) == 48
    assert keyring.key_for_edk(edk) == "tenant-a"
    assert keyring.decrypt_data_key([edk], CTX) == dk.plaintext
    # Each generation is a fresh key and a fresh IV.
    dk2 = keyring.generate_data_key("tenant-a", CTX)
    assert dk2.plaintext != dk.plaintext
    assert dk2.encrypted.provider_info != edk.provider_info
    keyring.check_key("tenant-a")


def test_empty_context_roundtrip(keyring: LocalKeyring) -> None:
    keyring.create_key("k")
    dk = keyring.generate_data_key("k", {})
    assert keyring.decrypt_data_key([dk.encrypted], {}) == dk.plaintext
    with pytest.raises(DataKeyAuthenticationFailed):
        keyring.decrypt_data_key([dk.encrypted], {"a": "b"})


def test_create_existing_and_invalid_ids(keyring: LocalKeyring) -> None:
    keyring.create_key("a")
    before = keyring.path.read_bytes()
    with pytest.raises(KeyExists):
        keyring.create_key("a")
    assert keyring.path.read_bytes() == before
    for bad in ["", "x" * 129, "has space", "ünï", "a\nb"]:
        with pytest.raises(KeyAccessError):
            keyring.create_key(bad)
    keyring.create_key("ok.id_with:all/sorts-" + "x" * 100)


def test_unknown_key(keyring: LocalKeyring) -> None:
    with pytest.raises(KeyNotFound):
        keyring.generate_data_key("nope", CTX)
    keyring.create_key("a")
    with pytest.raises(KeyNotFound):
        keyring.check_key("nope")
    with pytest.raises(KeyNotFound):
        keyring.rewrap(keyring.generate_data_key("a", CTX).encrypted, CTX, "nope")


def test_wrong_context_or_tampering_is_typed(keyring: LocalKeyring) -> None:
    keyring.create_key("a")
    dk = keyring.generate_data_key("a", CTX)
    with pytest.raises(DataKeyAuthenticationFailed) as ei:
        keyring.decrypt_data_key([dk.encrypted], {**CTX, "recording": "rec-0002"})
    assert isinstance(ei.value, KeyAccessError)
    assert not ei.value.transient
    flipped = bytes([dk.encrypted.ciphertext[0] ^ 1]) + dk.encrypted.ciphertext[1:]
    bad = EncryptedDataKey(dk.encrypted.provider_id, dk.encrypted.provider_info, flipped)
    with pytest.raises(DataKeyAuthenticationFailed):
        keyring.decrypt_data_key([bad], CTX)
    # A bad EDK first does not hide a good one after it.
    assert keyring.decrypt_data_key([bad, dk.encrypted], CTX) == dk.plaintext


def test_no_usable_data_key(keyring: LocalKeyring) -> None:
    keyring.create_key("a")
    foreign = EncryptedDataKey("aws-kms", b"arn:aws:kms:us-east-1:1:key/x", b"\0" * 100)
    with pytest.raises(NoUsableDataKey):
        keyring.decrypt_data_key([foreign], CTX)
    with pytest.raises(NoUsableDataKey):
        keyring.decrypt_data_key([], CTX)
    other = LocalKeyring(keyring.path.parent / "other.json")
    other.create_key("b")
    with pytest.raises(NoUsableDataKey, match="'b'"):
        keyring.decrypt_data_key([other.generate_data_key("b", CTX).encrypted], CTX)
    assert keyring.key_for_edk(foreign) is None


def test_rewrap(keyring: LocalKeyring) -> None:
    keyring.create_key("old")
    keyring.create_key("new")
    dk = keyring.generate_data_key("old", CTX)
    edk2 = keyring.rewrap(dk.encrypted, CTX, "new")
    assert keyring.key_for_edk(edk2) == "new"
    assert keyring.decrypt_data_key([edk2], CTX) == dk.plaintext
    with pytest.raises(DataKeyAuthenticationFailed):
        keyring.rewrap(dk.encrypted, {"tenant": "other"}, "new")


def test_keyring_permissions_refused(keyring: LocalKeyring, tmp_path: Path) -> None:
    keyring.create_key("a")
    for mode in (0o644, 0o640, 0o604, 0o620):
        os.chmod(keyring.path, mode)
        with pytest.raises(KeyringPermissionError):
            LocalKeyring(keyring.path).list_keys()
        with pytest.raises(KeyringPermissionError):
            keyring.generate_data_key("a", CTX)  # the cached copy is not trusted either
        with pytest.raises(KeyringPermissionError):
            keyring.create_key("b")
    os.chmod(keyring.path, 0o600)
    keyring.generate_data_key("a", CTX)

    link = tmp_path / "link.json"
    link.symlink_to(keyring.path)
    with pytest.raises(KeyringPermissionError, match="symlink"):
        LocalKeyring(link).list_keys()
    with pytest.raises(KeyringPermissionError, match="symlink"):
        LocalKeyring(link).create_key("c")
    d = tmp_path / "dir.json"
    d.mkdir(mode=0o700)
    with pytest.raises(KeyringPermissionError, match="regular"):
        LocalKeyring(d).list_keys()


def test_keyring_reloads_when_file_changes(keyring: LocalKeyring) -> None:
    keyring.create_key("a")
    assert [k.key_id for k in keyring.list_keys()] == ["a"]
    LocalKeyring(keyring.path).create_key("b")  # another process/instance
    assert [k.key_id for k in keyring.list_keys()] == ["a", "b"]
    keyring.generate_data_key("b", CTX)


def test_concurrent_create_from_processes(keyring: LocalKeyring) -> None:
    script = textwrap.dedent(
        """
        import sys
        from fsrecrypt.keys import LocalKeyring
        kr = LocalKeyring(sys.argv[1])
        for i in range(8):
            kr.create_key(f"{sys.argv[2]}-{i}")
        """
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(keyring.path), f"p{n}"],
            cwd=ROOT,
            stderr=subprocess.PIPE,
        )
        for n in range(4)
    ]
    for p in procs:
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err.decode()
    ids = {k.key_id for k in keyring.list_keys()}
    assert ids == {f"p{n}-{i}" for n in range(4) for i in range(8)}
    assert stat.S_IMODE(os.lstat(keyring.path).st_mode) == 0o600
    leftovers = [p.name for p in keyring.path.parent.iterdir() if ".tmp-" in p.name]
    assert leftovers == []


def test_no_secret_in_repr_str_or_errors(keyring: LocalKeyring) -> None:
    keyring.create_key("a")
    material = _material(keyring, "a")
    b64 = base64.b64encode(material).decode()
    dk = keyring.generate_data_key("a", CTX)
    texts = [repr(dk), str(dk), repr(keyring), str(keyring), repr(keyring.list_keys())]
    errors: list[BaseException] = []
    for action in (
        lambda: keyring.create_key("a"),
        lambda: keyring.decrypt_data_key([dk.encrypted], {"x": "y"}),
        lambda: keyring.generate_data_key("missing", CTX),
    ):
        try:
            action()
        except KeyAccessError as exc:
            errors.append(exc)
    os.chmod(keyring.path, 0o644)
    try:
        keyring.list_keys()
    except KeyAccessError as exc:
        errors.append(exc)
    os.chmod(keyring.path, 0o600)
    # A corrupt keyring must not echo its content either.
    keyring.path.write_text('{"keys": {"a": {"material": "' + b64 + '!!"}}}')
    try:
        keyring.list_keys()
    except KeyAccessError as exc:
        errors.append(exc)
    assert len(errors) == 5
    texts += [str(e) for e in errors] + [repr(e) for e in errors]
    texts += [e.one_line() for e in errors if hasattr(e, "one_line")]  # type: ignore[attr-defined]
    for secret in (material, dk.plaintext):
        for form in (
            base64.b64encode(secret).decode(),
            secret.hex(),
            repr(secret),
            str(list(secret)),
        ):
            for text in texts:
                assert form not in text
    assert "plaintext" not in repr(dk)
    with pytest.raises(ValueError):
        DataKey(plaintext=b"short", encrypted=dk.encrypted, key_id="a")


# --- interoperability with the official AWS Encryption SDK ------------------------------


def _sdk_provider(key_id: str, material: bytes):  # type: ignore[no-untyped-def]
    from aws_encryption_sdk.identifiers import EncryptionKeyType, WrappingAlgorithm
    from aws_encryption_sdk.internal.crypto.wrapping_keys import WrappingKey
    from aws_encryption_sdk.key_providers.raw import RawMasterKeyProvider

    class Provider(RawMasterKeyProvider):  # type: ignore[misc]
        provider_id = LOCAL_PROVIDER_ID

        def _get_raw_key(self, _key_id: bytes) -> WrappingKey:
            return WrappingKey(
                wrapping_algorithm=WrappingAlgorithm.AES_256_GCM_IV12_TAG16_NO_PADDING,
                wrapping_key=material,
                wrapping_key_type=EncryptionKeyType.SYMMETRIC,
            )

    provider = Provider()
    provider.add_master_key(key_id.encode())
    return provider


def test_sdk_unwraps_our_data_key(keyring: LocalKeyring) -> None:
    from aws_encryption_sdk.identifiers import Algorithm
    from aws_encryption_sdk.structures import EncryptedDataKey as SdkEdk
    from aws_encryption_sdk.structures import MasterKeyInfo

    keyring.create_key("tenant-a")
    provider = _sdk_provider("tenant-a", _material(keyring, "tenant-a"))
    for ctx in (CTX, {}):
        dk = keyring.generate_data_key("tenant-a", ctx)
        sdk_edk = SdkEdk(
            key_provider=MasterKeyInfo(
                provider_id=dk.encrypted.provider_id, key_info=dk.encrypted.provider_info
            ),
            encrypted_data_key=dk.encrypted.ciphertext,
        )
        got = provider.decrypt_data_key(sdk_edk, Algorithm.AES_256_GCM_HKDF_SHA512_COMMIT_KEY, ctx)
        assert got.data_key == dk.plaintext


def test_we_unwrap_sdk_message_data_key(keyring: LocalKeyring) -> None:
    import aws_encryption_sdk
    from aws_encryption_sdk.identifiers import Algorithm, CommitmentPolicy
    from aws_encryption_sdk.internal.formatting.deserialize import deserialize_header

    keyring.create_key("tenant-a")
    provider = _sdk_provider("tenant-a", _material(keyring, "tenant-a"))
    client = aws_encryption_sdk.EncryptionSDKClient(
        commitment_policy=CommitmentPolicy.REQUIRE_ENCRYPT_REQUIRE_DECRYPT
    )
    message, _ = client.encrypt(
        source=b"a recording",
        key_provider=provider,
        encryption_context=CTX,
        algorithm=Algorithm.AES_256_GCM_HKDF_SHA512_COMMIT_KEY,
        frame_length=4096,
    )
    assert message[:3] == bytes.fromhex("020478")
    header, _raw = deserialize_header(io.BytesIO(message))
    (sdk_edk,) = header.encrypted_data_keys
    edk = EncryptedDataKey(
        provider_id=sdk_edk.key_provider.provider_id,
        provider_info=sdk_edk.key_provider.key_info,
        ciphertext=sdk_edk.encrypted_data_key,
    )
    assert keyring.key_for_edk(edk) == "tenant-a"
    data_key = keyring.decrypt_data_key([edk], dict(header.encryption_context))
    # Proof it is THE data key: it reproduces the header's commitment key.
    commit = HKDF(
        algorithm=hashes.SHA512(), length=32, salt=header.message_id, info=b"COMMITKEY"
    ).derive(data_key)
    assert commit == header.commitment_key
    with pytest.raises(DataKeyAuthenticationFailed):
        keyring.decrypt_data_key([edk], {"tenant": "acme"})


# --- AWS KMS on the moto server ------------------------------------------------------------


@pytest.fixture
def kms(moto_server) -> AwsKmsProvider:  # type: ignore[no-untyped-def]
    return AwsKmsProvider(region=moto_server.region, endpoint_url=moto_server.endpoint_url)


def test_kms_create_key_with_alias(kms: AwsKmsProvider, moto_server) -> None:  # type: ignore[no-untyped-def]
    arn = kms.create_key("tenant-kms-a")
    assert arn.startswith("arn:aws:kms:us-east-1:")
    aliases = moto_server.client("kms").list_aliases()["Aliases"]
    target = {a["AliasName"]: a.get("TargetKeyId") for a in aliases}
    assert target["alias/tenant-kms-a"] == arn.rsplit("/", 1)[1]
    with pytest.raises(KeyExists):
        kms.create_key("alias/tenant-kms-a")
    arn_b = kms.create_key("alias/tenant-kms-b")
    assert arn_b != arn
    ids = [k.key_id for k in kms.list_keys()]
    assert "alias/tenant-kms-a" in ids and "alias/tenant-kms-b" in ids
    kms.check_key("tenant-kms-a")
    kms.check_key(arn)
    with pytest.raises(KeyAccessError):
        kms.create_key("alias/aws/forbidden")


def test_kms_generate_decrypt_rewrap(kms: AwsKmsProvider, kms_key: str) -> None:
    kms.create_key("tenant-kms-c")
    dk = kms.generate_data_key("tenant-kms-c", CTX)  # by alias ...
    info = dk.encrypted.provider_info.decode()
    assert dk.encrypted.provider_id == "aws-kms"
    assert info.startswith("arn:aws:kms:") and ":key/" in info and "alias" not in info
    assert dk.key_id == info
    assert kms.key_for_edk(dk.encrypted) == info
    assert len(dk.plaintext) == 32
    assert kms.decrypt_data_key([dk.encrypted], CTX) == dk.plaintext

    with pytest.raises(DataKeyAuthenticationFailed) as ei:
        kms.decrypt_data_key([dk.encrypted], {**CTX, "recording": "other"})
    assert not ei.value.transient

    edk2 = kms.rewrap(dk.encrypted, CTX, kms_key)  # ... and to a key ARN
    assert edk2.provider_info.decode() == kms_key
    assert edk2.ciphertext != dk.encrypted.ciphertext
    assert kms.decrypt_data_key([edk2], CTX) == dk.plaintext

    local = EncryptedDataKey(LOCAL_PROVIDER_ID, b"x" * 30, b"y" * 48)
    with pytest.raises(NoUsableDataKey):
        kms.decrypt_data_key([local], CTX)
    with pytest.raises(NoUsableDataKey):
        kms.rewrap(local, CTX, kms_key)
    # Foreign EDKs are skipped, ours is used.
    assert kms.decrypt_data_key([local, edk2], CTX) == dk.plaintext


def test_kms_unknown_key(kms: AwsKmsProvider) -> None:
    with pytest.raises(KeyNotFound):
        kms.generate_data_key("no-such-alias", CTX)
    with pytest.raises(KeyNotFound):
        kms.check_key("alias/no-such-alias")
    missing = "arn:aws:kms:us-east-1:123456789012:key/11111111-2222-3333-4444-555555555555"
    with pytest.raises(KeyNotFound):
        kms.generate_data_key(missing, CTX)


def test_kms_unreachable_is_transient_and_quick() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # The port is closed now: connections are refused.
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    kms = AwsKmsProvider(region="us-east-1", endpoint_url=f"http://127.0.0.1:{port}")
    t0 = time.monotonic()
    with pytest.raises(KeyProviderUnavailable) as ei:
        kms.generate_data_key("tenant", CTX)
    assert time.monotonic() - t0 < 10
    assert ei.value.transient


def test_build_key_provider(tmp_path: Path) -> None:
    local = build_key_provider(KeysConfig(provider="local", keyring=str(tmp_path / "k.json")))
    assert isinstance(local, LocalKeyring) and local.name == "local"
    remote = build_key_provider(KeysConfig(provider="aws-kms", region="eu-west-1"))
    assert isinstance(remote, AwsKmsProvider) and remote.name == "aws-kms"
    assert remote.endpoint_url is None


def test_local_path_does_not_import_boto(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import sys
        import fsrecrypt.keys, fsrecrypt.store
        from fsrecrypt.config import KeysConfig, StorageConfig
        kr = fsrecrypt.keys.build_key_provider(
            KeysConfig(provider="local", keyring={str(tmp_path / "k.json")!r}))
        kr.create_key("a")
        dk = kr.generate_data_key("a", {{"t": "1"}})
        assert kr.decrypt_data_key([dk.encrypted], {{"t": "1"}}) == dk.plaintext
        st = fsrecrypt.store.build_store(StorageConfig(path={str(tmp_path / "obj")!r}))
        st.put_stream("t/x.esdk", [b"abc"])
        assert st.read_bytes("t/x.esdk", 1, 3) == b"bc"
        st.check()
        heavy = ("boto3", "botocore", "s3transfer")
        bad = sorted(m for m in sys.modules if m.split(".")[0] in heavy)
        assert not bad, bad
        print("ok")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
