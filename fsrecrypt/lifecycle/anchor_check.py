"""``audit check-export``: check an exported access log offline, against its signed anchors.

An auditor receives an export (JSON lines or CSV: rows, then the anchors
covering them) and the anchor key (the HMAC key, or the Ed25519 public key). With no
database access this proves: every row hashes to its stored hash and links
to the one before it; every anchor is genuinely signed, and consecutive
anchors link; the row each anchor names as the tenant's head is in the
export with the anchored hash (so no row up to it was rewritten after it was
anchored); and, for an export from the chain's first row, the anchored row
count. Rows after the last covering anchor are reported as not anchored.
"""

from __future__ import annotations

import csv
import itertools
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from fsrecrypt.db import GENESIS_HASH, audit_row_hash
from fsrecrypt.lifecycle.anchors import AnchorSigner, anchor_hash, canonical, parse_anchor
from fsrecrypt.lifecycle.audit import EXPORT_COLUMNS

MAX_LINE = 8 * 1024 * 1024
CSV_HEADER = ",".join(EXPORT_COLUMNS)
# Text columns where an empty CSV cell may have been an empty string or NULL.
_NULLABLE_TEXT = ("user_id", "error_message", "user_agent")


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
    """Rows and anchors of a JSON-lines or CSV export (told apart by the CSV header)."""
    it = iter(lines)
    first = next(it, "")
    if first.strip().lstrip("\ufeff") == CSV_HEADER:
        return _read_csv(it, result)
    return _read_jsonl(itertools.chain([first], it), result)


def _anchor_item(item: Any, where: str, result: ExportCheck, anchors: list[dict]) -> None:
    try:
        anchors.append(parse_anchor(canonical(item["anchor"])))
    except (ValueError, RecursionError, TypeError, KeyError) as exc:
        result.problems.append(f"{where}: anchor unreadable: {exc}")


def _read_jsonl(lines: Iterable[str], result: ExportCheck) -> tuple[list[dict], list[dict]]:
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
            _anchor_item(item, f"line {number}", result, anchors)
        elif isinstance(item, dict) and type(item.get("id")) is int:
            rows.append(item)
        else:
            result.problems.append(f"line {number}: neither an audit row nor an anchor")
    return rows, anchors


def _bounded_lines(lines: Iterator[str], result: ExportCheck) -> Iterator[str]:
    for line in lines:
        if len(line) > MAX_LINE:
            result.problems.append("a CSV line is longer than any exported row")
            return
        yield line


def _read_csv(lines: Iterator[str], result: ExportCheck) -> tuple[list[dict], list[dict]]:
    rows: list[dict[str, Any]] = []
    anchors: list[dict[str, Any]] = []
    reader = csv.DictReader(_bounded_lines(lines, result), fieldnames=list(EXPORT_COLUMNS))
    try:
        for cells in reader:
            where = f"CSV record {reader.line_num}"
            if None in cells or any(v is None for v in cells.values()):
                result.problems.append(f"{where}: not {len(EXPORT_COLUMNS)} columns")
                continue
            try:
                if cells["id"] == "" and cells["action"] == "anchor":
                    _anchor_item(json.loads(cells["details"]), where, result, anchors)
                else:
                    rows.append(_typed_row(cells))
            except (ValueError, RecursionError, TypeError) as exc:
                result.problems.append(f"{where}: unreadable: {str(exc)[:200]}")
    except csv.Error as exc:
        result.problems.append(f"the CSV is malformed: {str(exc)[:200]}")
    return rows, anchors


def _typed_row(cells: dict[str, str]) -> dict[str, Any]:
    """A CSV record back to the values the row hash covers (empty cell = NULL)."""
    row: dict[str, Any] = {k: (v if v != "" else None) for k, v in cells.items()}
    if not cells["id"].isascii() or not cells["id"].isdigit() or len(cells["id"]) > 19:
        raise ValueError(f"id {cells['id'][:30]!r} is not a row number")
    row["id"] = int(cells["id"])
    if cells["success"] not in ("True", "False"):
        raise ValueError(f"success {cells['success'][:30]!r} is neither True nor False")
    row["success"] = cells["success"] == "True"
    if row["decryption_duration_ms"] is not None:
        row["decryption_duration_ms"] = float(row["decryption_duration_ms"])
    row["details"] = json.loads(cells["details"]) if cells["details"] else None
    return row


def _csv_readings(row: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Each way an ambiguous CSV cell can be read (NULL first).

    CSV has one spelling for an empty text and NULL, and the export writes
    NULL ``details`` as ``{}``; the row hash was computed over the value the
    database held, so exactly the right reading reproduces it.
    """
    options: dict[str, tuple[Any, ...]] = {
        name: (None, "") for name in _NULLABLE_TEXT if row.get(name) is None
    }
    if row.get("details") == {}:
        options["details"] = ({}, None)
    names = list(options)
    for choice in itertools.product(*(options[n] for n in names)):
        yield {**row, **dict(zip(names, choice, strict=True))}


def _row_hash_matches(row: dict[str, Any], from_csv: bool) -> bool:
    readings = _csv_readings(row) if from_csv else iter([row])
    for reading in readings:
        try:
            if audit_row_hash(str(reading.get("prev_hash")), reading) == row.get("row_hash"):
                return True
        except (ValueError, TypeError, OverflowError):
            return False  # a field no audit row can hold (bad address, number)
    return False


def check_export(lines: Iterable[str], signer: AnchorSigner) -> ExportCheck:
    """Check one exported tenant log (JSON lines) with no database; see the module doc."""
    result = ExportCheck()
    lines = iter(lines)
    first = next(lines, "")
    from_csv = first.strip().lstrip("\ufeff") == CSV_HEADER
    rows, anchors = _read(itertools.chain([first], lines), result)
    result.rows, result.anchors = len(rows), len(anchors)
    tenants = {r.get("tenant_id") for r in rows}
    if len(tenants) > 1:
        result.problems.append(f"the export mixes {len(tenants)} tenants' rows")
        return result
    tenant = next(iter(tenants), None)
    by_id: dict[int, dict[str, Any]] = {}
    prev: dict[str, Any] | None = None
    for row in rows:
        if not _row_hash_matches(row, from_csv):
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
