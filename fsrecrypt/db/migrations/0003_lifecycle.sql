-- fsrecrypt schema, version 3: legal holds, erasure receipts, audit chain heads.
-- Applied by `fsrecrypt migrate` inside one transaction.

-- A legal hold freezes a recording: neither `erase` nor `expire` may destroy
-- it while a hold is active (released_at IS NULL). Released holds stay as
-- history; at most one hold per recording is active at a time.
CREATE TABLE legal_holds (
    id              bigserial PRIMARY KEY,
    recording_id    uuid NOT NULL REFERENCES call_recordings (id) ON DELETE RESTRICT,
    tenant_id       uuid NOT NULL REFERENCES tenants (id) ON DELETE RESTRICT,
    reason          text NOT NULL CHECK (reason <> ''),
    placed_by       text NOT NULL,
    placed_at       timestamptz NOT NULL DEFAULT now(),
    released_by     text,
    released_at     timestamptz,
    release_reason  text,
    CONSTRAINT legal_holds_release_complete CHECK (
        (released_at IS NULL) = (released_by IS NULL)
    )
);

CREATE UNIQUE INDEX legal_holds_active ON legal_holds (recording_id) WHERE released_at IS NULL;
CREATE INDEX legal_holds_tenant ON legal_holds (tenant_id, placed_at);

-- What `erase`/`expire` printed, kept so a deletion can be proven later
-- (the receipt hash is sha256 over the canonical JSON of the receipt).
CREATE TABLE erasure_receipts (
    id            uuid PRIMARY KEY,
    action        text NOT NULL CHECK (action IN ('erase', 'expire')),
    operator      text NOT NULL,
    reason        text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    receipt       jsonb NOT NULL,
    receipt_hash  text NOT NULL UNIQUE
);

-- Retention: expiry looks for old stored recordings.
CREATE INDEX call_recordings_stored_created ON call_recordings (created_at)
    WHERE status = 'stored';

-- The head of every audit chain (tenant id, or 'global' for tenant NULL),
-- maintained by a trigger on insert. The hash chain alone cannot show that
-- the newest rows of a chain were deleted; the head (last id, last hash,
-- row count) can, and a deleted row in the middle also shows as a count gap.
CREATE TABLE audit_chain_heads (
    chain      text PRIMARY KEY,
    last_id    bigint NOT NULL,
    last_hash  text NOT NULL,
    row_count  bigint NOT NULL
);

CREATE FUNCTION fsrecrypt_audit_chain_head() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO audit_chain_heads AS h (chain, last_id, last_hash, row_count)
    VALUES (coalesce(NEW.tenant_id::text, 'global'), NEW.id, NEW.row_hash, 1)
    ON CONFLICT (chain) DO UPDATE
        SET last_id = EXCLUDED.last_id,
            last_hash = EXCLUDED.last_hash,
            row_count = h.row_count + 1;
    RETURN NULL;
END
$$;

CREATE TRIGGER recording_access_logs_chain_head
    AFTER INSERT ON recording_access_logs
    FOR EACH ROW EXECUTE FUNCTION fsrecrypt_audit_chain_head();

-- Rows written before this migration.
INSERT INTO audit_chain_heads (chain, last_id, last_hash, row_count)
SELECT coalesce(l.tenant_id::text, 'global'),
       max(l.id),
       (SELECT l2.row_hash FROM recording_access_logs l2
         WHERE l2.id = max(l.id)),
       count(*)
  FROM recording_access_logs l
 GROUP BY coalesce(l.tenant_id::text, 'global');
