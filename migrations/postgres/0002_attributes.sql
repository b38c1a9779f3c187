-- Credential attributes and scopes (SPEC §7.1). Existing credentials keep working as they
-- did: every one gets every scope ("*") and an empty meta; the rest stays null.
-- scopes: space-separated, sorted, like OAuth's `scope` (RFC 6749 §3.3).

ALTER TABLE api_credential
    ADD COLUMN name          text,
    ADD COLUMN owner         text COLLATE "C",
    ADD COLUMN meta          jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(meta) = 'object'),
    ADD COLUMN scopes        text  NOT NULL DEFAULT '*',
    ADD COLUMN expires_at    timestamptz,
    ADD COLUMN last_used_at  timestamptz,
    ADD COLUMN master_key_id text COLLATE "C";

CREATE INDEX api_credential_by_owner ON api_credential (owner, api_key) WHERE owner IS NOT NULL;
CREATE INDEX api_credential_by_master_key ON api_credential (master_key_id, api_key)
    WHERE master_key_id IS NOT NULL;

-- A change of what a cached authentication holds (scopes, expiry, owner) is announced like a
-- revocation, whoever makes it.
DROP TRIGGER api_credential_notify_active ON api_credential;

CREATE TRIGGER api_credential_notify_change
AFTER UPDATE ON api_credential
FOR EACH ROW WHEN (
       OLD.active     IS DISTINCT FROM NEW.active
    OR OLD.scopes     IS DISTINCT FROM NEW.scopes
    OR OLD.expires_at IS DISTINCT FROM NEW.expires_at
    OR OLD.owner      IS DISTINCT FROM NEW.owner
)
EXECUTE FUNCTION api_credential_notify();
