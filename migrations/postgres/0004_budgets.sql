-- Budgets: spending limits per project and per API key, per UTC day and UTC month, shared by
-- every gateway replica (crates/gateway-business/src/budget.rs). Amounts are exact USD.
-- key_id '' is the project's own budget; any other value is the budget of that key of the
-- project (key ids are unique within a project only). period is 'day' or 'month', and
-- period_start the day itself or the first day of the month: a new period is a new row, so
-- it starts from zero, and past periods stay as a record of what was spent.

-- What each budget has spent in a period: settled costs only. The row is also what a
-- reservation locks (in the same order on every replica), so checks of one budget never race.
CREATE TABLE IF NOT EXISTS budget_spend (
    project       TEXT NOT NULL,
    key_id        TEXT NOT NULL,
    period        TEXT NOT NULL,
    period_start  DATE NOT NULL,
    spent_usd     NUMERIC NOT NULL DEFAULT 0,
    PRIMARY KEY (project, key_id, period, period_start)
);

-- Money set aside for requests in flight, one row per reservation and budget. A row counts
-- only while expires_at is ahead: a replica that died mid-request cannot hold a budget for
-- longer than the reservation TTL. Settling deletes the rows; expired ones are deleted by any
-- replica at any time (they no longer count, so no lock is needed).
CREATE TABLE IF NOT EXISTS budget_reservations (
    reservation_id  UUID NOT NULL,
    project         TEXT NOT NULL,
    key_id          TEXT NOT NULL,
    period          TEXT NOT NULL,
    period_start    DATE NOT NULL,
    amount_usd      NUMERIC NOT NULL,
    expires_at      TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (reservation_id, project, key_id, period, period_start)
);
CREATE INDEX IF NOT EXISTS budget_reservations_budget
    ON budget_reservations (project, key_id, period, period_start, expires_at);
CREATE INDEX IF NOT EXISTS budget_reservations_expiry ON budget_reservations (expires_at);

-- Alerts already sent: the primary key makes each threshold fire once per budget and period,
-- whichever replica gets there first.
CREATE TABLE IF NOT EXISTS budget_alerts (
    project            TEXT NOT NULL,
    key_id             TEXT NOT NULL,
    period             TEXT NOT NULL,
    period_start       DATE NOT NULL,
    threshold_percent  INTEGER NOT NULL,
    limit_usd          NUMERIC NOT NULL,
    spent_usd          NUMERIC NOT NULL,   -- when the threshold was crossed
    fired_at           TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (project, key_id, period, period_start, threshold_percent)
);
