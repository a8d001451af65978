-- Keys created in the database (`gateway keys create`, POST /admin/keys) next to the config's.
-- Only the SHA-256 of a secret is stored; display_prefix is the start of the secret
-- (`sk-gw-1a2b3c…`), enough to recognise a key in a list and useless to guess it.
-- A database key is one with a display_prefix; created_by says who made it ('cli', 'admin').
ALTER TABLE api_keys ADD COLUMN name TEXT;
ALTER TABLE api_keys ADD COLUMN display_prefix TEXT;
-- JSON array of the aliases the key may use (within its project's); NULL: the project's.
ALTER TABLE api_keys ADD COLUMN models TEXT;
ALTER TABLE api_keys ADD COLUMN created_at TEXT;                 -- RFC 3339, UTC
-- Last change of the row (created, revoked, rotated): for lists and audits.
ALTER TABLE api_keys ADD COLUMN updated_at TEXT;
-- Set on a rotated key: the key that replaced it. expires_at then holds the end of the grace.
ALTER TABLE api_keys ADD COLUMN rotated_to TEXT;
-- Database key ids are random and named alone on the command line and the admin API.
CREATE UNIQUE INDEX IF NOT EXISTS api_keys_db_key_id ON api_keys (key_id)
    WHERE display_prefix IS NOT NULL;

-- One row whose version is bumped by every change to a database key, in the change's own
-- transaction. Replicas poll it (one row) and reload the active keys only when it moved.
CREATE TABLE IF NOT EXISTS api_key_changes (
    id       INTEGER PRIMARY KEY CHECK (id = 1),
    version  INTEGER NOT NULL
);
INSERT OR IGNORE INTO api_key_changes (id, version) VALUES (1, 0);
