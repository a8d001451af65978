-- Budgets: spending limits per project and per API key, per UTC day and UTC month
-- (crates/gateway-business/src/budget.rs). Amounts are integer nano-USD (1 USD =
-- 1000000000), exact and summable in SQL. key_id '' is the project's own budget; any other
-- value is the budget of that key of the project. period is 'day' or 'month', period_start
-- the day itself or the first day of the month ('YYYY-MM-DD'): a new period is a new row, so
-- it starts from zero, and past periods stay as a record of what was spent.

-- What each budget has spent in a period: settled costs only.
CREATE TABLE IF NOT EXISTS budget_spend (
    project       TEXT NOT NULL,
    key_id        TEXT NOT NULL,
    period        TEXT NOT NULL,
    period_start  TEXT NOT NULL,
    spent_nanos   INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (project, key_id, period, period_start)
);

-- Money set aside for requests in flight, one row per reservation and budget. A row counts
-- only while expires_at_ms (Unix milliseconds) is ahead, so a gateway that died mid-request
-- cannot hold a budget for longer than the reservation TTL.
CREATE TABLE IF NOT EXISTS budget_reservations (
    reservation_id  TEXT NOT NULL,
    project         TEXT NOT NULL,
    key_id          TEXT NOT NULL,
    period          TEXT NOT NULL,
    period_start    TEXT NOT NULL,
    amount_nanos    INTEGER NOT NULL,
    expires_at_ms   INTEGER NOT NULL,
    PRIMARY KEY (reservation_id, project, key_id, period, period_start)
);
CREATE INDEX IF NOT EXISTS budget_reservations_budget
    ON budget_reservations (project, key_id, period, period_start, expires_at_ms);
CREATE INDEX IF NOT EXISTS budget_reservations_expiry ON budget_reservations (expires_at_ms);

-- Alerts already sent: the primary key makes each threshold fire once per budget and period.
CREATE TABLE IF NOT EXISTS budget_alerts (
    project            TEXT NOT NULL,
    key_id             TEXT NOT NULL,
    period             TEXT NOT NULL,
    period_start       TEXT NOT NULL,
    threshold_percent  INTEGER NOT NULL,
    limit_nanos        INTEGER NOT NULL,
    spent_nanos        INTEGER NOT NULL,   -- when the threshold was crossed
    fired_at           TEXT NOT NULL,      -- RFC 3339, UTC
    PRIMARY KEY (project, key_id, period, period_start, threshold_percent)
);
