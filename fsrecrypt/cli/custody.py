"""``fsrecrypt custody ID [--check FILE]``: one recording's chain of custody as JSON."""

from __future__ import annotations

import click

from fsrecrypt.cli import config_option
from fsrecrypt.cli.helpers import echo_json, operator, services_for, user_option


@click.command("custody")
@config_option
@click.argument("recording_id")
@click.option(
    "--check",
    "check_file",
    type=click.Path(dir_okay=False, exists=True),
    default=None,
    help="Compare this (decrypted) file with the recording's keyed fingerprint.",
)
@user_option
@click.pass_context
def custody_command(
    ctx: click.Context, recording_id: str, check_file: str | None, user_id: str | None
) -> None:
    """Print a recording's evidence: creation, storage, fingerprint, events, anchors.

    With --check FILE, compare FILE with the HMAC-SHA256 fingerprint computed
    while the recording was encrypted (exit 1 if it differs). The key is
    derived on the server, so the fingerprint confirms nothing to anyone
    without it. Both are logged (actions custody and custody_check).
    """
    from fsrecrypt.lifecycle.custody import check_copy, recording_custody

    services = services_for(ctx)
    try:
        if check_file:
            with open(check_file, "rb") as f:
                echo_json(check_copy(services, recording_id, f, user_id=operator(user_id)))
            return
        echo_json(recording_custody(services, recording_id, user_id=operator(user_id)))
    finally:
        services.close()
