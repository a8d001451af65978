-- One row per request that reached routing. Written asynchronously by the gateway in batches;
-- request_id is the gateway's own id (UUIDv7), so a replayed batch cannot insert twice.
CREATE TABLE IF NOT EXISTS usage_events (
    request_id          UUID PRIMARY KEY,
    created_at          TIMESTAMPTZ NOT NULL,    -- when the request arrived
    project             TEXT,
    key_id              TEXT,
    tags                JSONB NOT NULL DEFAULT '{}'::jsonb, -- team, business_line, ...
    alias               TEXT,
    provider            TEXT,
    upstream_model      TEXT,
    attempts            INTEGER NOT NULL DEFAULT 1,
    status              INTEGER NOT NULL,
    error_type          TEXT,
    input_tokens        BIGINT,                  -- NULL: the vendor reported no usage
    output_tokens       BIGINT,
    cached_tokens       BIGINT,
    reasoning_tokens    BIGINT,
    elapsed_ms          DOUBLE PRECISION NOT NULL,
    ttft_ms             DOUBLE PRECISION,
    streamed            BOOLEAN NOT NULL,
    client_aborted      BOOLEAN NOT NULL,
    vendor_response_id  TEXT,
    vendor_request_id   TEXT
);
CREATE INDEX IF NOT EXISTS usage_events_project_time ON usage_events (project, created_at);
