"""The life after storage: audit trail checks, key rotation, erasure, retention, verification.

Everything here changes or proves something about recordings that are
already stored, so every operation follows the same two rules:

* Resumable and idempotent. A command killed half way leaves every row in a
  consistent state, and running it again finishes the job: each recording is
  handled in its own transactions with compare-and-set on the columns it
  changes, so a concurrent daemon, a second operator or a crashed earlier run
  can never be overwritten with stale data.
* Accountable. Every change writes a hash-chained ``recording_access_logs``
  row in the *same* transaction as the change (so the log cannot claim
  something that did not happen, or miss something that did), and every
  command writes a summary row with its outcome.

This module is named in ``cli.LAZY_COMMANDS``: it imports only click, the
standard library and the light fsrecrypt modules at top level. psycopg2,
boto3, tqdm and the crypto code are imported inside the functions.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import IO, TYPE_CHECKING, Any

import click

# The CLI's own -c option and state (cli imports only click, config and errors).
from fsrecrypt.cli import State
from fsrecrypt.cli import config_option as _config_option
from fsrecrypt.db import GENESIS_HASH
from fsrecrypt.errors import (
    ConfigError,
    FsrecryptError,
    IntegrityError,
    InvalidState,
    KeyAccessError,
    NotFound,
    StorageError,
)

if TYPE_CHECKING:  # pragma: no cover
    from fsrecrypt.db import Recording
    from fsrecrypt.pipeline import Services

_PAGE = 500
_MAX_ROTATION_PASSES = 3
# Test-only: "STEP:N" makes `rotate` SIGKILL itself after the N-th STEP
# (rewrapped, uploaded, swapped) so the tests can prove a killed rotation
# resumes. Unset in production; it never changes what a normal run does.
_CRASH_ENV = "FSRECRYPT_TEST_ROTATE_CRASH_AT"
_ROTATION_META_KEYS = ("rotation_pending_object", "rotation_superseded_object")


# --- typed errors of this module -------------------------------------------------------


class AuditChainBroken(IntegrityError):
    """``audit verify`` found edited, deleted or reordered access-log rows."""

    hint = (
        "The access log was changed outside fsrecrypt: keep the output, restore the "
        "recording_access_logs table from a backup and investigate database access"
    )


class LegalHoldActive(InvalidState):
    """A legal hold forbids destroying the recording."""

    hint = (
        "Recordings under legal hold cannot be erased or expired; release the hold with "
        "'fsrecrypt hold remove' once counsel allows it"
    )


class RetentionActive(InvalidState):
    """The recording is still inside its retention period."""

    hint = (
        "Wait until the retention period ([retention] days) has passed, or pass "
        "--override-retention (which is recorded in the audit log) if erasure is required "
        "now, e.g. for a GDPR erasure request"
    )


class RotationIncomplete(FsrecryptError):
    """Some recordings could not be re-wrapped or rewritten."""

    hint = (
        "Fix the cause named for each recording and run the same rotate command again; "
        "it resumes and skips what is done"
    )
    transient = True


class ErasureIncomplete(FsrecryptError):
    """Some recordings were tombstoned but their objects could not all be deleted."""

    hint = (
        "Their data keys are destroyed already; run the same erase command again to "
        "retry deleting the objects"
    )
    transient = True


class VerificationFailed(IntegrityError):
    """``verify`` found recordings that are missing, damaged or unreadable."""

    hint = (
        "Restore each named object from a backup or an earlier object version, "
        "or check the key provider for key errors"
    )


# --- shared helpers -------------------------------------------------------------------------


def _now() -> datetime:
    return datetime.now(UTC)


def _iso(value: datetime | None) -> str | None:
    return value.astimezone(UTC).isoformat(timespec="microseconds") if value else None


def _insert_audit(services: Services, cur: Any, **fields: Any) -> int:
    """Write an audit row inside the caller's transaction (change + log commit together)."""
    return int(services.db.audit_in_transaction(cur, **fields))


_crash_counts: dict[str, int] = {}


def _crash_point(step: str) -> None:
    """Test-only crash injection (see ``_CRASH_ENV``); a no-op unless the variable is set."""
    import signal

    spec = os.environ.get(_CRASH_ENV)
    if not spec:
        return
    want_step, _, count = spec.partition(":")
    if want_step != step:
        return
    _crash_counts[step] = _crash_counts.get(step, 0) + 1
    if _crash_counts[step] >= int(count or "1"):
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def _progress(total: int, desc: str) -> Any:
    """A tqdm bar on stderr (shown on terminals only, so cron logs stay clean)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="rec", file=sys.stderr, disable=None, leave=False)


def _tenant_names(services: Services) -> dict[str, str]:
    return {t.id: t.name for t in services.db.tenants()}


def _select_recordings(
    services: Services,
    *,
    recording_id: str | None = None,
    call_uuid: str | None = None,
    tenant_name: str | None = None,
) -> list[Recording]:
    """The recordings named by exactly one of --recording, --call or --tenant."""
    given = [v for v in (recording_id, call_uuid, tenant_name) if v]
    if len(given) != 1:
        raise ConfigError(
            "name exactly one of --recording, --call or --tenant",
            hint="Pass one selector, e.g. --recording ID.",
        )
    if recording_id:
        return [services.db.recording(recording_id)]
    if call_uuid:
        found = services.db.recordings(call_uuid=call_uuid)
        if not found:
            raise NotFound(f"no recording for call {call_uuid!r}")
        return found
    tenant = services.db.tenant_by_name(tenant_name or "")
    return services.db.recordings(tenant_id=tenant.id)


# --- the audit trail: verification ---------------------------------------------------------


@dataclass(frozen=True)
class ChainProblem:
    """One thing wrong with one row of one chain, in words an auditor can act on."""

    chain: str
    row_id: int | None
    kind: str  # edited | deleted | reordered | truncated
    detail: str

    def line(self) -> str:
        where = f"row {self.row_id}" if self.row_id is not None else "chain"
        return f"[{self.chain}] {where}: {self.kind}: {self.detail}"


@dataclass
class AuditVerification:
    chains: int = 0
    rows: int = 0
    problems: list[ChainProblem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class _ChainState:
    name: str
    prev_hash: str = GENESIS_HASH
    prev_id: int | None = None
    count: int = 0


def _chain_key(tenant_id: Any) -> str:
    return str(tenant_id) if tenant_id is not None else "global"


def verify_audit_chains(services: Services, *, tenant_name: str | None = None) -> AuditVerification:
    """Recompute every hash chain (or one tenant's) and name each broken link.

    Rows are read in id order, page by page, keeping only each chain's last
    hash in memory. A row whose recomputed hash differs from its stored hash
    was edited. A row whose ``prev_hash`` is not its predecessor's hash was
    either reordered (the hash it points to belongs to another row of the
    chain, looked up through the unique ``row_hash`` index) or follows a
    deleted row (the hash it points to exists nowhere). Rows deleted from the
    end of a chain leave no broken link, so each chain is also compared with
    its head (last id, hash and row count kept by a trigger on insert).
    """
    from fsrecrypt.db import audit_row_hash

    names = _tenant_names(services)
    only: str | None = None
    if tenant_name is not None:
        only = services.db.tenant_by_name(tenant_name).id
    result = AuditVerification()
    chains: dict[str, _ChainState] = {}

    def label(key: str) -> str:
        return names.get(key, key) if key != "global" else "global"

    last_id = 0
    while True:
        with services.db.transaction("reading the access log") as cur:
            if only is None:
                cur.execute(
                    "SELECT * FROM recording_access_logs WHERE id > %s ORDER BY id LIMIT %s",
                    (last_id, _PAGE * 10),
                )
            else:
                cur.execute(
                    "SELECT * FROM recording_access_logs WHERE id > %s AND tenant_id = %s"
                    " ORDER BY id LIMIT %s",
                    (last_id, only, _PAGE * 10),
                )
            cols = [d[0] for d in cur.description]
            rows = [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]
        if not rows:
            break
        for row in rows:
            last_id = row["id"]
            key = _chain_key(row["tenant_id"])
            state = chains.setdefault(key, _ChainState(label(key)))
            result.rows += 1
            state.count += 1
            recomputed = audit_row_hash(row["prev_hash"], row)
            if recomputed != row["row_hash"]:
                result.problems.append(
                    ChainProblem(
                        state.name,
                        row["id"],
                        "edited",
                        f"its contents no longer match its hash (action now {row['action']!r}, "
                        f"user {row['user_id']!r}, at {_iso(row['accessed_at'])})",
                    )
                )
            if row["prev_hash"] != state.prev_hash:
                result.problems.append(_broken_link(services, state, row))
            state.prev_hash = row["row_hash"]
            state.prev_id = row["id"]
    result.chains = len(chains)
    _check_heads(services, result, chains, only, label)
    return result


def _broken_link(services: Services, state: _ChainState, row: Mapping[str, Any]) -> ChainProblem:
    after = f"row {state.prev_id}" if state.prev_id is not None else "the start of the chain"
    if row["prev_hash"] == GENESIS_HASH:
        return ChainProblem(
            state.name,
            row["id"],
            "reordered",
            f"it claims to be the first row of the chain but comes after {after}",
        )
    with services.db.transaction("reading the access log") as cur:
        cur.execute(
            "SELECT id, tenant_id FROM recording_access_logs WHERE row_hash = %s",
            (row["prev_hash"],),
        )
        found = cur.fetchone()
    if found is not None and _chain_key(found[1]) == _chain_key(row["tenant_id"]):
        target = int(found[0])
        if target > row["id"]:
            return ChainProblem(
                state.name,
                row["id"],
                "reordered",
                f"it chains after row {target}, which has a higher id "
                f"(expected to follow {after}): rows were swapped or renumbered",
            )
        return ChainProblem(
            state.name,
            row["id"],
            "reordered",
            f"it chains after row {target}, but {after} sits between them: "
            "rows were moved or inserted",
        )
    if found is not None:
        return ChainProblem(
            state.name,
            row["id"],
            "reordered",
            f"it chains after row {found[0]} of another chain: the row was moved between tenants",
        )
    return ChainProblem(
        state.name,
        row["id"],
        "deleted",
        f"the row it follows is missing: at least one row was deleted between {after} "
        f"and row {row['id']}",
    )


def _check_heads(
    services: Services,
    result: AuditVerification,
    chains: dict[str, _ChainState],
    only: str | None,
    label: Callable[[str], str],
) -> None:
    with services.db.transaction("reading the audit chain heads") as cur:
        if only is None:
            cur.execute("SELECT chain, last_id, last_hash, row_count FROM audit_chain_heads")
        else:
            cur.execute(
                "SELECT chain, last_id, last_hash, row_count FROM audit_chain_heads"
                " WHERE chain = %s",
                (only,),
            )
        heads = {r[0]: (int(r[1]), r[2], int(r[3])) for r in cur.fetchall()}
    for key, (head_id, head_hash, head_count) in sorted(heads.items()):
        state = chains.get(key)
        name = state.name if state else label(key)
        if state is None:
            result.problems.append(
                ChainProblem(
                    name,
                    None,
                    "deleted",
                    f"all {head_count} rows of the chain are gone (last row was {head_id})",
                )
            )
            continue
        if state.prev_hash != head_hash or state.prev_id != head_id:
            result.problems.append(
                ChainProblem(
                    name,
                    state.prev_id,
                    "truncated",
                    f"the chain ends at row {state.prev_id} but its head records row {head_id}: "
                    "the newest rows were deleted",
                )
            )
        if state.count != head_count:
            result.problems.append(
                ChainProblem(
                    name,
                    None,
                    "deleted",
                    f"the chain holds {state.count} rows but {head_count} were written: "
                    f"{head_count - state.count} row(s) missing",
                )
            )


# --- the audit trail: export ----------------------------------------------------------------

EXPORT_COLUMNS = (
    "id",
    "accessed_at",
    "tenant_id",
    "recording_id",
    "user_id",
    "action",
    "success",
    "error_message",
    "ip_address",
    "user_agent",
    "decryption_duration_ms",
    "details",
    "prev_hash",
    "row_hash",
)


def _export_value(name: str, value: Any) -> Any:
    if isinstance(value, datetime):
        return _iso(value)
    if name in ("tenant_id", "recording_id", "ip_address") and value is not None:
        return str(value)
    return value


def iter_audit_rows(
    services: Services, tenant_id: str, start: datetime | None, end: datetime | None
) -> Iterator[dict[str, Any]]:
    """A tenant's rows with ``start <= accessed_at < end``, in chain order, page by page."""
    last_id = 0
    while True:
        clauses = ["tenant_id = %s", "id > %s"]
        params: list[Any] = [tenant_id, last_id]
        if start is not None:
            clauses.append("accessed_at >= %s")
            params.append(start)
        if end is not None:
            clauses.append("accessed_at < %s")
            params.append(end)
        params.append(_PAGE * 10)
        with services.db.transaction("exporting the access log") as cur:
            cur.execute(
                f"SELECT {', '.join(EXPORT_COLUMNS)} FROM recording_access_logs"  # noqa: S608
                f" WHERE {' AND '.join(clauses)} ORDER BY id LIMIT %s",
                params,
            )
            rows = cur.fetchall()
        if not rows:
            return
        for raw in rows:
            row = {c: _export_value(c, v) for c, v in zip(EXPORT_COLUMNS, raw, strict=True)}
            last_id = int(row["id"])
            yield row


def write_export(rows: Iterable[Mapping[str, Any]], out: IO[str], fmt: str) -> int:
    """JSON lines (``details`` as an object) or CSV (``details`` as a JSON string)."""
    import csv

    count = 0
    if fmt == "jsonl":
        for row in rows:
            out.write(json.dumps(row, sort_keys=False, default=str) + "\n")
            count += 1
        return count
    writer = csv.DictWriter(out, fieldnames=list(EXPORT_COLUMNS), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        flat = dict(row)
        flat["details"] = json.dumps(flat.get("details") or {}, sort_keys=True)
        writer.writerow(flat)
        count += 1
    return count


def _parse_when(value: str | None, option: str) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ConfigError(
            f"{option} {value!r} is not an ISO 8601 date or time",
            hint="Write it like 2026-01-31 or 2026-01-31T12:00:00+00:00 (UTC if no offset).",
        ) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


# --- key rotation ---------------------------------------------------------------------------


@dataclass
class RotationSummary:
    tenant: str
    to_key: str
    previous_tenant_key: str
    rewrite_headers: bool
    stored: int = 0
    rewrapped: int = 0
    already_current: int = 0
    headers_rewritten: int = 0
    headers_current: int = 0
    leftovers_cleaned: int = 0
    gone: int = 0
    passes: int = 0
    seconds: float = 0.0
    failures: dict[str, str] = field(default_factory=dict)
    remaining: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _canonical_key_id(services: Services, key_id: str) -> str:
    """The id rows record for ``key_id`` (an ARN for KMS, the key id for the keyring).

    A throw-away data key is generated with the target key: that proves the
    key can wrap right now and tells us the id the provider records for it,
    so a KMS alias given on the command line compares equal to the ARN the
    daemon writes into new rows.
    """
    services.keys.check_key(key_id)
    probe = services.keys.generate_data_key(key_id, {"fsrecrypt-purpose": "rotation-probe"})
    return probe.key_id


def _rows_needing_rotation(
    services: Services, tenant_id: str, target: str, rewrite: bool, after: str | None
) -> list[str]:
    where = [
        "tenant_id = %s",
        "status = 'stored'",
        "(kms_key_id IS DISTINCT FROM %s"
        " OR encryption_metadata ?| array['rotation_pending_object',"
        " 'rotation_superseded_object']"
        + (" OR encryption_metadata->>'header_key_id' IS DISTINCT FROM %s" if rewrite else "")
        + ")",
    ]
    params: list[Any] = [tenant_id, target] + ([target] if rewrite else [])
    if after is not None:
        where.append("id > %s")
        params.append(after)
    params.append(_PAGE)
    with services.db.transaction("listing recordings to rotate") as cur:
        cur.execute(
            f"SELECT id FROM call_recordings WHERE {' AND '.join(where)}"  # noqa: S608
            " ORDER BY id LIMIT %s",
            params,
        )
        return [str(r[0]) for r in cur.fetchall()]


def _count_rotation_work(
    services: Services, tenant_id: str, target: str, rewrite: bool
) -> tuple[int, int]:
    """(stored rows of the tenant, rows still needing work)."""
    extra = " OR encryption_metadata->>'header_key_id' IS DISTINCT FROM %s" if rewrite else ""
    params: list[Any] = [target] + ([target] if rewrite else []) + [tenant_id]
    with services.db.transaction("counting recordings to rotate") as cur:
        cur.execute(
            "SELECT count(*), count(*) FILTER (WHERE kms_key_id IS DISTINCT FROM %s"  # noqa: S608
            " OR encryption_metadata ?| array['rotation_pending_object',"
            f" 'rotation_superseded_object']{extra})"
            " FROM call_recordings WHERE status = 'stored' AND tenant_id = %s",
            params,
        )
        total, todo = cur.fetchone()
    return int(total), int(todo)


def rotate_tenant(
    services: Services,
    tenant_name: str,
    to_key: str,
    *,
    rewrite_headers: bool = False,
    user_id: str,
    progress: bool = True,
) -> RotationSummary:
    """Switch a tenant to ``to_key`` and re-wrap (optionally re-header) all its recordings.

    The tenant's key is switched first, so everything stored from now on
    (also by a running daemon) uses the new key. Then every stored recording
    whose database copy of the data key is wrapped by another key is
    re-wrapped (KMS ReEncrypt, or unwrap + wrap in memory for the keyring),
    each row in its own transaction with a compare-and-set on the old wrapped
    key. Passes repeat (up to three) so rows the daemon stored with the old
    key while the first pass ran are caught too.
    """
    started = time.monotonic()
    tenant = services.db.tenant_by_name(tenant_name)
    summary = RotationSummary(tenant.name, to_key, tenant.kms_key_id, rewrite_headers)
    try:
        target = _canonical_key_id(services, to_key)
        if tenant.kms_key_id != to_key:
            services.db.set_tenant_key(tenant.id, to_key)
        summary.stored, todo = _count_rotation_work(services, tenant.id, target, rewrite_headers)
        bar = _progress(todo, f"rotate {tenant.name}") if progress else None
        try:
            for _ in range(_MAX_ROTATION_PASSES):
                summary.passes += 1
                progressed = _rotation_pass(
                    services, tenant.id, target, to_key, rewrite_headers, user_id, summary, bar
                )
                _total, remaining = _count_rotation_work(
                    services, tenant.id, target, rewrite_headers
                )
                summary.remaining = remaining
                if remaining == 0 or not progressed:
                    break
        finally:
            if bar is not None:
                bar.close()
    except FsrecryptError as exc:
        summary.seconds = round(time.monotonic() - started, 3)
        services.db.audit(
            action="rotate",
            user_id=user_id,
            success=False,
            tenant_id=tenant.id,
            error_message=f"{type(exc).__name__}: {exc.message}",
            details={k: v for k, v in summary.as_dict().items() if k != "failures"},
        )
        raise
    summary.seconds = round(time.monotonic() - started, 3)
    failed = bool(summary.failures) or summary.remaining > 0
    services.db.audit(
        action="rotate",
        user_id=user_id,
        success=not failed,
        tenant_id=tenant.id,
        error_message=(f"{len(summary.failures)} recording(s) failed" if failed else None),
        details={**summary.as_dict(), "failures": dict(list(summary.failures.items())[:50])},
    )
    return summary


def _rotation_pass(
    services: Services,
    tenant_id: str,
    target: str,
    to_key: str,
    rewrite: bool,
    user_id: str,
    summary: RotationSummary,
    bar: Any,
) -> bool:
    progressed = False
    after: str | None = None
    while True:
        ids = _rows_needing_rotation(services, tenant_id, target, rewrite, after)
        if not ids:
            return progressed
        for rec_id in ids:
            after = rec_id
            if rec_id in summary.failures:
                continue
            try:
                outcome = rotate_recording(
                    services, rec_id, target, to_key, rewrite_headers=rewrite, user_id=user_id
                )
            except FsrecryptError as exc:
                summary.failures[rec_id] = f"{type(exc).__name__}: {exc.message}"
            else:
                progressed = True
                for name in outcome:
                    setattr(summary, name, getattr(summary, name) + 1)
            if bar is not None:
                bar.update(1)


def rotate_recording(
    services: Services,
    recording_id: str,
    target: str,
    to_key: str,
    *,
    rewrite_headers: bool,
    user_id: str,
) -> list[str]:
    """Bring one recording to the target key; returns the summary counters to bump.

    Safe to call any number of times: every step checks what is already done.
    """
    from fsrecrypt.pipeline import edk_from_bytes, edk_to_bytes, encryption_context

    outcome: list[str] = []
    rec = services.db.recording(recording_id)
    if rec.status != "stored":
        return ["gone"]
    if _finish_header_leftovers(services, rec):
        outcome.append("leftovers_cleaned")
        rec = services.db.recording(recording_id)
    context = encryption_context(rec.tenant_id, rec.id)
    if rec.kms_key_id != target:
        old_b64 = rec.encrypted_dek or ""
        new_edk = services.keys.rewrap(edk_from_bytes(rec.encrypted_dek_bytes()), context, to_key)
        new_b64 = _b64(edk_to_bytes(new_edk))
        recorded = services.keys.key_for_edk(new_edk) or target
        with services.db.transaction("re-wrapping a data key") as cur:
            cur.execute(
                "UPDATE call_recordings SET encrypted_dek = %s, kms_key_id = %s,"
                " updated_at = now(), encryption_metadata = encryption_metadata || %s::jsonb"
                " WHERE id = %s AND status = 'stored' AND encrypted_dek = %s",
                (
                    new_b64,
                    recorded,
                    json.dumps({"previous_kms_key_id": rec.kms_key_id}),
                    rec.id,
                    old_b64,
                ),
            )
            swapped = cur.rowcount == 1
            if swapped:
                _insert_audit(
                    services,
                    cur,
                    action="rotate",
                    user_id=user_id,
                    success=True,
                    recording_id=rec.id,
                    tenant_id=rec.tenant_id,
                    details={"from_key": rec.kms_key_id, "to_key": recorded, "step": "rewrap"},
                )
        if not swapped:
            # Erased, or re-wrapped by someone else meanwhile: look again.
            fresh = services.db.recording(recording_id)
            if fresh.status != "stored":
                return [*outcome, "gone"]
            if fresh.encrypted_dek == old_b64:
                raise InvalidState(f"recording {rec.id} could not be updated (row changed)")
            return rotate_recording(
                services,
                recording_id,
                target,
                to_key,
                rewrite_headers=rewrite_headers,
                user_id=user_id,
            )
        outcome.append("rewrapped")
        _crash_point("rewrapped")
        rec = services.db.recording(recording_id)
    else:
        outcome.append("already_current")
    if rewrite_headers:
        outcome.append(_rewrite_header(services, rec, target, user_id))
    return outcome


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode("ascii")


def _finish_header_leftovers(services: Services, rec: Recording) -> bool:
    """Complete what a killed header rewrite left: delete the orphan or the superseded object.

    ``rotation_pending_object`` is written *before* a new object is uploaded,
    ``rotation_superseded_object`` in the same transaction that switches the
    row to the new object. Either way the name of every copy that exists
    outside the row's ``s3_path`` is in the database, so nothing a crash
    leaves behind can escape a later erasure or this cleanup.
    """
    meta = rec.encryption_metadata or {}
    cleaned = False
    for meta_key in _ROTATION_META_KEYS:
        leftover = meta.get(meta_key)
        if not leftover:
            continue
        if leftover != rec.s3_path:
            services.store.delete(leftover)
        with services.db.transaction("clearing a rotation leftover") as cur:
            cur.execute(
                "UPDATE call_recordings SET encryption_metadata = encryption_metadata - %s"
                " WHERE id = %s AND encryption_metadata->>%s = %s",
                (meta_key, rec.id, meta_key, leftover),
            )
        cleaned = True
    return cleaned


def _rewrite_header(services: Services, rec: Recording, target: str, user_id: str) -> str:
    """Give the object a header wrapped by the target key (same message, same frames).

    The new object is written under a new key (objects are never overwritten),
    the row is switched to it by compare-and-set, and only then is the old
    object deleted (all versions), so a crash at any point leaves the row
    pointing at a complete object whose header opens with a key we hold.
    """
    from itertools import chain

    from fsrecrypt import format as esdk
    from fsrecrypt.pipeline import (
        edk_from_bytes,
        encryption_context,
        read_object_header,
    )
    from fsrecrypt.store import object_key

    old_key = rec.s3_path or ""
    info = services.store.head(old_key)
    header = read_object_header(services.store, old_key, info.size)
    header_keys = [services.keys.key_for_edk(e) for e in header.encrypted_data_keys]
    if header_keys == [target]:
        _mark_header_key(services, rec, target)
        return "headers_current"
    db_edk = edk_from_bytes(rec.encrypted_dek_bytes())
    context = encryption_context(rec.tenant_id, rec.id)
    data_key = services.keys.decrypt_data_key([db_edk], context)
    new_header = esdk.rewrap_header(header, data_key, [db_edk])
    del data_key
    new_key = object_key(
        services.config.storage.prefix,
        rec.tenant_id,
        f"{rec.id}.{secrets.token_hex(4)}",
        rec.created_at,
    )
    with services.db.transaction("recording a pending object") as cur:
        cur.execute(
            "UPDATE call_recordings SET encryption_metadata = encryption_metadata || %s::jsonb"
            " WHERE id = %s AND status = 'stored' AND s3_path = %s AND encrypted_dek = %s",
            (json.dumps({"rotation_pending_object": new_key}), rec.id, old_key, rec.encrypted_dek),
        )
        if cur.rowcount != 1:
            raise InvalidState(
                f"recording {rec.id} changed while its header was being rewritten",
                hint="Run the rotate command again; it picks up the current state.",
            )
    body = services.store.get_range(old_key, header.size, None)
    put = services.store.put_stream(
        new_key,
        chain([new_header.raw], body),
        metadata={"fsrecrypt-recording-id": rec.id, "fsrecrypt-tenant-id": rec.tenant_id},
    )
    expected = info.size - header.size + new_header.size
    if put.size != expected:
        services.store.delete(new_key)
        raise StorageError(
            f"copy of object {old_key} is {put.size} bytes, expected {expected}",
            hint="The object changed while it was copied; run the rotate command again.",
        )
    _crash_point("uploaded")
    meta_update: dict[str, Any] = {
        "rotation_superseded_object": old_key,
        "header_size": new_header.size,
        "header_key_id": target,
    }
    if put.version_id:
        meta_update["object_version"] = put.version_id
    with services.db.transaction("switching to the rewritten object") as cur:
        cur.execute(
            "UPDATE call_recordings SET s3_path = %s, encrypted_size_bytes = %s,"
            " updated_at = now(), encryption_metadata ="
            " (encryption_metadata - 'rotation_pending_object' - 'object_version') || %s::jsonb"
            " WHERE id = %s AND status = 'stored' AND s3_path = %s AND encrypted_dek = %s",
            (new_key, put.size, json.dumps(meta_update), rec.id, old_key, rec.encrypted_dek),
        )
        switched = cur.rowcount == 1
        if switched:
            _insert_audit(
                services,
                cur,
                action="rotate",
                user_id=user_id,
                success=True,
                recording_id=rec.id,
                tenant_id=rec.tenant_id,
                details={
                    "step": "rewrite_header",
                    "to_key": target,
                    "old_object": old_key,
                    "new_object": new_key,
                },
            )
    if not switched:
        services.store.delete(new_key)
        raise InvalidState(
            f"recording {rec.id} changed while its header was being rewritten",
            hint="Run the rotate command again; it picks up the current state.",
        )
    _crash_point("swapped")
    services.store.delete(old_key)
    with services.db.transaction("clearing a superseded object") as cur:
        cur.execute(
            "UPDATE call_recordings SET encryption_metadata ="
            " encryption_metadata - 'rotation_superseded_object' WHERE id = %s AND s3_path = %s",
            (rec.id, new_key),
        )
    return "headers_rewritten"


def _mark_header_key(services: Services, rec: Recording, target: str) -> None:
    with services.db.transaction("noting the header's key") as cur:
        cur.execute(
            "UPDATE call_recordings SET encryption_metadata = encryption_metadata || %s::jsonb"
            " WHERE id = %s AND s3_path = %s",
            (json.dumps({"header_key_id": target}), rec.id, rec.s3_path),
        )


# --- legal holds -----------------------------------------------------------------------------


def _lock_recording(cur: Any, recording_id: str) -> tuple[str, str, Any] | None:
    """Lock a row for the transaction: (status, tenant_id, metadata) or None."""
    cur.execute(
        "SELECT status, tenant_id, encryption_metadata, s3_path FROM call_recordings"
        " WHERE id = %s FOR UPDATE",
        (recording_id,),
    )
    row = cur.fetchone()
    return (row[0], str(row[1]), (row[2] or {}, row[3])) if row else None


def _active_holds(cur: Any, recording_ids: Sequence[str]) -> dict[str, str]:
    if not recording_ids:
        return {}
    cur.execute(
        "SELECT recording_id, reason FROM legal_holds"
        " WHERE released_at IS NULL AND recording_id = ANY(%s::uuid[])",
        (list(recording_ids),),
    )
    return {str(r[0]): r[1] for r in cur.fetchall()}


def add_hold(
    services: Services,
    *,
    reason: str,
    user_id: str,
    recording_id: str | None = None,
    call_uuid: str | None = None,
) -> list[dict[str, Any]]:
    """Place a legal hold on a recording (or every recording of a call).

    Idempotent: a recording already on hold keeps its existing hold and is
    reported as such. Erased recordings cannot be held (nothing is left).
    """
    if not reason.strip():
        raise ConfigError("a legal hold needs a --reason", hint="Say why, e.g. the case number.")
    if bool(recording_id) == bool(call_uuid):
        raise ConfigError("name exactly one of --recording or --call", hint="Pass one selector.")
    recordings = _select_recordings(services, recording_id=recording_id, call_uuid=call_uuid)
    results = []
    for rec in recordings:
        with services.db.transaction("placing a legal hold") as cur:
            locked = _lock_recording(cur, rec.id)
            if locked is None:
                raise NotFound(f"no recording with id {rec.id!r}")
            status, tenant_id, _meta = locked
            if status == "erased":
                results.append({"recording_id": rec.id, "status": "erased"})
                continue
            existing = _active_holds(cur, [rec.id])
            if existing:
                results.append({"recording_id": rec.id, "status": "already held"})
                continue
            cur.execute(
                "INSERT INTO legal_holds (recording_id, tenant_id, reason, placed_by)"
                " VALUES (%s, %s, %s, %s) RETURNING id",
                (rec.id, tenant_id, reason, user_id),
            )
            hold_id = int(cur.fetchone()[0])
            _insert_audit(
                services,
                cur,
                action="hold_add",
                user_id=user_id,
                success=True,
                recording_id=rec.id,
                tenant_id=tenant_id,
                details={"hold_id": hold_id, "reason": reason},
            )
        results.append({"recording_id": rec.id, "status": "held", "hold_id": hold_id})
    if all(r["status"] == "erased" for r in results):
        raise InvalidState(
            "recording(s) "
            + ", ".join(r["recording_id"] for r in results)
            + " were erased; there is nothing left to hold",
            hint="See the deletion receipt in the audit log.",
        )
    return results


def remove_hold(
    services: Services,
    *,
    reason: str,
    user_id: str,
    recording_id: str | None = None,
    call_uuid: str | None = None,
) -> list[dict[str, Any]]:
    """Release the active hold(s); the hold rows stay as history."""
    if not reason.strip():
        raise ConfigError(
            "releasing a legal hold needs a --reason", hint="Say why, e.g. 'case closed'."
        )
    if bool(recording_id) == bool(call_uuid):
        raise ConfigError("name exactly one of --recording or --call", hint="Pass one selector.")
    recordings = _select_recordings(services, recording_id=recording_id, call_uuid=call_uuid)
    results = []
    for rec in recordings:
        with services.db.transaction("releasing a legal hold") as cur:
            locked = _lock_recording(cur, rec.id)
            if locked is None:
                raise NotFound(f"no recording with id {rec.id!r}")
            cur.execute(
                "UPDATE legal_holds SET released_at = now(), released_by = %s,"
                " release_reason = %s WHERE recording_id = %s AND released_at IS NULL"
                " RETURNING id",
                (user_id, reason, rec.id),
            )
            released = [int(r[0]) for r in cur.fetchall()]
            if released:
                _insert_audit(
                    services,
                    cur,
                    action="hold_remove",
                    user_id=user_id,
                    success=True,
                    recording_id=rec.id,
                    tenant_id=locked[1],
                    details={"hold_ids": released, "reason": reason},
                )
        results.append({"recording_id": rec.id, "status": "released" if released else "not held"})
    if not any(r["status"] == "released" for r in results):
        raise NotFound(
            "no active legal hold on " + ", ".join(r["recording_id"] for r in results),
            hint="List active holds with 'fsrecrypt hold list'.",
        )
    return results


def list_holds(services: Services, *, tenant_name: str | None = None) -> list[dict[str, Any]]:
    """Active holds, oldest first."""
    params: list[Any] = []
    where = "h.released_at IS NULL"
    if tenant_name:
        where += " AND h.tenant_id = %s"
        params.append(services.db.tenant_by_name(tenant_name).id)
    with services.db.transaction("listing legal holds") as cur:
        cur.execute(
            "SELECT h.id, h.recording_id, t.name, r.call_uuid, h.reason, h.placed_by,"  # noqa: S608
            " h.placed_at FROM legal_holds h JOIN tenants t ON t.id = h.tenant_id"
            " JOIN call_recordings r ON r.id = h.recording_id"
            f" WHERE {where} ORDER BY h.placed_at, h.id",
            params,
        )
        rows = cur.fetchall()
    return [
        {
            "hold_id": int(r[0]),
            "recording_id": str(r[1]),
            "tenant": r[2],
            "call_uuid": r[3],
            "reason": r[4],
            "placed_by": r[5],
            "placed_at": _iso(r[6]),
        }
        for r in rows
    ]


# --- erasure and retention ---------------------------------------------------------------------


def retention_ends(services: Services, rec: Recording) -> datetime | None:
    """When the recording's retention period ends; None if it never does (days = 0)."""
    days = services.config.retention.days
    if days <= 0:
        return None
    return rec.created_at + timedelta(days=days)


def _inside_retention(services: Services, rec: Recording, now: datetime) -> bool:
    ends = retention_ends(services, rec)
    return ends is None or now < ends


def receipt_hash(receipt: Mapping[str, Any]) -> str:
    """sha256 over the canonical JSON of the receipt (without its own hash)."""
    import hashlib

    body = {k: v for k, v in receipt.items() if k != "receipt_hash"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def check_erasable(
    services: Services,
    recordings: Sequence[Recording],
    *,
    override_retention: bool,
    now: datetime | None = None,
) -> None:
    """Refuse the whole request before anything is destroyed (holds, retention, pending)."""
    now = now or _now()
    live = [r for r in recordings if r.status != "erased"]
    pending = [r.id for r in live if r.status == "pending"]
    if pending:
        raise InvalidState(
            f"recording(s) {', '.join(pending)} are still being stored",
            hint="Wait until they are stored (or failed), then erase them.",
        )
    with services.db.transaction("checking legal holds") as cur:
        held = _active_holds(cur, [r.id for r in live])
    if held:
        raise LegalHoldActive(
            "legal hold blocks erasure of "
            + ", ".join(f"{rid} ({reason})" for rid, reason in sorted(held.items()))
        )
    if not override_retention:
        inside = [r for r in live if _inside_retention(services, r, now)]
        if inside:
            days = services.config.retention.days
            period = f"{days} days" if days else "forever ([retention] days = 0)"
            first = inside[0]
            ends = retention_ends(services, first)
            until = f" (until {_iso(ends)})" if ends else ""
            raise RetentionActive(
                f"{len(inside)} recording(s) are inside the retention period of {period}, "
                f"e.g. {first.id}{until}"
            )


def erase_recordings(
    services: Services,
    recordings: Sequence[Recording],
    *,
    reason: str,
    user_id: str,
    override_retention: bool = False,
    action: str = "erase",
) -> dict[str, Any]:
    """Crypto-shred and delete recordings; return the deletion receipt.

    Per recording: (1) in one transaction, with the row locked and the hold
    re-checked, the wrapped data key is destroyed (``encrypted_dek`` NULL),
    the row becomes ``erased`` and the names of every object copy are kept
    in its metadata; (2) every version of those objects is deleted; (3) the
    audit row is written. A crash after (1) leaves nothing decryptable through
    the database; running the command again repeats (2) for erased rows, so
    the object copies (whose headers still hold a wrapped key) go too. The
    audit rows of the recording are never touched.
    """
    import uuid

    if not reason.strip():
        raise ConfigError("erasure needs a --reason", hint="Say why, e.g. the request ticket.")
    check_erasable(services, recordings, override_retention=override_retention)
    receipt_id = str(uuid.uuid4())
    entries: list[dict[str, Any]] = []
    failures: dict[str, str] = {}
    for rec in recordings:
        try:
            entry = _erase_one(
                services,
                rec,
                reason=reason,
                user_id=user_id,
                override_retention=override_retention,
                action=action,
                receipt_id=receipt_id,
            )
        except FsrecryptError as exc:
            failures[rec.id] = f"{type(exc).__name__}: {exc.message}"
            services.db.audit(
                action=action,
                user_id=user_id,
                success=False,
                recording_id=rec.id,
                tenant_id=rec.tenant_id,
                error_message=failures[rec.id],
                details={"reason": reason, "receipt_id": receipt_id},
            )
            continue
        if entry is not None:
            entries.append(entry)
    receipt: dict[str, Any] = {
        "receipt_id": receipt_id,
        "action": action,
        "erased_at": _iso(_now()),
        "operator": user_id,
        "reason": reason,
        "override_retention": override_retention,
        "recordings": entries,
        "recording_ids": [e["recording_id"] for e in entries],
        "object_keys": [k for e in entries for k in e["object_keys"]],
        "versions_deleted": sum(e["versions_deleted"] for e in entries),
    }
    receipt["receipt_hash"] = receipt_hash(receipt)
    if entries:
        with services.db.transaction("keeping the deletion receipt") as cur:
            cur.execute(
                "INSERT INTO erasure_receipts (id, action, operator, reason, receipt,"
                " receipt_hash) VALUES (%s, %s, %s, %s, %s, %s)",
                (
                    receipt_id,
                    action,
                    user_id,
                    reason,
                    json.dumps(receipt),
                    receipt["receipt_hash"],
                ),
            )
    if failures:
        raise ErasureIncomplete(
            f"{len(failures)} recording(s) were not completely erased: "
            + "; ".join(f"{rid}: {why}" for rid, why in failures.items())
        )
    return receipt


def _erase_one(
    services: Services,
    rec: Recording,
    *,
    reason: str,
    user_id: str,
    override_retention: bool,
    action: str,
    receipt_id: str,
) -> dict[str, Any] | None:
    with services.db.transaction("tombstoning a recording") as cur:
        locked = _lock_recording(cur, rec.id)
        if locked is None:
            raise NotFound(f"no recording with id {rec.id!r}")
        status, tenant_id, (meta, s3_path) = locked
        if _active_holds(cur, [rec.id]):
            raise LegalHoldActive(f"legal hold blocks erasure of {rec.id}")
        if status == "pending":
            raise InvalidState(f"recording {rec.id} is still being stored")
        erasure = dict(meta.get("erasure") or {})
        already = status == "erased"
        # An erased row lists only the copies whose deletion has not been
        # confirmed yet; a live row's copies are its object and any copy a
        # killed key rotation left behind.
        objects = list(erasure.get("objects") or []) if already else []
        for candidate in [
            None if already else s3_path,
            *(meta.get(k) for k in _ROTATION_META_KEYS),
        ]:
            if candidate and candidate not in objects:
                objects.append(candidate)
        if already and not objects:
            return None
        erasure.update(
            {"objects": objects, "reason": erasure.get("reason", reason), "receipt_id": receipt_id}
        )
        cur.execute(
            "UPDATE call_recordings SET status = 'erased', encrypted_dek = NULL,"
            " erased_at = coalesce(erased_at, now()), updated_at = now(),"
            " claimed_by = NULL, claimed_until = NULL,"
            " encryption_metadata = (encryption_metadata - 'rotation_pending_object'"
            " - 'rotation_superseded_object') || %s::jsonb"
            " WHERE id = %s",
            (json.dumps({"erasure": erasure}), rec.id),
        )
    versions = 0
    for key in objects:
        versions += services.store.delete(key)
    from fsrecrypt.pipeline import remove_source_if_unchanged

    plaintext_deleted = remove_source_if_unchanged(
        rec.source_path, rec.source_fingerprint, services.config.freeswitch.recordings_dirs
    )
    with services.db.transaction("recording the erasure") as cur:
        cur.execute(
            "UPDATE call_recordings SET encryption_metadata = jsonb_set(encryption_metadata,"
            " '{erasure,objects}', '[]'::jsonb) || jsonb_build_object('erased_objects', %s::jsonb)"
            " WHERE id = %s AND status = 'erased'",
            (json.dumps(objects), rec.id),
        )
        _insert_audit(
            services,
            cur,
            action=action,
            user_id=user_id,
            success=True,
            recording_id=rec.id,
            tenant_id=tenant_id,
            details={
                "reason": reason,
                "receipt_id": receipt_id,
                "object_keys": objects,
                "versions_deleted": versions,
                "override_retention": override_retention,
                "data_key_destroyed": not already,
                "plaintext_deleted": plaintext_deleted,
            },
        )
    return {
        "recording_id": rec.id,
        "tenant_id": tenant_id,
        "call_uuid": rec.call_uuid,
        "object_keys": objects,
        "versions_deleted": versions,
        "plaintext_deleted": plaintext_deleted,
        "previously_erased": already,
    }


def expiry_candidates(
    services: Services, *, now: datetime | None = None
) -> tuple[list[Recording], list[Recording]]:
    """(stored recordings past retention and not held, those past retention but held)."""
    days = services.config.retention.days
    if days <= 0:
        return [], []
    cutoff = (now or _now()) - timedelta(days=days)
    with services.db.transaction("finding expired recordings") as cur:
        cur.execute(
            "SELECT r.id, EXISTS (SELECT 1 FROM legal_holds h WHERE h.recording_id = r.id"
            " AND h.released_at IS NULL) FROM call_recordings r"
            " WHERE r.status = 'stored' AND r.created_at < %s ORDER BY r.created_at, r.id",
            (cutoff,),
        )
        rows = cur.fetchall()
    expired, held = [], []
    for rec_id, is_held in rows:
        rec = services.db.recording(str(rec_id))
        (held if is_held else expired).append(rec)
    return expired, held


def expire(services: Services, *, user_id: str, dry_run: bool = False) -> dict[str, Any]:
    """Erase every stored recording past retention that no legal hold protects."""
    days = services.config.retention.days
    expired, held = expiry_candidates(services)
    report: dict[str, Any] = {
        "retention_days": days,
        "dry_run": dry_run,
        "expired": [r.id for r in expired],
        "held": [r.id for r in held],
    }
    if days <= 0:
        report["note"] = "[retention] days = 0: recordings are kept forever, nothing expires"
    if dry_run:
        return report
    receipt = None
    try:
        if expired:
            receipt = erase_recordings(
                services,
                expired,
                reason=f"retention period of {days} days expired",
                user_id=user_id,
                action="expire",
            )
    except FsrecryptError as exc:
        services.db.audit(
            action="expire",
            user_id=user_id,
            success=False,
            error_message=f"{type(exc).__name__}: {exc.message}",
            details={"retention_days": days, "candidates": len(expired), "held": len(held)},
        )
        raise
    services.db.audit(
        action="expire",
        user_id=user_id,
        success=True,
        details={
            "retention_days": days,
            "erased": len(expired),
            "held": report["held"][:100],
            "receipt_id": receipt["receipt_id"] if receipt else None,
        },
    )
    report["receipt"] = receipt
    return report


# --- verification -------------------------------------------------------------------------------


@dataclass
class VerifyReport:
    checked: int = 0
    ok: int = 0
    total_stored: int = 0
    bytes_verified: int = 0
    failures: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def verify_recording(services: Services, rec: Recording) -> int:
    """Check one stored recording end to end; returns the plaintext bytes authenticated.

    Raises a typed error whose message starts with the failing check: object
    (missing), size (object vs row), header (parse or context), key (unwrap),
    frames (authentication) or audio size (plaintext vs row).
    """
    from fsrecrypt.pipeline import iter_plaintext, open_recording, read_object_header

    key = rec.s3_path or ""
    try:
        info = services.store.head(key)
    except FsrecryptError as exc:
        raise type(exc)(f"object: {exc.message}", hint=exc.hint) from None
    if rec.encrypted_size_bytes is not None and info.size != rec.encrypted_size_bytes:
        raise IntegrityError(
            f"size: object {key} is {info.size} bytes, the row says {rec.encrypted_size_bytes}"
        )
    try:
        read_object_header(services.store, key, info.size)
    except FsrecryptError as exc:
        raise type(exc)(f"header: {exc.message}", hint=exc.hint) from None
    try:
        opened = open_recording(services, rec)
    except FsrecryptError as exc:
        stage = "key" if isinstance(exc, KeyAccessError) else "header"
        raise type(exc)(f"{stage}: {exc.message}", hint=exc.hint) from None
    total = 0
    try:
        for chunk in iter_plaintext(services, opened):
            total += len(chunk)
    except FsrecryptError as exc:
        raise type(exc)(f"frames: {exc.message}", hint=exc.hint) from None
    if rec.file_size_bytes is not None and total != rec.file_size_bytes:
        raise IntegrityError(
            f"audio size: decrypted {total} bytes, the row says {rec.file_size_bytes}"
        )
    return total


def verify_recordings(
    services: Services,
    *,
    user_id: str,
    tenant_name: str | None = None,
    sample_percent: float = 100.0,
    progress: bool = True,
) -> VerifyReport:
    """Verify all (or a random sample of) stored recordings; one audit row per run."""
    import math
    import random

    if not 0 < sample_percent <= 100:
        raise ConfigError(
            f"--sample {sample_percent} is not a percentage in (0, 100]",
            hint="Use e.g. --sample 5 to check 5% of the recordings.",
        )
    started = time.monotonic()
    tenant_id = services.db.tenant_by_name(tenant_name).id if tenant_name else None
    ids = _stored_ids(services, tenant_id)
    report = VerifyReport(total_stored=len(ids))
    if sample_percent < 100 and ids:
        count = max(1, math.ceil(len(ids) * sample_percent / 100))
        ids = sorted(random.SystemRandom().sample(ids, count))
    bar = _progress(len(ids), "verify") if progress else None
    try:
        for rec_id in ids:
            try:
                rec = services.db.recording(rec_id)
            except NotFound:
                continue
            if rec.status != "stored":
                continue
            report.checked += 1
            try:
                report.bytes_verified += verify_recording(services, rec)
            except FsrecryptError as exc:
                report.failures[rec.id] = f"{exc.message} [{type(exc).__name__}]"
                services.db.audit(
                    action="verify",
                    user_id=user_id,
                    success=False,
                    recording_id=rec.id,
                    tenant_id=rec.tenant_id,
                    error_message=report.failures[rec.id],
                    details={"object_key": rec.s3_path},
                )
            else:
                report.ok += 1
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    report.seconds = round(time.monotonic() - started, 3)
    services.db.audit(
        action="verify",
        user_id=user_id,
        success=not report.failures,
        tenant_id=tenant_id,
        error_message=f"{len(report.failures)} recording(s) failed" if report.failures else None,
        details={
            "checked": report.checked,
            "ok": report.ok,
            "failed": len(report.failures),
            "sample_percent": sample_percent,
            "failed_ids": sorted(report.failures)[:100],
        },
    )
    return report


def _stored_ids(services: Services, tenant_id: str | None) -> list[str]:
    with services.db.transaction("listing stored recordings") as cur:
        if tenant_id is None:
            cur.execute("SELECT id FROM call_recordings WHERE status = 'stored' ORDER BY id")
        else:
            cur.execute(
                "SELECT id FROM call_recordings WHERE status = 'stored' AND tenant_id = %s"
                " ORDER BY id",
                (tenant_id,),
            )
        return [str(r[0]) for r in cur.fetchall()]


# --- command line ---------------------------------------------------------------------------------


def _state(ctx: click.Context) -> State:
    return ctx.ensure_object(State)


_user_option = click.option(
    "--user",
    "user_id",
    default=None,
    help="Operator id for the audit log (default: cli:<OS user>).",
)


def _services(ctx: click.Context) -> Services:
    return _state(ctx).services()  # type: ignore[no-any-return]


def _user(user_id: str | None) -> str:
    from fsrecrypt.cli import default_user

    return user_id or default_user()


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


@click.group("audit")
def audit_group() -> None:
    """Check and export the tamper-evident access log."""


@audit_group.command("verify")
@_config_option
@click.option("--tenant", "tenant_name", default=None, help="Check only this tenant's chain.")
@_user_option
@click.pass_context
def audit_verify_command(ctx: click.Context, tenant_name: str | None, user_id: str | None) -> None:
    """Recompute every hash chain; name edited, deleted or reordered rows.

    Exits non-zero if anything is wrong. The run itself is logged (action
    audit_verify) after the check, so it never affects its own result.
    """
    services = _services(ctx)
    try:
        result = verify_audit_chains(services, tenant_name=tenant_name)
        for problem in result.problems:
            click.echo(problem.line())
        tenant_id = services.db.tenant_by_name(tenant_name).id if tenant_name else None
        services.db.audit(
            action="audit_verify",
            user_id=_user(user_id),
            success=result.ok,
            tenant_id=tenant_id,
            error_message=None if result.ok else f"{len(result.problems)} problem(s)",
            details={
                "chains": result.chains,
                "rows": result.rows,
                "problems": [p.line() for p in result.problems[:50]],
            },
        )
        summary = {"chains": result.chains, "rows": result.rows, "problems": len(result.problems)}
        click.echo(json.dumps(summary))
        if not result.ok:
            raise AuditChainBroken(
                f"the access log is not intact: {len(result.problems)} problem(s) in "
                f"{result.rows} rows (listed above)"
            )
    finally:
        services.close()


@audit_group.command("export")
@_config_option
@click.option("--tenant", "tenant_name", required=True, help="Tenant whose log to export.")
@click.option("--from", "from_", default=None, help="Start (inclusive), ISO 8601; UTC if naive.")
@click.option("--to", "to", default=None, help="End (exclusive), ISO 8601; UTC if naive.")
@click.option(
    "--format", "fmt", type=click.Choice(["jsonl", "csv"]), default="jsonl", show_default=True
)
@click.option(
    "-o", "--output", "output_path", default=None, help="File to write (default: stdout)."
)
@_user_option
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
    import io

    start, end = _parse_when(from_, "--from"), _parse_when(to, "--to")
    services = _services(ctx)
    try:
        tenant = services.db.tenant_by_name(tenant_name)
        rows = iter_audit_rows(services, tenant.id, start, end)
        if output_path:
            from fsrecrypt.cli import atomic_output

            with atomic_output(output_path) as raw:
                text = io.TextIOWrapper(raw, encoding="utf-8", newline="")
                count = write_export(rows, text, fmt)
                text.flush()
                text.detach()
        else:
            count = write_export(rows, sys.stdout, fmt)
        services.db.audit(
            action="audit_export",
            user_id=_user(user_id),
            success=True,
            tenant_id=tenant.id,
            details={"rows": count, "from": from_, "to": to, "format": fmt},
        )
    finally:
        services.close()
    if output_path:
        click.echo(json.dumps({"rows": count, "out": output_path, "format": fmt}))


@click.command("rotate")
@_config_option
@click.option("--tenant", "tenant_name", required=True, help="Tenant to rotate.")
@click.option("--to", "to_key", required=True, help="New key id (keyring id or KMS id/ARN/alias).")
@click.option(
    "--rewrite-headers",
    is_flag=True,
    help="Also rewrite every object so its header is wrapped by the new key (see below).",
)
@_user_option
@click.pass_context
def rotate_command(
    ctx: click.Context, tenant_name: str, to_key: str, rewrite_headers: bool, user_id: str | None
) -> None:
    """Move a tenant to a new key without re-encrypting any audio.

    \b
    1. The tenant's key is switched at once: recordings stored from now on
       (also by a running daemon) are wrapped by KEY.
    2. The database copy of every stored recording's data key is re-wrapped
       by KEY (KMS ReEncrypt; the local keyring unwraps and wraps in memory).
       Reads use this copy, so this is all that is needed to keep playing
       recordings while the old key stays available and trusted (scheduled
       rotation, a tenant moving to its own key).

    Each object's header still holds the old wrapping, which lets the old
    key (plus a copy of the object) decrypt it without the database. Use
    --rewrite-headers when the old key must be retired completely (deleted
    from the keyring, KMS key scheduled for deletion, confirmed compromise):
    each object is copied under a new name with a header wrapped by KEY
    (same message id, frames copied byte for byte), the row is switched to
    it and the old object is deleted (all versions).

    Resumable and idempotent: kill it at any point and run it again; rows
    already on KEY are skipped. Prints a JSON summary; exits non-zero if any
    recording could not be rotated.
    """
    services = _services(ctx)
    try:
        summary = rotate_tenant(
            services,
            tenant_name,
            to_key,
            rewrite_headers=rewrite_headers,
            user_id=_user(user_id),
        )
    finally:
        services.close()
    _echo_json(summary.as_dict())
    if summary.failures or summary.remaining:
        raise RotationIncomplete(
            f"{len(summary.failures)} recording(s) of tenant {tenant_name} were not rotated "
            f"({summary.remaining} still on another key or header): "
            + "; ".join(f"{rid}: {why}" for rid, why in list(summary.failures.items())[:10])
        )


@click.command("erase")
@_config_option
@click.option("--recording", "recording_id", default=None, help="Erase this recording.")
@click.option("--call", "call_uuid", default=None, help="Erase every recording of this call.")
@click.option("--tenant", "tenant_name", default=None, help="Erase every recording of a tenant.")
@click.option("--reason", required=True, help="Why (ticket, request id); kept in the receipt.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option(
    "--override-retention",
    is_flag=True,
    help="Erase even inside the retention period (recorded in the audit log).",
)
@_user_option
@click.pass_context
def erase_command(
    ctx: click.Context,
    recording_id: str | None,
    call_uuid: str | None,
    tenant_name: str | None,
    reason: str,
    yes: bool,
    override_retention: bool,
    user_id: str | None,
) -> None:
    """Permanently destroy recordings (crypto-shredding) and print a deletion receipt.

    Deletes every version of each object, destroys the wrapped data key,
    marks the row erased and keeps all audit rows. Nothing can decrypt the
    recording afterwards. Refused for recordings under legal hold, and for
    recordings inside the retention period unless --override-retention
    ([retention] days = 0 keeps recordings forever, so erasing then always
    needs the override). Running it again on erased recordings retries any
    object deletion that failed.
    """
    services = _services(ctx)
    try:
        recordings = _select_recordings(
            services, recording_id=recording_id, call_uuid=call_uuid, tenant_name=tenant_name
        )
        if not recordings:
            raise NotFound("no recordings match", hint="Check the tenant name.")
        check_erasable(services, recordings, override_retention=override_retention)
        if not yes:
            shown = ", ".join(r.id for r in recordings[:5]) + (
                " ..." if len(recordings) > 5 else ""
            )
            click.confirm(
                f"Permanently erase {len(recordings)} recording(s) ({shown})? "
                "This cannot be undone",
                abort=True,
                err=True,
            )
        receipt = erase_recordings(
            services,
            recordings,
            reason=reason,
            user_id=_user(user_id),
            override_retention=override_retention,
        )
    finally:
        services.close()
    _echo_json(receipt)


def _change_hold(
    ctx: click.Context,
    change: Callable[..., Any],
    recording_id: str | None,
    call_uuid: str | None,
    reason: str,
    user_id: str | None,
) -> None:
    services = _services(ctx)
    try:
        results = change(
            services,
            reason=reason,
            user_id=_user(user_id),
            recording_id=recording_id,
            call_uuid=call_uuid,
        )
    finally:
        services.close()
    _echo_json(results)


@click.group("hold")
def hold_group() -> None:
    """Legal holds: recordings on hold cannot be erased or expired."""


@hold_group.command("add")
@_config_option
@click.option("--recording", "recording_id", default=None, help="Hold this recording.")
@click.option("--call", "call_uuid", default=None, help="Hold every recording of this call.")
@click.option("--reason", required=True, help="Why (case or matter number).")
@_user_option
@click.pass_context
def hold_add_command(
    ctx: click.Context,
    recording_id: str | None,
    call_uuid: str | None,
    reason: str,
    user_id: str | None,
) -> None:
    """Place a legal hold (logged as hold_add)."""
    _change_hold(ctx, add_hold, recording_id, call_uuid, reason, user_id)


@hold_group.command("remove")
@_config_option
@click.option("--recording", "recording_id", default=None, help="Release this recording.")
@click.option("--call", "call_uuid", default=None, help="Release every recording of this call.")
@click.option("--reason", required=True, help="Why the hold ends.")
@_user_option
@click.pass_context
def hold_remove_command(
    ctx: click.Context,
    recording_id: str | None,
    call_uuid: str | None,
    reason: str,
    user_id: str | None,
) -> None:
    """Release a legal hold (logged as hold_remove; the hold stays as history)."""
    _change_hold(ctx, remove_hold, recording_id, call_uuid, reason, user_id)


@hold_group.command("list")
@_config_option
@click.option("--tenant", "tenant_name", default=None, help="Only this tenant's holds.")
@click.pass_context
def hold_list_command(ctx: click.Context, tenant_name: str | None) -> None:
    """List active legal holds (tab-separated)."""
    services = _services(ctx)
    try:
        holds = list_holds(services, tenant_name=tenant_name)
    finally:
        services.close()
    for h in holds:
        click.echo(
            "\t".join(
                str(h[k] or "-")
                for k in ("recording_id", "tenant", "call_uuid", "placed_at", "placed_by", "reason")
            )
        )


@click.command("expire")
@_config_option
@click.option("--dry-run", is_flag=True, help="Only list what would be erased.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@_user_option
@click.pass_context
def expire_command(ctx: click.Context, dry_run: bool, yes: bool, user_id: str | None) -> None:
    """Erase stored recordings older than [retention] days that are not on legal hold.

    Each is erased like 'fsrecrypt erase' (logged as expire) and one receipt
    is printed. With [retention] days = 0 nothing ever expires.
    """
    services = _services(ctx)
    try:
        if not dry_run and not yes:
            expired, _held = expiry_candidates(services)
            if expired:
                click.confirm(
                    f"Permanently erase {len(expired)} recording(s) past retention?",
                    abort=True,
                    err=True,
                )
        report = expire(services, user_id=_user(user_id), dry_run=dry_run)
    finally:
        services.close()
    _echo_json(report)


@click.command("verify")
@_config_option
@click.option("--tenant", "tenant_name", default=None, help="Only this tenant's recordings.")
@click.option(
    "--sample",
    "sample_percent",
    type=float,
    default=100.0,
    show_default=True,
    help="Check a random PERCENT of the recordings.",
)
@_user_option
@click.pass_context
def verify_command(
    ctx: click.Context, tenant_name: str | None, sample_percent: float, user_id: str | None
) -> None:
    """Prove stored recordings are intact and readable.

    For each: the object exists, its size matches the row, its header parses
    and belongs to the recording, its data key unwraps, every frame
    authenticates (decrypted and discarded) and the audio size matches.
    Prints each failure and a JSON summary; exits non-zero on any failure.
    """
    services = _services(ctx)
    try:
        report = verify_recordings(
            services,
            user_id=_user(user_id),
            tenant_name=tenant_name,
            sample_percent=sample_percent,
        )
    finally:
        services.close()
    for rec_id, why in sorted(report.failures.items()):
        click.echo(f"FAIL {rec_id}: {why}")
    click.echo(
        json.dumps(
            {
                "checked": report.checked,
                "ok": report.ok,
                "failed": len(report.failures),
                "total_stored": report.total_stored,
                "bytes_verified": report.bytes_verified,
                "seconds": report.seconds,
            }
        )
    )
    if report.failures:
        raise VerificationFailed(
            f"{len(report.failures)} of {report.checked} recording(s) failed verification "
            "(listed above)"
        )
