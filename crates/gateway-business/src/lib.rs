//! Business layer: the usage record of every request, written to SQLite or Postgres.
