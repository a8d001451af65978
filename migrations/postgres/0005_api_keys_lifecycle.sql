-- Keys created in the database (`gateway keys create`, POST /admin/keys) next to the config's.
-- Only the SHA-256 of a secret is stored; display_prefix is the start of the secret
-- (`sk-gw-1a2b3c…`), enough to recognise a key in a list and useless to guess it.
-- A database key is one with a display_prefix; created_by says who made it ('cli', 'admin').
ALTER TABLE api_keys ADD COLUMN IF NOT EXISTS name TEXT;
ALTER TABLE api_keys ADD COLUMN IF NOT EXISTS display_prefix TEXT;
-- JSON array of the aliases the key may use (within its project's); NULL: the project's.
ALTER TABLE api_keys ADD COLUMN IF NOT EXISTS models JSONB;
ALTER TABLE api_keys ADD COLUMN IF NOT EXISTS created_at TIMESTAMPTZ;
-- Last change of the row (created, revoked, rotated): for lists and audits.
ALTER TABLE api_keys ADD COLUMN IF NOT EXISTS updated_at TIMESTAMPTZ;
-- Set on a rotated key: the key that replaced it. expires_at then holds the end of the grace.
ALTER TABLE api_keys ADD COLUMN IF NOT EXISTS rotated_to TEXT;
-- Database key ids are random and named alone on the command line and the admin API.
CREATE UNIQUE INDEX IF NOT EXISTS api_keys_db_key_id ON api_keys (key_id)
    WHERE display_prefix IS NOT NULL;

-- One row whose version is bumped, under its row lock, by every change to a database key.
-- Replicas poll it (one row) and reload the active keys only when it moved: exact whatever the
-- writers' clocks say, and the lock orders concurrent changes so none is missed.
CREATE TABLE IF NOT EXISTS api_key_changes (
    id       INTEGER PRIMARY KEY CHECK (id = 1),
    version  BIGINT NOT NULL
);
INSERT INTO api_key_changes (id, version) VALUES (1, 0) ON CONFLICT (id) DO NOTHING;
