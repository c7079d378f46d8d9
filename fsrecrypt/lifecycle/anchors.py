"""Anchors: the audit chains' heads, signed and written where the database's writers cannot reach.

The hash chain shows an edited row only as long as nobody recomputes the
hashes after it; whoever can write PostgreSQL can. An anchor is one JSON
document naming every chain's head (tenant, last row id, its hash, the row
count, its time), signed (HMAC-SHA256 or Ed25519, key in its own 0600 file)
and written to a write-once sink (``fsrecrypt.store.anchors``); each anchor
names the previous one's hash, so the anchors form a chain of their own.
``verify_against_anchors`` then finds a chain rewritten consistently in SQL:
the rewritten row hashes contradict the anchor taken before the rewrite.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from fsrecrypt.config import Config
from fsrecrypt.db import GENESIS_HASH
from fsrecrypt.errors import ConfigError, IntegrityError
from fsrecrypt.lifecycle.anchor_signing import (
    ANCHOR_KEY,
    AnchorSigner,
    anchor_hash,
    canonical,
)
from fsrecrypt.lifecycle.common import iso
from fsrecrypt.pipeline import Services
from fsrecrypt.store.anchors import (
    MAX_ANCHOR_BYTES,
    AnchorSink,
    LocalAnchorDir,
    S3AnchorBucket,
    StoredAnchor,
)

ANCHOR_FORMAT = "fsrecrypt-audit-anchor/1"
_LOCK_SQL = "hashtextextended('audit:anchor', 7)"

__all__ = [
    "ANCHOR_FORMAT",
    "ANCHOR_KEY",
    "AnchorContradicted",
    "AnchorSigner",
    "AnchorsNotConfigured",
    "anchor_hash",
    "anchor_if_due",
    "canonical",
    "read_anchors",
    "verify_against_anchors",
    "write_anchor",
]


class AnchorsNotConfigured(ConfigError):
    """Anchoring was asked for but ``[audit]`` names nowhere to write anchors."""

    hint = "Set [audit] anchor_dir or anchor_bucket (see conf/fsrecrypt.toml)."


class AnchorContradicted(IntegrityError):
    """``audit verify --anchors`` found the database disagreeing with a signed anchor."""

    hint = (
        "The access log was rewritten after it was anchored: keep the output, restore "
        "recording_access_logs from a backup older than the named anchor and investigate "
        "database access"
    )


# --- sinks --------------------------------------------------------------------------------------


def anchor_sinks(config: Config) -> list[AnchorSink]:
    """Every configured sink, the bucket first (it is the stronger one); empty if none."""
    cfg = config.audit
    sinks: list[AnchorSink] = []
    if cfg.anchor_bucket:
        sinks.append(
            S3AnchorBucket(
                cfg.anchor_bucket,
                prefix=cfg.anchor_prefix,
                retention_days=cfg.anchor_retention_days,
                mode=cfg.anchor_lock_mode,
                region=config.storage.region,
                endpoint_url=config.storage.endpoint_url or None,
            )
        )
    if cfg.anchor_dir:
        sinks.append(LocalAnchorDir(cfg.anchor_dir))
    return sinks


def _primary(config: Config) -> AnchorSink:
    sinks = anchor_sinks(config)
    if not sinks:
        raise AnchorsNotConfigured("no place to write or read audit anchors is configured")
    return sinks[0]


def parse_anchor(data: bytes) -> dict[str, Any]:
    """A stored anchor's document, or ``ValueError`` saying why it is not one."""
    if len(data) > MAX_ANCHOR_BYTES:
        raise ValueError("it is larger than any anchor fsrecrypt writes")
    try:
        doc = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, huge numbers, deep nesting
        raise ValueError(f"it is not JSON ({type(exc).__name__})") from None
    if not isinstance(doc, dict) or doc.get("format") != ANCHOR_FORMAT:
        raise ValueError(f"it is not a {ANCHOR_FORMAT} document")
    chains = doc.get("chains")
    if not isinstance(doc.get("seq"), int) or not isinstance(chains, list):
        raise ValueError("its seq or chains field is malformed")
    for entry in chains:
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("chain"), str)
            and type(entry.get("last_id")) is int
            and type(entry.get("row_count")) is int
            and isinstance(entry.get("row_hash"), str)
        ):
            raise ValueError("a chain entry is malformed")
    return doc


# --- writing --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AnchorReceipt:
    """What ``audit anchor`` printed: which anchor, where, covering which heads."""

    seq: int
    sha256: str
    created_at: str
    chains: int
    rows: int
    locations: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "sha256": self.sha256,
            "created_at": self.created_at,
            "chains": self.chains,
            "rows": self.rows,
            "locations": list(self.locations),
        }


def _heads(cur: Any) -> list[dict[str, Any]]:
    cur.execute(
        "SELECT h.chain, h.last_id, h.last_hash, h.row_count, l.accessed_at, t.name"
        " FROM audit_chain_heads h"
        " LEFT JOIN recording_access_logs l ON l.id = h.last_id"
        " LEFT JOIN tenants t ON h.chain <> 'global' AND t.id::text = h.chain"
        " ORDER BY h.chain"
    )
    return [
        {
            "chain": chain,
            "tenant": name,
            "last_id": int(last_id),
            "row_hash": last_hash,
            "row_count": int(count),
            "last_at": iso(at),
        }
        for chain, last_id, last_hash, count, at, name in cur.fetchall()
    ]


def _write_locked(services: Services, cur: Any, *, user_id: str) -> AnchorReceipt:
    config = services.config
    sinks = anchor_sinks(config)
    signer = AnchorSigner.from_config(config.audit, create=True, keys=config.keys)
    # The newest anchor in any sink: if a write reached one sink and not the
    # other, the next anchor still gets a fresh number (verify names the gap).
    found = [a for a in (sink.latest() for sink in sinks) if a is not None]
    latest = max(found, key=lambda a: a.seq) if found else None
    if latest is None:
        seq, prev = 1, GENESIS_HASH
    else:
        try:
            prev_doc = parse_anchor(latest.data)
        except ValueError as exc:
            raise IntegrityError(
                f"the latest anchor {latest.location} is unreadable: {exc}",
                hint="Run 'fsrecrypt audit verify --anchors' and investigate the anchor store.",
            ) from None
        seq, prev = latest.seq + 1, anchor_hash(prev_doc)
    chains = _heads(cur)
    body: dict[str, Any] = {
        "format": ANCHOR_FORMAT,
        "seq": seq,
        "created_at": iso(datetime.now(UTC)),
        "host": socket.gethostname()[:255],
        "prev_anchor_sha256": prev,
        "chains": chains,
    }
    doc = {**body, "signature": signer.sign(body)}
    data = canonical(doc) + b"\n"
    locations = tuple(sink.write(seq, data) for sink in sinks)
    receipt = AnchorReceipt(
        seq,
        anchor_hash(doc),
        body["created_at"],
        len(chains),
        sum(c["row_count"] for c in chains),
        locations,
    )
    services.db.audit_in_transaction(
        cur,
        action="audit_anchor",
        user_id=user_id,
        success=True,
        details={"seq": seq, "sha256": receipt.sha256, "locations": list(locations)},
    )
    return receipt


def write_anchor(services: Services, *, user_id: str) -> AnchorReceipt:
    """Anchor every chain's head now (waiting for any other anchor writer to finish).

    The anchor is logged afterwards (action ``audit_anchor`` in the global
    chain), so the next anchor covers the record of this one.
    """
    if not services.config.audit.anchoring:
        raise AnchorsNotConfigured("no place to write audit anchors is configured")
    with services.db.transaction("anchoring the access log") as cur:
        cur.execute(f"SELECT pg_advisory_xact_lock({_LOCK_SQL})")
        return _write_locked(services, cur, user_id=user_id)


def anchor_if_due(
    services: Services, *, user_id: str = "fsrecrypt-daemon", now: float | None = None
) -> AnchorReceipt | None:
    """Write an anchor if the latest is older than ``[audit] anchor_interval``; else None.

    Any number of daemons and workers may call this on a timer: a
    PostgreSQL advisory lock lets one writer in at a time and the others
    return at once, and the age is read from the sink under that lock, so
    two callers never write two anchors for one interval.
    """
    cfg = services.config.audit
    if not cfg.anchoring:
        return None
    with services.db.transaction("anchoring the access log") as cur:
        cur.execute(f"SELECT pg_try_advisory_xact_lock({_LOCK_SQL})")
        if not cur.fetchone()[0]:
            return None
        latest = anchor_sinks(services.config)[0].latest()
        if latest is not None:
            try:
                created = datetime.fromisoformat(parse_anchor(latest.data)["created_at"])
                age = (time.time() if now is None else now) - created.timestamp()
            except (ValueError, KeyError, TypeError):
                age = float("inf")  # unreadable: write a fresh one (verify reports the bad one)
            if age < cfg.anchor_interval:
                return None
        return _write_locked(services, cur, user_id=user_id)


# --- checking the database against the anchors ---------------------------------------------------


@dataclass(frozen=True)
class AnchorProblem:
    """One way the anchors and the database disagree, naming the anchor and the rows."""

    seq: int | None
    location: str
    kind: str  # contradicted | forged | unreadable | missing | broken-link
    detail: str
    chain: str | None = None
    first_row: int | None = None
    last_row: int | None = None

    def line(self) -> str:
        where = f"anchor {self.seq}" if self.seq is not None else "anchors"
        rows = ""
        if self.chain is not None:
            rows = f" [{self.chain}] rows {self.first_row}..{self.last_row}"
        return f"{where} ({self.location}){rows}: {self.kind}: {self.detail}"


@dataclass
class AnchorVerification:
    anchors: int = 0
    problems: list[AnchorProblem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def first_contradicted(self) -> AnchorProblem | None:
        found = [p for p in self.problems if p.kind == "contradicted"]
        return min(found, key=lambda p: p.seq or 0) if found else None

    def summary(self) -> dict[str, Any]:
        first = self.first_contradicted
        return {
            "anchors": self.anchors,
            "anchor_problems": len(self.problems),
            "first_contradicted_anchor": first.seq if first else None,
        }


@dataclass
class _Seen:
    """Per chain: the last anchored row id and the database's row count up to it."""

    last_id: int = 0
    db_count: int = 0


def _check_entry(
    cur: Any, stored: StoredAnchor, entry: Mapping[str, Any], seen: _Seen, label: str
) -> list[AnchorProblem]:
    chain, last_id = entry["chain"], entry["last_id"]
    tenant_id = None if chain == "global" else chain
    # The rows this anchor covers: the chain's rows after the previous anchor's head.
    cur.execute(
        "SELECT count(*), min(id) FROM recording_access_logs"
        " WHERE tenant_id IS NOT DISTINCT FROM %s::uuid AND id > %s AND id <= %s",
        (tenant_id, seen.last_id, max(last_id, seen.last_id)),
    )
    count, first = cur.fetchone()
    first_row = int(first) if first is not None else seen.last_id + 1

    def problem(detail: str) -> AnchorProblem:
        return AnchorProblem(
            stored.seq, stored.location, "contradicted", detail, label, first_row, last_id
        )

    if last_id < seen.last_id:
        return [problem(f"it names row {last_id}, older than the previous anchor's {seen.last_id}")]
    seen.db_count += int(count)
    seen.last_id = last_id
    cur.execute(
        "SELECT row_hash, coalesce(tenant_id::text, 'global') FROM recording_access_logs"
        " WHERE id = %s",
        (last_id,),
    )
    row = cur.fetchone()
    found: list[AnchorProblem] = []
    if row is None or row[1] != chain:
        found.append(problem(f"row {last_id}, the chain's head when anchored, is gone"))
    elif row[0] != entry["row_hash"]:
        found.append(
            problem(
                f"row {last_id} now hashes to {row[0][:16]}..., the anchor recorded "
                f"{entry['row_hash'][:16]}...: rows up to it were rewritten"
            )
        )
    if seen.db_count != entry["row_count"]:
        found.append(
            problem(
                f"the chain holds {seen.db_count} rows up to row {last_id}, "
                f"the anchor recorded {entry['row_count']}"
            )
        )
    return found


def _valid_chain_key(chain: str) -> bool:
    if chain == "global":
        return True
    import uuid

    try:
        uuid.UUID(chain)
    except ValueError:
        return False
    return True


def verify_against_anchors(services: Services) -> AnchorVerification:
    """Compare the database with every anchor, oldest first; name each contradiction.

    Each anchor's signature and link to its predecessor are checked, then
    each chain head it names: the row must still exist in that chain with
    the anchored hash, and the chain must hold as many rows up to it.
    """
    sink = _primary(services.config)
    signer = AnchorSigner.from_config(services.config.audit, keys=services.config.keys)
    result = AnchorVerification()
    seen: dict[str, _Seen] = {}
    prev_hash, prev_seq = GENESIS_HASH, 0
    names: dict[str, str] = {}
    for stored in sink.read_all():
        result.anchors += 1
        for note in stored.notes:
            kind = "overwritten" if stored.data else "unreadable"
            result.problems.append(AnchorProblem(stored.seq, stored.location, kind, note))
        if not stored.data:
            prev_hash, prev_seq = "", stored.seq
            continue
        try:
            doc = parse_anchor(stored.data)
        except ValueError as exc:
            result.problems.append(
                AnchorProblem(stored.seq, stored.location, "unreadable", str(exc))
            )
            prev_hash, prev_seq = "", stored.seq
            continue
        why = signer.check(doc)
        if why is not None or doc["seq"] != stored.seq:
            result.problems.append(
                AnchorProblem(
                    stored.seq, stored.location, "forged", why or "its seq does not match its name"
                )
            )
            prev_hash, prev_seq = anchor_hash(doc), stored.seq
            continue
        if stored.seq != prev_seq + 1:
            result.problems.append(
                AnchorProblem(
                    stored.seq,
                    stored.location,
                    "missing",
                    f"anchors {prev_seq + 1}..{stored.seq - 1} are missing",
                )
            )
        elif prev_hash and doc.get("prev_anchor_sha256") != prev_hash:
            result.problems.append(
                AnchorProblem(
                    stored.seq,
                    stored.location,
                    "broken-link",
                    f"it does not name anchor {prev_seq}'s hash as its predecessor",
                )
            )
        prev_hash, prev_seq = anchor_hash(doc), stored.seq
        with services.db.transaction("checking the access log against its anchors") as cur:
            for entry in doc["chains"]:
                chain = entry["chain"]
                if not _valid_chain_key(chain):
                    result.problems.append(
                        AnchorProblem(stored.seq, stored.location, "unreadable", "bad chain name")
                    )
                    continue
                label = names.setdefault(chain, str(entry.get("tenant") or chain))
                result.problems.extend(
                    _check_entry(cur, stored, entry, seen.setdefault(chain, _Seen()), label)
                )
    return result


def read_anchors(config: Config) -> list[tuple[StoredAnchor, dict[str, Any]]]:
    """Every readable anchor with its document (for exports); unreadable ones are left out."""
    out = []
    for stored in _primary(config).read_all():
        try:
            out.append((stored, parse_anchor(stored.data)))
        except ValueError:
            continue
    return out
