"""The tamper-evident access log: verify its hash chains, export a tenant's rows.

``verify_audit_chains`` only reads; ``run_audit_verification`` and
``export_audit_log`` also log themselves (actions ``audit_verify`` and
``audit_export``) after the work, so a run never affects its own result.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import IO, Any

from fsrecrypt.db import GENESIS_HASH, audit_row_hash
from fsrecrypt.errors import ConfigError, IntegrityError
from fsrecrypt.lifecycle.common import PAGE, iso, tenant_names
from fsrecrypt.pipeline import Services


class AuditChainBroken(IntegrityError):
    """``audit verify`` found edited, deleted or reordered access-log rows."""

    hint = (
        "The access log was changed outside fsrecrypt: keep the output, restore the "
        "recording_access_logs table from a backup and investigate database access"
    )


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

    def summary(self) -> dict[str, int]:
        """The counts ``audit verify`` prints after the problems."""
        return {"chains": self.chains, "rows": self.rows, "problems": len(self.problems)}


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
    names = tenant_names(services)
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
                    (last_id, PAGE * 10),
                )
            else:
                cur.execute(
                    "SELECT * FROM recording_access_logs WHERE id > %s AND tenant_id = %s"
                    " ORDER BY id LIMIT %s",
                    (last_id, only, PAGE * 10),
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
                        f"user {row['user_id']!r}, at {iso(row['accessed_at'])})",
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
        return iso(value)
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
        params.append(PAGE * 10)
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


class ExportWriter:
    """Writes an export: rows, then the anchors covering them, in JSON lines or CSV.

    JSON lines carry ``details`` as an object and each anchor as one line
    ``{"anchor": ..., "location": ...}``. CSV carries ``details`` as a JSON
    string and each anchor as a row with an empty ``id``, action ``anchor``
    and that same object in ``details``, so a spreadsheet export is as
    checkable offline as a JSON-lines one.
    """

    def __init__(self, out: IO[str], fmt: str) -> None:
        self._out = out
        self._csv: csv.DictWriter[str] | None = None
        if fmt != "jsonl":
            self._csv = csv.DictWriter(out, fieldnames=list(EXPORT_COLUMNS), lineterminator="\n")
            self._csv.writeheader()

    def rows(self, rows: Iterable[Mapping[str, Any]]) -> int:
        count = 0
        for row in rows:
            if self._csv is None:
                self._out.write(json.dumps(row, sort_keys=False, default=str) + "\n")
            else:
                flat = dict(row)
                flat["details"] = json.dumps(flat.get("details") or {}, sort_keys=True)
                self._csv.writerow(flat)
            count += 1
        return count

    def anchors(self, anchors: Iterable[Mapping[str, Any]]) -> int:
        count = 0
        for item in anchors:
            if self._csv is None:
                self._out.write(json.dumps(item) + "\n")
            else:
                self._csv.writerow({"action": "anchor", "details": json.dumps(item)})
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


@dataclass(frozen=True)
class ExportWindow:
    """An export's ``--from``/``--to``: parsed, and as given (the audit row keeps the text)."""

    start: datetime | None
    end: datetime | None
    from_text: str | None = None
    to_text: str | None = None

    @classmethod
    def parse(cls, from_text: str | None, to_text: str | None) -> ExportWindow:
        """Raise ``ConfigError`` for a bound that is not ISO 8601; naive times are UTC."""
        return cls(
            _parse_when(from_text, "--from"), _parse_when(to_text, "--to"), from_text, to_text
        )


OutputOpener = Callable[[], AbstractContextManager[IO[str]]]
"""Opens where an export goes. The command line owns files (and the atomic
write that leaves nothing behind on failure); the domain only writes text."""


def run_audit_verification(
    services: Services, *, tenant_name: str | None, user_id: str
) -> AuditVerification:
    """``verify_audit_chains``, then log the run (action ``audit_verify``).

    The row is written after the check, so a run never affects its own result.
    """
    result = verify_audit_chains(services, tenant_name=tenant_name)
    tenant_id = services.db.tenant_by_name(tenant_name).id if tenant_name else None
    services.db.audit(
        action="audit_verify",
        user_id=user_id,
        success=result.ok,
        tenant_id=tenant_id,
        error_message=None if result.ok else f"{len(result.problems)} problem(s)",
        details={
            "chains": result.chains,
            "rows": result.rows,
            "problems": [p.line() for p in result.problems[:50]],
        },
    )
    return result


def export_audit_log(
    services: Services,
    *,
    tenant_name: str,
    window: ExportWindow,
    fmt: str,
    user_id: str,
    open_output: OutputOpener,
) -> int:
    """Write a tenant's rows (with their hashes) to ``open_output()``; returns the row count.

    The hashes are included so an auditor can recompute the chain without
    database access. The tenant is resolved before the output is opened (an
    unknown tenant creates no file); the export is logged (``audit_export``)
    once the output is complete.
    """
    tenant = services.db.tenant_by_name(tenant_name)
    span: dict[str, int] = {}

    def tracked() -> Iterator[dict[str, Any]]:
        for row in iter_audit_rows(services, tenant.id, window.start, window.end):
            span.setdefault("first", int(row["id"]))
            span["last"] = int(row["id"])
            yield row

    anchors = 0
    with open_output() as out:
        writer = ExportWriter(out, fmt)
        count = writer.rows(tracked())
        if services.config.audit.anchoring and span:
            anchors = writer.anchors(
                covering_anchors(services, str(tenant.id), span["first"], span["last"])
            )
    services.db.audit(
        action="audit_export",
        user_id=user_id,
        success=True,
        tenant_id=tenant.id,
        details={
            "rows": count,
            "anchors": anchors,
            "from": window.from_text,
            "to": window.to_text,
            "format": fmt,
        },
    )
    return count


def covering_anchors(
    services: Services, tenant_id: str, first_id: int, last_id: int
) -> Iterator[dict[str, Any]]:
    """Every anchor whose head of this tenant's chain is an exported row, as written.

    Each as ``{"anchor": {...}, "location": ...}``, so ``audit check-export``
    can check the rows against signed heads without the database. Anchors
    are signed documents: the export carries them unchanged.
    """
    from fsrecrypt.lifecycle.anchors import read_anchors

    for stored, doc in read_anchors(services.config):
        heads = [c for c in doc["chains"] if c["chain"] == tenant_id]
        if heads and first_id <= heads[0]["last_id"] <= last_id:
            yield {"anchor": doc, "location": stored.location}
