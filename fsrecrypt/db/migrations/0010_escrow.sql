-- fsrecrypt schema, version 10: escrow keys, a second way back into every recording.
-- Applied by `fsrecrypt migrate` inside one transaction.

-- A tenant's escrow wrapping keys, in the order reads try them after the
-- primary (kms_key_id): a KMS key ARN (any region) or raw-aes:<id> (a
-- raw AES key of the escrow keyring). Identifiers only, never material.
ALTER TABLE tenants
    ADD COLUMN escrow_key_ids text[] NOT NULL DEFAULT '{}'
        CHECK (array_position(escrow_key_ids, '') IS NULL
               AND NOT kms_key_id = ANY(escrow_key_ids));

-- One wrapped copy of a recording's data key per escrow key (the object's
-- header carries the same EDKs after the primary's). Same encoding as
-- call_recordings.encrypted_dek: base64 of the ESDK serialization of one
-- encrypted data key.
CREATE TABLE recording_escrow_deks (
    recording_id   uuid NOT NULL REFERENCES call_recordings (id) ON DELETE CASCADE,
    key_ref        text NOT NULL CHECK (key_ref <> ''),
    encrypted_dek  text NOT NULL CHECK (encrypted_dek <> ''),
    created_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (recording_id, key_ref)
);

-- Crypto-shredding destroys every wrapped copy: whatever sets a row's
-- encrypted_dek to NULL (erase, expire) also drops its escrow copies, in
-- the same transaction, so no code path can forget them.
CREATE FUNCTION fsrecrypt_shred_escrow_deks() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM recording_escrow_deks WHERE recording_id = NEW.id;
    RETURN NULL;
END
$$;

CREATE TRIGGER call_recordings_shred_escrow_deks
    AFTER UPDATE OF encrypted_dek ON call_recordings
    FOR EACH ROW WHEN (NEW.encrypted_dek IS NULL AND OLD.encrypted_dek IS NOT NULL)
    EXECUTE FUNCTION fsrecrypt_shred_escrow_deks();
