"""Least privilege per role: the IAM policies in ``conf/iam/`` against moto with IAM enforced.

A moto server of its own (``tests/support/moto_variants.py``; the shared
fixture's server is not touched) is set up without authentication, then
switched to enforcing IAM (``/moto-api/reset-auth`` with 0, what moto's
``set_initial_no_auth_action_count`` does in server mode). One IAM user and
access key per role carries exactly its policy document from ``conf/iam/``.
Each command then runs with one role's key alone: the daemon's path stores
recordings (single PUT and multipart, escrow copy, health probe, orphan
upload cleanup) and cannot read, decrypt or delete a stored recording;
playback plays it; admin verifies, rotates with rewritten headers, checks
the escrow and erases.

What moto does NOT evaluate, so this test cannot prove (AWS does):

* ``Condition`` blocks: moto knows only ``StringEquals`` on the
  ``sts:ExternalId`` key, so the ``kms:EncryptionContext:tenant_id`` /
  ``kms:EncryptionContextKeys`` and ``s3:prefix`` conditions always pass.
* KMS ``Resource``: moto checks every KMS request against resource ``*``,
  so the KMS key ARNs are rendered as ``*`` here (S3 resources are checked,
  bucket and key ARNs alike).
* DeleteObjects (the batch delete ``erase`` uses): moto authorizes
  ``s3:DeleteObject`` against the bucket's ARN, AWS against each key's; the
  admin user gets that one extra moto-only statement.
"""

from __future__ import annotations

import http.client
import json
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError
from click.testing import CliRunner

from fsrecrypt.cli import main
from fsrecrypt.config import Config, with_overrides
from fsrecrypt.pipeline import Services, edk_from_bytes
from fsrecrypt.web import create_api_key
from tests.support.daemon import make_env
from tests.support.factories import make_wav, write_config
from tests.support.moto import MotoServer
from tests.support.moto_variants import start_moto, stop_moto
from tests.support.serve import serve_process

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
ACCOUNT = "123456789012"  # moto's default account
PREFIX = "recordings/"
ANCHOR_PREFIX = "anchors/"
ROLES = ("daemon", "playback", "admin")
# moto authorizes the batch DeleteObjects against the bucket ARN (see the module docstring).
MOTO_DELETE_OBJECTS = {
    "Sid": "MotoOnlyDeleteObjectsIsAuthorizedOnTheBucket",
    "Effect": "Allow",
    "Action": "s3:DeleteObject",
    "Resource": "arn:aws:s3:::{bucket}",
}


def render(role: str, bucket: str, anchor_bucket: str) -> dict[str, Any]:
    text = (ROOT / "conf" / "iam" / f"{role}.json").read_text()
    for name, value in {
        "${ACCOUNT_ID}": ACCOUNT,
        "${BUCKET}": bucket,
        "${PREFIX}": PREFIX,
        "${ANCHOR_BUCKET}": anchor_bucket,
        "${ANCHOR_PREFIX}": ANCHOR_PREFIX,
        "${ANCHOR_SIGNING_KEY_ARN}": f"arn:aws:kms:us-east-1:{ACCOUNT}:key/anchor-signing",
    }.items():
        text = text.replace(name, value)
    assert "${" not in text, f"unrendered placeholder in conf/iam/{role}.json"
    doc = json.loads(text)
    for statement in doc["Statement"]:
        actions = statement["Action"]
        if any(a.startswith("kms:") for a in ([actions] if isinstance(actions, str) else actions)):
            statement["Resource"] = "*"  # moto checks KMS against "*" only
    if role == "admin":
        doc["Statement"].append({**MOTO_DELETE_OBJECTS, "Resource": f"arn:aws:s3:::{bucket}"})
    return doc


def _enforce(server: MotoServer, count: str) -> None:
    req = urllib.request.Request(
        f"{server.endpoint_url}/moto-api/reset-auth",
        data=count.encode(),
        method="POST",
        headers={"Content-Type": "text/plain"},  # a form body would be parsed away
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        resp.read()


class World:
    def __init__(self, server: MotoServer, root: Path, dsn: str) -> None:
        self.server = server
        self.root = root
        url = server.endpoint_url
        s3 = boto3.client("s3", region_name="us-east-1", endpoint_url=url)
        self.bucket = f"iam-{uuid.uuid4().hex[:12]}"
        s3.create_bucket(Bucket=self.bucket)
        s3.put_bucket_versioning(Bucket=self.bucket, VersioningConfiguration={"Status": "Enabled"})
        kms = boto3.client("kms", region_name="us-east-1", endpoint_url=url)
        self.primary = kms.create_key()["KeyMetadata"]["Arn"]
        self.rotated = kms.create_key()["KeyMetadata"]["Arn"]
        eu = boto3.client("kms", region_name="eu-west-1", endpoint_url=url)
        self.escrow = eu.create_key()["KeyMetadata"]["Arn"]
        # A multipart upload a killed daemon left behind (the sweep aborts it).
        self.stale_upload = s3.create_multipart_upload(
            Bucket=self.bucket, Key=f"{PREFIX}stale.esdk"
        )["UploadId"]
        iam = boto3.client("iam", region_name="us-east-1", endpoint_url=url)
        self.creds: dict[str, tuple[str, str]] = {}
        for role in (*ROLES, "nobody"):
            iam.create_user(UserName=f"fsrecrypt-{role}")
            if role != "nobody":
                iam.put_user_policy(
                    UserName=f"fsrecrypt-{role}",
                    PolicyName=role,
                    PolicyDocument=json.dumps(render(role, self.bucket, "unused-anchors")),
                )
            key = iam.create_access_key(UserName=f"fsrecrypt-{role}")["AccessKey"]
            self.creds[role] = (key["AccessKeyId"], key["SecretAccessKey"])
        (root / "recordings").mkdir()
        self.config = with_overrides(
            Config(),
            database={"dsn": dsn},
            keys={
                "provider": "aws-kms",
                "endpoint_url": url,
                "keyring": str(root / "keyring.json"),
            },
            storage={
                "backend": "s3",
                "bucket": self.bucket,
                "prefix": PREFIX,
                "endpoint_url": url,
                "part_size": 5 * 1024 * 1024,
            },
            pipeline={"frame_size": 4096},
            playback={"signing_key_file": str(root / "secrets" / "url.key")},
            freeswitch={"recordings_dirs": (str(root / "recordings"),)},
        )
        self.cfg = write_config(root / "fsrecrypt.toml", self.config)

    def as_role(self, monkeypatch: pytest.MonkeyPatch, role: str) -> None:
        key, secret = self.creds[role]
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
        monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
        monkeypatch.delenv("AWS_SECURITY_TOKEN", raising=False)

    def cli(self, monkeypatch: pytest.MonkeyPatch, role: str, *args: str) -> tuple[int, str]:
        self.as_role(monkeypatch, role)
        run = CliRunner().invoke(main, ["-c", str(self.cfg), *args])
        # On success the JSON on stdout (a job's progress lines go to stderr); else everything.
        return run.exit_code, run.stdout if run.exit_code == 0 else run.output

    def client(self, monkeypatch: pytest.MonkeyPatch, role: str, service: str) -> Any:
        self.as_role(monkeypatch, role)
        # A fresh session: boto3's default one keeps the credentials it first resolved.
        return boto3.session.Session().client(
            service, region_name="us-east-1", endpoint_url=self.server.endpoint_url
        )


@pytest.fixture
def world(moto_server: MotoServer, tmp_path: Path, pg_dsn: str) -> Iterator[World]:
    """moto_server only for its dummy environment; IAM is enforced on a server of our own."""
    server = start_moto()
    try:
        built = World(server, tmp_path, pg_dsn)
        _enforce(server, "0")
        yield built
    finally:
        stop_moto(server)


def _denied(call: Any) -> str:
    with pytest.raises(ClientError) as info:
        call()
    code = info.value.response["Error"]["Code"]
    assert code in ("AccessDenied", "AccessDeniedException", "403"), code  # HEAD: no body
    return code


def test_each_role_works_with_its_policy_alone(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = world
    tenant = f"iam-{uuid.uuid4().hex[:8]}"
    # Enforcement is on: a user without a policy can do nothing.
    _denied(lambda: w.client(monkeypatch, "nobody", "s3").list_objects_v2(Bucket=w.bucket))
    code, out = w.cli(monkeypatch, "playback", "tenants", "add", tenant, "--key", w.primary)
    assert code != 0  # playback may not even describe a key

    # admin: add the tenant (DescribeKey, the escrow key's probe Encrypt).
    code, out = w.cli(
        monkeypatch, "admin", "tenants", "add", tenant, "--key", w.primary,
        "--escrow-key", w.escrow,
    )  # fmt: skip
    assert code == 0, out

    # daemon: store a short recording (PutObject) and a long one (multipart;
    # HeadObject before it is denied and skipped), each with its escrow copy.
    originals = {}
    for name, seconds, channels in (("short", 1.0, 1), ("long", 175.0, 2)):
        path = w.root / "recordings" / f"{name}.wav"
        data = make_wav(path, seconds, channels=channels, seed=len(name))
        code, out = w.cli(monkeypatch, "daemon", "ingest", str(path), "--tenant", tenant)
        assert code == 0, out
        originals[name] = data
    assert len(originals["long"]) > 5 * 1024 * 1024
    # daemon: a file stored but kept (killed before the unlink) is finished later;
    # the daemon may not HEAD the object, so the stored row is the proof.
    kept = w.root / "recordings" / "kept.wav"
    originals["kept"] = make_wav(kept, 0.5, seed=9)
    for extra in (["--keep"], []):
        code, out = w.cli(monkeypatch, "daemon", "ingest", str(kept), "--tenant", tenant, *extra)
        assert code == 0, out
    assert not kept.exists()
    services = Services(w.config)
    try:
        rows = services.db.recordings(tenant_id=services.db.tenant_by_name(tenant).id)
        by_size = {r.file_size_bytes: r for r in rows}
        ids = {name: by_size[len(data)].id for name, data in originals.items()}
        assert len(ids) == 3
        assert all(len(services.db.escrow_deks(rid)) == 1 for rid in ids.values())
        short = services.db.recording(ids["short"])
    finally:
        services.close()

    # daemon: its other calls (health self-check, orphan multipart cleanup).
    w.as_role(monkeypatch, "daemon")
    daemon_services = Services(w.config)
    try:
        daemon_services.keys.check_key(w.primary)
        daemon_services.store.check()
        assert daemon_services.store.abort_incomplete_uploads(0) == 1
    finally:
        daemon_services.close()

    # daemon: cannot read, decrypt or delete a stored recording.
    code, out = w.cli(monkeypatch, "daemon", "get", ids["short"], "-o", str(w.root / "d.wav"))
    assert code != 0 and "access denied" in out.lower(), out
    s3 = w.client(monkeypatch, "daemon", "s3")
    _denied(lambda: s3.get_object(Bucket=w.bucket, Key=short.s3_path))
    _denied(lambda: s3.head_object(Bucket=w.bucket, Key=short.s3_path))
    _denied(lambda: s3.delete_object(Bucket=w.bucket, Key=short.s3_path))
    _denied(lambda: s3.list_objects_v2(Bucket=w.bucket))
    kms = w.client(monkeypatch, "daemon", "kms")
    edk = edk_from_bytes(short.encrypted_dek_bytes())
    context = {"tenant_id": short.tenant_id, "recording_id": short.id}
    _denied(lambda: kms.decrypt(CiphertextBlob=edk.ciphertext, EncryptionContext=context))
    _denied(
        lambda: kms.re_encrypt(
            CiphertextBlob=edk.ciphertext,
            SourceEncryptionContext=context,
            DestinationKeyId=w.rotated,
        )
    )

    # playback: plays both; may not write, delete or re-wrap.
    for name, rid in ids.items():
        out_path = w.root / f"{name}.out"
        code, out = w.cli(monkeypatch, "playback", "get", rid, "-o", str(out_path))
        assert code == 0, out
        assert out_path.read_bytes() == originals[name]
    w.as_role(monkeypatch, "playback")
    services = Services(w.config)
    try:
        _row, api_key = create_api_key(services, tenant, "supervisor@example.com")
    finally:
        services.close()
    with serve_process(w.cfg, w.root / "serve.log") as (port, _pid):
        for extra, want in (({}, originals["long"]), ({"Range": "bytes=10-99"}, None)):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            conn.request(
                "GET",
                f"/v1/recordings/{ids['long']}/stream",
                headers={"X-API-Key": api_key, **extra},
            )
            resp = conn.getresponse()
            body = resp.read()
            assert resp.status in (200, 206), body[:300]
            assert body == (want if want is not None else originals["long"][10:100])
            conn.close()
    s3 = w.client(monkeypatch, "playback", "s3")
    _denied(lambda: s3.put_object(Bucket=w.bucket, Key=f"{PREFIX}x", Body=b"x"))
    _denied(lambda: s3.delete_object(Bucket=w.bucket, Key=short.s3_path))
    code, out = w.cli(monkeypatch, "playback", "rotate", "--tenant", tenant, "--to", w.rotated)
    assert code != 0

    # admin: verify, check the escrow, rotate with rewritten headers, erase.
    code, out = w.cli(monkeypatch, "admin", "verify", "--tenant", tenant)
    assert code == 0, out
    code, out = w.cli(monkeypatch, "admin", "verify", "--escrow", "--tenant", tenant)
    assert code == 0, out
    code, out = w.cli(
        monkeypatch, "admin", "rotate", "--tenant", tenant, "--to", w.rotated, "--rewrite-headers"
    )
    assert code == 0, out
    assert json.loads(out)["headers_rewritten"] == 3
    code, out = w.cli(monkeypatch, "admin", "verify", "--escrow", "--tenant", tenant)
    assert code == 0 and json.loads(out.strip().splitlines()[-1])["header_without_escrow"] == 0
    # admin: drop the escrow key, then add it back (unwrap + Encrypt per recording).
    code, out = w.cli(monkeypatch, "admin", "tenants", "set-keys", tenant, "--key", w.rotated)
    assert code == 0, out
    code, out = w.cli(
        monkeypatch, "admin", "tenants", "set-keys", tenant, "--key", w.rotated,
        "--escrow-key", w.escrow,
    )  # fmt: skip
    assert code == 0 and json.loads(out)["escrow_rewrapped"] == 3, out
    code, out = w.cli(
        monkeypatch, "admin", "erase", "--recording", ids["short"], "--reason", "iam test",
        "--yes", "--override-retention",
    )  # fmt: skip
    assert code == 0, out
    _enforce(w.server, "inf")
    s3 = boto3.client("s3", region_name="us-east-1", endpoint_url=w.server.endpoint_url)
    left = s3.list_object_versions(Bucket=w.bucket, Prefix=PREFIX)
    keys = {v["Key"] for v in left.get("Versions", [])}
    assert keys and not any(ids["short"] in k for k in keys)  # every version of it is gone


def test_the_daemon_runs_with_the_daemon_policy_alone(
    moto_server: MotoServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``fsrecrypt run`` itself: stores recordings (one multipart), its self-checks pass."""
    server = start_moto()
    try:
        url = server.endpoint_url
        bucket = f"iamd-{uuid.uuid4().hex[:12]}"
        boto3.session.Session().client("s3", endpoint_url=url).create_bucket(Bucket=bucket)
        iam = boto3.session.Session().client("iam", endpoint_url=url)
        creds = {}
        for role in ("daemon", "playback"):
            iam.create_user(UserName=role)
            iam.put_user_policy(
                UserName=role,
                PolicyName=role,
                PolicyDocument=json.dumps(render(role, bucket, "unused-anchors")),
            )
            creds[role] = iam.create_access_key(UserName=role)["AccessKey"]
        envs = make_env(tmp_path, s3=(server, SimpleNamespace(name=bucket)))
        env = next(envs)
        try:
            monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
            monkeypatch.delenv("AWS_SECURITY_TOKEN", raising=False)
            env.extra_env.pop("AWS_SESSION_TOKEN", None)
            env.extra_env["AWS_ACCESS_KEY_ID"] = creds["daemon"]["AccessKeyId"]
            env.extra_env["AWS_SECRET_ACCESS_KEY"] = creds["daemon"]["SecretAccessKey"]
            _enforce(server, "0")
            env.start(storage={"part_size": 5 * 1024 * 1024})
            files = [env.write_wav(seconds=1.0), env.write_wav(seconds=180.0, channels=2)]
            for path, _data in files:
                env.emit_stop(path)
            rows = [env.wait_status(path, "stored", timeout=90) for path, _ in files]
            assert all(not path.exists() for path, _ in files)
            as_daemon = boto3.session.Session(
                aws_access_key_id=creds["daemon"]["AccessKeyId"],
                aws_secret_access_key=creds["daemon"]["SecretAccessKey"],
            ).client("s3", region_name="us-east-1", endpoint_url=url)
            _denied(lambda: as_daemon.get_object(Bucket=bucket, Key=rows[0].s3_path))
            beat_path = env.tmp / "run" / "heartbeat"
            env.wait(
                lambda: {"keys", "store"} <= set(json.loads(beat_path.read_text())["self_checks"]),
                timeout=60,
                what="the daemon's self-checks",
            )
            checks = json.loads(beat_path.read_text())["self_checks"]
            assert checks["keys"]["ok"] is True and checks["store"]["ok"] is True, checks
            monkeypatch.setenv("AWS_ACCESS_KEY_ID", creds["playback"]["AccessKeyId"])
            monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", creds["playback"]["SecretAccessKey"])
            for row, (_path, data) in zip(rows, files, strict=True):
                assert env.decrypt(row) == data
        finally:
            envs.close()
    finally:
        stop_moto(server)


def test_policies_name_only_what_the_code_calls() -> None:
    """No wildcard actions beyond kms:ReEncrypt*; the daemon never gets a read, decrypt or
    delete of a recording (only of its anchors and its own health probe)."""
    docs = {role: render(role, "b", "a") for role in ROLES}

    def grants(doc: dict[str, Any]) -> list[tuple[str, str]]:
        out = []
        for st in doc["Statement"]:
            assert st["Effect"] == "Allow"
            actions = [st["Action"]] if isinstance(st["Action"], str) else st["Action"]
            resources = [st["Resource"]] if isinstance(st["Resource"], str) else st["Resource"]
            out += [(a, r) for a in actions for r in resources]
        return out

    for role, doc in docs.items():
        for action, _resource in grants(doc):
            assert "*" not in action or action == "kms:ReEncrypt*", (role, action)
    recordings = "arn:aws:s3:::b/recordings/*"
    daemon = grants(docs["daemon"])
    assert not [a for a, _r in daemon if a in ("kms:Decrypt", "kms:ReEncrypt*")]
    for action in ("s3:GetObject", "s3:GetObjectVersion", "s3:DeleteObject", "s3:ListBucket"):
        assert (action, recordings) not in daemon
        assert (action, "arn:aws:s3:::b") not in daemon
    assert ("s3:PutObject", recordings) in daemon
    assert ("s3:GetObject", recordings) in grants(docs["playback"])
    assert ("kms:Decrypt", "*") in grants(docs["playback"])  # "*": rendered for moto
