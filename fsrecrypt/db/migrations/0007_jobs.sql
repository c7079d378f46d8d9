-- fsrecrypt schema, version 7: bulk jobs (rotate, verify, expire, erase, backfill ...).
-- Applied by `fsrecrypt migrate` inside one transaction.
--
-- A bulk operation is one `jobs` row plus one `job_items` row per unit of
-- work (usually one recording). Any number of `fsrecrypt worker` processes
-- (and the command that created the job) claim queued items in batches with
-- FOR UPDATE SKIP LOCKED, each under a lease they renew by a heartbeat; an
-- item whose lease ran out (its worker died) goes back to the queue.

CREATE TABLE jobs (
    id            bigserial PRIMARY KEY,
    kind          text NOT NULL CHECK (kind ~ '^[a-z][a-z0-9_-]{0,39}$'),
    -- What the command asked for (tenant, key, reason ...): the kind's input.
    params        jsonb NOT NULL DEFAULT '{}'::jsonb,
    -- creating: items are still being streamed in (workers may already work);
    -- running: all items are in; done/failed: finished (failed = some items
    -- failed); cancelled: `jobs cancel`, queued items are no longer claimed.
    state         text NOT NULL DEFAULT 'creating'
                  CHECK (state IN ('creating', 'running', 'done', 'failed', 'cancelled')),
    created_by    text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    started_at    timestamptz,
    finished_at   timestamptz,
    total_items   bigint NOT NULL DEFAULT 0,
    -- The kind's summary, written once when the last item finished.
    result        jsonb,
    error         text,
    -- Who is writing the summary (a lease too: a finisher that dies is replaced).
    finishing_by    text,
    finishing_until timestamptz
);
CREATE INDEX jobs_active ON jobs (id) WHERE state IN ('creating', 'running');

CREATE TABLE job_items (
    job_id        bigint NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    seq           bigint NOT NULL,
    state         text NOT NULL DEFAULT 'queued'
                  CHECK (state IN ('queued', 'running', 'done', 'failed', 'skipped')),
    payload       jsonb NOT NULL,
    attempts      integer NOT NULL DEFAULT 0,
    claimed_by    text,
    lease_until   timestamptz,
    -- A transient failure puts the item back with a delay (backoff).
    available_at  timestamptz NOT NULL DEFAULT now(),
    finished_at   timestamptz,
    message       text,
    result        jsonb,
    PRIMARY KEY (job_id, seq)
);
-- Claiming: the queued items of one job in order (partial: done items cost nothing).
CREATE INDEX job_items_queued ON job_items (job_id, seq) WHERE state = 'queued';
-- Heartbeat (renew my leases) and the reaper (leases that ran out).
CREATE INDEX job_items_running_owner ON job_items (claimed_by) WHERE state = 'running';
CREATE INDEX job_items_running_lease ON job_items (lease_until) WHERE state = 'running';
-- `jobs show` (first failures) and `jobs retry`.
CREATE INDEX job_items_failed ON job_items (job_id, seq) WHERE state = 'failed';

-- Finished-item counters, one row per (job, shard): a worker adds to a
-- random shard in the same transaction that finishes the item, so counts are
-- exact, `jobs show` reads a few rows instead of a million, and workers do
-- not all queue on one hot row.
CREATE TABLE job_counts (
    job_id   bigint NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    shard    smallint NOT NULL,
    done     bigint NOT NULL DEFAULT 0,
    failed   bigint NOT NULL DEFAULT 0,
    skipped  bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (job_id, shard)
);

-- The daemon's recording claims are short leases renewed by a heartbeat
-- (``[jobs] lease_seconds``): renewing "my" claims and finding expired ones
-- must not scan the recordings table.
CREATE INDEX call_recordings_claimed_by ON call_recordings (claimed_by)
    WHERE claimed_by IS NOT NULL;
CREATE INDEX call_recordings_claimed_until ON call_recordings (claimed_until)
    WHERE claimed_by IS NOT NULL;
