-- fsrecrypt schema, version 14: where a recording's custody fingerprint came from.
-- Applied by `fsrecrypt migrate` inside one transaction.

-- 'encrypt': computed over the bytes read while the recording was encrypted
-- (every recording stored since version 6). 'decrypted': computed later from
-- the authenticated decryption of the stored object, by
-- `fsrecrypt custody --fill-missing`, for recordings stored before
-- fingerprints existed; plaintext_hmac_at says when.
ALTER TABLE call_recordings
    ADD COLUMN plaintext_hmac_source text NOT NULL DEFAULT 'encrypt'
        CHECK (plaintext_hmac_source IN ('encrypt', 'decrypted')),
    ADD COLUMN plaintext_hmac_at timestamptz;

CREATE INDEX call_recordings_missing_fingerprint
    ON call_recordings (id) WHERE plaintext_hmac IS NULL AND status = 'stored';
