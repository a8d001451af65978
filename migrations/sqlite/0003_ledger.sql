-- The ledger: what each request cost, the price rows that priced it, and the projects and keys
-- of the config. docs/billing.md describes every table and view. SQLite has no decimal type:
-- money is TEXT holding an exact decimal, and cost has an INTEGER copy in nano-units to sum.

-- Projects and their keys, synced from [[projects]] whenever the gateway starts or reloads.
-- Rows are never deleted: usage rows name projects and keys that may have left the config.
CREATE TABLE IF NOT EXISTS projects (
    name            TEXT PRIMARY KEY NOT NULL,
    tags            TEXT NOT NULL DEFAULT '{}',      -- JSON object, as in the config at last_seen_at
    first_seen_at   TEXT NOT NULL,                   -- RFC 3339, UTC
    last_seen_at    TEXT NOT NULL                    -- the last sync that found it in the config
);
CREATE TABLE IF NOT EXISTS api_keys (
    project         TEXT NOT NULL REFERENCES projects (name),
    key_id          TEXT NOT NULL,
    sha256          TEXT NOT NULL,                   -- lower-case hex SHA-256; never the key
    first_seen_at   TEXT NOT NULL,
    last_seen_at    TEXT NOT NULL,
    -- For keys created in the database rather than the config; a config key leaves them NULL.
    expires_at      TEXT,
    revoked_at      TEXT,
    created_by      TEXT,                            -- 'config' for keys from the config
    PRIMARY KEY (project, key_id)
);

-- Every [[prices]] row the gateway has been configured with. A changed price is a new row; an
-- old row is never deleted, and only effective_to ever changes. Amounts are normalised decimal
-- text ('0.6', never '0.60'), so equal prices compare equal as text.
CREATE TABLE IF NOT EXISTS prices (
    id                          INTEGER PRIMARY KEY AUTOINCREMENT,
    provider                    TEXT NOT NULL,
    model                       TEXT NOT NULL,       -- the upstream model
    input_per_million           TEXT NOT NULL,
    output_per_million          TEXT NOT NULL,
    cached_input_per_million    TEXT,                -- NULL: the input price
    cache_write_per_million     TEXT,                -- NULL: the input price
    reasoning_per_million       TEXT,                -- NULL: the output price
    currency                    TEXT NOT NULL,
    effective_from              TEXT,                -- 'YYYY-MM-DD', first UTC day; NULL: always
    effective_to                TEXT,                -- first UTC day no longer in force; NULL: open
    first_seen_at               TEXT NOT NULL
);
-- One row per distinct price, so syncing the same config twice adds nothing. NULLs are mapped
-- to '', because a plain unique constraint treats two NULLs as different.
CREATE UNIQUE INDEX IF NOT EXISTS prices_identity ON prices (
    provider, model, IFNULL(effective_from, ''), currency,
    input_per_million, output_per_million,
    IFNULL(cached_input_per_million, ''), IFNULL(cache_write_per_million, ''),
    IFNULL(reasoning_per_million, '')
);

-- Prompt tokens written to the vendor's cache (Anthropic's cache_creation_input_tokens); part of
-- input_tokens, like cached_tokens. NULL on rows from before this migration.
ALTER TABLE usage_events ADD COLUMN cache_write_tokens INTEGER;
-- What the request cost, priced when it finished: exact decimal text with 12 places. NULL:
-- unknown (no usage, or no price for the target on that UTC day); never a silent 0.
ALTER TABLE usage_events ADD COLUMN cost TEXT;
-- cost rounded to 1e-9 as an integer: what the views sum, exactly.
ALTER TABLE usage_events ADD COLUMN cost_nanos INTEGER;
ALTER TABLE usage_events ADD COLUMN currency TEXT;
ALTER TABLE usage_events ADD COLUMN price_id INTEGER REFERENCES prices (id);
CREATE INDEX IF NOT EXISTS usage_events_time ON usage_events (created_at);

-- Spend per UTC day and per UTC month. Rows without a price have a NULL currency, so they make
-- lines of their own with a NULL cost; unpriced_requests counts them. cost is exact decimal
-- text with 9 places, made from the integer sum of cost_nanos.
CREATE VIEW IF NOT EXISTS spend_daily AS
SELECT
    day, project, team, business_line, provider, model, alias, currency, requests,
    input_tokens, output_tokens, cached_tokens, reasoning_tokens,
    CASE WHEN nanos IS NULL THEN NULL
         ELSE printf('%d.%09d', nanos / 1000000000, nanos % 1000000000) END AS cost,
    unpriced_requests
FROM (
    SELECT
        date(created_at) AS day,
        project,
        CAST(json_extract(tags, '$.team') AS TEXT) AS team,
        CAST(json_extract(tags, '$.business_line') AS TEXT) AS business_line,
        provider,
        upstream_model AS model,
        alias,
        currency,
        COUNT(*) AS requests,
        IFNULL(SUM(input_tokens), 0) AS input_tokens,
        IFNULL(SUM(output_tokens), 0) AS output_tokens,
        IFNULL(SUM(cached_tokens), 0) AS cached_tokens,
        IFNULL(SUM(reasoning_tokens), 0) AS reasoning_tokens,
        SUM(cost_nanos) AS nanos,
        COUNT(*) FILTER (
            WHERE cost IS NULL AND (input_tokens IS NOT NULL OR output_tokens IS NOT NULL)
        ) AS unpriced_requests
    FROM usage_events
    GROUP BY 1, 2, 3, 4, 5, 6, 7, 8
);

CREATE VIEW IF NOT EXISTS spend_monthly AS
SELECT
    month, project, team, business_line, provider, model, alias, currency, requests,
    input_tokens, output_tokens, cached_tokens, reasoning_tokens,
    CASE WHEN nanos IS NULL THEN NULL
         ELSE printf('%d.%09d', nanos / 1000000000, nanos % 1000000000) END AS cost,
    unpriced_requests
FROM (
    SELECT
        strftime('%Y-%m-01', created_at) AS month,
        project,
        CAST(json_extract(tags, '$.team') AS TEXT) AS team,
        CAST(json_extract(tags, '$.business_line') AS TEXT) AS business_line,
        provider,
        upstream_model AS model,
        alias,
        currency,
        COUNT(*) AS requests,
        IFNULL(SUM(input_tokens), 0) AS input_tokens,
        IFNULL(SUM(output_tokens), 0) AS output_tokens,
        IFNULL(SUM(cached_tokens), 0) AS cached_tokens,
        IFNULL(SUM(reasoning_tokens), 0) AS reasoning_tokens,
        SUM(cost_nanos) AS nanos,
        COUNT(*) FILTER (
            WHERE cost IS NULL AND (input_tokens IS NOT NULL OR output_tokens IS NOT NULL)
        ) AS unpriced_requests
    FROM usage_events
    GROUP BY 1, 2, 3, 4, 5, 6, 7, 8
);
