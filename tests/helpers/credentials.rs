//! Key/secret pairs as clients hold them, made with the test deployments' master key.

use credgate::credential::{ApiKey, MasterKey, SecretDeriver};

/// The master key of every test deployment (the SPEC §1 test vector key).
pub const MASTER_HEX: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

/// A key/secret pair as a client holds it.
#[derive(Debug, Clone)]
pub struct Pair {
    pub key: String,
    pub secret: String,
}

/// The deriver of the test master key.
pub fn deriver() -> SecretDeriver {
    SecretDeriver::new(&MasterKey::from_hex(MASTER_HEX).expect("test key"))
}

/// Mints a valid pair for the test master key.
pub fn mint() -> Pair {
    let key = ApiKey::generate();
    let secret = deriver().secret_for(&key).expose();
    Pair {
        key: key.into_string(),
        secret,
    }
}

/// A valid key with a secret derived from another master key.
pub fn forged() -> Pair {
    let key = ApiKey::generate();
    let other = SecretDeriver::new(&MasterKey::from_bytes([42; 32]));
    let secret = other.secret_for(&key).expose();
    Pair {
        key: key.into_string(),
        secret,
    }
}
