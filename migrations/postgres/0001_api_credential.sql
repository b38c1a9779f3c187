-- credgate schema v1 (PostgreSQL). No secret and no hash of a secret is ever stored.

CREATE TABLE api_credential (
    -- COLLATE "C": byte order, the same order as on SQLite, whatever the database locale.
    api_key    text COLLATE "C" PRIMARY KEY,
    active     boolean     NOT NULL DEFAULT true,
    created_at timestamptz NOT NULL DEFAULT now(),
    revoked_at timestamptz,
    revoked_by text
);

-- Revocation is permanent, a key is an identity, and revoked_at is set here so that direct
-- SQL (UPDATE api_credential SET active = false ...) records it too.
CREATE FUNCTION api_credential_guard_update() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.api_key IS DISTINCT FROM OLD.api_key THEN
        RAISE EXCEPTION 'credgate: api_key cannot be changed';
    END IF;
    IF NOT OLD.active AND NEW.active THEN
        RAISE EXCEPTION 'credgate: a revoked credential cannot be reactivated';
    END IF;
    IF OLD.active AND NOT NEW.active THEN
        NEW.revoked_at := clock_timestamp();
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER api_credential_guard_update
BEFORE UPDATE ON api_credential
FOR EACH ROW EXECUTE FUNCTION api_credential_guard_update();

-- A revoked key must never be registered again, so its row is kept forever.
CREATE FUNCTION api_credential_keep_revoked() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT OLD.active THEN
        RAISE EXCEPTION 'credgate: revoked credentials are kept so they can never come back';
    END IF;
    RETURN OLD;
END;
$$;

CREATE TRIGGER api_credential_keep_revoked
BEFORE DELETE ON api_credential
FOR EACH ROW EXECUTE FUNCTION api_credential_keep_revoked();

-- Every change of `active` (and a row deleted by hand) is announced on the channel
-- credgate_credential_changed with the api_key as payload; every instance LISTENs and drops
-- the key from its cache. Delivered at commit, whoever made the change.
CREATE FUNCTION api_credential_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('credgate_credential_changed', OLD.api_key);
    RETURN NULL;
END;
$$;

CREATE TRIGGER api_credential_notify_active
AFTER UPDATE OF active ON api_credential
FOR EACH ROW WHEN (OLD.active IS DISTINCT FROM NEW.active)
EXECUTE FUNCTION api_credential_notify();

CREATE TRIGGER api_credential_notify_delete
AFTER DELETE ON api_credential
FOR EACH ROW EXECUTE FUNCTION api_credential_notify();
