//! credgate: a self-hosted API credential service.
//!
//! A credential is a pair (`ak_…` key, `sk_…` secret) where the secret is an HMAC derivation
//! of the key under the deployment's master key, so a pair proves itself without a database.
//! Where a request goes:
//!
//! - [`startup`] builds the [`Application`] from a [`Config`]: master key, store, cache,
//!   router, and runs it with graceful shutdown.
//! - `connections` caps open connections, closes idle ones to make room, and backs off
//!   when `accept` fails.
//! - [`http`] holds the router, the middleware stack and the handlers, with one error type.
//! - [`auth`] authenticates a request: form → derivation → cache → database.
//! - [`credential`] parses keys and secrets and does the derivation; [`attributes`] parses
//!   the rest of a credential (scopes, owner, expiry…).
//! - [`store`] is the storage seam (`CredentialStore`) and its SQLite and PostgreSQL
//!   backends.
//! - [`config`] holds the configuration and the master key sources.
//! - [`telemetry`] sets up logs and the Prometheus metrics.
//! - [`leak`] finds credential pairs in text, for `credgate scan`.
//! - [`layer`] is credgate as a library: a `tower::Layer` that authenticates another
//!   service's requests in-process ([`startup::open`] builds what it needs).
//!
//! The `credgate` command line belongs to the binary (`src/main.rs`, `src/cli/`), not to the
//! library.

pub mod attributes;
pub mod audit;
pub mod auth;
pub mod config;
pub(crate) mod connections;
pub mod credential;
pub mod http;
pub mod layer;
pub mod leak;
pub mod startup;
pub mod store;
pub mod telemetry;

pub use config::Config;
pub use startup::Application;
