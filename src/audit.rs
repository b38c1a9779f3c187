//! The audit log (SPEC §8.5): who changed which credential, how, and from where. Each event
//! is written by the store in the transaction of the change it records; changes made in the
//! database directly are recorded by the schema's triggers, with source `sql`.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde::ser::{SerializeMap, Serializer};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::attributes::format_time;
use crate::credential::ApiKey;
use crate::store::{CredentialRecord, NewCredential, Update};

/// What happened to a credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// Registered by its holder (`POST /credentials`) or inserted by SQL.
    Registered,
    /// Minted and registered by the service (`POST /credentials/issue`, the new key of a roll).
    Issued,
    /// Attributes changed.
    Updated,
    /// Replaced by a new key; it expires at the end of the grace period.
    Rolled,
    /// Revoked.
    Revoked,
    /// Its row was deleted by SQL (only an active credential's row can be).
    Deleted,
}

impl EventKind {
    /// The name stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Registered => "registered",
            Self::Issued => "issued",
            Self::Updated => "updated",
            Self::Rolled => "rolled",
            Self::Revoked => "revoked",
            Self::Deleted => "deleted",
        }
    }
}

/// Where a change came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The HTTP API.
    Api,
    /// The `credgate` command line, straight on the database.
    Cli,
}

impl Source {
    fn as_str(self) -> &'static str {
        match self {
            Self::Api => "api",
            Self::Cli => "cli",
        }
    }
}

/// Who makes a change and from where: recorded with every event the change writes.
#[derive(Debug, Clone)]
pub struct Origin {
    /// The authenticated credential, if any (open registration has none, nor has the CLI).
    pub actor: Option<ApiKey>,
    /// API or command line.
    pub source: Source,
    /// The client's address, of an API call (formatted once per connection).
    client: Option<Arc<str>>,
    /// The request's id, of an API call.
    request_id: Option<String>,
    /// More context for each event's `detail`: a reason, say.
    context: Map<String, Value>,
}

impl Origin {
    /// A change made through the API by `actor`, for the client at `client`, in request
    /// `request_id`.
    pub fn api(actor: Option<ApiKey>, client: Option<Arc<str>>, request_id: String) -> Self {
        Self {
            actor,
            source: Source::Api,
            client,
            request_id: Some(request_id),
            context: Map::new(),
        }
    }

    /// A change made by the command line.
    pub fn cli() -> Self {
        Self {
            actor: None,
            source: Source::Cli,
            client: None,
            request_id: None,
            context: Map::new(),
        }
    }

    /// Adds one field to the context. (Its name is none of an event's own fields, nor
    /// `client` or `request_id`.)
    pub fn with(mut self, field: &str, value: impl Into<Value>) -> Self {
        self.context.insert(field.into(), value.into());
        self
    }

    /// The event `kind` of `api_key`, with `fields` plus this origin's context as its detail,
    /// written as JSON once, here.
    pub(crate) fn event(
        &self,
        api_key: &ApiKey,
        kind: EventKind,
        fields: impl Fields,
    ) -> Result<NewEvent, serde_json::Error> {
        Ok(NewEvent {
            api_key: api_key.as_str().to_owned(),
            event: kind.as_str(),
            actor: self.actor.as_ref().map(|k| k.as_str().to_owned()),
            source: self.source.as_str(),
            detail: serde_json::value::to_raw_value(&Detail {
                fields,
                origin: self,
            })?,
        })
    }

    /// The event of a registration (or issuance) of `new`.
    pub(crate) fn registered(&self, new: &NewCredential) -> Result<NewEvent, serde_json::Error> {
        let kind = if new.issued {
            EventKind::Issued
        } else {
            EventKind::Registered
        };
        let attributes = Attributes {
            scopes: new.scopes.as_slice(),
            name: new.name.as_deref(),
            owner: new.owner.as_deref(),
            expires_at: new.expires_at.as_ref(),
            master_key_id: new.master_key_id.as_deref(),
            rolled_from: None,
        };
        self.event(&new.api_key, kind, attributes)
    }

    /// The event of an update of `key`: the fields it set, with their new values.
    pub(crate) fn updated(
        &self,
        key: &ApiKey,
        update: &Update,
    ) -> Result<NewEvent, serde_json::Error> {
        let mut changed = Map::new();
        if let Some(name) = &update.name {
            changed.insert("name".into(), name.clone().into());
        }
        if let Some(owner) = &update.owner {
            changed.insert("owner".into(), owner.clone().into());
        }
        if let Some(meta) = &update.meta {
            changed.insert("meta".into(), Value::Object(meta.clone()));
        }
        if let Some(scopes) = &update.scopes {
            changed.insert("scopes".into(), scopes.as_slice().to_vec().into());
        }
        if let Some(expires_at) = &update.expires_at {
            changed.insert(
                "expires_at".into(),
                expires_at.as_ref().map(format_time).into(),
            );
        }
        let mut detail = Map::new();
        detail.insert("changed".into(), Value::Object(changed));
        self.event(key, EventKind::Updated, detail)
    }

    /// The two events of a roll: `rolled` for the old key, `issued` for the new one.
    pub(crate) fn rolled(
        &self,
        old: &ApiKey,
        new: &ApiKey,
        record: &CredentialRecord,
        old_until: DateTime<Utc>,
    ) -> Result<[NewEvent; 2], serde_json::Error> {
        let mut detail = Map::new();
        detail.insert("rolled_to".into(), new.as_str().into());
        detail.insert("expires_at".into(), format_time(&old_until).into());
        let attributes = Attributes {
            scopes: &record.scopes,
            name: record.name.as_deref(),
            owner: record.owner.as_deref(),
            expires_at: record.expires_at.as_ref(),
            master_key_id: record.master_key_id.as_deref(),
            rolled_from: Some(old.as_str()),
        };
        Ok([
            self.event(old, EventKind::Rolled, detail)?,
            self.event(new, EventKind::Issued, attributes)?,
        ])
    }

    /// The event of a revocation of `key`.
    pub(crate) fn revoked(&self, key: &ApiKey) -> Result<NewEvent, serde_json::Error> {
        self.event(key, EventKind::Revoked, Map::new())
    }
}

/// An event's own fields in its detail, written into the detail's JSON object.
pub(crate) trait Fields {
    /// Writes each field as an entry of `map`.
    fn write<M: SerializeMap>(&self, map: &mut M) -> Result<(), M::Error>;
}

impl Fields for Map<String, Value> {
    fn write<M: SerializeMap>(&self, map: &mut M) -> Result<(), M::Error> {
        self.iter()
            .try_for_each(|(field, value)| map.serialize_entry(field, value))
    }
}

/// What a new credential was given, as its registration event's detail (never its meta,
/// which can be large: it is on the credential). Written straight from the credential:
/// registration is the high-volume write, and a JSON map built and dropped for each was a
/// large share of a registration's work outside the database.
struct Attributes<'a> {
    scopes: &'a [String],
    name: Option<&'a str>,
    owner: Option<&'a str>,
    expires_at: Option<&'a DateTime<Utc>>,
    master_key_id: Option<&'a str>,
    /// The key a roll replaced.
    rolled_from: Option<&'a str>,
}

impl Fields for Attributes<'_> {
    fn write<M: SerializeMap>(&self, map: &mut M) -> Result<(), M::Error> {
        map.serialize_entry("scopes", self.scopes)?;
        let text = [
            ("name", self.name),
            ("owner", self.owner),
            ("master_key_id", self.master_key_id),
            ("rolled_from", self.rolled_from),
        ];
        for (field, value) in text {
            if let Some(value) = value {
                map.serialize_entry(field, value)?;
            }
        }
        if let Some(expires_at) = self.expires_at {
            map.serialize_entry("expires_at", &format_time(expires_at))?;
        }
        Ok(())
    }
}

/// An event's detail: its own fields, then its origin's context.
struct Detail<'a, F> {
    fields: F,
    origin: &'a Origin,
}

impl<F: Fields> Serialize for Detail<'_, F> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        self.fields.write(&mut map)?;
        if let Some(client) = &self.origin.client {
            map.serialize_entry("client", &**client)?;
        }
        if let Some(request_id) = &self.origin.request_id {
            map.serialize_entry("request_id", request_id)?;
        }
        self.origin.context.write(&mut map)?;
        map.end()
    }
}

/// An event to write, in the transaction of its change.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct NewEvent {
    pub(crate) api_key: String,
    pub(crate) event: &'static str,
    pub(crate) actor: Option<String>,
    pub(crate) source: &'static str,
    /// A JSON object.
    pub(crate) detail: Box<RawValue>,
}

/// An event as stored. Never holds a secret: none is ever given to the store.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct Event {
    /// Its position in the log; later events have larger ids.
    pub id: i64,
    /// When it was written.
    #[serde(serialize_with = "crate::store::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub at: DateTime<Utc>,
    /// The credential it concerns.
    pub api_key: String,
    /// `registered`, `issued`, `updated`, `rolled`, `revoked` or `deleted`.
    pub event: String,
    /// The authenticated credential that made the change, if any.
    pub actor: Option<String>,
    /// `api`, `cli` or `sql`.
    pub source: String,
    /// What changed, and the context: client address and request id for the API.
    #[sqlx(json)]
    #[schema(value_type = Object)]
    pub detail: Value,
}

/// A page request for [`crate::store::CredentialStore::events`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventQuery {
    /// Only events of this credential.
    pub api_key: Option<ApiKey>,
    /// Only events after this id.
    pub after: Option<i64>,
    /// At most this many.
    pub limit: u32,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attributes::Scopes;

    const KEY: &str = "ak_0123456789abcdefghijklmnopqrstuv";

    #[test]
    fn api_events_carry_the_client_and_request_and_the_changed_fields() {
        let key = ApiKey::parse(KEY).expect("key");
        let origin = Origin::api(Some(key.clone()), Some("192.0.2.7".into()), "req-1".into());
        let update = Update {
            owner: Some(None),
            scopes: Some(Scopes::new(["b", "a"]).expect("scopes")),
            ..Update::default()
        };
        let event = origin.updated(&key, &update).expect("an event");
        assert_eq!(event.event, "updated");
        assert_eq!(event.source, "api");
        assert_eq!(event.actor.as_deref(), Some(KEY));
        assert_eq!(
            detail(&event),
            serde_json::json!({
                "changed": { "owner": null, "scopes": ["a", "b"] },
                "client": "192.0.2.7",
                "request_id": "req-1",
            })
        );
    }

    #[test]
    fn cli_events_have_no_actor_and_keep_their_reason() {
        let key = ApiKey::parse(KEY).expect("key");
        let event = Origin::cli()
            .with("reason", "leaked")
            .revoked(&key)
            .expect("an event");
        assert_eq!(
            (event.event, event.source, event.actor.as_deref()),
            ("revoked", "cli", None)
        );
        assert_eq!(detail(&event), serde_json::json!({ "reason": "leaked" }));
    }

    fn detail(event: &NewEvent) -> Value {
        serde_json::from_str(event.detail.get()).expect("the detail is JSON")
    }
}
