"""Branch keys (``aws-kms-hierarchy``) against moto's DynamoDB and KMS, and the official SDK.

What a user relies on: an object fsrecrypt writes with a branch key opens with
the official ``aws-encryption-sdk`` given a Hierarchical keyring on the same
key store (built here with the MPL alone), and what the SDK writes opens with
fsrecrypt; versions of a branch key keep decrypting; a wrapped key under
another context, a tampered or hostile EDK, a planted branch key and a KMS
outage fail typed; a warm cache keeps wrapping and unwrapping with KMS and
DynamoDB unreachable.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time

import aws_encryption_sdk
import pytest
from aws_encryption_sdk.identifiers import Algorithm, CommitmentPolicy

from fsrecrypt import errors
from fsrecrypt import format as esdk
from fsrecrypt.config import KeysConfig
from fsrecrypt.keys import DataKeyAuthenticationFailed, build_key_provider
from tests.support.keystore import KeyStoreEnv, make_key_store
from tests.support.tcpproxy import TcpProxy

F = 4096
SIZES = [0, 1, F - 1, F + 1, 3 * F + 17]
CONTEXTS = {"empty": {}, "tenant": {"tenant_id": "t-1", "recording_id": "r-1"}}

pytestmark = pytest.mark.integration


def _client() -> aws_encryption_sdk.EncryptionSDKClient:
    return aws_encryption_sdk.EncryptionSDKClient(
        commitment_policy=CommitmentPolicy.REQUIRE_ENCRYPT_REQUIRE_DECRYPT
    )


def _ours_encrypt(provider, key_id: str, plaintext: bytes, context: dict[str, str]) -> bytes:
    data_key = provider.generate_data_key(key_id, context)
    encryptor = esdk.Encryptor(data_key.plaintext, [data_key.encrypted], context, frame_length=F)
    return b"".join(encryptor.stream(io.BytesIO(plaintext)))


def _ours_decrypt(provider, message: bytes) -> bytes:
    return b"".join(
        esdk.decrypt_stream(
            io.BytesIO(message),
            lambda h: provider.decrypt_data_key(h.encrypted_data_keys, h.encryption_context),
        )
    )


@pytest.fixture(scope="module")
def store(moto_server) -> KeyStoreEnv:
    return make_key_store(moto_server)


@pytest.fixture(scope="module")
def branch(store: KeyStoreEnv) -> str:
    return store.official_branch_key()


@pytest.fixture(scope="module")
def provider(store: KeyStoreEnv):
    return store.provider()


@pytest.mark.parametrize("context_name", CONTEXTS)
@pytest.mark.parametrize("size", SIZES)
def test_ours_opens_with_the_official_sdk(store, branch, provider, size, context_name) -> None:
    plaintext = os.urandom(size)
    context = CONTEXTS[context_name]
    message = _ours_encrypt(provider, branch, plaintext, context)
    assert message[:3] == b"\x02\x04\x78"  # message format v2, suite 0x0478
    header = esdk.parse_header(message)
    (edk,) = header.encrypted_data_keys
    assert edk.provider_id == "aws-kms-hierarchy" and edk.provider_info == branch.encode()
    out, sdk_header = _client().decrypt(source=message, keyring=store.official_keyring(branch))
    assert out == plaintext
    assert dict(sdk_header.encryption_context) == context


@pytest.mark.parametrize("context_name", CONTEXTS)
@pytest.mark.parametrize("size", SIZES)
def test_official_sdk_messages_open_with_ours(store, branch, provider, size, context_name) -> None:
    plaintext = os.urandom(size)
    message, _ = _client().encrypt(
        source=plaintext,
        keyring=store.official_keyring(branch),
        encryption_context=CONTEXTS[context_name],
        algorithm=Algorithm.AES_256_GCM_HKDF_SHA512_COMMIT_KEY,
        frame_length=F,
    )
    assert _ours_decrypt(provider, bytes(message)) == plaintext


def test_a_new_branch_key_version_wraps_new_keys_and_old_ones_still_open(store) -> None:
    provider = store.provider(cache_ttl=1)
    branch = provider.create_key("new")
    context = {"tenant_id": "t", "recording_id": "before"}
    before = provider.generate_data_key(branch, context)
    provider.version_branch_key(branch)
    time.sleep(1.1)  # the cached active version expires (cache_ttl = 1 s)
    after = provider.generate_data_key(branch, {**context, "recording_id": "after"})
    # bytes 28..44 of the hierarchy EDK are the branch key version that wrapped it
    assert before.encrypted.ciphertext[28:44] != after.encrypted.ciphertext[28:44]
    fresh = store.provider()
    assert fresh.decrypt_data_key([before.encrypted], context) == before.plaintext
    assert (
        fresh.decrypt_data_key([after.encrypted], {**context, "recording_id": "after"})
        == after.plaintext
    )


def test_wrong_context_and_tampering_fail_authentication(provider, branch) -> None:
    context = {"tenant_id": "t", "recording_id": "r"}
    key = provider.generate_data_key(branch, context)
    with pytest.raises(DataKeyAuthenticationFailed):
        provider.decrypt_data_key([key.encrypted], {**context, "recording_id": "other"})
    with pytest.raises(DataKeyAuthenticationFailed):
        provider.decrypt_data_key([key.encrypted], {**context, "extra": "x"})
    for i in (0, 20, len(key.encrypted.ciphertext) - 1):  # salt, IV, tag
        blob = bytearray(key.encrypted.ciphertext)
        blob[i] ^= 0x01
        bad = esdk.EncryptedDataKey(
            key.encrypted.provider_id, key.encrypted.provider_info, bytes(blob)
        )
        with pytest.raises(DataKeyAuthenticationFailed):
            provider.decrypt_data_key([bad], context)
    with pytest.raises(DataKeyAuthenticationFailed):
        provider.decrypt_data_key(
            [
                esdk.EncryptedDataKey(
                    "aws-kms-hierarchy", branch.encode(), key.encrypted.ciphertext[:-1]
                )
            ],
            context,
        )


@pytest.mark.parametrize(
    "edk",
    [
        esdk.EncryptedDataKey("aws-kms-hierarchy", b"\xff\xfe", b"\0" * 92),
        esdk.EncryptedDataKey("aws-kms-hierarchy", b"x" * 4000, b"\0" * 92),
        esdk.EncryptedDataKey("aws-kms-hierarchy", b"a b", b"\0" * 92),
        esdk.EncryptedDataKey("fsrecrypt-local", b"k", b""),
    ],
    ids=["non-utf8-id", "huge-id", "bad-id-chars", "local-edk"],
)
def test_hostile_or_foreign_edks_are_not_ours(provider, edk) -> None:
    assert provider.key_for_edk(edk) is None
    with pytest.raises(errors.NoUsableDataKey):
        provider.decrypt_data_key([edk], {"tenant_id": "t"})


def test_kms_tenant_keys_from_before_the_switch_keep_working_and_can_move(
    store, branch, provider
) -> None:
    """A tenant whose key is a KMS ARN (stored with aws-kms) is served by KMS directly, and
    rotate's re-wrap moves its data keys to a branch key (or back) without the audio."""
    arn = store.new_kms_key()
    context = {"tenant_id": "old", "recording_id": "r"}
    provider.check_key(arn)
    legacy = provider.generate_data_key(arn, context)
    assert legacy.encrypted.provider_id == "aws-kms" and legacy.key_id == arn
    assert provider.key_for_edk(legacy.encrypted) == arn
    assert provider.decrypt_data_key([legacy.encrypted], context) == legacy.plaintext
    on_branch = provider.rewrap(legacy.encrypted, context, branch)
    assert provider.key_for_edk(on_branch) == branch
    assert provider.decrypt_data_key([on_branch], context) == legacy.plaintext
    back = provider.rewrap(on_branch, context, arn)
    assert back.provider_id == "aws-kms"
    assert provider.decrypt_data_key([back], context) == legacy.plaintext
    other = store.new_kms_key()
    moved = provider.rewrap(legacy.encrypted, context, other)
    assert provider.key_for_edk(moved) == other
    assert provider.decrypt_data_key([moved], context) == legacy.plaintext
    with pytest.raises(DataKeyAuthenticationFailed):
        provider.decrypt_data_key([legacy.encrypted], {**context, "recording_id": "x"})
    for name in ("alias/acme", "arn:aws:kms:us-east-1:111122223333:key/x"):
        with pytest.raises(errors.KeyAccessError, match="looks like a KMS key"):
            provider.create_key(name)


def test_an_unknown_branch_key_is_not_found(provider) -> None:
    with pytest.raises(errors.KeyNotFound):
        provider.check_key("no-such-branch-key")
    edk = esdk.EncryptedDataKey("aws-kms-hierarchy", b"no-such-branch-key", os.urandom(92))
    with pytest.raises(errors.KeyAccessError):
        provider.decrypt_data_key([edk], {"tenant_id": "t"})
    with pytest.raises(errors.KeyAccessError):
        provider.check_key("bad id with spaces")


def test_named_branch_keys_and_list(store) -> None:
    provider = store.provider()
    created = provider.create_key("acme-branch")
    assert created == "acme-branch"
    listed = {k.key_id: k for k in provider.list_keys()}
    assert "acme-branch" in listed
    assert store.kms_key_arn in listed["acme-branch"].description
    with pytest.raises(errors.KeyAccessError):
        provider.create_key("acme-branch")  # never overwritten


def test_a_branch_key_planted_under_another_kms_key_is_refused(store) -> None:
    """A writer of the table adds a branch key under a KMS key it controls: not trusted."""
    foreign_arn = store.new_kms_key()
    from aws_cryptographic_material_providers.keystore.models import CreateKeyInput

    planted = store.official_key_store(foreign_arn).create_key(CreateKeyInput())
    provider = store.provider()
    with pytest.raises(errors.KeyAccessError) as info:
        provider.generate_data_key(planted.branch_key_identifier, {"tenant_id": "t"})
    assert "another KMS key" in info.value.message
    with pytest.raises(errors.KeyAccessError, match="refusing to move"):
        provider.move_branch_key(
            planted.branch_key_identifier, store.kms_key_arn, store.new_kms_key()
        )


def test_warm_cache_wraps_and_unwraps_with_kms_and_dynamodb_unreachable(store) -> None:
    """KMS and DynamoDB cut off: keys cached within the TTL keep working, at once.

    A branch key that is not cached fails fast with the transient error the
    daemon's retry path understands.
    """
    moto_port = int(store.moto.endpoint_url.rsplit(":", 1)[1])
    proxy = TcpProxy(moto_port)
    proxy.up()
    try:
        provider = build_key_provider(
            KeysConfig(
                provider="aws-kms-hierarchy",
                region=store.moto.region,
                endpoint_url=f"http://127.0.0.1:{proxy.port}",
                key_store_table=store.table,
                key_store_kms_key=store.kms_key_arn,
            )
        )
        warm = provider.create_key("new")
        cold = provider.create_key("new")
        first = provider.generate_data_key(warm, {"recording_id": "0"})
        provider.decrypt_data_key([first.encrypted], {"recording_id": "0"})
        proxy.down()
        started = time.monotonic()
        for i in range(100):
            context = {"recording_id": str(i)}
            key = provider.generate_data_key(warm, context)
            assert provider.decrypt_data_key([key.encrypted], context) == key.plaintext
        assert provider.decrypt_data_key([first.encrypted], {"recording_id": "0"})
        assert time.monotonic() - started < 10, "wrapping waited for the network"
        with pytest.raises(errors.KeyProviderUnavailable) as info:
            provider.generate_data_key(cold, {"recording_id": "x"})
        assert info.value.transient
    finally:
        proxy.down()


def test_configuring_aws_kms_does_not_load_the_material_providers_library() -> None:
    code = (
        "import sys\n"
        "from fsrecrypt.config import KeysConfig\n"
        "from fsrecrypt.keys import build_key_provider\n"
        "build_key_provider(KeysConfig(provider='aws-kms'))\n"
        "mpl = 'aws_cryptographic_material_providers'\n"
        "assert not any(m.startswith(mpl) for m in sys.modules)\n"
        "from fsrecrypt.keys import AwsKmsHierarchyProvider\n"
        "assert 'aws_cryptographic_material_providers.mpl' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({}, "key_store_table"),
        ({"key_store_table": "t"}, "key_store_table"),
        ({"key_store_table": "table", "key_store_kms_key": "alias/x"}, "key_store_kms_key"),
        ({"key_store_table": "table", "key_store_kms_key": "arn:aws:kms:x"}, "key_store_kms_key"),
    ],
)
def test_hierarchy_config_needs_a_table_and_a_key_arn(values, message) -> None:
    with pytest.raises(ValueError, match=message):
        KeysConfig(provider="aws-kms-hierarchy", **values).validate()
    with pytest.raises(ValueError, match="cache_ttl"):
        KeysConfig(cache_ttl=0).validate()


def test_concurrent_callers_wait_for_a_slow_branch_key_fetch_instead_of_failing(store) -> None:
    """Eight workers miss the cache at once while KMS takes 1.5 s: one fetches, the others
    wait for it (or take over), none fails, and KMS sees one call, not eight."""
    import threading

    provider = store.provider(cache_ttl=60)
    branch = provider.create_key("new")
    calls: list[str] = []

    def slow_kms(model, **_kw) -> None:
        calls.append(model.name)
        time.sleep(1.5)

    provider.kms_client.meta.events.register("before-call.kms.Decrypt", slow_kms)
    failures: list[Exception] = []

    def worker(n: int) -> None:
        try:
            for i in range(3):
                provider.generate_data_key(branch, {"recording_id": f"{n}-{i}"})
        except Exception as exc:  # collected for the assertion
            failures.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert failures == []
    assert 1 <= len(calls) <= 2, calls
