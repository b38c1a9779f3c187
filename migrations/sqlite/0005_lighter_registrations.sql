-- The audit log's per-row costs on the registration path, with what it accepts unchanged.
--
-- 1. The event table's CHECKs as comparisons: SQLite builds a temporary B-tree for an
--    `IN (...)` list of more than two constants on every execution of an INSERT, which made
--    the two lists a large share of a registration's work. A CHECK cannot be changed in
--    place, so the table is rebuilt (its ids, and the AUTOINCREMENT counter, are kept).
-- 2. A credential's `registered_event` is stamped by the trigger only for rows written by
--    SQL. The service inserts its registration event first and the credential row with the
--    event's id, so the row is written once, not written and then updated.
-- 3. No index on the master key id: no query used it (the listing reads the table in key
--    order and filters), and each registration paid a random page write for it.

-- Rename without rewriting the triggers of api_credential, which insert into this table by
-- name: they go on naming the rebuilt table.
PRAGMA legacy_alter_table = ON;
ALTER TABLE api_credential_event RENAME TO api_credential_event_v4;
PRAGMA legacy_alter_table = OFF;

CREATE TABLE api_credential_event (
    -- AUTOINCREMENT: an id is never reused after a prune, so a reader's cursor stays valid.
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    at      TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    api_key TEXT    NOT NULL,
    event   TEXT    NOT NULL
            CHECK (event = 'registered' OR event = 'issued' OR event = 'updated'
                   OR event = 'rolled' OR event = 'revoked' OR event = 'deleted'),
    actor   TEXT,
    source  TEXT    NOT NULL CHECK (source = 'api' OR source = 'cli' OR source = 'sql'),
    detail  TEXT    NOT NULL DEFAULT '{}'
            CHECK (json_valid(detail) AND json_type(detail) = 'object')
);

INSERT INTO api_credential_event (id, at, api_key, event, actor, source, detail)
    SELECT id, at, api_key, event, actor, source, detail FROM api_credential_event_v4
    ORDER BY id;

-- The counter, not the largest id kept: after a prune of every event they differ.
DELETE FROM sqlite_sequence WHERE name = 'api_credential_event';
INSERT INTO sqlite_sequence (name, seq)
    SELECT 'api_credential_event', seq FROM sqlite_sequence
    WHERE name = 'api_credential_event_v4';

-- Its indexes and triggers go with it.
DROP TABLE api_credential_event_v4;

CREATE INDEX api_credential_event_by_time ON api_credential_event (at);

-- See 0004: the registration event is found from the credential's row.
CREATE INDEX api_credential_event_by_key ON api_credential_event (api_key, id)
    WHERE event NOT IN ('registered', 'issued');

-- Registrations made by SQL; the service stamps its own rows as it writes them.
CREATE TRIGGER api_credential_event_registration
AFTER INSERT ON api_credential_event
WHEN NEW.source = 'sql' AND NEW.event IN ('registered', 'issued')
BEGIN
    UPDATE api_credential SET registered_event = NEW.id WHERE api_key = NEW.api_key;
END;

CREATE TRIGGER api_credential_event_append_only
BEFORE UPDATE ON api_credential_event
BEGIN
    SELECT RAISE(ABORT, 'credgate: audit events cannot be changed');
END;

DROP INDEX api_credential_by_master_key;
