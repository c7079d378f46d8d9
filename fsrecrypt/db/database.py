"""``Database``: the pool plus every query, composed from one class per responsibility."""

from __future__ import annotations

from fsrecrypt.db.audit import AuditLog
from fsrecrypt.db.branch_keys import BranchKeys
from fsrecrypt.db.custody import Custody
from fsrecrypt.db.jobs import Jobs
from fsrecrypt.db.masks import MaskSessions
from fsrecrypt.db.pool import translate_errors
from fsrecrypt.db.queue import WorkQueue
from fsrecrypt.db.recordings import Recordings
from fsrecrypt.db.schema import check_schema, schema_version
from fsrecrypt.db.tenants import Tenants
from fsrecrypt.db.unassigned import UnassignedFiles
from fsrecrypt.db.uploads import Uploads


class Database(
    WorkQueue,
    Recordings,
    Tenants,
    UnassignedFiles,
    AuditLog,
    Custody,
    Jobs,
    BranchKeys,
    Uploads,
    MaskSessions,
):
    """A small connection pool plus the queries; safe to share across greenlets/threads.

    Each base holds one responsibility's SQL (see its module); callers use one
    object, ``services.db``, and never see the split.
    """

    def ping(self) -> int:
        with self.transaction("checking the database") as cur:
            cur.execute("SELECT 1")
            cur.fetchone()
        with translate_errors("checking the schema"), self.connection() as conn:
            version = schema_version(conn)
            check_schema(conn)
        return version
