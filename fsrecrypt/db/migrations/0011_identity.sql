-- fsrecrypt schema, version 11: roles for API keys, and acting for an end user.
-- Applied by `fsrecrypt migrate` inside one transaction.
--
-- A key holds one or more roles: listen (stream, playback URL), download
-- (the whole file as an attachment), ingest (upload), admin (holds, erasure,
-- custody). Keys made before this version keep what they could do: listen.
-- on_behalf_of marks a service key that may name the end user it acts for
-- (X-On-Behalf-Of); the access log then carries both.

ALTER TABLE api_keys
    ADD COLUMN roles text[] NOT NULL DEFAULT ARRAY['listen']::text[]
        CHECK (cardinality(roles) BETWEEN 1 AND 4
               AND roles <@ ARRAY['listen', 'download', 'ingest', 'admin']::text[]),
    ADD COLUMN on_behalf_of boolean NOT NULL DEFAULT false;
