//! The node's cloud config (`/etc/kubernetes/azure.json`, `--cloudconfig`)
//! and the `--immutable-user-msis` list, read the same way by mic and nmi.
//!
//! azure.json is read as upstream reads it: YAML (JSON is YAML) converted to
//! a JSON object whose keys match ignoring case, as Go's `encoding/json`
//! does. A key that is absent or null reads as empty; a value of the wrong
//! type is an error naming the key.
//!
//! [`WatchedFile`] notices when azure.json is rewritten (upstream MIC
//! re-read it when it changed), reads at most [`MAX_FILE_BYTES`], and
//! reads each version once, so a bad version is reported once and the
//! caller keeps the configuration it had.

use std::collections::BTreeMap;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde_json::Value;

/// Largest azure.json read (real ones are a few kilobytes).
pub const MAX_FILE_BYTES: u64 = 1 << 20;

/// azure.json's key for the kubelet identity's client ID.
pub const KUBELET_CLIENT_ID_KEY: &str = "userAssignedIdentityID";

/// Why azure.json could not be read.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum AzureJsonError {
    /// Not a YAML or JSON object.
    #[error("not a JSON or YAML object: {0}")]
    Syntax(String),
    /// A key holds a value of another type.
    #[error("{key}: expected a {expected}, got {got}")]
    WrongType {
        /// The key as asked for.
        key: String,
        /// `string` or `boolean`.
        expected: &'static str,
        /// The value found, as JSON.
        got: String,
    },
}

/// A parsed azure.json: its top-level keys, lower-cased.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AzureJson {
    keys: BTreeMap<String, Value>,
}

impl AzureJson {
    /// Parses the file's contents. An empty file is an error: it says
    /// nothing, not even that a key is absent.
    pub fn parse(text: &str) -> Result<Self, AzureJsonError> {
        if text.trim().is_empty() {
            return Err(AzureJsonError::Syntax("the file is empty".into()));
        }
        let map: BTreeMap<String, Value> =
            serde_saphyr::from_str(text).map_err(|e| AzureJsonError::Syntax(e.to_string()))?;
        Ok(AzureJson {
            keys: map
                .into_iter()
                .map(|(k, v)| (k.to_lowercase(), v))
                .collect(),
        })
    }

    fn get(&self, key: &str) -> Option<&Value> {
        self.keys.get(&key.to_lowercase()).filter(|v| !v.is_null())
    }

    fn wrong_type(key: &str, expected: &'static str, got: &Value) -> AzureJsonError {
        // The value of a secret is never put in an error (errors are logged).
        let lower = key.to_lowercase();
        let got = if lower.contains("secret") || lower.contains("password") {
            "a value (not shown)".to_string()
        } else {
            got.to_string()
        };
        AzureJsonError::WrongType {
            key: key.into(),
            expected,
            got,
        }
    }

    /// The string at `key`, as written (empty when absent or null).
    pub fn string(&self, key: &str) -> Result<String, AzureJsonError> {
        match self.get(key) {
            None => Ok(String::new()),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(other) => Err(Self::wrong_type(key, "string", other)),
        }
    }

    /// The boolean at `key` (false when absent or null).
    pub fn boolean(&self, key: &str) -> Result<bool, AzureJsonError> {
        match self.get(key) {
            None => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(other) => Err(Self::wrong_type(key, "boolean", other)),
        }
    }

    /// The kubelet identity's client ID ([`KUBELET_CLIENT_ID_KEY`]), trimmed;
    /// `None` when absent, null or blank.
    pub fn kubelet_client_id(&self) -> Result<Option<String>, AzureJsonError> {
        let id = self.string(KUBELET_CLIENT_ID_KEY)?;
        let id = id.trim();
        Ok((!id.is_empty()).then(|| id.to_string()))
    }
}

/// What tells one version of a file from another: its length, its
/// modification and change times and its inode (a file replaced by a rename
/// has a new one).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileStamp {
    len: u64,
    modified: Option<SystemTime>,
    changed_ns: i128,
    inode: (u64, u64),
}

impl FileStamp {
    /// The stamp of the file at `path` now.
    pub fn of(path: &Path) -> std::io::Result<FileStamp> {
        let m = std::fs::metadata(path)?;
        #[cfg(unix)]
        let (changed_ns, inode) = {
            use std::os::unix::fs::MetadataExt as _;
            (
                i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec()),
                (m.dev(), m.ino()),
            )
        };
        #[cfg(not(unix))]
        let (changed_ns, inode) = (0, (0, 0));
        Ok(FileStamp {
            len: m.len(),
            modified: m.modified().ok(),
            changed_ns,
            inode,
        })
    }
}

/// What is known of the file's current version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Seen {
    /// It could be looked at: this stamp.
    Stamp(FileStamp),
    /// It could not (for example while it is being replaced): this error.
    Missing(String),
}

/// Whether the file must be read again: only when what is seen now differs
/// from what was seen at the last look (a new version, or the file back).
/// A version already read, well or badly, is not read again.
pub fn must_reread(last: &Seen, now: &Seen) -> bool {
    matches!(now, Seen::Stamp(_)) && last != now
}

/// Why a file could not be read.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReadFileError {
    /// Opening or reading failed.
    #[error("reading {path}: {message}")]
    Io {
        /// The file.
        path: String,
        /// What went wrong.
        message: String,
    },
    /// The file is larger than [`MAX_FILE_BYTES`].
    #[error("{path} is larger than {MAX_FILE_BYTES} bytes")]
    TooLarge {
        /// The file.
        path: String,
    },
}

/// The file's contents as UTF-8, at most [`MAX_FILE_BYTES`].
pub fn read_bounded(path: &Path) -> Result<String, ReadFileError> {
    let io = |e: std::io::Error| ReadFileError::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    };
    let mut text = String::new();
    std::fs::File::open(path)
        .map_err(io)?
        .take(MAX_FILE_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(io)?;
    if text.len() as u64 > MAX_FILE_BYTES {
        return Err(ReadFileError::TooLarge {
            path: path.display().to_string(),
        });
    }
    Ok(text)
}

/// What [`WatchedFile::poll`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Poll {
    /// The same version as at the last look, or still missing.
    Unchanged,
    /// The file disappeared (reported once until it is back).
    Vanished(String),
    /// A new version: its contents.
    Changed(String),
    /// A new version that could not be read.
    Unreadable(ReadFileError),
}

/// A file read again whenever it changes.
#[derive(Debug)]
pub struct WatchedFile {
    path: PathBuf,
    last: Seen,
}

impl WatchedFile {
    /// Starts watching `path` and reads it once; the version read is the
    /// one later polls compare with.
    pub fn open(path: impl Into<PathBuf>) -> Result<(WatchedFile, String), ReadFileError> {
        let path = path.into();
        let last = seen(&path);
        let text = read_bounded(&path)?;
        Ok((WatchedFile { path, last }, text))
    }

    /// The watched path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Looks at the file: a stat, and a read only when it changed.
    pub fn poll(&mut self) -> Poll {
        let now = seen(&self.path);
        if !must_reread(&self.last, &now) {
            let vanished = match (&self.last, &now) {
                (Seen::Stamp(_), Seen::Missing(e)) => Some(e.clone()),
                _ => None,
            };
            self.last = now;
            return vanished.map_or(Poll::Unchanged, Poll::Vanished);
        }
        let result = read_bounded(&self.path);
        // The stamp after the read, so that a write racing the read makes
        // the next poll read again.
        self.last = now;
        match result {
            Ok(text) => {
                if seen(&self.path) != self.last {
                    self.last = Seen::Missing("changed while being read".into());
                }
                Poll::Changed(text)
            }
            Err(e) => Poll::Unreadable(e),
        }
    }
}

fn seen(path: &Path) -> Seen {
    match FileStamp::of(path) {
        Ok(s) => Seen::Stamp(s),
        Err(e) => Seen::Missing(e.to_string()),
    }
}

/// `--immutable-user-msis`: comma-separated client IDs, each trimmed and
/// lower-cased, blank entries dropped (as upstream loads the flag). Any
/// other text is kept: a client ID is compared, never parsed.
pub fn client_id_list(flag: &str) -> Vec<String> {
    flag.split(',')
        .map(|c| c.trim().to_lowercase())
        .filter(|c| !c.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_id_lists() {
        let cases: &[(&str, &[&str])] = &[
            ("", &[]),
            (",", &[]),
            (" , ,", &[]),
            ("aaaa-1", &["aaaa-1"]),
            ("AAAA-1,bbbb-2", &["aaaa-1", "bbbb-2"]),
            (" aaaa-1 , ,BBBB-2,", &["aaaa-1", "bbbb-2"]),
            ("a,a", &["a", "a"]),
        ];
        for (flag, want) in cases {
            assert_eq!(client_id_list(flag), *want, "{flag:?}");
        }
    }

    #[test]
    fn kubelet_client_ids() {
        let cases: &[(&str, Result<Option<&str>, &str>)] = &[
            (
                r#"{"cloud":"AzurePublicCloud","userAssignedIdentityID":"kubelet-id"}"#,
                Ok(Some("kubelet-id")),
            ),
            (
                r#"{"userassignedidentityid":" Kubelet-ID "}"#,
                Ok(Some("Kubelet-ID")),
            ),
            (
                "userAssignedIdentityID: kubelet-id\n",
                Ok(Some("kubelet-id")),
            ),
            (r#"{"useManagedIdentityExtension":true}"#, Ok(None)),
            ("{}", Ok(None)),
            (r#"{"userAssignedIdentityID":""}"#, Ok(None)),
            (r#"{"userAssignedIdentityID":"  "}"#, Ok(None)),
            (r#"{"userAssignedIdentityID":null}"#, Ok(None)),
            (
                r#"{"userAssignedIdentityID":42}"#,
                Err("userAssignedIdentityID: expected a string, got 42"),
            ),
            ("not json", Err("not a JSON or YAML object")),
            ("[]", Err("not a JSON or YAML object")),
            ("{", Err("not a JSON or YAML object")),
            ("", Err("not a JSON or YAML object: the file is empty")),
            (" \n", Err("not a JSON or YAML object: the file is empty")),
        ];
        for (text, want) in cases {
            let got = AzureJson::parse(text).and_then(|j| j.kubelet_client_id());
            match (want, &got) {
                (Ok(w), Ok(g)) => assert_eq!(g.as_deref(), *w, "{text}"),
                (Err(w), Err(e)) => assert!(e.to_string().starts_with(w), "{text}: {e}"),
                _ => panic!("{text}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn a_version_is_read_once() {
        let stamp = |len, ino| {
            Seen::Stamp(FileStamp {
                len,
                modified: None,
                changed_ns: 0,
                inode: (1, ino),
            })
        };
        let missing = || Seen::Missing("No such file or directory".into());
        let cases = [
            (stamp(10, 1), stamp(10, 1), false),
            (stamp(10, 1), stamp(11, 1), true),
            // Replaced by a rename: same length, new inode.
            (stamp(10, 1), stamp(10, 2), true),
            (stamp(10, 1), missing(), false),
            (missing(), missing(), false),
            (missing(), stamp(10, 1), true),
        ];
        for (last, now, want) in cases {
            assert_eq!(must_reread(&last, &now), want, "{last:?} -> {now:?}");
        }
    }

    /// Real rewrites of a real file: each version read once, a vanished
    /// file reported once, an oversized one refused.
    #[test]
    fn watched_file_reads_each_new_version() {
        let dir = std::env::temp_dir().join(format!("aadpodid-watched-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("azure.json");
        std::fs::write(&path, "{\"a\":1}").unwrap();
        let (mut w, first) = WatchedFile::open(&path).unwrap();
        assert_eq!(first, "{\"a\":1}");
        assert_eq!(w.poll(), Poll::Unchanged);
        std::fs::write(&path, "{\"a\":22}").unwrap();
        assert_eq!(w.poll(), Poll::Changed("{\"a\":22}".into()));
        assert_eq!(w.poll(), Poll::Unchanged);
        // Replaced by a rename, as kubelet and editors do.
        let tmp = dir.join("azure.json.tmp");
        std::fs::write(&tmp, "{\"a\":33}").unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        assert_eq!(w.poll(), Poll::Changed("{\"a\":33}".into()));
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(w.poll(), Poll::Vanished(_)));
        assert_eq!(w.poll(), Poll::Unchanged);
        std::fs::write(&path, vec![b' '; (MAX_FILE_BYTES + 1) as usize]).unwrap();
        assert!(matches!(
            w.poll(),
            Poll::Unreadable(ReadFileError::TooLarge { .. })
        ));
        assert_eq!(w.poll(), Poll::Unchanged, "a bad version is read once");
        std::fs::write(&path, "{}").unwrap();
        assert_eq!(w.poll(), Poll::Changed("{}".into()));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn strings_and_booleans_by_key_in_any_case() {
        let j = AzureJson::parse(
            "cloud: AzureChinaCloud\ntenantID: t\nuseManagedIdentityExtension: true\nvmType: null\nmaximumLoadBalancerRuleCount: 250\n",
        )
        .unwrap();
        assert_eq!(j.string("cloud").unwrap(), "AzureChinaCloud");
        assert_eq!(j.string("tenantId").unwrap(), "t");
        assert_eq!(j.string("TENANTID").unwrap(), "t");
        assert_eq!(j.string("vmType").unwrap(), "", "null reads as empty");
        assert_eq!(j.string("absent").unwrap(), "");
        assert!(j.boolean("useManagedIdentityExtension").unwrap());
        assert!(!j.boolean("vmType").unwrap(), "null reads as false");
        assert!(!j.boolean("absent").unwrap());
        assert_eq!(
            j.string("maximumLoadBalancerRuleCount")
                .unwrap_err()
                .to_string(),
            "maximumLoadBalancerRuleCount: expected a string, got 250"
        );
        assert_eq!(
            j.boolean("cloud").unwrap_err().to_string(),
            r#"cloud: expected a boolean, got "AzureChinaCloud""#
        );
        let j = AzureJson::parse("aadClientSecret: 123456\nkeyPassword: [1]\n").unwrap();
        for key in ["aadClientSecret", "keyPassword"] {
            let e = j.string(key).unwrap_err().to_string();
            assert_eq!(
                e,
                format!("{key}: expected a string, got a value (not shown)")
            );
        }
    }
}
