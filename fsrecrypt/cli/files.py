"""One file at a time: ``encrypt``/``decrypt`` (a message and a key, no database),
``ingest`` (the pipeline's job on one file) and ``get`` (a stored recording back).

Plaintext is written only through :func:`fsrecrypt.cli.output.atomic_output`,
so a failed or killed command leaves nothing readable at its output path.
"""

from __future__ import annotations

import json
import os

import click

from fsrecrypt.cli import State, config_option
from fsrecrypt.cli.helpers import operator, services_for
from fsrecrypt.cli.output import STDOUT, atomic_output, open_input
from fsrecrypt.errors import ConfigError


def _parse_context(pairs: tuple[str, ...]) -> dict[str, str]:
    context: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--context {pair!r} is not KEY=VALUE", hint="Write it as key=value.")
        if key in context:
            raise ConfigError(f"--context {key!r} given twice", hint="Give each key once.")
        context[key] = value
    return context


@click.command("encrypt")
@config_option
@click.argument("input_path", metavar="IN")
@click.argument("output_path", metavar="OUT")
@click.option("--key", "key_id", required=True, help="Key that wraps the data key.")
@click.option(
    "--context", "context_pairs", multiple=True, metavar="K=V", help="Encryption context."
)
@click.option("--frame-size", type=int, default=None, help="Frame length (multiple of 4096).")
@click.pass_context
def encrypt_command(
    ctx: click.Context,
    input_path: str,
    output_path: str,
    key_id: str,
    context_pairs: tuple[str, ...],
    frame_size: int | None,
) -> None:
    """Encrypt IN to OUT as an AWS Encryption SDK message (no database needed)."""
    from fsrecrypt.keys import build_key_provider
    from fsrecrypt.messages import encrypt_message

    config = ctx.ensure_object(State).config
    context = _parse_context(context_pairs)
    provider = build_key_provider(config.keys)
    with open_input(input_path) as src, atomic_output(output_path, 0o644) as out:
        message = encrypt_message(
            provider,
            key_id,
            context,
            src,
            out,
            frame_length=frame_size or config.pipeline.frame_size,
        )
    click.echo(
        json.dumps(
            {
                "in": input_path,
                "out": output_path,
                "plaintext_bytes": message.plaintext_bytes,
                "ciphertext_bytes": message.ciphertext_bytes,
                "message_id": message.message_id,
            }
        ),
        err=output_path == STDOUT,
    )


@click.command("decrypt")
@config_option
@click.argument("input_path", metavar="IN")
@click.argument("output_path", metavar="OUT")
@click.pass_context
def decrypt_command(ctx: click.Context, input_path: str, output_path: str) -> None:
    """Decrypt the message IN to OUT ('-': stdout); nothing is left at OUT if anything fails.

    Not even when killed: see ``atomic_output``.
    """
    from fsrecrypt.keys import build_key_provider
    from fsrecrypt.messages import decrypt_message

    provider = build_key_provider(ctx.ensure_object(State).config.keys)
    with open_input(input_path) as src, atomic_output(output_path) as out:
        written = decrypt_message(provider, src, out)
    click.echo(
        json.dumps({"in": input_path, "out": output_path, "plaintext_bytes": written}),
        err=output_path == STDOUT,
    )


@click.command("ingest")
@config_option
@click.argument("file_path", metavar="FILE")
@click.option("--tenant", "tenant_name", required=True, help="Tenant name.")
@click.option("--call-uuid", default=None, help="FreeSWITCH call UUID to record with it.")
@click.option("--keep", is_flag=True, help="Keep the plaintext even if delete_plaintext is on.")
@click.option("--user", "user_id", default=None, help="User id for the audit log.")
@click.pass_context
def ingest_command(
    ctx: click.Context,
    file_path: str,
    tenant_name: str,
    call_uuid: str | None,
    keep: bool,
    user_id: str | None,
) -> None:
    """Encrypt, upload and record FILE for TENANT, then delete the plaintext."""
    from fsrecrypt.pipeline import ingest_file

    services = services_for(ctx)
    try:
        outcome = ingest_file(
            services,
            os.path.abspath(file_path),
            tenant_name,
            call_uuid=call_uuid,
            user_id=operator(user_id),
            delete=False if keep else None,
        )
    finally:
        services.close()
    click.echo(
        json.dumps(
            {
                "recording_id": outcome.recording.id,
                "object_key": outcome.object_key,
                "plaintext_bytes": outcome.recording.file_size_bytes,
                "ciphertext_bytes": outcome.recording.encrypted_size_bytes,
                "plaintext_deleted": outcome.plaintext_deleted,
                "already_stored": outcome.already_stored,
            }
        )
    )


@click.command("get")
@config_option
@click.argument("recording_id")
@click.option(
    "-o", "--output", "output_path", required=True, help="Where to write the WAV ('-': stdout)."
)
@click.option("--user", "user_id", default=None, help="User id for the audit log.")
@click.pass_context
def get_command(
    ctx: click.Context, recording_id: str, output_path: str, user_id: str | None
) -> None:
    """Fetch and decrypt RECORDING_ID to OUTPUT (audit-logged as a download)."""
    from fsrecrypt.pipeline import fetch_recording

    services = services_for(ctx)
    try:
        with atomic_output(output_path) as out:
            opened = fetch_recording(
                services, recording_id, out, user_id=operator(user_id), action="download"
            )
    finally:
        services.close()
    click.echo(
        json.dumps(
            {
                "recording_id": recording_id,
                "out": output_path,
                "plaintext_bytes": opened.plaintext_size,
            }
        ),
        err=output_path == STDOUT,
    )
