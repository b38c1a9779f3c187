-- Credential attributes and scopes (SPEC §7.1). Existing credentials keep working as they
-- did: every one gets every scope ("*") and an empty meta; the rest stays null.
-- scopes: space-separated, sorted, like OAuth's `scope` (RFC 6749 §3.3).
-- Timestamps are text in one format, '%Y-%m-%dT%H:%M:%fZ', so they compare as text.

ALTER TABLE api_credential ADD COLUMN name TEXT;
ALTER TABLE api_credential ADD COLUMN owner TEXT;
ALTER TABLE api_credential ADD COLUMN meta TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(meta) AND json_type(meta) = 'object');
ALTER TABLE api_credential ADD COLUMN scopes TEXT NOT NULL DEFAULT '*';
ALTER TABLE api_credential ADD COLUMN expires_at TEXT;
ALTER TABLE api_credential ADD COLUMN last_used_at TEXT;
ALTER TABLE api_credential ADD COLUMN master_key_id TEXT;

CREATE INDEX api_credential_by_owner ON api_credential (owner, api_key) WHERE owner IS NOT NULL;
CREATE INDEX api_credential_by_master_key ON api_credential (master_key_id, api_key)
    WHERE master_key_id IS NOT NULL;

-- A change of what a cached authentication holds reaches every cache like a revocation.
CREATE TRIGGER api_credential_attributes_changed
AFTER UPDATE OF scopes, expires_at, owner ON api_credential
WHEN OLD.scopes IS NOT NEW.scopes
  OR OLD.expires_at IS NOT NEW.expires_at
  OR OLD.owner IS NOT NEW.owner
BEGIN
    INSERT INTO api_credential_change (api_key) VALUES (NEW.api_key);
END;
