-- The audit log (SPEC §8.5): one row per change of a credential, written in the transaction
-- of the change. The service writes its own events (source api or cli, with the actor and
-- the client); the triggers below record every change made in the database directly
-- (source sql). Events are never updated; `credgate audit prune` is the only delete.
CREATE TABLE api_credential_event (
    -- AUTOINCREMENT: an id is never reused after a prune, so a reader's cursor stays valid.
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    at      TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    api_key TEXT    NOT NULL,
    event   TEXT    NOT NULL
            CHECK (event IN ('registered', 'issued', 'updated', 'rolled', 'revoked', 'deleted')),
    actor   TEXT,
    source  TEXT    NOT NULL CHECK (source IN ('api', 'cli', 'sql')),
    detail  TEXT    NOT NULL DEFAULT '{}'
            CHECK (json_valid(detail) AND json_type(detail) = 'object')
);

CREATE INDEX api_credential_event_by_time ON api_credential_event (at);

-- A credential's events, found without an index entry per registration: an index on
-- (api_key, id) over every event puts one more random page write into each registration's
-- commit, which halves the durable registration rate. Later events (few) are indexed; the
-- registration event is found from the credential's row, which its transaction writes
-- anyway (and from a `deleted` event, for a row deleted by SQL).
CREATE INDEX api_credential_event_by_key ON api_credential_event (api_key, id)
    WHERE event NOT IN ('registered', 'issued');

ALTER TABLE api_credential ADD COLUMN registered_event INTEGER;

CREATE TRIGGER api_credential_event_registration
AFTER INSERT ON api_credential_event
WHEN NEW.event IN ('registered', 'issued')
BEGIN
    UPDATE api_credential SET registered_event = NEW.id WHERE api_key = NEW.api_key;
END;

CREATE TRIGGER api_credential_event_append_only
BEFORE UPDATE ON api_credential_event
BEGIN
    SELECT RAISE(ABORT, 'credgate: audit events cannot be changed');
END;

-- Holds one row only inside the service's own write transactions (inserted after BEGIN,
-- deleted before COMMIT, so no other connection ever sees it): the service records its
-- changes itself, and the triggers record everyone else's.
CREATE TABLE credgate_audit_writer (
    id INTEGER NOT NULL PRIMARY KEY CHECK (id = 1)
);

-- Space-separated scopes as a JSON array; a stored value that cannot be one (SQL can store
-- anything) is kept as a string.
-- (SQLite has no functions in SQL, so the expression is repeated where it is needed.)

CREATE TRIGGER api_credential_audit_insert
AFTER INSERT ON api_credential
WHEN NOT EXISTS (SELECT 1 FROM credgate_audit_writer)
BEGIN
    INSERT INTO api_credential_event (api_key, event, source, detail)
    VALUES (NEW.api_key, 'registered', 'sql', json_object(
        'scopes', CASE
            WHEN json_valid('["' || replace(replace(replace(NEW.scopes, '\', '\\'), '"', '\"'), ' ', '","') || '"]')
            THEN json('["' || replace(replace(replace(NEW.scopes, '\', '\\'), '"', '\"'), ' ', '","') || '"]')
            ELSE NEW.scopes END));
END;

CREATE TRIGGER api_credential_audit_revoke
AFTER UPDATE OF active ON api_credential
WHEN OLD.active <> 0 AND NEW.active = 0
 AND NOT EXISTS (SELECT 1 FROM credgate_audit_writer)
BEGIN
    INSERT INTO api_credential_event (api_key, event, source)
    VALUES (NEW.api_key, 'revoked', 'sql');
END;

-- `changed`: each changed attribute with its new value (json_remove drops the unchanged
-- ones; removing a path that is absent changes nothing).
CREATE TRIGGER api_credential_audit_update
AFTER UPDATE OF name, owner, meta, scopes, expires_at ON api_credential
WHEN (OLD.name IS NOT NEW.name OR OLD.owner IS NOT NEW.owner OR OLD.meta IS NOT NEW.meta
      OR OLD.scopes IS NOT NEW.scopes OR OLD.expires_at IS NOT NEW.expires_at)
 AND NOT EXISTS (SELECT 1 FROM credgate_audit_writer)
BEGIN
    INSERT INTO api_credential_event (api_key, event, source, detail)
    VALUES (NEW.api_key, 'updated', 'sql', json_object('changed', json_remove(
        json_object(
            'name', NEW.name,
            'owner', NEW.owner,
            'meta', CASE WHEN json_valid(NEW.meta) THEN json(NEW.meta) ELSE NEW.meta END,
            'scopes', CASE
                WHEN json_valid('["' || replace(replace(replace(NEW.scopes, '\', '\\'), '"', '\"'), ' ', '","') || '"]')
                THEN json('["' || replace(replace(replace(NEW.scopes, '\', '\\'), '"', '\"'), ' ', '","') || '"]')
                ELSE NEW.scopes END,
            'expires_at', NEW.expires_at),
        CASE WHEN OLD.name IS NEW.name THEN '$.name' ELSE '$.-' END,
        CASE WHEN OLD.owner IS NEW.owner THEN '$.owner' ELSE '$.-' END,
        CASE WHEN OLD.meta IS NEW.meta THEN '$.meta' ELSE '$.-' END,
        CASE WHEN OLD.scopes IS NEW.scopes THEN '$.scopes' ELSE '$.-' END,
        CASE WHEN OLD.expires_at IS NEW.expires_at THEN '$.expires_at' ELSE '$.-' END)));
END;

CREATE TRIGGER api_credential_audit_delete
AFTER DELETE ON api_credential
WHEN NOT EXISTS (SELECT 1 FROM credgate_audit_writer)
BEGIN
    INSERT INTO api_credential_event (api_key, event, source, detail)
    VALUES (OLD.api_key, 'deleted', 'sql', json_object('registered_event', OLD.registered_event));
END;
