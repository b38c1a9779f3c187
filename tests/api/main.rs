//! The service's contract, in one test binary: the HTTP API row by row (`api`), the cache
//! and the storage behind it (`cache_and_storage`), and the real binary and its CLI
//! (`process`). Every store-dependent test runs against SQLite and against PostgreSQL (this
//! binary's own server, see `helpers/pg.rs`).
//!
//! The helpers in `tests/helpers/` are shared with the `cluster` and `faults` binaries, each
//! of which includes only the modules it uses. This binary includes every one of them and
//! allows no dead code: a helper no test uses is reported here.

// A test crate has no public API: its helpers are `pub` only to be shared between modules.
#![allow(unreachable_pub)]

#[path = "../helpers"]
mod helpers {
    pub mod app;
    pub mod client;
    pub mod credentials;
    pub mod pg;
    pub mod raw_http;
    pub mod server_process;
    pub mod wait;
    pub mod webdriver;
}

/// Generates one `#[tokio::test]` per backend for each named `async fn(Backend)`, in modules
/// `sqlite` and `postgres`: the contract is written once and run against every store.
macro_rules! contract_tests {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::helpers::app::Backend::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::helpers::app::Backend::Postgres).await
                }
            )*
        }
    };
}

mod api;
mod audit;
mod cache_and_storage;
mod console;
mod ecosystem;
/// `examples/embedded.rs` itself, so its tests (`embedding`) run exactly the example's code.
#[path = "../../examples/embedded.rs"]
mod embedded_example;
mod embedding;
mod lifecycle;
mod packaging;
mod privileges;
mod process;
mod upgrade;
