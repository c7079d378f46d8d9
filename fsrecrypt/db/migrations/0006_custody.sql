-- fsrecrypt schema, version 6: chain of custody per recording.
-- Applied by `fsrecrypt migrate` inside one transaction.

-- The keyed fingerprint of the plaintext, computed while it was encrypted:
-- HMAC-SHA256 under a per-tenant key derived on the server from
-- [audit] fingerprint_key_file (hex). It proves that a decrypted copy is
-- identical without letting anyone who reads the database confirm guessed
-- content. NULL for recordings stored before this version.
ALTER TABLE call_recordings
    ADD COLUMN plaintext_hmac text
        CHECK (plaintext_hmac IS NULL OR plaintext_hmac ~ '^[0-9a-f]{64}$'),
    ADD COLUMN plaintext_hmac_key_id text,
    -- When and where the plaintext file was deleted after the object and
    -- its row were durable (NULL: not deleted by fsrecrypt, or before v6).
    ADD COLUMN plaintext_deleted_at timestamptz,
    ADD COLUMN plaintext_deleted_host text;
