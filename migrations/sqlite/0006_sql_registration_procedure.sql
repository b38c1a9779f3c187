-- Registrations made by SQL, recorded by one procedure instead of two triggers on the
-- service's path, with what is recorded unchanged.
--
-- An AFTER INSERT trigger costs every insert into its table a frame as large as the
-- trigger's whole program, and a statement journal, also when its WHEN clause is false:
-- for the service's own registrations, `api_credential_audit_insert` (with the scopes
-- expression in its body) and `api_credential_event_registration` (on each event insert)
-- were about a sixth of the writer's instructions, for nothing they wrote.
--
-- Now the trigger on `api_credential` only passes a row made by SQL to the view
-- `credgate_sql_registration`, whose INSTEAD OF trigger writes its event and points the row
-- at it, as the two triggers did. The event table has no trigger on insert.

DROP TRIGGER api_credential_event_registration;
DROP TRIGGER api_credential_audit_insert;

-- A procedure: the view never has rows; inserting into it runs the trigger below.
CREATE VIEW credgate_sql_registration (api_key, scopes) AS SELECT NULL, NULL WHERE 0;

-- Space-separated scopes as a JSON array, as in 0004 (a stored value that cannot be one is
-- kept as a string). `last_insert_rowid()` is the event's id: inside a trigger it names
-- the trigger's own last insert.
CREATE TRIGGER credgate_sql_registration
INSTEAD OF INSERT ON credgate_sql_registration
BEGIN
    INSERT INTO api_credential_event (api_key, event, source, detail)
    VALUES (NEW.api_key, 'registered', 'sql', json_object(
        'scopes', CASE
            WHEN json_valid('["' || replace(replace(replace(NEW.scopes, '\', '\\'), '"', '\"'), ' ', '","') || '"]')
            THEN json('["' || replace(replace(replace(NEW.scopes, '\', '\\'), '"', '\"'), ' ', '","') || '"]')
            ELSE NEW.scopes END));
    UPDATE api_credential SET registered_event = last_insert_rowid()
     WHERE api_key = NEW.api_key;
END;

CREATE TRIGGER api_credential_audit_insert
AFTER INSERT ON api_credential
WHEN NOT EXISTS (SELECT 1 FROM credgate_audit_writer)
BEGIN
    INSERT INTO credgate_sql_registration (api_key, scopes) VALUES (NEW.api_key, NEW.scopes);
END;
