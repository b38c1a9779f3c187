-- credgate schema v1 (SQLite). No secret and no hash of a secret is ever stored.

CREATE TABLE api_credential (
    api_key    TEXT    NOT NULL PRIMARY KEY,
    active     BOOLEAN NOT NULL DEFAULT 1 CHECK (active IN (0, 1)),
    created_at TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    revoked_at TEXT,
    revoked_by TEXT
) WITHOUT ROWID;

-- Every change of a credential that must reach caches (revocation, a row deleted by hand),
-- in commit order. Each credgate instance polls it (gated by PRAGMA data_version) and drops
-- the named keys from its authentication cache.
CREATE TABLE api_credential_change (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    api_key    TEXT    NOT NULL,
    changed_at TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);

-- Revocation is permanent: the database itself refuses to turn a credential back on.
CREATE TRIGGER api_credential_no_reactivation
BEFORE UPDATE OF active ON api_credential
WHEN OLD.active = 0 AND NEW.active <> 0
BEGIN
    SELECT RAISE(ABORT, 'credgate: a revoked credential cannot be reactivated');
END;

-- A key is an identity; renaming a row would move its revocation state to another key.
CREATE TRIGGER api_credential_key_immutable
BEFORE UPDATE OF api_key ON api_credential
WHEN OLD.api_key <> NEW.api_key
BEGIN
    SELECT RAISE(ABORT, 'credgate: api_key cannot be changed');
END;

-- A revoked key must never be registered again, so its row is kept forever.
CREATE TRIGGER api_credential_keep_revoked
BEFORE DELETE ON api_credential
WHEN OLD.active = 0
BEGIN
    SELECT RAISE(ABORT, 'credgate: revoked credentials are kept so they can never come back');
END;

-- revoked_at is set here, so direct SQL (UPDATE ... SET active = 0) records it too.
CREATE TRIGGER api_credential_revoked
AFTER UPDATE OF active ON api_credential
WHEN OLD.active <> 0 AND NEW.active = 0
BEGIN
    UPDATE api_credential
       SET revoked_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
     WHERE api_key = NEW.api_key;
    INSERT INTO api_credential_change (api_key) VALUES (NEW.api_key);
END;

CREATE TRIGGER api_credential_deleted
AFTER DELETE ON api_credential
BEGIN
    INSERT INTO api_credential_change (api_key) VALUES (OLD.api_key);
END;
