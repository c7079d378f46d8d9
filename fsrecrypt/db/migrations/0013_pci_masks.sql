-- fsrecrypt schema, version 13: masked (PCI-paused) spans of recordings.
-- Applied by `fsrecrypt migrate` inside one transaction.

-- One row per RECORD_START the daemon saw: a recording's time zero and its
-- identity (FreeSWITCH core, channel, path), written as the event arrives,
-- so a daemon killed before RECORD_STOP still knows it after a restart.
-- recording_id is set when the recording is stored with its verdict.
CREATE TABLE recording_mask_sessions (
    id            bigserial PRIMARY KEY,
    core_uuid     text NOT NULL,
    channel_uuid  text NOT NULL,
    source_path   text NOT NULL,
    started_us    bigint NOT NULL,
    stopped_us    bigint,
    marks         integer NOT NULL DEFAULT 0 CHECK (marks >= 0),
    recording_id  uuid REFERENCES call_recordings (id) ON DELETE SET NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT recording_mask_sessions_unique
        UNIQUE (core_uuid, channel_uuid, source_path, started_us)
);
CREATE INDEX recording_mask_sessions_open
    ON recording_mask_sessions (channel_uuid, source_path) WHERE recording_id IS NULL;
CREATE INDEX recording_mask_sessions_path
    ON recording_mask_sessions (source_path) WHERE recording_id IS NULL;

-- Each mask / unmask as announced (dialplan application or uuid_record API),
-- in arrival order: the raw evidence the spans are computed from.
CREATE TABLE recording_mask_marks (
    session_id   bigint NOT NULL REFERENCES recording_mask_sessions (id) ON DELETE CASCADE,
    seq          integer NOT NULL,
    kind         text NOT NULL CHECK (kind IN ('mask', 'unmask')),
    via          text NOT NULL CHECK (via IN ('dialplan', 'api')),
    at_us        bigint NOT NULL,
    received_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (session_id, seq)
);

-- The spans as checked against the audio before encryption (announced and
-- found offsets in milliseconds, verdict per span) and the verdict of the
-- recording: NULL = no mask announced, false = a mask the audio does not
-- show (alerted where required until acknowledged).
ALTER TABLE call_recordings
    ADD COLUMN mask_spans jsonb,
    ADD COLUMN mask_verified boolean,
    ADD COLUMN mask_ack_at timestamptz,
    ADD COLUMN mask_ack_by text;
CREATE INDEX call_recordings_mask_unacknowledged ON call_recordings (tenant_id)
    WHERE mask_verified = false AND mask_ack_at IS NULL;
