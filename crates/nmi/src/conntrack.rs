//! `--enable-conntrack-deletion`: cutting connections to IMDS that were
//! opened before the redirect.
//!
//! The DNAT rule applies to new connections only: a keep-alive connection a
//! pod opened to 169.254.169.254:80 before NMI installed its redirect (a new
//! or rebooted node, or a chain someone deleted) keeps reaching the node's
//! real IMDS, which hands out any identity of the node. After each sync that
//! (re)installed the redirect NMI deletes the conntrack entries of such
//! connections. The next packet of the connection then starts a new entry,
//! goes through the nat table, is redirected to NMI, which knows no such
//! connection and resets it; the pod's client reconnects and reaches NMI.
//!
//! Only entries whose reply still comes from the metadata address are
//! deleted (`--reply-src`): connections already redirected to NMI have their
//! reply from NMI's address and are left alone. Host-network traffic to IMDS
//! (the kubelet, NMI itself) is not redirected, so deleting its entry only
//! makes conntrack pick the connection up again, unchanged.
//!
//! Pure: [`delete_args`] and [`outcome`]; thin: [`Conntrack`], over the
//! `conntrack` program from conntrack-tools (Debian package `conntrack`),
//! which needs CAP_NET_ADMIN as iptables does.

use std::net::Ipv4Addr;
use std::path::PathBuf;

/// The arguments that delete the TCP entries whose original destination is
/// `ip:port` and whose reply comes from `ip` (not redirected).
pub fn delete_args(ip: Ipv4Addr, port: u16) -> Vec<String> {
    let ip = ip.to_string();
    [
        "-D",
        "-p",
        "tcp",
        "--orig-dst",
        &ip,
        "--orig-port-dst",
        &port.to_string(),
        "--reply-src",
        &ip,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// What a `conntrack -D` run meant: the number of entries deleted, or why it
/// failed. `code` is the exit code (`None` when killed by a signal),
/// `stderr` what it printed there. conntrack prints "N flow entries have
/// been deleted." and exits 1 when N is 0: that is not a failure.
pub fn outcome(code: Option<i32>, stderr: &str) -> Result<u64, String> {
    let deleted = stderr.lines().find_map(|l| {
        let (_, rest) = l.split_once(": ").unwrap_or(("", l));
        rest.trim()
            .strip_suffix("flow entries have been deleted.")
            .and_then(|n| n.trim().parse::<u64>().ok())
    });
    match (code, deleted) {
        (Some(0), Some(n)) => Ok(n),
        (Some(0), None) => Ok(0),
        (Some(1), Some(0)) => Ok(0),
        _ => Err(format!(
            "exit {}: {}",
            code.map_or_else(|| "by signal".to_string(), |c| c.to_string()),
            stderr.trim()
        )),
    }
}

/// Why deleting conntrack entries failed.
#[derive(Debug, thiserror::Error)]
pub enum ConntrackError {
    /// The program is not there.
    #[error(
        "--enable-conntrack-deletion: {program} not found ({source}); install conntrack-tools (Debian package `conntrack`) in NMI's image or point --conntrack-path at it"
    )]
    NotFound {
        /// The program.
        program: String,
        /// Why.
        source: std::io::Error,
    },
    /// The program could not be started for another reason.
    #[error("--enable-conntrack-deletion: running {program}: {source}")]
    Spawn {
        /// The program.
        program: String,
        /// Why.
        source: std::io::Error,
    },
    /// It ran and failed.
    #[error("--enable-conntrack-deletion: {program} {args}: {reason}")]
    Failed {
        /// The program.
        program: String,
        /// Its arguments.
        args: String,
        /// Exit status and stderr.
        reason: String,
    },
}

/// Longest a `conntrack` run may take (it holds up the iptables loop).
const RUN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Runs `conntrack` (optionally behind a prefix such as `ip netns exec <ns>`).
#[derive(Clone, Debug)]
pub struct Conntrack {
    program: PathBuf,
    prefix: Vec<String>,
}

impl Conntrack {
    /// Runs `program` (normally `conntrack`, `--conntrack-path`).
    pub fn new(program: impl Into<PathBuf>) -> Self {
        Conntrack {
            program: program.into(),
            prefix: Vec::new(),
        }
    }

    /// Runs `program prefix... conntrack-args...`.
    pub fn with_prefix(program: impl Into<PathBuf>, prefix: &[&str]) -> Self {
        Conntrack {
            program: program.into(),
            prefix: prefix.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// Deletes the not-redirected TCP entries to `ip:port`; returns how many.
    pub async fn delete_to(&self, ip: Ipv4Addr, port: u16) -> Result<u64, ConntrackError> {
        let args = delete_args(ip, port);
        let program = self.program.display().to_string();
        let run = tokio::process::Command::new(&self.program)
            .args(&self.prefix)
            .args(&args)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output();
        let out = match tokio::time::timeout(RUN_TIMEOUT, run).await {
            Ok(Ok(out)) => out,
            Ok(Err(source)) if source.kind() == std::io::ErrorKind::NotFound => {
                return Err(ConntrackError::NotFound { program, source });
            }
            Ok(Err(source)) => return Err(ConntrackError::Spawn { program, source }),
            Err(_) => {
                return Err(ConntrackError::Failed {
                    program,
                    args: args.join(" "),
                    reason: format!("no answer within {RUN_TIMEOUT:?}; killed"),
                });
            }
        };
        outcome(out.status.code(), &String::from_utf8_lossy(&out.stderr)).map_err(|reason| {
            ConntrackError::Failed {
                program,
                args: args.join(" "),
                reason,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_select_not_redirected_tcp_to_the_metadata_address() {
        assert_eq!(
            delete_args(Ipv4Addr::new(169, 254, 169, 254), 80),
            [
                "-D",
                "-p",
                "tcp",
                "--orig-dst",
                "169.254.169.254",
                "--orig-port-dst",
                "80",
                "--reply-src",
                "169.254.169.254"
            ]
        );
    }

    #[test]
    fn outcomes() {
        type Case = (&'static str, Option<i32>, &'static str, Result<u64, ()>);
        let cases: &[Case] = &[
            (
                "nothing to delete is exit 1 and not an error",
                Some(1),
                "conntrack v1.4.7 (conntrack-tools): 0 flow entries have been deleted.\n",
                Ok(0),
            ),
            (
                "some deleted",
                Some(0),
                "conntrack v1.4.7 (conntrack-tools): 3 flow entries have been deleted.\n",
                Ok(3),
            ),
            (
                "an older version's plain line",
                Some(0),
                "1 flow entries have been deleted.",
                Ok(1),
            ),
            ("success without a count", Some(0), "", Ok(0)),
            (
                "no permission",
                Some(1),
                "conntrack v1.4.7 (conntrack-tools): Operation failed: Operation not permitted\n",
                Err(()),
            ),
            (
                "exit 1 claiming deletions is odd: an error",
                Some(1),
                "2 flow entries have been deleted.",
                Err(()),
            ),
            (
                "bad usage",
                Some(2),
                "conntrack v1.4.7 (conntrack-tools): unknown option",
                Err(()),
            ),
            ("killed", None, "", Err(())),
        ];
        for (name, code, stderr, want) in cases {
            assert_eq!(outcome(*code, stderr).map_err(|_| ()), *want, "{name}");
        }
        assert!(
            outcome(Some(1), "Operation not permitted")
                .unwrap_err()
                .contains("Operation not permitted"),
            "the error carries stderr"
        );
    }

    #[tokio::test]
    async fn a_missing_program_says_what_to_install() {
        let err = Conntrack::new("/nonexistent/conntrack")
            .delete_to(Ipv4Addr::new(169, 254, 169, 254), 80)
            .await
            .unwrap_err();
        assert!(matches!(err, ConntrackError::NotFound { .. }), "{err:?}");
        let text = err.to_string();
        assert!(text.contains("/nonexistent/conntrack"), "{text}");
        assert!(text.contains("--conntrack-path"), "{text}");
    }
}
