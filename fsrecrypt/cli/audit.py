"""``fsrecrypt audit verify|export|anchor|check-export``: check, export, anchor the log."""

from __future__ import annotations

import contextlib
import io
import json
import sys
from collections.abc import Iterator
from typing import IO, Any

import click

from fsrecrypt.cli import State, config_option
from fsrecrypt.cli.helpers import echo_json, operator, services_for, user_option
from fsrecrypt.cli.output import atomic_output


@click.group("audit")
def audit_group() -> None:
    """Check and export the tamper-evident access log."""


@audit_group.command("verify")
@config_option
@click.option("--tenant", "tenant_name", default=None, help="Check only this tenant's chain.")
@click.option(
    "--anchors",
    "with_anchors",
    is_flag=True,
    help="Also check the chains against every signed anchor ([audit] anchor_dir/bucket).",
)
@user_option
@click.pass_context
def audit_verify_command(
    ctx: click.Context, tenant_name: str | None, with_anchors: bool, user_id: str | None
) -> None:
    """Recompute every hash chain; name edited, deleted or reordered rows.

    With --anchors, also compare the database with every anchor: a chain
    rewritten consistently in SQL (hashes recomputed) passes the plain check
    but contradicts the anchors taken before the rewrite; the first such
    anchor and the rows it covers are named. Exits non-zero if anything is
    wrong. The run itself is logged (action audit_verify) after the check,
    so it never affects its own result.
    """
    from fsrecrypt.lifecycle.anchors import AnchorContradicted, verify_against_anchors
    from fsrecrypt.lifecycle.audit import AuditChainBroken, run_audit_verification

    services = services_for(ctx)
    try:
        anchored = verify_against_anchors(services) if with_anchors else None
        result = run_audit_verification(
            services, tenant_name=tenant_name, user_id=operator(user_id)
        )
    finally:
        services.close()
    for problem in result.problems:
        click.echo(problem.line())
    summary: dict[str, object] = dict(result.summary())
    if anchored is not None:
        for anchor_problem in anchored.problems:
            click.echo(anchor_problem.line())
        summary.update(anchored.summary())
    click.echo(json.dumps(summary))
    if anchored is not None and not anchored.ok:
        first = anchored.first_contradicted
        named = (
            f"first contradicted: anchor {first.seq} ({first.location}), "
            f"[{first.chain}] rows {first.first_row}..{first.last_row}"
            if first
            else "see the lines above"
        )
        raise AnchorContradicted(
            f"the access log disagrees with its anchors: {len(anchored.problems)} problem(s); "
            + named
        )
    if not result.ok:
        raise AuditChainBroken(
            f"the access log is not intact: {len(result.problems)} problem(s) in "
            f"{result.rows} rows (listed above)"
        )


@audit_group.command("export")
@config_option
@click.option("--tenant", "tenant_name", required=True, help="Tenant whose log to export.")
@click.option("--from", "from_", default=None, help="Start (inclusive), ISO 8601; UTC if naive.")
@click.option("--to", "to", default=None, help="End (exclusive), ISO 8601; UTC if naive.")
@click.option(
    "--format", "fmt", type=click.Choice(["jsonl", "csv"]), default="jsonl", show_default=True
)
@click.option(
    "-o", "--output", "output_path", default=None, help="File to write (default: stdout)."
)
@user_option
@click.pass_context
def audit_export_command(
    ctx: click.Context,
    tenant_name: str,
    from_: str | None,
    to: str | None,
    fmt: str,
    output_path: str | None,
    user_id: str | None,
) -> None:
    """Write a tenant's access log rows (with their hashes) as JSON lines or CSV.

    The hashes are included so an auditor can recompute the chain without
    database access. The export itself is logged (action audit_export).
    """
    from fsrecrypt.lifecycle.audit import ExportWindow, export_audit_log

    window = ExportWindow.parse(from_, to)

    @contextlib.contextmanager
    def open_output() -> Iterator[IO[str]]:
        if not output_path:
            yield sys.stdout
            return
        with atomic_output(output_path) as raw:
            text = io.TextIOWrapper(raw, encoding="utf-8", newline="")
            yield text
            text.flush()
            text.detach()

    services = services_for(ctx)
    try:
        count = export_audit_log(
            services,
            tenant_name=tenant_name,
            window=window,
            fmt=fmt,
            user_id=operator(user_id),
            open_output=open_output,
        )
    finally:
        services.close()
    if output_path:
        click.echo(json.dumps({"rows": count, "out": output_path, "format": fmt}))


@audit_group.command("anchor")
@config_option
@click.option(
    "--public-key",
    "public_key",
    is_flag=True,
    help="Print the (Ed25519 or KMS) public key auditors check anchors with; write nothing.",
)
@user_option
@click.pass_context
def audit_anchor_command(ctx: click.Context, public_key: bool, user_id: str | None) -> None:
    """Write the head of every audit chain as one signed anchor, write-once.

    Goes to [audit] anchor_bucket (S3 Object Lock) and/or anchor_dir (a new
    file per anchor, fsynced). Each anchor names the previous one's hash.
    """
    from fsrecrypt.lifecycle.anchors import AnchorSigner, write_anchor

    state = ctx.ensure_object(State)
    if public_key:
        signer = AnchorSigner.from_config(state.config.audit, create=True, keys=state.config.keys)
        echo_json({"alg": signer.alg, "key_id": signer.key_id, "public_key": signer.public_key})
        return
    services = services_for(ctx)
    try:
        receipt = write_anchor(services, user_id=operator(user_id))
    finally:
        services.close()
    echo_json(receipt.as_dict())


@audit_group.command("check-export")
@config_option
@click.argument("export_file", type=click.Path(dir_okay=False, exists=True))
@click.option(
    "--key-file",
    default=None,
    help="Anchor key file (HMAC key or Ed25519 private key); default [audit] anchor_key_file.",
)
@click.option(
    "--public-key",
    default=None,
    help="Ed25519 or KMS public key (base64), from 'audit anchor --public-key'.",
)
@click.pass_context
def audit_check_export_command(
    ctx: click.Context, export_file: str, key_file: str | None, public_key: str | None
) -> None:
    """Check an `audit export` (JSON lines or CSV) offline, without any database access.

    Recomputes every row's hash and link, checks each anchor's signature and
    that the rows it names still carry the anchored hashes. Exits non-zero
    if anything is wrong.
    """
    from fsrecrypt.lifecycle.anchor_check import check_export
    from fsrecrypt.lifecycle.anchors import AnchorContradicted

    signer = _export_signer(ctx, key_file, public_key)
    with open(export_file, encoding="utf-8", errors="replace") as f:
        result = check_export(f, signer)
    for problem in result.problems:
        click.echo(problem)
    click.echo(json.dumps(result.summary()))
    if not result.ok:
        raise AnchorContradicted(
            f"the export {export_file} does not check out: {len(result.problems)} problem(s) "
            "(listed above)"
        )


def _export_signer(ctx: click.Context, key_file: str | None, public_key: str | None) -> Any:
    from fsrecrypt.keyfile import load_key_file
    from fsrecrypt.lifecycle.anchor_signing import (
        ANCHOR_KEY,
        KMS_ALG,
        AnchorSigner,
        public_key_from_text,
    )

    if public_key:
        alg, raw = public_key_from_text(public_key)
        return AnchorSigner(alg, public=raw)
    config = ctx.ensure_object(State).config
    cfg = config.audit
    if cfg.anchor_signature == KMS_ALG and not key_file:
        return AnchorSigner.from_config(cfg, keys=config.keys)
    secret = load_key_file(key_file or cfg.anchor_key_file, ANCHOR_KEY, create=False)
    return AnchorSigner(cfg.anchor_signature, secret=secret)
