-- fsrecrypt schema, version 5: counted anonymous refusals.
-- Applied by `fsrecrypt migrate` inside one transaction.

-- Unauthenticated requests cost their sender nothing, and access-log rows are
-- never deleted: one row per anonymous refusal let anyone grow the log without
-- bound. Such refusals are counted here per client address, action, reason and
-- minute; the first of each bucket is also written to the global hash chain
-- (first_log_id), and that row records the final count of the client's
-- previous bucket (which it thereby seals: sealed_by_log_id).
CREATE TABLE audit_refusal_buckets (
    bucket_start      timestamptz NOT NULL,
    client            text NOT NULL CHECK (length(client) <= 64),
    action            text NOT NULL CHECK (length(action) <= 64),
    reason            text NOT NULL CHECK (length(reason) <= 200),
    refusals          bigint NOT NULL CHECK (refusals > 0),
    first_seen_at     timestamptz NOT NULL,
    last_seen_at      timestamptz NOT NULL,
    first_log_id      bigint REFERENCES recording_access_logs (id) ON DELETE RESTRICT,
    sealed_by_log_id  bigint REFERENCES recording_access_logs (id) ON DELETE RESTRICT,
    PRIMARY KEY (client, action, reason, bucket_start)
);

CREATE INDEX audit_refusal_buckets_time ON audit_refusal_buckets (bucket_start);
