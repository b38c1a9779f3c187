//! Service configuration and where the master key comes from (SPEC §1, §4).
//!
//! The master key is looked up in a fixed order: an explicit key file, then a key embedded in
//! the binary at build time, then `<data dir>/master.key`, generated (mode 0600) when absent.
//! There is no built-in default key.

use std::fs;
use std::io::{ErrorKind, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;

use crate::attributes::Scopes;
use crate::connections;
use crate::credential::{KeyRing, MasterKey, MasterKeyFileError};
use crate::store::{DatabaseTarget, StoreSettings};
use crate::telemetry::LogFormat;

pub use crate::connections::MAX_CONNECTIONS;

/// A master key embedded at build time (`CREDGATE_EMBEDDED_MASTER_KEY`, checked by build.rs).
const EMBEDDED_MASTER_KEY: Option<&str> = option_env!("CREDGATE_EMBEDDED_MASTER_KEY");

/// Name of the generated key file inside the data dir.
pub(crate) const MASTER_KEY_FILE_NAME: &str = "master.key";

// The defaults, written once: `Config::new`, `StoreSettings::default` and the command line's
// `[default: …]` all read these.

/// Default data dir, relative to the working directory.
pub const DEFAULT_DATA_DIR: &str = "./credgate-data";

/// Name of the default SQLite database inside the data dir.
pub const DEFAULT_DATABASE_FILE_NAME: &str = "credgate.db";

/// Default listen address: every IPv4 interface, port 8080.
pub const DEFAULT_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 8080);

/// Default lifetime of a cached positive authentication.
pub const DEFAULT_CACHE_TTL: Duration = Duration::from_secs(300);

/// Default most credentials in the authentication cache.
pub const DEFAULT_CACHE_CAPACITY: u64 = 100_000;

/// Default longest a request may take, body upload included.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Default longest a client may take to send a request's headers.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Default longest in-flight requests may run after a shutdown signal.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);

/// Default most pooled database connections for queries.
pub const DEFAULT_DB_MAX_CONNECTIONS: u32 = 16;

/// Default longest a database query may run, or wait for a connection.
pub const DEFAULT_DB_TIMEOUT: Duration = Duration::from_secs(5);

/// Default scopes of a credential registered without a `scopes` field: every scope.
pub const DEFAULT_REGISTRATION_SCOPES: &str = "*";

/// Default: registration needs no credential (SPEC §2).
pub const DEFAULT_OPEN_REGISTRATION: bool = true;

/// Default interval of `last_used_at` writes (SPEC §8.4).
pub const DEFAULT_LAST_USED_INTERVAL: Duration = Duration::from_secs(60);

/// Default log line format of `serve`.
pub const DEFAULT_LOG_FORMAT: LogFormat = LogFormat::Text;

/// Default log filter directive of `serve`.
pub const DEFAULT_LOG_LEVEL: &str = "info";

/// Everything `serve` needs.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address to listen on (port 0 picks a free one).
    pub listen: SocketAddr,
    /// Holds the default SQLite file and the generated master key.
    pub data_dir: PathBuf,
    /// The database; `None` means `<data dir>/credgate.db`.
    pub database: Option<DatabaseTarget>,
    /// Explicit master key file; takes precedence over every other source.
    pub master_key_file: Option<PathBuf>,
    /// How long a positive authentication is cached; zero disables the cache.
    pub cache_ttl: Duration,
    /// Most cached credentials.
    pub cache_capacity: u64,
    /// Longest a request may take, body upload included.
    pub request_timeout: Duration,
    /// Longest a client may take to send a request's headers.
    pub header_read_timeout: Duration,
    /// Longest in-flight requests may run after a shutdown signal.
    pub shutdown_timeout: Duration,
    /// Database pool size and timeouts.
    pub store: StoreSettings,
    /// Most HTTP connections open at once; `None` derives it from the open-file limit and the
    /// database (see [`Config::max_connections()`]).
    pub max_connections: Option<u32>,
    /// Who may register, with which scopes, and what `/auth/verify` answers.
    pub policy: Policy,
    /// How often `last_used_at` is written; zero disables tracking.
    pub last_used_interval: Duration,
}

/// The privilege settings (SPEC §7.3, §7.4). The defaults keep the seed's model: anyone with a
/// valid pair registers it, and every credential may do everything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Scopes of a credential registered without a `scopes` field (`--registration-scopes`).
    pub registration_scopes: Scopes,
    /// Whether `POST /credentials` needs no credential (`--open-registration`).
    pub open_registration: bool,
    /// What a successful `/auth/verify` answers (`--verify-ok-status`).
    pub verify_ok_status: VerifyStatus,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            registration_scopes: Scopes::parse_list(DEFAULT_REGISTRATION_SCOPES)
                .unwrap_or_default(),
            open_registration: DEFAULT_OPEN_REGISTRATION,
            verify_ok_status: VerifyStatus::NoContent,
        }
    }
}

/// The success status of `/auth/verify`: 204 by default; Envoy's `ext_authz` needs 200.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerifyStatus {
    /// 200 OK.
    Ok,
    /// 204 No Content.
    NoContent,
}

impl VerifyStatus {
    /// The status code.
    pub fn code(self) -> u16 {
        match self {
            Self::Ok => 200,
            Self::NoContent => 204,
        }
    }
}

impl Config {
    /// Defaults from SPEC §2 and §5, with the given data dir.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            listen: DEFAULT_LISTEN,
            data_dir: data_dir.into(),
            database: None,
            master_key_file: None,
            cache_ttl: DEFAULT_CACHE_TTL,
            cache_capacity: DEFAULT_CACHE_CAPACITY,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT,
            store: StoreSettings::default(),
            max_connections: None,
            policy: Policy::default(),
            last_used_interval: DEFAULT_LAST_USED_INTERVAL,
        }
    }

    /// The connection limit: the one configured, else the soft `RLIMIT_NOFILE` minus the
    /// descriptors the database and the rest of the process need, never below a small
    /// minimum nor above [`MAX_CONNECTIONS`].
    pub fn max_connections(&self) -> u32 {
        self.max_connections.unwrap_or_else(|| {
            connections::derived_max_connections(
                connections::open_file_limit(),
                connections::database_descriptors(&self.database_target(), &self.store),
            )
        })
    }

    /// The database this configuration names (see [`database_target`]).
    pub fn database_target(&self) -> DatabaseTarget {
        database_target(self.database.as_ref(), &self.data_dir)
    }
}

/// The database to use: the one named explicitly, else SQLite at
/// `<data dir>/`[`DEFAULT_DATABASE_FILE_NAME`]. `serve` and the direct-database commands
/// share this rule, so they find the same default file.
pub fn database_target(explicit: Option<&DatabaseTarget>, data_dir: &Path) -> DatabaseTarget {
    explicit
        .cloned()
        .unwrap_or_else(|| DatabaseTarget::Sqlite(data_dir.join(DEFAULT_DATABASE_FILE_NAME)))
}

/// Where the master key in use came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// `--master-key-file` / `CREDGATE_MASTER_KEY_FILE`.
    File(PathBuf),
    /// Embedded in the binary at build time.
    Embedded,
    /// `<data dir>/master.key`; `true` when it was generated just now.
    DataDir(PathBuf, bool),
}

/// Whether a missing `<data dir>/master.key` may be generated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenMissing {
    /// Generate it (`serve`, `issue`): a fresh serve and a fresh issue then agree.
    Generate,
    /// Fail (`verify`): checking against a key made up just now would mean nothing.
    Fail,
}

/// Loads the master keys from the first source that applies (a file may hold several; the
/// first mints).
pub fn load_master_key(
    file: Option<&Path>,
    data_dir: &Path,
    missing: WhenMissing,
) -> anyhow::Result<(KeyRing, KeySource)> {
    let (keys, source) = load_master_keys(file, data_dir, missing)?;
    let ring = KeyRing::new(&keys).context("no master key")?;
    Ok((ring, source))
}

/// The master keys themselves, from the first source that applies.
pub fn load_master_keys(
    file: Option<&Path>,
    data_dir: &Path,
    missing: WhenMissing,
) -> anyhow::Result<(Vec<MasterKey>, KeySource)> {
    resolve_master_key(
        file,
        EMBEDDED_MASTER_KEY.filter(|k| !k.is_empty()),
        data_dir,
        missing,
    )
}

fn resolve_master_key(
    file: Option<&Path>,
    embedded: Option<&str>,
    data_dir: &Path,
    missing: WhenMissing,
) -> anyhow::Result<(Vec<MasterKey>, KeySource)> {
    if let Some(path) = file {
        let keys = read_key_file(path)?;
        return Ok((keys, KeySource::File(path.to_owned())));
    }
    if let Some(hex) = embedded {
        let key = MasterKey::from_hex(hex).context("the master key embedded at build time")?;
        return Ok((vec![key], KeySource::Embedded));
    }
    let path = data_dir.join(MASTER_KEY_FILE_NAME);
    match fs::metadata(&path) {
        Ok(_) => Ok((read_key_file(&path)?, KeySource::DataDir(path, false))),
        Err(e) if e.kind() == ErrorKind::NotFound && missing == WhenMissing::Fail => {
            anyhow::bail!(
                "no master key: {} does not exist (give --master-key-file)",
                path.display()
            )
        }
        Err(e) if e.kind() == ErrorKind::NotFound => {
            let (keys, created) = create_key_file(&path)?;
            Ok((keys, KeySource::DataDir(path, created)))
        }
        Err(e) => Err(e).with_context(|| format!("cannot read master key file {}", path.display())),
    }
}

fn read_key_file(path: &Path) -> anyhow::Result<Vec<MasterKey>> {
    let bytes = fs::read(path)
        .with_context(|| format!("cannot read master key file {}", path.display()))?;
    // Text that is not UTF-8 was read fine: it is a malformed key, not an unreadable file.
    let key = std::str::from_utf8(&bytes)
        .map_err(|_| MasterKeyFileError::Line(1))
        .and_then(MasterKey::parse_file)
        .with_context(|| format!("malformed master key file {}", path.display()))?;
    if let Ok(meta) = fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(path = %path.display(), "master key file is readable by group or others; chmod 600 it");
    }
    Ok(key)
}

/// Creates the data dir (0700) when needed.
pub fn ensure_data_dir(dir: &Path) -> anyhow::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create data dir {}", dir.display()))
}

/// Writes a fresh key to `path` without ever clobbering one: written to a private temp
/// file, synced, then hard-linked into place. If another process won the race, its key is
/// used. Returns the key and whether this call created it.
fn create_key_file(path: &Path) -> anyhow::Result<(Vec<MasterKey>, bool)> {
    let dir = path.parent().unwrap_or(Path::new("."));
    ensure_data_dir(dir)?;
    let key = MasterKey::generate();
    let tmp = dir.join(format!(
        ".{MASTER_KEY_FILE_NAME}.{}.tmp",
        std::process::id()
    ));
    write_private(&tmp, key.to_hex_line().as_bytes())?;
    let linked = fs::hard_link(&tmp, path);
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => {
            if let Ok(d) = fs::File::open(dir) {
                let _ = d.sync_all();
            }
            Ok((vec![key], true))
        }
        Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok((read_key_file(path)?, false)),
        Err(e) => {
            Err(e).with_context(|| format!("cannot create master key file {}", path.display()))
        }
    }
}

/// Creates `path` with mode 0600, refusing to overwrite, and syncs it.
pub fn write_private(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX_A: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
    const HEX_B: &str = "ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100";

    #[test]
    fn explicit_file_wins_over_embedded_and_data_dir() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("k");
        fs::write(&file, format!("{HEX_A}\n")).unwrap();
        let (key, source) =
            resolve_master_key(Some(&file), Some(HEX_B), dir.path(), WhenMissing::Generate)
                .unwrap();
        assert_eq!(key, [MasterKey::from_hex(HEX_A).unwrap()]);
        assert_eq!(source, KeySource::File(file));
        assert!(!dir.path().join(MASTER_KEY_FILE_NAME).exists());
    }

    #[test]
    fn embedded_wins_over_data_dir() {
        let dir = tempfile::tempdir().unwrap();
        let (key, source) =
            resolve_master_key(None, Some(HEX_B), dir.path(), WhenMissing::Generate).unwrap();
        assert_eq!(key, [MasterKey::from_hex(HEX_B).unwrap()]);
        assert_eq!(source, KeySource::Embedded);
        assert!(resolve_master_key(None, Some("abc"), dir.path(), WhenMissing::Generate).is_err());
    }

    #[test]
    fn data_dir_key_is_generated_once_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("nested/data");
        let (first, source) = resolve_master_key(None, None, &data, WhenMissing::Generate).unwrap();
        let path = data.join(MASTER_KEY_FILE_NAME);
        assert_eq!(source, KeySource::DataDir(path.clone(), true));
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let (second, source) =
            resolve_master_key(None, None, &data, WhenMissing::Generate).unwrap();
        assert_eq!(first, second);
        assert_eq!(source, KeySource::DataDir(path, false));
        // No temp file left behind.
        assert_eq!(fs::read_dir(&data).unwrap().count(), 1);
    }

    #[test]
    fn bad_key_files_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing");
        let err = resolve_master_key(Some(&missing), None, dir.path(), WhenMissing::Generate)
            .unwrap_err();
        assert!(format!("{err:#}").contains("cannot read master key file"));
        let bad = dir.path().join("bad");
        fs::write(&bad, "not hex").unwrap();
        let err =
            resolve_master_key(Some(&bad), None, dir.path(), WhenMissing::Generate).unwrap_err();
        assert!(format!("{err:#}").contains("malformed master key file"));
        let err = resolve_master_key(None, None, dir.path(), WhenMissing::Fail).unwrap_err();
        assert!(format!("{err:#}").contains("no master key"));
        assert!(!dir.path().join(MASTER_KEY_FILE_NAME).exists());
    }

    // ---- Properties ----------------------------------------------------------------------

    use crate::credential::MAX_MASTER_KEYS;
    use crate::credential::testing::{MASTER_KEY_FORM, master_key_like};
    use proptest::prelude::*;

    proptest! {
        // Each case writes a file: fewer cases than for the pure parsers.
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn a_key_file_is_accepted_exactly_when_the_spec_says(contents in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..80),
            master_key_like().prop_map(String::into_bytes),
            // Several keys, comments and blank lines.
            prop::collection::vec(
                prop_oneof![
                    3 => master_key_like(),
                    1 => Just("# old key, remove after the roll\n".to_owned()),
                    1 => Just("  \n".to_owned()),
                    1 => Just(format!("{HEX_A}\n")),
                ],
                0..11,
            )
            .prop_map(|lines| lines.concat().into_bytes()),
            // A valid key with one byte that is not UTF-8.
            (master_key_like(), 0..64usize, 0x80..=0xffu8).prop_map(|(text, at, byte)| {
                let mut bytes = text.into_bytes();
                if let Some(b) = bytes.get_mut(at) {
                    *b = byte;
                }
                bytes
            }),
        ]) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("key");
            fs::write(&path, &contents).unwrap();
            // SPEC §1 and §8.3: one key per line, 64 hex characters; blank lines and lines
            // starting (after blanks) with `#` ignored; 1 to 8 distinct keys.
            let lines: Option<Vec<String>> = std::str::from_utf8(&contents).ok().map(|t| {
                t.lines()
                    .filter(|l| !l.trim().is_empty() && !l.trim().starts_with('#'))
                    .map(str::to_ascii_lowercase)
                    .collect()
            });
            let valid = lines.as_ref().is_some_and(|keys| {
                let distinct: std::collections::HashSet<&String> = keys.iter().collect();
                (1..=MAX_MASTER_KEYS).contains(&keys.len())
                    && distinct.len() == keys.len()
                    && keys.iter().all(|k| MASTER_KEY_FORM.is_match(k) && k.len() == 64)
            });
            match read_key_file(&path) {
                Ok(keys) => {
                    prop_assert!(valid, "accepted {contents:?}");
                    let lines = lines.unwrap();
                    prop_assert_eq!(keys.len(), lines.len());
                    prop_assert_eq!(Ok(keys[0].clone()), MasterKey::from_hex(&lines[0]));
                }
                Err(e) => {
                    prop_assert!(!valid, "refused {contents:?}: {e:#}");
                    // Readable but wrong is malformed, never "cannot read".
                    let message = format!("{e:#}");
                    prop_assert!(message.starts_with("malformed master key file"), "{message}");
                }
            }
        }
    }
}
