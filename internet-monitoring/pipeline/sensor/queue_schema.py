"""The queue file's tables and the SQL that creates them (schema version ``SCHEMA_VERSION``)."""

from __future__ import annotations

import sqlite3

SCHEMA_VERSION = "1"

CHUNK_COLUMNS = (
    "sequence, event_id, chunk_index, chunk_count, payload, chunk_sha256, event_sha256, "
    "created_at, logical_timestamp_ms, attributes, enqueued_at, nbytes"
)

# A queued chunk's columns after its sequence; a quarantined chunk keeps the same ones.
_CHUNK_FIELDS = """\
    event_id             TEXT    NOT NULL,
    chunk_index          INTEGER NOT NULL,
    chunk_count          INTEGER NOT NULL,
    payload              BLOB    NOT NULL,
    chunk_sha256         BLOB    NOT NULL,
    event_sha256         BLOB    NOT NULL,
    created_at           TEXT    NOT NULL,
    logical_timestamp_ms INTEGER NOT NULL,
    attributes           TEXT    NOT NULL,
    enqueued_at          REAL    NOT NULL,
    nbytes               INTEGER NOT NULL"""

SCHEMA_SQL = f"""
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS chunks (
    sequence             INTEGER PRIMARY KEY AUTOINCREMENT,
{_CHUNK_FIELDS}
);
CREATE INDEX IF NOT EXISTS chunks_enqueued_at ON chunks (enqueued_at);
CREATE INDEX IF NOT EXISTS chunks_event_id ON chunks (event_id, chunk_index);
CREATE TABLE IF NOT EXISTS quarantine (
    sequence             INTEGER PRIMARY KEY,
{_CHUNK_FIELDS},
    reason               TEXT    NOT NULL,
    quarantined_at       REAL    NOT NULL
);
CREATE TABLE IF NOT EXISTS dropped (
    reason TEXT PRIMARY KEY,
    chunks INTEGER NOT NULL DEFAULT 0,
    events INTEGER NOT NULL DEFAULT 0,
    bytes  INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS totals (
    id     INTEGER PRIMARY KEY CHECK (id = 1),
    chunks INTEGER NOT NULL,
    bytes  INTEGER NOT NULL
);
INSERT OR IGNORE INTO totals (id, chunks, bytes)
    SELECT 1, COUNT(*), COALESCE(SUM(nbytes), 0) FROM chunks;
CREATE TRIGGER IF NOT EXISTS chunks_totals_insert AFTER INSERT ON chunks BEGIN
    UPDATE totals SET chunks = chunks + 1, bytes = bytes + NEW.nbytes WHERE id = 1;
END;
CREATE TRIGGER IF NOT EXISTS chunks_totals_delete AFTER DELETE ON chunks BEGIN
    UPDATE totals SET chunks = chunks - 1, bytes = bytes - OLD.nbytes WHERE id = 1;
END;
"""


INSERT_CHUNK_SQL = (f"INSERT INTO chunks ({CHUNK_COLUMNS}) "
                 "VALUES (NULL, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")


def run_script(conn: sqlite3.Connection, script: str) -> None:
    """Run DDL statement by statement: ``executescript`` would COMMIT our transaction."""
    for statement in split_statements(script):
        conn.execute(statement)


def split_statements(script: str) -> list[str]:
    statements: list[str] = []
    buffer = ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            statements.append(buffer.strip())
            buffer = ""
    if buffer.strip():
        statements.append(buffer.strip())
    return statements
