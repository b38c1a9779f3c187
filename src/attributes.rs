//! Credential attributes (SPEC §7.1) and scopes (§7.2): their forms, parsed once at the edge
//! like keys and secrets, and the shared, read-only [`ScopeSet`] the authentication cache
//! keeps per credential.

use std::fmt;
use std::sync::Arc;

use axum::http::HeaderValue;
use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Map, Value};

/// The scopes credgate itself checks (SPEC §7.2). Any other scope belongs to the guarded API.
pub mod scope {
    /// `GET /credentials`, `GET /credentials/{any key}`.
    pub const CREDENTIALS_READ: &str = "credentials:read";
    /// Issue, update, roll; `owner`/`meta`/`scopes` on registration.
    pub const CREDENTIALS_WRITE: &str = "credentials:write";
    /// `DELETE /credentials/{any key}`.
    pub const CREDENTIALS_REVOKE: &str = "credentials:revoke";
    /// `GET /audit`.
    pub const AUDIT_READ: &str = "audit:read";
    /// Every scope, credgate's and the guarded API's.
    pub const ALL: &str = "*";
}

/// Most distinct scopes on one credential.
pub const MAX_SCOPES: usize = 32;
/// Most characters of a name or an owner.
pub const MAX_TEXT_CHARS: usize = 200;
/// Most bytes of `meta`, serialized.
pub const MAX_META_BYTES: usize = 4096;

/// Whether `s` is a scope: `*` or `[a-z0-9][a-z0-9:._-]{0,63}`.
pub fn is_scope(s: &str) -> bool {
    if s == scope::ALL {
        return true;
    }
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter().all(|&c| SCOPE_CHARS[usize::from(c)])
}

/// The bytes a scope may hold, as a table: checked for every scope a forward-auth request
/// requires, where a lookup per byte beats the five comparisons.
static SCOPE_CHARS: [bool; 256] = {
    let mut table = [false; 256];
    let mut c = 0;
    while c < 256 {
        let b = c as u8;
        table[c] =
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b':' | b'.' | b'_' | b'-');
        c += 1;
    }
    table
};

/// A credential's scopes: valid, distinct, sorted, at most [`MAX_SCOPES`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Scopes(Vec<String>);

impl Scopes {
    /// Checks, deduplicates and sorts a list of scopes.
    pub fn new<S: AsRef<str>>(items: impl IntoIterator<Item = S>) -> Result<Self, String> {
        let mut scopes = Vec::new();
        for item in items {
            let item = item.as_ref();
            if !is_scope(item) {
                return Err(format!(
                    "must hold only \"*\" or scopes of the form [a-z0-9][a-z0-9:._-]{{0,63}}, not {item:?}"
                ));
            }
            scopes.push(item.to_owned());
        }
        scopes.sort_unstable();
        scopes.dedup();
        if scopes.len() > MAX_SCOPES {
            return Err(format!("must hold at most {MAX_SCOPES} distinct scopes"));
        }
        Ok(Self(scopes))
    }

    /// A comma-separated list, as `--registration-scopes` takes it (`''` is no scope).
    pub fn parse_list(text: &str) -> Result<Self, String> {
        Self::new(text.split(',').map(str::trim).filter(|s| !s.is_empty()))
    }

    /// The storage form: space-separated, sorted (OAuth's `scope` format, RFC 6749 §3.3).
    pub fn to_stored(&self) -> String {
        self.0.join(" ")
    }

    /// The scopes, sorted.
    pub fn as_slice(&self) -> &[String] {
        &self.0
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The first of these scopes that `holder` does not hold, if any: what a caller may not
    /// grant.
    pub fn first_missing(&self, holder: &ScopeSet) -> Option<&str> {
        self.0.iter().find(|s| !holder.holds(s)).map(String::as_str)
    }
}

/// The scopes of an authenticated credential, as the cache keeps them: shared between every
/// credential with the same scopes, with the `X-Credential-Scopes` value made once.
#[derive(Debug, PartialEq, Eq)]
pub struct ScopeSet {
    /// Sorted, for binary search.
    items: Box<[Box<str>]>,
    all: bool,
    /// Space-separated, as stored: the `X-Credential-Scopes` value, checked once per set
    /// rather than at every answer. `None` when there is no scope, and when a value written
    /// by hand holds a character no header may carry.
    header: Option<HeaderValue>,
}

impl ScopeSet {
    /// The set a stored value names (space-separated). Values an operator wrote by hand are
    /// taken as they are: a malformed one is a scope nobody can require of it.
    pub fn from_stored(stored: &str) -> Self {
        let mut items: Vec<Box<str>> = stored.split_ascii_whitespace().map(Box::from).collect();
        items.sort_unstable();
        items.dedup();
        let header = (!items.is_empty())
            .then(|| HeaderValue::from_maybe_shared(bytes::Bytes::from(items.join(" "))).ok())
            .flatten();
        Self {
            all: items.iter().any(|s| &**s == scope::ALL),
            items: items.into_boxed_slice(),
            header,
        }
    }

    /// A copy that shares no memory with `self`, its header value included.
    pub(crate) fn unshared(&self) -> Self {
        Self {
            items: self.items.clone(),
            all: self.all,
            header: self
                .header
                .as_ref()
                .and_then(|h| HeaderValue::from_bytes(h.as_bytes()).ok()),
        }
    }

    /// Whether a holder of these may act with `scope` (it holds it, or `*`).
    pub fn holds(&self, scope: &str) -> bool {
        self.all || self.items.binary_search_by(|s| (**s).cmp(scope)).is_ok()
    }

    /// The `X-Credential-Scopes` value: space-separated and sorted. `None` when there is no
    /// scope ([`ScopeSet::is_empty`]), and when a hand-written one cannot be sent as a header.
    pub fn header(&self) -> Option<&HeaderValue> {
        self.header.as_ref()
    }

    /// Whether there is no scope at all.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The scopes, sorted.
    pub fn iter(&self) -> impl Iterator<Item = &str> {
        self.items.iter().map(|s| &**s)
    }
}

/// Checks a `name`: 1..200 characters, no control characters.
pub fn parse_name(text: &str) -> Result<String, String> {
    let chars = text.chars().count();
    if chars == 0 || chars > MAX_TEXT_CHARS {
        return Err(format!("must have 1 to {MAX_TEXT_CHARS} characters"));
    }
    if text.chars().any(char::is_control) {
        return Err("must not contain control characters".into());
    }
    Ok(text.to_owned())
}

/// Whether `c` may appear in an owner.
fn is_owner_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"._:@/-".contains(&c)
}

/// Checks an `owner`: 1..200 characters `[A-Za-z0-9._:@/-]`.
pub fn parse_owner(text: &str) -> Result<String, String> {
    if text.is_empty() || text.len() > MAX_TEXT_CHARS {
        return Err(format!("must have 1 to {MAX_TEXT_CHARS} characters"));
    }
    if !text.bytes().all(is_owner_char) {
        return Err("must contain only A-Z, a-z, 0-9 and . _ : @ / -".into());
    }
    Ok(text.to_owned())
}

/// Checks `meta`: a JSON object of at most 4 096 bytes serialized. Returns the serialized form.
pub fn parse_meta(value: &Value) -> Result<Map<String, Value>, String> {
    let Value::Object(map) = value else {
        return Err("must be a JSON object".into());
    };
    let size = serde_json::to_vec(value).map_or(usize::MAX, |v| v.len());
    if size > MAX_META_BYTES {
        return Err(format!(
            "must be at most {MAX_META_BYTES} bytes serialized, not {size}"
        ));
    }
    Ok(map.clone())
}

/// Checks an `expires_at` given by a request: RFC 3339 with an offset, in the future.
/// Kept to the millisecond, like every stored timestamp.
pub fn parse_expiry(text: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, String> {
    let at = DateTime::parse_from_rfc3339(text)
        .map_err(|_| {
            "must be an RFC 3339 timestamp with an offset, like 2030-01-01T00:00:00Z".to_owned()
        })?
        .with_timezone(&Utc);
    let at = DateTime::<Utc>::from_timestamp_millis(at.timestamp_millis())
        .ok_or_else(|| "is out of range".to_owned())?;
    if at <= now {
        return Err("must be in the future".into());
    }
    Ok(at)
}

/// A timestamp as every response and the SQLite store write it: RFC 3339, UTC, milliseconds.
pub fn format_time(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// A credential's computed state (SPEC §7.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Active and not past its expiry.
    Active,
    /// Active, but past its `expires_at`.
    Expired,
    /// Revoked.
    Revoked,
}

impl State {
    /// The state of a credential with these columns, at `now`.
    pub fn of(active: bool, expires_at: Option<DateTime<Utc>>, now: DateTime<Utc>) -> Self {
        match (active, expires_at) {
            (false, _) => Self::Revoked,
            (true, Some(at)) if at <= now => Self::Expired,
            (true, _) => Self::Active,
        }
    }

    /// Parses a `?state=` filter value.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "active" => Some(Self::Active),
            "expired" => Some(Self::Expired),
            "revoked" => Some(Self::Revoked),
            _ => None,
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Active => "active",
            Self::Expired => "expired",
            Self::Revoked => "revoked",
        })
    }
}

/// Whether `s` is a master key id: 16 lowercase hex characters (SPEC §8.3).
pub fn is_master_key_id(s: &str) -> bool {
    s.len() == 16
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Shares equal values between cached credentials: most credentials of a deployment have one
/// of a few scope lists (and owners), and 100 000 cached copies of each would cost megabytes.
/// Values no cached credential uses any more are dropped as the table grows.
pub struct Interner<T> {
    values: std::sync::Mutex<Interned<T>>,
}

struct Interned<T> {
    map: std::collections::HashMap<Box<str>, std::sync::Weak<T>>,
    /// Size at which dead entries are next swept.
    sweep_at: usize,
}

impl<T> Default for Interner<T> {
    fn default() -> Self {
        Self {
            values: std::sync::Mutex::new(Interned {
                map: std::collections::HashMap::new(),
                sweep_at: INTERNER_SWEEP_MIN,
            }),
        }
    }
}

/// Fewest entries before the interner sweeps dead ones.
const INTERNER_SWEEP_MIN: usize = 1024;

impl<T> Interner<T> {
    /// The shared value for `key`, made by `make` when nobody holds one.
    pub fn get(&self, key: &str, make: impl FnOnce() -> T) -> Arc<T> {
        // A plain map: a panic elsewhere cannot leave it half-updated.
        let mut values = self.values.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(value) = values.map.get(key).and_then(std::sync::Weak::upgrade) {
            return value;
        }
        let value = Arc::new(make());
        if values.map.len() >= values.sweep_at {
            values.map.retain(|_, value| value.strong_count() > 0);
            values.sweep_at = (values.map.len() * 2).max(INTERNER_SWEEP_MIN);
        }
        values.map.insert(key.into(), Arc::downgrade(&value));
        value
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_are_checked_sorted_and_deduplicated() {
        let s = Scopes::new(["b:x", "a", "b:x", "*"]).unwrap();
        assert_eq!(s.as_slice(), ["*", "a", "b:x"]);
        assert_eq!(s.to_stored(), "* a b:x");
        for bad in ["", "A", "-a", "a b", "a/b", &"a".repeat(65), "**", "é"] {
            assert!(Scopes::new([bad]).is_err(), "{bad:?}");
        }
        assert!(Scopes::new(["a".repeat(64)]).is_ok());
        let many: Vec<String> = (0..33).map(|i| format!("s{i}")).collect();
        assert!(Scopes::new(&many).is_err());
        assert!(Scopes::new(&many[..32]).is_ok());
        assert_eq!(Scopes::parse_list("").unwrap(), Scopes::default());
        assert_eq!(
            Scopes::parse_list(" orders:read, *").unwrap().as_slice(),
            ["*", "orders:read"]
        );
    }

    #[test]
    fn a_scope_set_holds_its_scopes_or_everything() {
        let set = ScopeSet::from_stored("orders:read credentials:read");
        assert!(set.holds("orders:read") && set.holds("credentials:read"));
        assert!(!set.holds("orders:write") && !set.holds("*"));
        let header = set.header().map(|h| h.as_bytes());
        assert_eq!(header, Some(&b"credentials:read orders:read"[..]));
        let all = ScopeSet::from_stored("*");
        assert!(all.holds("anything") && all.holds("*"));
        let none = ScopeSet::from_stored("");
        assert!(!none.holds("a") && none.is_empty() && none.header().is_none());
        // Written by hand with a control character: a set, but no header value.
        let unsendable = ScopeSet::from_stored("a\u{1}b");
        assert!(unsendable.holds("a\u{1}b") && !unsendable.is_empty());
        assert!(unsendable.header().is_none());
    }

    #[test]
    fn equal_values_are_shared_and_dropped_ones_swept() {
        let interner = Interner::default();
        let set = |s: &'static str| move || ScopeSet::from_stored(s);
        let a = interner.get("x y", set("x y"));
        assert!(Arc::ptr_eq(&a, &interner.get("x y", set("x y"))));
        assert!(!Arc::ptr_eq(&a, &interner.get("x", set("x"))));
        drop(a);
        for i in 0..3000 {
            interner.get(&format!("s{i}"), set(""));
        }
        assert!(interner.values.lock().unwrap().map.len() < 3000);
    }

    #[test]
    fn attributes_are_validated() {
        assert!(parse_name("Billing worker").is_ok());
        assert!(parse_name("").is_err() && parse_name("a\nb").is_err());
        assert!(parse_name(&"é".repeat(200)).is_ok() && parse_name(&"é".repeat(201)).is_err());
        assert!(parse_owner("tenant:42/eu-west@acme.io").is_ok());
        assert!(parse_owner("a b").is_err() && parse_owner("").is_err());
        assert!(parse_meta(&serde_json::json!({"a": [1]})).is_ok());
        assert!(parse_meta(&serde_json::json!([1])).is_err());
        assert!(parse_meta(&serde_json::json!({"a": "x".repeat(4096)})).is_err());
        let now = Utc::now();
        assert!(parse_expiry("2999-01-01T00:00:00Z", now).is_ok());
        assert!(parse_expiry("2999-01-01T00:00:00+02:00", now).is_ok());
        assert!(parse_expiry("2999-01-01T00:00:00", now).is_err());
        assert!(parse_expiry("2000-01-01T00:00:00Z", now).is_err());
        assert!(is_master_key_id("0123456789abcdef") && !is_master_key_id("0123456789ABCDEF"));
    }
}
