-- fsrecrypt schema, version 1: tenants, recordings, the access log.
-- Applied by `fsrecrypt migrate` inside one transaction.

CREATE TABLE tenants (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name        text NOT NULL UNIQUE
                CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$'),
    kms_key_id  text NOT NULL CHECK (kms_key_id <> ''),
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE call_recordings (
    id                    uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id             uuid NOT NULL REFERENCES tenants (id) ON DELETE RESTRICT,
    call_uuid             text,
    core_uuid             text,
    source_path           text NOT NULL,
    -- Identity of the plaintext file: device, inode, size and mtime. With the
    -- path it makes the same file impossible to store twice, while a later,
    -- different file written to the same path is a new recording.
    source_fingerprint    text NOT NULL,
    status                text NOT NULL DEFAULT 'pending'
                          CHECK (status IN ('pending', 'stored', 'failed', 'discarded', 'erased')),
    encrypted             boolean NOT NULL DEFAULT false,
    encryption_algorithm  text,
    -- The wrapped data key: base64 of the ESDK serialization of one encrypted
    -- data key (provider id, provider info, ciphertext). Never plaintext key
    -- material. This copy is authoritative for reads (key rotation re-wraps it).
    encrypted_dek         text,
    kms_key_id            text,
    s3_path               text,
    file_size_bytes       bigint CHECK (file_size_bytes >= 0),
    encrypted_size_bytes  bigint CHECK (encrypted_size_bytes >= 0),
    encryption_metadata   jsonb NOT NULL DEFAULT '{}'::jsonb,
    attempts              integer NOT NULL DEFAULT 0,
    last_error            text,
    next_attempt_at       timestamptz,
    -- A worker's lease on a pending row: only the holder may mark it stored,
    -- so two workers (an event and a sweep, or two daemons) never race.
    claimed_by            text,
    claimed_until         timestamptz,
    created_at            timestamptz NOT NULL DEFAULT now(),
    updated_at            timestamptz NOT NULL DEFAULT now(),
    stored_at             timestamptz,
    erased_at             timestamptz,
    CONSTRAINT call_recordings_source_unique UNIQUE (source_path, source_fingerprint),
    CONSTRAINT call_recordings_stored_complete CHECK (
        status <> 'stored' OR (encrypted AND encrypted_dek IS NOT NULL AND s3_path IS NOT NULL
                               AND stored_at IS NOT NULL)
    )
);

CREATE UNIQUE INDEX call_recordings_s3_path ON call_recordings (s3_path) WHERE s3_path IS NOT NULL;
CREATE INDEX call_recordings_tenant_created ON call_recordings (tenant_id, created_at);
CREATE INDEX call_recordings_call_uuid ON call_recordings (call_uuid);
CREATE INDEX call_recordings_pending ON call_recordings (status, next_attempt_at)
    WHERE status IN ('pending', 'failed');

-- The access log outlives the recordings it describes: no cascade, and the
-- reference does not even block a recording's tombstoning (rows stay).
CREATE TABLE recording_access_logs (
    id                      bigserial PRIMARY KEY,
    recording_id            uuid REFERENCES call_recordings (id) ON DELETE RESTRICT,
    tenant_id               uuid REFERENCES tenants (id) ON DELETE RESTRICT,
    user_id                 text NOT NULL,
    action                  text NOT NULL,
    ip_address              inet,
    user_agent              text,
    decryption_duration_ms  double precision,
    success                 boolean NOT NULL,
    error_message           text,
    details                 jsonb NOT NULL DEFAULT '{}'::jsonb,
    accessed_at             timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- Tamper evidence: row_hash = sha256(prev_hash || canonical row), chained
    -- per tenant (tenant_id NULL = the global chain).
    prev_hash               text NOT NULL,
    row_hash                text NOT NULL UNIQUE
);

CREATE INDEX recording_access_logs_recording ON recording_access_logs (recording_id);
CREATE INDEX recording_access_logs_tenant ON recording_access_logs (tenant_id, id);
