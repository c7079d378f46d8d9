"""A branch key's items in the DynamoDB key store, re-wrapped under another KMS key.

Why this exists: the Material Providers Library (1.11) creates, versions and
reads branch keys, but cannot move one to another KMS key. Each item of a
branch key (``branch:ACTIVE``, every ``branch:version:*``, ``beacon:ACTIVE``)
holds its key material as a KMS ciphertext (``enc``) whose encryption context
is the item's other attributes plus ``tablename`` (the logical key store
name). Moving an item is one KMS ReEncrypt (the material never leaves KMS in
clear) with ``kms-arn`` changed in the destination context, and one
conditional PutItem, so a branch key with N versions costs N + 2 calls, not
one per recording.

The source key of every item must be the one the caller expects: an item
wrapped by some other key (planted by a writer of the table) is refused, never
laundered into a key we trust. boto3 is imported at the top, like ``kms.py``;
only ``fsrecrypt.keys.hierarchy`` imports this module.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from botocore.client import BaseClient
from botocore.exceptions import BotoCoreError, ClientError

from fsrecrypt.errors import KeyAccessError, KeyNotFound
from fsrecrypt.keys.awserrors import aws_error

ENC = "enc"
KMS_ARN = "kms-arn"
BRANCH_KEY_ID = "branch-key-id"
ITEM_TYPE = "type"
ACTIVE = "branch:ACTIVE"


@dataclass
class BranchKeyMove:
    """What moving one branch key did: item types re-wrapped or already on the target."""

    branch_key_id: str
    to_kms_key: str
    rewrapped: list[str] = field(default_factory=list)
    already_current: list[str] = field(default_factory=list)


def _plain(value: dict[str, Any]) -> str:
    """A string or number attribute as the string the KMS context holds."""
    if "S" in value:
        return str(value["S"])
    if "N" in value:
        return str(value["N"])
    raise KeyAccessError("branch key item has an attribute that is neither string nor number")


def item_context(item: dict[str, dict[str, Any]], logical_name: str) -> dict[str, str]:
    """The KMS encryption context the key store used for this item's ``enc``."""
    context = {k: _plain(v) for k, v in item.items() if k != ENC}
    context["tablename"] = logical_name
    return context


def _call(client: BaseClient, service: str, op: str, ref: str, **kwargs: Any) -> dict[str, Any]:
    try:
        return dict(getattr(client, op)(**kwargs))
    except (ClientError, BotoCoreError) as exc:
        raise aws_error(exc, f"{service} {op} for {ref}") from None


def branch_key_items(ddb: BaseClient, table: str, branch_key_id: str) -> Iterator[dict[str, Any]]:
    """Every item of one branch key (strongly consistent reads, all pages)."""
    kwargs: dict[str, Any] = {
        "TableName": table,
        "KeyConditionExpression": "#b = :b",
        "ExpressionAttributeNames": {"#b": BRANCH_KEY_ID},
        "ExpressionAttributeValues": {":b": {"S": branch_key_id}},
        "ConsistentRead": True,
    }
    while True:
        page = _call(ddb, "dynamodb", "query", table, **kwargs)
        yield from page.get("Items", [])
        if not page.get("LastEvaluatedKey"):
            return
        kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]


def item_kms_arn(item: dict[str, Any]) -> str:
    return _plain(item.get(KMS_ARN, {"S": ""}))


def move_branch_key(
    ddb: BaseClient,
    kms: BaseClient,
    *,
    table: str,
    logical_name: str,
    branch_key_id: str,
    from_arn: str,
    to_arn: str,
) -> BranchKeyMove:
    """Re-wrap every item of ``branch_key_id`` from ``from_arn`` to ``to_arn``.

    Idempotent and resumable: items already on ``to_arn`` are skipped, each
    write is conditional on the ciphertext and key it replaces, so a crash or
    a concurrent writer leaves every item whole, wrapped by one key or the
    other. Raises ``KeyNotFound`` when the branch key has no items and
    ``KeyAccessError`` for an item wrapped by neither key.
    """
    result = BranchKeyMove(branch_key_id, to_arn)
    items = list(branch_key_items(ddb, table, branch_key_id))
    if not items:
        raise KeyNotFound(f"branch key {branch_key_id} is not in key store {table}")
    foreign = sorted(
        {item_kms_arn(i) for i in items} - {from_arn, to_arn},
    )
    if foreign:
        raise KeyAccessError(
            f"branch key {branch_key_id} has items wrapped by {', '.join(foreign)}, "
            f"expected {from_arn}; refusing to move it",
            hint="Check who wrote to the key store table; only fsrecrypt and the MPL should.",
        )
    for item in items:
        kind = _plain(item[ITEM_TYPE])
        if item_kms_arn(item) == to_arn:
            result.already_current.append(kind)
            continue
        source = item_context(item, logical_name)
        dest = {**source, KMS_ARN: to_arn}
        resp = _call(
            kms,
            "kms",
            "re_encrypt",
            from_arn,
            CiphertextBlob=item[ENC]["B"],
            SourceEncryptionContext=source,
            SourceKeyId=from_arn,
            DestinationKeyId=to_arn,
            DestinationEncryptionContext=dest,
        )
        new_item = {k: v for k, v in item.items() if k not in (ENC, KMS_ARN)}
        new_item[KMS_ARN] = {"S": to_arn}
        new_item[ENC] = {"B": resp["CiphertextBlob"]}
        _call(
            ddb,
            "dynamodb",
            "put_item",
            table,
            TableName=table,
            Item=new_item,
            ConditionExpression="#enc = :old AND #arn = :from",
            ExpressionAttributeNames={"#enc": ENC, "#arn": KMS_ARN},
            ExpressionAttributeValues={":old": item[ENC], ":from": {"S": from_arn}},
        )
        result.rewrapped.append(kind)
    return result
