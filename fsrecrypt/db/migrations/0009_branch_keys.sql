-- fsrecrypt schema, version 9: the KMS key protecting each branch key
-- ([keys] provider = "aws-kms-hierarchy").
-- Applied by `fsrecrypt migrate` inside one transaction.

-- A hierarchy tenant's kms_key_id (and its recordings' kms_key_id) is the id
-- of its branch key in the DynamoDB key store. The branch key is protected by
-- [keys] key_store_kms_key unless a row here says otherwise: `fsrecrypt
-- rotate` moves a branch key to another KMS key by re-wrapping its items and
-- then records the new key here. The key store is only used in its strict
-- mode with the key named here (or the configured one), so a branch key
-- planted in the table under a KMS key nobody chose is refused.
CREATE TABLE branch_keys (
    branch_key_id text PRIMARY KEY
        CHECK (branch_key_id ~ '^[A-Za-z0-9._:/-]{1,128}$'),
    kms_key_arn text NOT NULL
        CHECK (kms_key_arn ~ '^arn:aws[a-z-]*:kms:[a-z0-9-]+:[0-9]{12}:key/[A-Za-z0-9-]{1,128}$'),
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
