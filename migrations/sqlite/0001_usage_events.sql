-- One row per request that reached routing. Written asynchronously by the gateway in batches;
-- request_id is the gateway's own id (UUIDv7), so a replayed batch cannot insert twice.
CREATE TABLE IF NOT EXISTS usage_events (
    request_id          TEXT PRIMARY KEY NOT NULL,
    created_at          TEXT NOT NULL,           -- RFC 3339, UTC: when the request arrived
    project             TEXT,
    key_id              TEXT,
    tags                TEXT NOT NULL DEFAULT '{}', -- JSON object: team, business_line, ...
    alias               TEXT,
    provider            TEXT,
    upstream_model      TEXT,
    attempts            INTEGER NOT NULL DEFAULT 1,
    status              INTEGER NOT NULL,
    error_type          TEXT,
    input_tokens        INTEGER,                 -- NULL: the vendor reported no usage
    output_tokens       INTEGER,
    cached_tokens       INTEGER,
    reasoning_tokens    INTEGER,
    elapsed_ms          REAL NOT NULL,
    ttft_ms             REAL,
    streamed            INTEGER NOT NULL,        -- 0 / 1
    client_aborted      INTEGER NOT NULL,        -- 0 / 1
    vendor_response_id  TEXT,
    vendor_request_id   TEXT
);
CREATE INDEX IF NOT EXISTS usage_events_project_time ON usage_events (project, created_at);
