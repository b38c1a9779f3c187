//! Credential formats and the secret derivation (SPEC §1).
//!
//! `ApiKey` and `ApiSecret` are parsed once at the edge; everything past the edge works with
//! values that are known to be well formed. `SecretDeriver` turns the master key into the
//! HMAC key `K` and checks (or mints) secrets in constant time.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hkdf::Hkdf;
use hmac::{Hmac, KeyInit, Mac};
use rand::RngExt as _;
use rand::distr::Alphanumeric;
use sha2::Sha256;
use subtle::ConstantTimeEq;

// Never change these prefixes: every issued credential carries them.
/// Prefix of every api_key.
pub const KEY_PREFIX: &str = "ak_";
/// Prefix of every api_secret.
pub const SECRET_PREFIX: &str = "sk_";

const KEY_MIN_CHARS: usize = 16;
const KEY_MAX_CHARS: usize = 64;
/// Characters `issue` puts after `ak_`: 32 base62 characters carry more than 190 bits.
const MINTED_KEY_CHARS: usize = 32;
/// base64url without padding of 32 bytes.
const SECRET_CHARS: usize = 43;

const HKDF_SALT: &[u8] = b"credgate/v1";
const HKDF_INFO: &[u8] = b"api-secret-derivation";
const KEY_ID_INFO: &[u8] = b"credgate key id";

/// Why a presented key or secret is not well formed. The text is safe to show a caller:
/// it never contains the presented value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    /// The value is empty.
    #[error("must not be empty")]
    Empty,
    /// The value does not start with the expected prefix.
    #[error("must start with \"{0}\"")]
    Prefix(&'static str),
    /// The value has the wrong number of characters after its prefix.
    #[error("must have {0} characters after the prefix")]
    Length(&'static str),
    /// The value contains characters outside its alphabet.
    #[error("must contain only {0}")]
    Alphabet(&'static str),
    /// The secret decodes, but is not the canonical encoding of its bytes.
    #[error("is not a canonical base64url encoding")]
    NotCanonical,
}

/// A well-formed api_key (`ak_` + 16..64 characters `[A-Za-z0-9]`). Public: it identifies.
/// Kept in place when it is as short as a minted one, rather than in a `String`: every
/// authenticated request parses one, and a cache entry then needs no allocation for its key
/// (40 bytes in all, where a `String` takes 24 plus 48 on the heap).
#[derive(Clone)]
pub struct ApiKey(KeyText);

#[derive(Clone)]
enum KeyText {
    /// ASCII, prefix included; zero past `len`.
    Inline {
        len: u8,
        text: [u8; KEY_INLINE],
    },
    Heap(Box<[u8]>),
}

/// Longest api_key, prefix included.
const KEY_MAX_LEN: usize = KEY_PREFIX.len() + KEY_MAX_CHARS;
/// Longest api_key kept in place: the enum is then 40 bytes. Minted keys have 35.
const KEY_INLINE: usize = 38;

/// Which bytes may follow a key's prefix: a table lookup each, rather than the three range
/// checks of `is_ascii_alphanumeric`.
static KEY_ALPHABET: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        table[b] = (b as u8).is_ascii_alphanumeric();
        b += 1;
    }
    table
};

impl ApiKey {
    /// Parses a presented api_key: text, or a header value's bytes as sent.
    pub fn parse(raw: impl AsRef<[u8]>) -> Result<Self, FormatError> {
        let raw = raw.as_ref();
        if raw.is_empty() {
            return Err(FormatError::Empty);
        }
        let body = raw
            .strip_prefix(KEY_PREFIX.as_bytes())
            .ok_or(FormatError::Prefix(KEY_PREFIX))?;
        if !(KEY_MIN_CHARS..=KEY_MAX_CHARS).contains(&body.len()) {
            return Err(FormatError::Length("16 to 64"));
        }
        if !body.iter().all(|&b| KEY_ALPHABET[usize::from(b)]) {
            return Err(FormatError::Alphabet("the characters A-Z, a-z and 0-9"));
        }
        Ok(Self::from_checked(raw))
    }

    /// Mints a fresh random key: `ak_` + 32 base62 characters from a CSPRNG.
    pub fn generate() -> Self {
        let mut text = [0u8; KEY_PREFIX.len() + MINTED_KEY_CHARS];
        text[..KEY_PREFIX.len()].copy_from_slice(KEY_PREFIX.as_bytes());
        for (b, c) in text[KEY_PREFIX.len()..]
            .iter_mut()
            .zip(rand::rng().sample_iter(Alphanumeric))
        {
            *b = c;
        }
        Self::from_checked(&text)
    }

    /// The key whose text `raw` is, when it is equal to a key parsed before (one found in a
    /// cache by its text, say): its form needs no second check. `None` only when it cannot
    /// be a key's text at all.
    pub(crate) fn known(raw: &[u8]) -> Option<Self> {
        (raw.len() <= KEY_MAX_LEN).then(|| Self::from_checked(raw))
    }

    /// A key from text known to be well formed (at most [`KEY_MAX_LEN`] bytes).
    fn from_checked(raw: &[u8]) -> Self {
        match u8::try_from(raw.len()) {
            Ok(len) if raw.len() <= KEY_INLINE => {
                let mut text = [0u8; KEY_INLINE];
                text[..raw.len()].copy_from_slice(raw);
                Self(KeyText::Inline { len, text })
            }
            _ => Self(KeyText::Heap(Box::from(raw))),
        }
    }

    /// The key as presented, prefix included.
    pub fn as_str(&self) -> &str {
        // ASCII, checked when parsed: the fallback is never taken.
        std::str::from_utf8(self.as_bytes()).unwrap_or_default()
    }

    fn as_bytes(&self) -> &[u8] {
        match &self.0 {
            KeyText::Inline { len, text } => &text[..usize::from(*len)],
            KeyText::Heap(text) => text,
        }
    }

    /// The key as an owned string.
    pub fn into_string(self) -> String {
        self.as_str().to_owned()
    }
}

// Compared, ordered and hashed by its text alone, like the string it stands for.
impl PartialEq for ApiKey {
    fn eq(&self, other: &Self) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for ApiKey {}

impl PartialOrd for ApiKey {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for ApiKey {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.as_bytes().cmp(other.as_bytes())
    }
}

impl std::hash::Hash for ApiKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_bytes().hash(state);
    }
}

/// A key can be looked up by its text as sent (equal, ordered and hashed alike).
impl std::borrow::Borrow<[u8]> for ApiKey {
    fn borrow(&self) -> &[u8] {
        self.as_bytes()
    }
}

impl fmt::Display for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiKey({})", self.as_str())
    }
}

/// A well-formed api_secret: the 32 bytes behind a canonical `sk_` + base64url string.
///
/// Neither `Debug` nor any other formatting prints the secret; use [`ApiSecret::expose`]
/// where showing it is the point (minting).
#[derive(Clone)]
pub struct ApiSecret([u8; 32]);

impl ApiSecret {
    /// Parses a presented api_secret (text, or a header value's bytes as sent), refusing any
    /// non-canonical encoding.
    pub fn parse(raw: impl AsRef<[u8]>) -> Result<Self, FormatError> {
        let raw = raw.as_ref();
        if raw.is_empty() {
            return Err(FormatError::Empty);
        }
        let body = raw
            .strip_prefix(SECRET_PREFIX.as_bytes())
            .ok_or(FormatError::Prefix(SECRET_PREFIX))?;
        if body.len() != SECRET_CHARS {
            return Err(FormatError::Length("43"));
        }
        // The engine checks the alphabet and rejects set trailing bits, so only the
        // canonical encoding decodes.
        let mut bytes = [0u8; 32];
        match URL_SAFE_NO_PAD.decode_slice(body, &mut bytes) {
            Ok(32) => Ok(Self(bytes)),
            Err(base64::DecodeSliceError::DecodeError(
                base64::DecodeError::InvalidByte(..) | base64::DecodeError::InvalidPadding,
            )) => Err(FormatError::Alphabet("base64url characters")),
            _ => Err(FormatError::NotCanonical),
        }
    }

    /// Whether this is the same secret as `other`, compared in constant time.
    pub fn same_as(&self, other: &ApiSecret) -> bool {
        words::<32, 4>(&self.0)
            .ct_eq(&words::<32, 4>(&other.0))
            .into()
    }

    /// The canonical encoding without its prefix: what a cache keeps to recognise this
    /// secret as presented, without decoding it.
    pub fn encoded(&self) -> EncodedSecret {
        let mut text = [0u8; ENCODED_WORDS * 8];
        // 32 bytes encode to exactly 43 characters; the rest stays zero.
        let _ = URL_SAFE_NO_PAD.encode_slice(self.0, &mut text[..SECRET_CHARS]);
        EncodedSecret(words(&text))
    }

    /// The secret in its canonical string form. Only for showing it to its owner.
    pub fn expose(&self) -> String {
        format!("{SECRET_PREFIX}{}", URL_SAFE_NO_PAD.encode(self.0))
    }
}

/// A secret's canonical text after `sk_`. The only well-formed presentation of a secret is
/// `sk_` + exactly this text, so a presented value equal to it needs no parsing.
/// Kept as words, zero-padded, so the comparison is six word compares rather than 43 byte
/// compares each behind an optimisation barrier.
#[derive(Clone)]
pub struct EncodedSecret([u64; ENCODED_WORDS]);

/// Words of an [`EncodedSecret`]: 43 characters, zero-padded to 48 bytes.
const ENCODED_WORDS: usize = 6;

impl EncodedSecret {
    /// Whether `presented` (a header value as sent) is this secret, compared in constant
    /// time. Anything else — another secret, a malformed value — is `false`. (Its length
    /// is compared first: the length of a well-formed secret is public.)
    pub fn is(&self, presented: impl AsRef<[u8]>) -> bool {
        Self::as_sent(presented).is_some_and(|sent| sent.0.ct_eq(&self.0).into())
    }

    /// A presented value's text after `sk_`, as words: `None` unless it is `sk_` and 43
    /// characters. For a value [`ApiSecret::parse`] accepted, the same as
    /// [`ApiSecret::encoded`] without encoding again (the canonical text is the only one that
    /// parses).
    pub fn as_sent(presented: impl AsRef<[u8]>) -> Option<Self> {
        let text = presented.as_ref().strip_prefix(SECRET_PREFIX.as_bytes())?;
        if text.len() != SECRET_CHARS {
            return None;
        }
        let mut padded = [0u8; ENCODED_WORDS * 8];
        padded[..SECRET_CHARS].copy_from_slice(text);
        Some(Self(words::<{ ENCODED_WORDS * 8 }, ENCODED_WORDS>(&padded)))
    }
}

impl fmt::Debug for EncodedSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("EncodedSecret(<redacted>)")
    }
}

impl fmt::Debug for ApiSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiSecret(<redacted>)")
    }
}

/// The deployment's 32-byte master key. `Debug` prints no key material.
#[derive(Clone, PartialEq, Eq)]
pub struct MasterKey([u8; 32]);

/// Why master key text could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "a master key must be 64 hexadecimal characters (32 bytes), optionally followed by a newline"
)]
pub struct MasterKeyFormatError;

impl MasterKey {
    /// Wraps raw key bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// Generates a new random master key from a CSPRNG.
    pub fn generate() -> Self {
        let mut bytes = [0u8; 32];
        rand::rng().fill(&mut bytes);
        Self(bytes)
    }

    /// Parses the key file form: 64 hex characters, a trailing newline allowed.
    pub fn from_hex(text: &str) -> Result<Self, MasterKeyFormatError> {
        let text = text
            .strip_suffix('\n')
            .map(|t| t.strip_suffix('\r').unwrap_or(t))
            .unwrap_or(text);
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(text, &mut bytes).map_err(|_| MasterKeyFormatError)?;
        Ok(Self(bytes))
    }

    /// The key file form: 64 lowercase hex characters and a newline.
    pub fn to_hex_line(&self) -> String {
        format!("{}\n", hex::encode(self.0))
    }
}

/// Why a master key file could not be read: no key, a malformed line, or too many keys.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MasterKeyFileError {
    /// No line holds a key.
    #[error("the file holds no key (one per line: 64 hexadecimal characters)")]
    Empty,
    /// A line is not a key.
    #[error(
        "line {0} is not a key (64 hexadecimal characters; blank lines and lines starting with # are ignored)"
    )]
    Line(usize),
    /// More keys than a forged secret may cost HMACs.
    #[error("the file holds more than {MAX_MASTER_KEYS} keys")]
    TooMany,
    /// The same key twice.
    #[error("line {0} repeats a key")]
    Repeated(usize),
}

/// Most master keys configured at once: a forged secret costs one HMAC per key (SPEC §8.3).
pub const MAX_MASTER_KEYS: usize = 8;

impl MasterKey {
    /// Parses a key file: one key per line (64 hex characters); blank lines and lines whose
    /// first non-blank character is `#` are ignored. The first key mints; all verify.
    pub fn parse_file(text: &str) -> Result<Vec<Self>, MasterKeyFileError> {
        let mut keys: Vec<Self> = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let content = line.trim();
            if content.is_empty() || content.starts_with('#') {
                continue;
            }
            let key = Self::from_hex(line).map_err(|_| MasterKeyFileError::Line(n + 1))?;
            if keys.contains(&key) {
                return Err(MasterKeyFileError::Repeated(n + 1));
            }
            keys.push(key);
            if keys.len() > MAX_MASTER_KEYS {
                return Err(MasterKeyFileError::TooMany);
            }
        }
        if keys.is_empty() {
            return Err(MasterKeyFileError::Empty);
        }
        Ok(keys)
    }
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MasterKey(<redacted>)")
    }
}

/// Derives and verifies secrets: `HMAC-SHA256(K, api_key)` with `K` from HKDF (SPEC §1).
#[derive(Clone)]
pub struct SecretDeriver {
    /// HMAC keyed with `K`, cloned per derivation so the key schedule is computed once.
    mac: Hmac<Sha256>,
    /// The master key's public id (SPEC §8.3).
    key_id: String,
}

impl SecretDeriver {
    /// Builds the deriver for a master key.
    pub fn new(master: &MasterKey) -> Self {
        let k = derive_k(master);
        // HMAC accepts keys of any length, so this cannot fail for 32 bytes.
        let mac = match <Hmac<Sha256> as KeyInit>::new_from_slice(&k) {
            Ok(mac) => mac,
            Err(_) => unreachable!("HMAC takes keys of any length"),
        };
        let mut id = mac.clone();
        id.update(KEY_ID_INFO);
        let key_id = hex::encode(&id.finalize().into_bytes()[..8]);
        Self { mac, key_id }
    }

    /// The master key's id: the first 16 hex characters of `HMAC-SHA256(K, "credgate key id")`.
    /// Public: it names the key without revealing it.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// The secret that belongs to `key`.
    pub fn secret_for(&self, key: &ApiKey) -> ApiSecret {
        let mut mac = self.mac.clone();
        mac.update(key.as_str().as_bytes());
        ApiSecret(mac.finalize().into_bytes().into())
    }

    /// Whether `secret` is the derivation of `key`, compared in constant time.
    pub fn verify(&self, key: &ApiKey, secret: &ApiSecret) -> bool {
        self.secret_for(key).same_as(secret)
    }
}

/// The configured master keys (SPEC §8.3): the first mints, every one verifies. Never empty.
#[derive(Clone, Debug)]
pub struct KeyRing {
    derivers: Vec<SecretDeriver>,
}

impl KeyRing {
    /// The ring of these keys, the first one minting. `None` when there is none.
    pub fn new(keys: &[MasterKey]) -> Option<Self> {
        (!keys.is_empty()).then(|| Self {
            derivers: keys.iter().map(SecretDeriver::new).collect(),
        })
    }

    /// The deriver that mints new pairs.
    pub fn minting(&self) -> &SecretDeriver {
        // `new` refuses an empty ring.
        &self.derivers[0]
    }

    /// The deriver of the key that derived `secret` from `key`, if any configured key did.
    /// A forged secret costs one HMAC per key.
    pub fn verify(&self, key: &ApiKey, secret: &ApiSecret) -> Option<&SecretDeriver> {
        self.derivers.iter().find(|d| d.verify(key, secret))
    }

    /// The ids of the configured keys, the minting one first.
    pub fn key_ids(&self) -> impl Iterator<Item = &str> {
        self.derivers.iter().map(SecretDeriver::key_id)
    }
}

impl From<SecretDeriver> for KeyRing {
    fn from(deriver: SecretDeriver) -> Self {
        Self {
            derivers: vec![deriver],
        }
    }
}

impl fmt::Debug for SecretDeriver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretDeriver(<redacted>)")
    }
}

/// Bytes as little-endian words, for constant-time comparison a word at a time.
fn words<const BYTES: usize, const WORDS: usize>(bytes: &[u8; BYTES]) -> [u64; WORDS] {
    const { assert!(BYTES == WORDS * 8) };
    let mut out = [0u64; WORDS];
    for (word, chunk) in out.iter_mut().zip(bytes.chunks_exact(8)) {
        let mut b = [0u8; 8];
        b.copy_from_slice(chunk);
        *word = u64::from_le_bytes(b);
    }
    out
}

fn derive_k(master: &MasterKey) -> [u8; 32] {
    let hk = Hkdf::<Sha256>::new(Some(HKDF_SALT), &master.0);
    let mut k = [0u8; 32];
    // 32 bytes is far below HKDF-SHA256's 8160-byte output limit.
    if hk.expand(HKDF_INFO, &mut k).is_err() {
        unreachable!("32 bytes is a valid HKDF-SHA256 output length");
    }
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vector_master() -> MasterKey {
        let mut bytes = [0u8; 32];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = i as u8;
        }
        MasterKey::from_bytes(bytes)
    }

    #[test]
    fn hkdf_k_matches_spec() {
        assert_eq!(
            hex::encode(derive_k(&vector_master())),
            "21dbd00309346c3c8006f8fe840fdcfb224f901676413bd6e1311c4eba6a1f3e"
        );
    }

    #[test]
    fn derivation_matches_spec_vectors() {
        let d = SecretDeriver::new(&vector_master());
        for (key, secret) in [
            (
                "ak_0123456789abcdefghijklmnopqrstuv",
                "sk_x3WIncH4WcxsOvcOMY66Fjay8bqDTjErBwSru6iHvOo",
            ),
            (
                "ak_TestVector2Example00000000000000",
                "sk_AttoQ3O3D2-1LdMUKU1eUv62IMFAeDYMQn_JFYhrSlw",
            ),
        ] {
            let key = ApiKey::parse(key).unwrap();
            assert_eq!(d.secret_for(&key).expose(), secret);
            assert!(d.verify(&key, &ApiSecret::parse(secret).unwrap()));
        }
    }

    #[test]
    fn verify_rejects_other_keys_secret_and_other_master() {
        let d = SecretDeriver::new(&vector_master());
        let a = ApiKey::parse("ak_0123456789abcdefghijklmnopqrstuv").unwrap();
        let b = ApiKey::parse("ak_TestVector2Example00000000000000").unwrap();
        assert!(!d.verify(&a, &d.secret_for(&b)));
        let other = SecretDeriver::new(&MasterKey::from_bytes([7; 32]));
        assert!(!d.verify(&a, &other.secret_for(&a)));
    }

    #[test]
    fn key_parsing() {
        assert!(ApiKey::parse(format!("ak_{}", "a".repeat(16))).is_ok());
        assert!(ApiKey::parse(format!("ak_{}", "Z9".repeat(32))).is_ok());
        assert_eq!(ApiKey::parse(""), Err(FormatError::Empty));
        assert_eq!(
            ApiKey::parse("sk_0123456789abcdefghij"),
            Err(FormatError::Prefix("ak_"))
        );
        assert!(matches!(
            ApiKey::parse(format!("ak_{}", "a".repeat(15))),
            Err(FormatError::Length(_))
        ));
        assert!(matches!(
            ApiKey::parse(format!("ak_{}", "a".repeat(65))),
            Err(FormatError::Length(_))
        ));
        assert!(matches!(
            ApiKey::parse("ak_0123456789abcdef-"),
            Err(FormatError::Alphabet(_))
        ));
        // Multi-byte characters are refused, never sliced.
        assert!(ApiKey::parse("ak_0123456789abcdeé").is_err());
        assert!(ApiKey::parse("AK_0123456789abcdefgh").is_err());
    }

    #[test]
    fn generated_keys_are_well_formed_and_distinct() {
        let a = ApiKey::generate();
        let b = ApiKey::generate();
        assert_ne!(a, b);
        assert_eq!(a.as_str().len(), 3 + 32);
        assert_eq!(ApiKey::parse(a.as_str()), Ok(a.clone()));
        // Kept in place, yet equal, ordered and hashed like its text.
        let hash = |v: &dyn Fn(&mut std::hash::DefaultHasher)| {
            let mut h = std::hash::DefaultHasher::new();
            v(&mut h);
            std::hash::Hasher::finish(&h)
        };
        use std::hash::Hash as _;
        let text = a.as_str().as_bytes();
        assert_eq!(hash(&|h| a.hash(h)), hash(&|h| text.hash(h)));
        assert_eq!(a.cmp(&b), a.as_str().cmp(b.as_str()));
        assert_eq!(ApiKey::known(text), Some(a.clone()));
        let longest = ApiKey::parse(format!("ak_{}", "z".repeat(64))).unwrap();
        assert_eq!(ApiKey::known(longest.as_str().as_bytes()), Some(longest));
        assert_eq!(ApiKey::known(&[b'z'; 68]), None);
        assert_eq!(std::mem::size_of::<ApiKey>(), 40);
    }

    #[test]
    fn an_encoded_secret_recognises_exactly_its_canonical_text() {
        let good = "sk_x3WIncH4WcxsOvcOMY66Fjay8bqDTjErBwSru6iHvOo";
        let encoded = ApiSecret::parse(good).unwrap().encoded();
        assert!(encoded.is(good));
        for other in [
            // The same bytes under a lenient decoder, but not the canonical text.
            "sk_x3WIncH4WcxsOvcOMY66Fjay8bqDTjErBwSru6iHvOp",
            // Another secret, one character apart at the start.
            "sk_y3WIncH4WcxsOvcOMY66Fjay8bqDTjErBwSru6iHvOo",
            "x3WIncH4WcxsOvcOMY66Fjay8bqDTjErBwSru6iHvOo",
            "ak_x3WIncH4WcxsOvcOMY66Fjay8bqDTjErBwSru6iHvOo",
            "sk_x3WIncH4WcxsOvcOMY66Fjay8bqDTjErBwSru6iHvO",
            "sk_x3WIncH4WcxsOvcOMY66Fjay8bqDTjErBwSru6iHvOo\0",
            "sk_",
            "",
        ] {
            assert!(!encoded.is(other), "{other:?}");
        }
        let key = ApiKey::generate();
        let derived = SecretDeriver::new(&MasterKey::from_bytes([3; 32])).secret_for(&key);
        assert!(derived.encoded().is(derived.expose()));
        assert!(!derived.encoded().is(good));
        // Kept as sent, a parsed secret is the same as encoded again.
        let sent = EncodedSecret::as_sent(derived.expose()).unwrap();
        assert_eq!(sent.0, derived.encoded().0);
        assert!(sent.is(derived.expose()));
        for malformed in [
            "",
            "sk_",
            good.trim_start_matches("sk_"),
            &good[..good.len() - 1],
        ] {
            assert!(EncodedSecret::as_sent(malformed).is_none(), "{malformed:?}");
        }
    }

    #[test]
    fn secret_parsing_and_canonical_encoding() {
        let good = "sk_x3WIncH4WcxsOvcOMY66Fjay8bqDTjErBwSru6iHvOo";
        assert!(ApiSecret::parse(good).is_ok());
        // Last char 'o' carries two unused low bits equal to zero; 'p' sets one of them and
        // decodes to the same bytes under a lenient decoder.
        let non_canonical = "sk_x3WIncH4WcxsOvcOMY66Fjay8bqDTjErBwSru6iHvOp";
        assert_eq!(
            ApiSecret::parse(non_canonical).map(|_| ()),
            Err(FormatError::NotCanonical)
        );
        assert_eq!(ApiSecret::parse("").map(|_| ()), Err(FormatError::Empty));
        assert_eq!(
            ApiSecret::parse("ak_x3WIncH4WcxsOvcOMY66Fjay8bqDTjErBwSru6iHvOo").map(|_| ()),
            Err(FormatError::Prefix("sk_"))
        );
        assert!(matches!(
            ApiSecret::parse(&good[..good.len() - 1]),
            Err(FormatError::Length(_))
        ));
        assert!(matches!(
            ApiSecret::parse(format!("{good}=")),
            Err(FormatError::Length(_))
        ));
        assert!(matches!(
            ApiSecret::parse("sk_x3WIncH4WcxsOvcOMY66Fjay8bqDTjErBwSru6iHv+o"),
            Err(FormatError::Alphabet(_))
        ));
    }

    #[test]
    fn secrets_never_print() {
        let s = ApiSecret::parse("sk_x3WIncH4WcxsOvcOMY66Fjay8bqDTjErBwSru6iHvOo").unwrap();
        assert!(!format!("{s:?}").contains("x3WI"));
        assert!(!format!("{:?}", vector_master()).contains("0001"));
    }

    #[test]
    fn master_key_hex() {
        let hex_text = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
        assert_eq!(MasterKey::from_hex(hex_text), Ok(vector_master()));
        assert_eq!(
            MasterKey::from_hex(&format!("{hex_text}\n")),
            Ok(vector_master())
        );
        assert_eq!(vector_master().to_hex_line(), format!("{hex_text}\n"));
        assert!(MasterKey::from_hex(&hex_text[2..]).is_err());
        assert!(MasterKey::from_hex(&format!("{hex_text}\n\n")).is_err());
        assert!(MasterKey::from_hex(&format!("{hex_text}00")).is_err());
        assert!(MasterKey::from_hex(&hex_text.replace('0', "g")).is_err());
        assert!(MasterKey::from_hex("").is_err());
    }

    #[test]
    fn a_key_ring_mints_with_its_first_key_and_verifies_with_all() {
        let (a, b) = (
            MasterKey::from_bytes([1; 32]),
            MasterKey::from_bytes([2; 32]),
        );
        let ring = KeyRing::new(&[b.clone(), a.clone()]).unwrap();
        let (old, new) = (SecretDeriver::new(&a), SecretDeriver::new(&b));
        assert_eq!(ring.minting().key_id(), new.key_id());
        assert_eq!(
            ring.key_ids().collect::<Vec<_>>(),
            [new.key_id(), old.key_id()]
        );
        let key = ApiKey::generate();
        for deriver in [&old, &new] {
            let verified = ring.verify(&key, &deriver.secret_for(&key)).unwrap();
            assert_eq!(verified.key_id(), deriver.key_id());
        }
        let other = SecretDeriver::new(&MasterKey::from_bytes([3; 32]));
        assert!(ring.verify(&key, &other.secret_for(&key)).is_none());
        assert!(KeyRing::new(&[]).is_none());
        // Ids are 16 lowercase hex characters, and differ between keys.
        assert_eq!(old.key_id().len(), 16);
        assert_ne!(old.key_id(), new.key_id());
    }

    #[test]
    fn key_files_hold_up_to_eight_distinct_keys() {
        let hex = |b: u8| hex::encode([b; 32]);
        let text = format!("# rotation\n\n{}\n  # old\n{}\r\n", hex(1), hex(2));
        assert_eq!(MasterKey::parse_file(&text).unwrap().len(), 2);
        assert_eq!(
            MasterKey::parse_file("# none\n\n"),
            Err(MasterKeyFileError::Empty)
        );
        assert_eq!(
            MasterKey::parse_file(&format!("{}\nnope\n", hex(1))),
            Err(MasterKeyFileError::Line(2))
        );
        assert_eq!(
            MasterKey::parse_file(&format!("{}\n{}\n", hex(1), hex(1).to_uppercase())),
            Err(MasterKeyFileError::Repeated(2))
        );
        let nine: String = (1..=9).map(|b| format!("{}\n", hex(b))).collect();
        assert_eq!(
            MasterKey::parse_file(&nine),
            Err(MasterKeyFileError::TooMany)
        );
        assert_eq!(MasterKey::parse_file(&nine[..65 * 8]).unwrap().len(), 8);
    }

    // ---- Properties ----------------------------------------------------------------------

    use proptest::prelude::*;
    use testing::{CANONICAL_SECRET, KEY_FORM, MASTER_KEY_FORM, any_text, key_like, secret_like};

    /// The first rule of SPEC §1 a presented key breaks, as [`FormatError`] reports it.
    fn key_error(raw: &str) -> FormatError {
        match raw.strip_prefix(KEY_PREFIX) {
            _ if raw.is_empty() => FormatError::Empty,
            None => FormatError::Prefix(KEY_PREFIX),
            Some(body) if !(16..=64).contains(&body.len()) => FormatError::Length("16 to 64"),
            Some(_) => FormatError::Alphabet("the characters A-Z, a-z and 0-9"),
        }
    }

    /// The first rule a presented secret breaks, or `None` for a canonical one.
    fn secret_error(raw: &str) -> Option<FormatError> {
        let b64 = |c: u8| c.is_ascii_alphanumeric() || c == b'-' || c == b'_';
        match raw.strip_prefix(SECRET_PREFIX) {
            _ if raw.is_empty() => Some(FormatError::Empty),
            None => Some(FormatError::Prefix(SECRET_PREFIX)),
            Some(body) if body.len() != 43 => Some(FormatError::Length("43")),
            Some(body) if !body.bytes().all(b64) => {
                Some(FormatError::Alphabet("base64url characters"))
            }
            Some(_) if !CANONICAL_SECRET.is_match(raw) => Some(FormatError::NotCanonical),
            Some(_) => None,
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        #[test]
        fn a_key_is_accepted_exactly_when_the_spec_says(raw in prop_oneof![any_text(), key_like()]) {
            match ApiKey::parse(&raw) {
                Ok(key) => {
                    prop_assert!(KEY_FORM.is_match(&raw), "accepted {raw:?}");
                    prop_assert_eq!(key.as_str(), raw.as_str());
                }
                Err(e) => {
                    prop_assert!(!KEY_FORM.is_match(&raw), "refused {raw:?}: {e}");
                    prop_assert_eq!(e, key_error(&raw));
                }
            }
        }

        #[test]
        fn a_secret_is_accepted_exactly_when_canonical(raw in prop_oneof![any_text(), secret_like()]) {
            match ApiSecret::parse(&raw) {
                Ok(secret) => {
                    prop_assert!(CANONICAL_SECRET.is_match(&raw), "accepted {raw:?}");
                    // The only string that parses to these bytes is the one presented.
                    prop_assert_eq!(secret.expose(), raw);
                }
                Err(e) => {
                    prop_assert!(!CANONICAL_SECRET.is_match(&raw), "refused {raw:?}: {e}");
                    prop_assert_eq!(Some(e.clone()), secret_error(&raw));
                    // The message never echoes what was presented.
                    if let Some(body) = raw.get(3..).filter(|b| b.len() >= 8) {
                        prop_assert!(!e.to_string().contains(body));
                    }
                }
            }
        }

        #[test]
        fn every_secret_round_trips(bytes in any::<[u8; 32]>()) {
            let secret = ApiSecret(bytes);
            let parsed = ApiSecret::parse(secret.expose());
            prop_assert_eq!(parsed.map(|s| s.0), Ok(bytes));
        }

        #[test]
        fn a_master_key_is_accepted_exactly_when_the_spec_says(
            text in prop_oneof![
                any_text(),
                testing::master_key_like(),
            ]
        ) {
            match MasterKey::from_hex(&text) {
                Ok(key) => {
                    prop_assert!(MASTER_KEY_FORM.is_match(&text), "accepted {text:?}");
                    let hex_digits = text.trim_end_matches(['\r', '\n']).to_ascii_lowercase();
                    prop_assert_eq!(key.to_hex_line(), format!("{hex_digits}\n"));
                }
                Err(e) => {
                    prop_assert!(!MASTER_KEY_FORM.is_match(&text), "refused {text:?}");
                    prop_assert_eq!(e, MasterKeyFormatError);
                }
            }
        }

        #[test]
        fn every_master_key_round_trips(bytes in any::<[u8; 32]>()) {
            let key = MasterKey::from_bytes(bytes);
            prop_assert_eq!(MasterKey::from_hex(&key.to_hex_line()), Ok(key));
        }
    }
}

/// Strategies and SPEC oracles shared by the property tests of the parsers.
#[cfg(test)]
pub(crate) mod testing {
    use std::sync::LazyLock;

    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use proptest::prelude::*;
    use regex::Regex;

    /// SPEC §1's api_key form.
    pub(crate) static KEY_FORM: LazyLock<Regex> =
        LazyLock::new(|| Regex::new("^ak_[A-Za-z0-9]{16,64}$").expect("pattern"));
    /// SPEC §1's api_secret form: 43 base64url characters of which the last carries two
    /// unused low bits, zero in the canonical encoding (values 0, 4, … 60).
    pub(crate) static CANONICAL_SECRET: LazyLock<Regex> =
        LazyLock::new(|| Regex::new("^sk_[A-Za-z0-9_-]{42}[AEIMQUYcgkosw048]$").expect("pattern"));
    /// SPEC §1's key file: 64 hex characters, then a newline or not (CRLF counts as one).
    pub(crate) static MASTER_KEY_FORM: LazyLock<Regex> =
        LazyLock::new(|| Regex::new("^[0-9A-Fa-f]{64}(\\r?\\n)?$").expect("pattern"));

    /// Any text at all: arbitrary Unicode, control characters included.
    pub(crate) fn any_text() -> impl Strategy<Value = String> + Clone {
        prop_oneof![any::<String>(), "\\PC{0,80}"]
    }

    /// A character a near miss may carry: anything, or one from the alphabets nearby.
    fn near_char() -> impl Strategy<Value = char> + Clone {
        prop_oneof![
            any::<char>(),
            proptest::sample::select("AZaz09_-+/= .\n\u{e9}\u{0}".chars().collect::<Vec<_>>()),
        ]
    }

    /// `s` with one character replaced, removed or inserted.
    pub(crate) fn mutate(s: String) -> impl Strategy<Value = String> {
        let n = s.chars().count();
        (0..=n, near_char(), 0..3u8).prop_map(move |(at, c, op)| {
            let mut chars: Vec<char> = s.chars().collect();
            match op {
                0 if at < n => chars[at] = c,
                1 if at < n => {
                    chars.remove(at);
                }
                _ => chars.insert(at, c),
            }
            chars.into_iter().collect()
        })
    }

    /// A valid api_key.
    pub(crate) fn valid_key() -> impl Strategy<Value = String> + Clone {
        "ak_[A-Za-z0-9]{16,64}"
    }

    /// Keys that are valid, almost valid, or the wrong length or prefix.
    pub(crate) fn key_like() -> impl Strategy<Value = String> + Clone {
        prop_oneof![
            valid_key(),
            valid_key().prop_flat_map(mutate),
            "(ak_|AK_|Ak_|ak-|ak|a|_|sk_|ak__| ak_)?[A-Za-z0-9]{0,70}",
            "ak_[ -~]{0,70}",
        ]
    }

    /// A valid (canonical) api_secret.
    pub(crate) fn valid_secret() -> impl Strategy<Value = String> + Clone {
        any::<[u8; 32]>().prop_map(|b| format!("sk_{}", URL_SAFE_NO_PAD.encode(b)))
    }

    /// Secrets that are canonical, almost so (one character off, a non-canonical last
    /// character, padding), or the wrong length or prefix.
    pub(crate) fn secret_like() -> impl Strategy<Value = String> + Clone {
        let b64 = proptest::sample::select(
            "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
                .chars()
                .collect::<Vec<_>>(),
        );
        prop_oneof![
            valid_secret(),
            valid_secret().prop_flat_map(mutate),
            (valid_secret(), b64).prop_map(|(s, last)| format!("{}{last}", &s[..s.len() - 1])),
            valid_secret().prop_map(|s| format!("{s}=")),
            valid_secret().prop_map(|s| format!("{}=", &s[..s.len() - 1])),
            // Standard base64 spells two of the characters differently.
            valid_secret().prop_map(|s| s.replace('-', "+").replace('_', "/")),
            "(sk_|SK_|sk-|sk|ak_)?[A-Za-z0-9_=+/-]{0,50}",
        ]
    }

    /// Key file texts: valid, almost valid, other lengths and line ends.
    pub(crate) fn master_key_like() -> impl Strategy<Value = String> + Clone {
        let valid = "[0-9a-fA-F]{64}(\n|\r\n)?";
        prop_oneof![
            valid,
            valid.prop_flat_map(mutate),
            "[ \t\u{feff}]?[0-9a-fA-F]{0,70}(\n|\r\n|\r|\n\n|\n\r| |\t|\0)?",
        ]
    }
}
