-- The audit log (SPEC §8.5): one row per change of a credential, written in the transaction
-- of the change. The service writes its own events (source api or cli, with the actor and
-- the client) on connections that set `credgate.audit = service`; the trigger below records
-- every change made on any other connection (source sql). Events are never updated;
-- `credgate audit prune` is the only delete.
CREATE TABLE api_credential_event (
    id      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    api_key text COLLATE "C" NOT NULL,
    event   text NOT NULL
            CHECK (event IN ('registered', 'issued', 'updated', 'rolled', 'revoked', 'deleted')),
    actor   text,
    source  text NOT NULL CHECK (source IN ('api', 'cli', 'sql')),
    detail  jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(detail) = 'object')
);

CREATE INDEX api_credential_event_by_key ON api_credential_event (api_key, id);
CREATE INDEX api_credential_event_by_time ON api_credential_event (at);

CREATE FUNCTION api_credential_event_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'credgate: audit events cannot be changed';
END;
$$;

CREATE TRIGGER api_credential_event_append_only
BEFORE UPDATE ON api_credential_event
FOR EACH ROW EXECUTE FUNCTION api_credential_event_append_only();

CREATE FUNCTION api_credential_audit() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    changed jsonb := '{}';
BEGIN
    IF current_setting('credgate.audit', true) IS NOT DISTINCT FROM 'service' THEN
        RETURN NULL;
    END IF;
    IF TG_OP = 'INSERT' THEN
        INSERT INTO api_credential_event (api_key, event, source, detail)
        VALUES (NEW.api_key, 'registered', 'sql',
                jsonb_build_object('scopes', to_jsonb(string_to_array(NEW.scopes, ' '))));
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO api_credential_event (api_key, event, source)
        VALUES (OLD.api_key, 'deleted', 'sql');
    ELSE
        IF OLD.active AND NOT NEW.active THEN
            INSERT INTO api_credential_event (api_key, event, source)
            VALUES (NEW.api_key, 'revoked', 'sql');
        END IF;
        IF OLD.name IS DISTINCT FROM NEW.name THEN
            changed := changed || jsonb_build_object('name', NEW.name);
        END IF;
        IF OLD.owner IS DISTINCT FROM NEW.owner THEN
            changed := changed || jsonb_build_object('owner', NEW.owner);
        END IF;
        IF OLD.meta IS DISTINCT FROM NEW.meta THEN
            changed := changed || jsonb_build_object('meta', NEW.meta);
        END IF;
        IF OLD.scopes IS DISTINCT FROM NEW.scopes THEN
            changed := changed
                || jsonb_build_object('scopes', to_jsonb(string_to_array(NEW.scopes, ' ')));
        END IF;
        IF OLD.expires_at IS DISTINCT FROM NEW.expires_at THEN
            changed := changed || jsonb_build_object('expires_at',
                to_char(NEW.expires_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'));
        END IF;
        IF changed <> '{}' THEN
            INSERT INTO api_credential_event (api_key, event, source, detail)
            VALUES (NEW.api_key, 'updated', 'sql', jsonb_build_object('changed', changed));
        END IF;
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER api_credential_audit
AFTER INSERT OR UPDATE OR DELETE ON api_credential
FOR EACH ROW EXECUTE FUNCTION api_credential_audit();
