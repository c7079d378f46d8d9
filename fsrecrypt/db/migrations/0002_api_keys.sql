-- fsrecrypt schema, version 2: API keys for the playback server.
--
-- A key is "fsr_<key_id>_<secret>": key_id is public (it names the key in
-- listings, the access log and revocation), the secret is 256 random bits.
-- Only sha256 of the whole key is stored: with 256 bits of entropy a fast
-- hash cannot be brute-forced, and a stolen table grants nothing.

CREATE TABLE api_keys (
    id            uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    key_id        text NOT NULL UNIQUE CHECK (key_id ~ '^[0-9a-f]{16}$'),
    key_hash      text NOT NULL CHECK (key_hash ~ '^[0-9a-f]{64}$'),
    tenant_id     uuid NOT NULL REFERENCES tenants (id) ON DELETE RESTRICT,
    user_id       text NOT NULL CHECK (user_id <> '' AND length(user_id) <= 200),
    created_at    timestamptz NOT NULL DEFAULT now(),
    last_used_at  timestamptz,
    revoked_at    timestamptz
);

CREATE INDEX api_keys_tenant_user ON api_keys (tenant_id, user_id);
