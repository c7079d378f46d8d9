"""Extra moto server processes with behaviour the shared one does not have, for tests.

The shared fixture (``tests/support/moto.py``) is left exactly as it is; a
test that needs AWS behaviour moto lacks, or IAM enforcement, starts its own
server here:

* ``kms_state_server``: moto with AWS KMS's key-state rule. moto 5.2 keeps
  ``DisableKey``'s state but still encrypts and decrypts with a disabled key
  (``moto/kms/models.py`` never reads ``key_state``); AWS answers
  ``DisabledException`` (or ``KMSInvalidStateException`` for a key pending
  deletion). This server adds just that check around moto's own
  Encrypt/Decrypt/GenerateDataKey/ReEncrypt (``python -m
  tests.support.moto_variants``), so "the primary KMS key is disabled" can
  be tested against a server, also from child processes.
* ``start_moto(env=...)``: any other variant, e.g. ``INITIAL_NO_AUTH_ACTION_COUNT``
  for moto's IAM enforcement.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.moto import _DUMMY_ENV, REGION, MotoServer, _wait_until_up, free_port

ROOT = Path(__file__).resolve().parents[2]


def start_moto(*, env: dict[str, str] | None = None, kms_key_state: bool = False) -> MotoServer:
    """A moto server process of its own on a free port (stop it with ``stop_moto``)."""
    port = free_port()
    tmpdir = Path(tempfile.mkdtemp(prefix="fsrecrypt-moto-variant-"))
    stderr_path = tmpdir / "moto.stderr"
    module = "tests.support.moto_variants" if kms_key_state else "moto.server"
    full_env = {**os.environ, **_DUMMY_ENV, **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), full_env.get("PYTHONPATH")]))
    with open(stderr_path, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", module, "-H", "127.0.0.1", "-p", str(port)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=full_env,
            cwd=str(ROOT),
        )
    server = MotoServer(
        endpoint_url=f"http://127.0.0.1:{port}",
        region=REGION,
        process=proc,
        stderr_path=stderr_path,
    )
    _wait_until_up(server)
    return server


def stop_moto(server: MotoServer) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait(timeout=10)


@pytest.fixture(scope="session")
def kms_state_server(moto_server: MotoServer) -> Iterator[MotoServer]:
    """moto that refuses disabled KMS keys as AWS does (``moto_server`` sets the dummy env)."""
    server = start_moto(kms_key_state=True)
    try:
        yield server
    finally:
        stop_moto(server)


def _patch_kms_key_state() -> None:
    """AWS KMS's rule: a key that is not Enabled neither encrypts nor decrypts."""
    from moto.core.exceptions import JsonRESTError
    from moto.kms import models

    def refuse_unless_enabled(backend: Any, key_id: str) -> None:
        key = backend.keys[backend.any_id_to_key_id(key_id)]
        if key.key_state == "Disabled":
            raise JsonRESTError("DisabledException", f"{key.arn} is disabled.")
        if key.key_state != "Enabled":
            raise JsonRESTError("KMSInvalidStateException", f"{key.arn} is pending deletion.")

    original_encrypt = models.KmsBackend.encrypt
    original_decrypt = models.KmsBackend.decrypt

    def encrypt(self: Any, key_id: str, *args: Any, **kwargs: Any) -> Any:
        refuse_unless_enabled(self, key_id)
        return original_encrypt(self, key_id, *args, **kwargs)

    def decrypt(self: Any, *args: Any, **kwargs: Any) -> Any:
        plaintext, arn = original_decrypt(self, *args, **kwargs)
        refuse_unless_enabled(self, arn)
        return plaintext, arn

    # GenerateDataKey and ReEncrypt go through these two.
    models.KmsBackend.encrypt = encrypt  # type: ignore[method-assign]
    models.KmsBackend.decrypt = decrypt  # type: ignore[method-assign]


if __name__ == "__main__":
    _patch_kms_key_state()
    from moto.server import main

    main(sys.argv[1:])
