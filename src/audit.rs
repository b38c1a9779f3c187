//! The audit log (SPEC §8.5): who changed which credential, how, and from where. Each event
//! is written by the store in the transaction of the change it records; changes made in the
//! database directly are recorded by the schema's triggers, with source `sql`.

use std::net::IpAddr;

use chrono::{DateTime, Utc};
use serde::Serialize;
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
    /// Context merged into each event's `detail`: the client address and request id of an
    /// API call, a reason.
    pub context: Map<String, Value>,
}

impl Origin {
    /// A change made through the API by `actor`, for the client at `client`, in request
    /// `request_id`.
    pub fn api(actor: Option<ApiKey>, client: Option<IpAddr>, request_id: &str) -> Self {
        let mut context = Map::new();
        if let Some(client) = client {
            context.insert("client".into(), client.to_string().into());
        }
        context.insert("request_id".into(), request_id.into());
        Self {
            actor,
            source: Source::Api,
            context,
        }
    }

    /// A change made by the command line.
    pub fn cli() -> Self {
        Self {
            actor: None,
            source: Source::Cli,
            context: Map::new(),
        }
    }

    /// Adds one field to the context.
    pub fn with(mut self, field: &str, value: impl Into<Value>) -> Self {
        self.context.insert(field.into(), value.into());
        self
    }

    /// The event `kind` of `api_key`, with `detail` plus this origin's context.
    pub(crate) fn event(
        &self,
        api_key: &ApiKey,
        kind: EventKind,
        mut detail: Map<String, Value>,
    ) -> NewEvent {
        for (field, value) in &self.context {
            detail.insert(field.clone(), value.clone());
        }
        NewEvent {
            api_key: api_key.as_str().to_owned(),
            event: kind.as_str(),
            actor: self.actor.as_ref().map(|k| k.as_str().to_owned()),
            source: self.source.as_str(),
            detail: Value::Object(detail),
        }
    }

    /// The event of a registration (or issuance) of `new`.
    pub(crate) fn registered(&self, new: &NewCredential) -> NewEvent {
        let kind = if new.issued {
            EventKind::Issued
        } else {
            EventKind::Registered
        };
        let attributes = attributes(
            new.scopes.as_slice(),
            new.name.as_deref(),
            new.owner.as_deref(),
            new.expires_at.as_ref(),
            new.master_key_id.as_deref(),
        );
        self.event(&new.api_key, kind, attributes)
    }

    /// The event of an update of `key`: the fields it set, with their new values.
    pub(crate) fn updated(&self, key: &ApiKey, update: &Update) -> NewEvent {
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
    ) -> [NewEvent; 2] {
        let mut detail = Map::new();
        detail.insert("rolled_to".into(), new.as_str().into());
        detail.insert("expires_at".into(), format_time(&old_until).into());
        let mut attributes = attributes(
            &record.scopes,
            record.name.as_deref(),
            record.owner.as_deref(),
            record.expires_at.as_ref(),
            record.master_key_id.as_deref(),
        );
        attributes.insert("rolled_from".into(), old.as_str().into());
        [
            self.event(old, EventKind::Rolled, detail),
            self.event(new, EventKind::Issued, attributes),
        ]
    }

    /// The event of a revocation of `key`.
    pub(crate) fn revoked(&self, key: &ApiKey) -> NewEvent {
        self.event(key, EventKind::Revoked, Map::new())
    }
}

/// What a new credential was given, as its registration event's detail (never its meta,
/// which can be large: it is on the credential).
fn attributes(
    scopes: &[String],
    name: Option<&str>,
    owner: Option<&str>,
    expires_at: Option<&DateTime<Utc>>,
    master_key_id: Option<&str>,
) -> Map<String, Value> {
    let mut detail = Map::new();
    detail.insert("scopes".into(), scopes.to_vec().into());
    let optional = [
        ("name", name.map(str::to_owned)),
        ("owner", owner.map(str::to_owned)),
        ("expires_at", expires_at.map(format_time)),
        ("master_key_id", master_key_id.map(str::to_owned)),
    ];
    for (field, value) in optional {
        if let Some(value) = value {
            detail.insert(field.into(), value.into());
        }
    }
    detail
}

/// An event to write, in the transaction of its change.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct NewEvent {
    pub(crate) api_key: String,
    pub(crate) event: &'static str,
    pub(crate) actor: Option<String>,
    pub(crate) source: &'static str,
    pub(crate) detail: Value,
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
        let origin = Origin::api(Some(key.clone()), "192.0.2.7".parse().ok(), "req-1");
        let update = Update {
            owner: Some(None),
            scopes: Some(Scopes::new(["b", "a"]).expect("scopes")),
            ..Update::default()
        };
        let event = origin.updated(&key, &update);
        assert_eq!(event.event, "updated");
        assert_eq!(event.source, "api");
        assert_eq!(event.actor.as_deref(), Some(KEY));
        assert_eq!(
            event.detail,
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
        let event = Origin::cli().with("reason", "leaked").revoked(&key);
        assert_eq!(
            (event.event, event.source, event.actor),
            ("revoked", "cli", None)
        );
        assert_eq!(event.detail, serde_json::json!({ "reason": "leaked" }));
    }
}
