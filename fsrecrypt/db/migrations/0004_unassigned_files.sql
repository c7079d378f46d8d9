-- Files whose RECORD_STOP named a tenant that does not exist (yet).
--
-- A recording row needs a tenant, so such a file gets no row; without this
-- table a restarted daemon's sweep would see an unknown file and adopt it
-- under [freeswitch] default_tenant: the wrong tenant. The sweep consults
-- this table instead: it leaves the file alone until the named tenant exists,
-- then stores it for that tenant.
CREATE TABLE unassigned_files (
    source_path         text NOT NULL,
    source_fingerprint  text NOT NULL,
    tenant_name         text NOT NULL,
    call_uuid           text,
    core_uuid           text,
    metadata            jsonb NOT NULL DEFAULT '{}'::jsonb,
    reason              text NOT NULL,
    created_at          timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source_path, source_fingerprint)
);
