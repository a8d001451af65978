#!/usr/bin/env bash
# Runs every test: the Rust workspace (unit and integration tests, against real SQLite and
# PostgreSQL and the in-repo mock upstream), then the end-to-end suite that drives the gateway
# with the official OpenAI Python SDK. Starts PostgreSQL and Redis first if needed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/services.sh

# Databases left by earlier runs of the Postgres tests (each test makes its own).
if [ -z "${GATEWAY_TEST_POSTGRES_URL:-}" ]; then
  for db in $(psql -h 127.0.0.1 -U postgres -d postgres -tAc \
      "SELECT datname FROM pg_database WHERE datname LIKE 'gw\_test\_%' OR datname LIKE 'gw\_late\_%'"); do
    psql -h 127.0.0.1 -U postgres -d postgres -qc "DROP DATABASE IF EXISTS \"$db\"" || true
  done
fi

echo "== cargo test"
cargo test --workspace --locked

echo "== end-to-end: official OpenAI Python SDK"
cargo build --locked -p gateway-bin -p gateway-test-support
venv=target/e2e-venv
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check -r tests/e2e/requirements.txt
# Real client tools (tests/e2e/test_tools_*.py): Claude Code from npm, pinned in
# tests/e2e/package.json. Installed when missing or not the pinned version.
pinned=$(node -p "require('./tests/e2e/package.json').devDependencies['@anthropic-ai/claude-code']")
installed=$(node -p "try { require('./tests/e2e/node_modules/@anthropic-ai/claude-code/package.json').version } catch { '' }")
if [ "$installed" != "$pinned" ] || [ ! -x tests/e2e/node_modules/.bin/claude ]; then
  (cd tests/e2e && npm ci --no-audit --no-fund)
fi
GATEWAY_BIN="$PWD/target/debug/gateway" MOCK_UPSTREAM_BIN="$PWD/target/debug/mock-upstream" \
  "$venv/bin/python" -m pytest tests/e2e -p no:cacheprovider -q
