"""``audit check-export``: check an exported access log offline, against its signed anchors.

An auditor receives a JSON-lines export (rows, then the anchors covering
them) and the anchor key (the HMAC key, or the Ed25519 public key). With no
database access this proves: every row hashes to its stored hash and links
to the one before it; every anchor is genuinely signed, and consecutive
anchors link; the row each anchor names as the tenant's head is in the
export with the anchored hash (so no row up to it was rewritten after it was
anchored); and, for an export from the chain's first row, the anchored row
count. Rows after the last covering anchor are reported as not anchored.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from fsrecrypt.db import GENESIS_HASH, audit_row_hash
from fsrecrypt.lifecycle.anchors import AnchorSigner, anchor_hash, canonical, parse_anchor

MAX_LINE = 8 * 1024 * 1024


@dataclass
class ExportCheck:
    rows: int = 0
    anchors: int = 0
    anchored_rows: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "anchors": self.anchors,
            "anchored_rows": self.anchored_rows,
            "unanchored_rows": self.rows - self.anchored_rows,
            "problems": len(self.problems),
        }


def _read(lines: Iterable[str], result: ExportCheck) -> tuple[list[dict], list[dict]]:
    rows: list[dict[str, Any]] = []
    anchors: list[dict[str, Any]] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if len(line) > MAX_LINE:
            result.problems.append(f"line {number}: longer than any exported row")
            continue
        try:
            item = json.loads(line)
        except (ValueError, RecursionError):  # not JSON, a 5000-digit number, deep nesting
            result.problems.append(f"line {number}: not JSON (is this a JSON-lines export?)")
            continue
        if isinstance(item, dict) and "anchor" in item:
            try:
                anchors.append(parse_anchor(canonical(item["anchor"])))
            except (ValueError, RecursionError) as exc:
                result.problems.append(f"line {number}: anchor unreadable: {exc}")
        elif isinstance(item, dict) and type(item.get("id")) is int:
            rows.append(item)
        else:
            result.problems.append(f"line {number}: neither an audit row nor an anchor")
    return rows, anchors


def check_export(lines: Iterable[str], signer: AnchorSigner) -> ExportCheck:
    """Check one exported tenant log (JSON lines) with no database; see the module doc."""
    result = ExportCheck()
    rows, anchors = _read(lines, result)
    result.rows, result.anchors = len(rows), len(anchors)
    tenants = {r.get("tenant_id") for r in rows}
    if len(tenants) > 1:
        result.problems.append(f"the export mixes {len(tenants)} tenants' rows")
        return result
    tenant = next(iter(tenants), None)
    by_id: dict[int, dict[str, Any]] = {}
    prev: dict[str, Any] | None = None
    for row in rows:
        try:
            recomputed = audit_row_hash(str(row.get("prev_hash")), row)
        except (ValueError, TypeError, OverflowError):
            recomputed = None  # a field no audit row can hold (bad address, number)
        if recomputed is None or recomputed != row.get("row_hash"):
            result.problems.append(f"row {row['id']}: its contents no longer match its hash")
        if prev is not None and row.get("prev_hash") != prev.get("row_hash"):
            result.problems.append(
                f"row {row['id']}: does not follow row {prev['id']} (rows missing or reordered)"
            )
        if prev is not None and row["id"] <= prev["id"]:
            result.problems.append(f"row {row['id']}: out of order after row {prev['id']}")
        by_id[row["id"]] = row
        prev = row
    from_genesis = bool(rows) and rows[0].get("prev_hash") == GENESIS_HASH
    if rows and not anchors:
        result.problems.append("no anchor covers this export: nothing in it is anchored")
    last_doc: dict[str, Any] | None = None
    anchored_to = 0
    for doc in sorted(anchors, key=lambda d: d["seq"]):
        seq = doc["seq"]
        why = signer.check(doc)
        if why is not None:
            result.problems.append(f"anchor {seq}: {why}")
            continue
        if last_doc is not None and seq == last_doc["seq"] + 1:
            if doc.get("prev_anchor_sha256") != anchor_hash(last_doc):
                result.problems.append(f"anchor {seq}: does not link to anchor {seq - 1}")
        last_doc = doc
        heads = [c for c in doc["chains"] if c["chain"] == tenant]
        if not heads:
            result.problems.append(f"anchor {seq}: names no head of this tenant's chain")
            continue
        head = heads[0]
        row = by_id.get(head["last_id"])
        if row is None:
            result.problems.append(
                f"anchor {seq}: its head row {head['last_id']} is not in the export"
            )
        elif row.get("row_hash") != head["row_hash"]:
            result.problems.append(
                f"anchor {seq}: row {head['last_id']} differs from the anchored hash: "
                f"rows up to it were rewritten after anchor {seq}"
            )
        elif from_genesis:
            count = sum(1 for r in rows if r["id"] <= head["last_id"])
            if count != head["row_count"]:
                result.problems.append(
                    f"anchor {seq}: {count} rows up to row {head['last_id']}, "
                    f"the anchor recorded {head['row_count']}"
                )
        anchored_to = max(anchored_to, head["last_id"])
    result.anchored_rows = sum(1 for r in rows if r["id"] <= anchored_to)
    return result
