-- fsrecrypt schema, version 12: recordings uploaded through the API (POST /v1/recordings).
-- Applied by `fsrecrypt migrate` inside one transaction.

-- The client's Idempotency-Key: a retried upload with the same key (per
-- tenant) answers the first upload's recording instead of storing the audio
-- twice. A discarded upload (truncated body, refused content) frees its key,
-- so the client's retry stores the recording. NULL for every other row.
ALTER TABLE call_recordings
    ADD COLUMN idempotency_key text
        CHECK (idempotency_key IS NULL OR length(idempotency_key) BETWEEN 1 AND 255);

CREATE UNIQUE INDEX call_recordings_idempotency
    ON call_recordings (tenant_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL AND status <> 'discarded';
