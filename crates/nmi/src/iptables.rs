//! The redirect of pod IMDS traffic to NMI (upstream's rules and their limits:
//! docs/upstream-behaviour.md#iptables-redirect). Pure: the expected rules and the
//! plan that turns what `iptables -S` shows into them. Thin: [`Runner`], over the
//! `iptables` binary.
//!
//! **Fail-closed.** NMI leaves the chain and the jump in place when it stops,
//! so during a restart or rolling update pods' requests to 169.254.169.254 are
//! refused at once (nothing listens on the DNAT target) instead of reaching the
//! real IMDS, which would hand out any node identity. Only `nmi
//! --cleanup-iptables` (by hand), `--cleanup-on-uninstall` when NMI's own
//! DaemonSet is gone (what the chart sets; see `uninstall.rs`) or
//! `--remove-iptables-on-exit` (upstream's behaviour) removes them.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

/// The nat chain NMI owns.
pub const CHAIN: &str = "aad-metadata";
/// The built-in chain that jumps to [`CHAIN`] (pod traffic only: host-network
/// traffic goes through OUTPUT and is not redirected, as upstream).
pub const PREROUTING: &str = "PREROUTING";

/// Where the redirect points.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Redirect {
    /// IMDS address (`--metadata-ip`).
    pub metadata_ip: Ipv4Addr,
    /// IMDS port (`--metadata-port`).
    pub metadata_port: u16,
    /// NMI's address (`--nmi-listen-address`, 0.0.0.0 mapped to 127.0.0.1).
    pub target_ip: IpAddr,
    /// NMI's port (`--nmi-port`).
    pub target_port: u16,
}

impl Redirect {
    /// The chain's rules exactly as `iptables -t nat -S aad-metadata` prints them.
    pub fn expected_rules(&self) -> Vec<String> {
        vec![
            format!(
                "-A {CHAIN} ! -s 127.0.0.1/32 -d {}/32 -p tcp -m tcp --dport {} -j DNAT --to-destination {}:{}",
                self.metadata_ip, self.metadata_port, self.target_ip, self.target_port
            ),
            format!("-A {CHAIN} -j RETURN"),
        ]
    }

    /// Whether packets DNATed to the target need `route_localnet`.
    pub fn needs_route_localnet(&self) -> bool {
        self.target_ip.is_loopback()
    }
}

/// One iptables change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// `-N aad-metadata`.
    CreateChain,
    /// `-F aad-metadata`.
    FlushChain,
    /// `-A aad-metadata <rule>`; the string is a `-S` line.
    AppendRule(String),
    /// `-D PREROUTING -j aad-metadata` (a jump not at position 1, or a duplicate).
    DeleteJump,
    /// `-I PREROUTING 1 -j aad-metadata`.
    InsertJump,
}

impl Action {
    /// The iptables arguments after `-t nat`.
    pub fn args(&self) -> Vec<String> {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        match self {
            Action::CreateChain => s(&["-N", CHAIN]),
            Action::FlushChain => s(&["-F", CHAIN]),
            Action::AppendRule(rule) => rule.split_whitespace().map(str::to_owned).collect(),
            Action::DeleteJump => s(&["-D", PREROUTING, "-j", CHAIN]),
            Action::InsertJump => s(&["-I", PREROUTING, "1", "-j", CHAIN]),
        }
    }
}

/// `-A PREROUTING -j aad-metadata` as `-S` prints it.
fn jump_line() -> String {
    format!("-A {PREROUTING} -j {CHAIN}")
}

/// What to change, given `chain` (the `-S aad-metadata` lines, `None` when the
/// chain does not exist) and `prerouting` (the `-S PREROUTING` lines). Empty when
/// everything is in place. Tampered chains are flushed and rewritten (as upstream
/// does at its next check); the jump is kept first in PREROUTING and single, so no
/// rule inserted before it can divert pod traffic around NMI.
pub fn plan(redirect: &Redirect, chain: Option<&[String]>, prerouting: &[String]) -> Vec<Action> {
    let mut actions = Vec::new();
    let expected = redirect.expected_rules();
    match chain {
        None => {
            actions.push(Action::CreateChain);
            actions.extend(expected.into_iter().map(Action::AppendRule));
        }
        Some(lines) => {
            let rules: Vec<&str> = lines
                .iter()
                .map(|l| l.trim())
                .filter(|l| l.starts_with("-A "))
                .collect();
            if rules != expected.iter().map(String::as_str).collect::<Vec<_>>() {
                actions.push(Action::FlushChain);
                actions.extend(expected.into_iter().map(Action::AppendRule));
            }
        }
    }
    let appended: Vec<&str> = prerouting
        .iter()
        .map(|l| l.trim())
        .filter(|l| l.starts_with("-A "))
        .collect();
    let jump = jump_line();
    let positions: Vec<usize> = appended
        .iter()
        .enumerate()
        .filter(|(_, l)| **l == jump)
        .map(|(i, _)| i)
        .collect();
    if positions != [0] {
        actions.extend(positions.iter().map(|_| Action::DeleteJump));
        actions.push(Action::InsertJump);
    }
    actions
}

/// Why an iptables call failed.
#[derive(Debug, thiserror::Error)]
pub enum IptablesError {
    /// The program could not be started.
    #[error("running {program}: {source}")]
    Spawn {
        /// The program.
        program: String,
        /// Why.
        source: std::io::Error,
    },
    /// It ran and failed.
    #[error("iptables {args}: {stderr}")]
    Failed {
        /// The arguments.
        args: String,
        /// Its stderr.
        stderr: String,
    },
    /// Writing the route_localnet sysctl failed.
    #[error("setting net.ipv4.conf.all.route_localnet=1: {0}")]
    RouteLocalnet(std::io::Error),
    /// route_localnet is 0, the target is loopback and `/proc/sys` is
    /// read-only: what is wrong and the two fixes.
    #[error("{0}")]
    RouteLocalnetReadOnly(String),
    /// Deleting the conntrack entries of connections opened before the
    /// redirect failed (`--enable-conntrack-deletion`).
    #[error(transparent)]
    Conntrack(#[from] crate::conntrack::ConntrackError),
}

/// The parts of the nat table NMI looks at.
struct Tables {
    /// `-A aad-metadata` lines; `None` when the chain does not exist.
    chain: Option<Vec<String>>,
    /// `-A PREROUTING` lines.
    prerouting: Vec<String>,
}

/// Runs `iptables` (optionally behind a prefix such as `ip netns exec <ns>`,
/// which tests use; NMI itself runs it plainly in the host's namespace).
#[derive(Clone, Debug)]
pub struct Runner {
    program: PathBuf,
    prefix: Vec<String>,
    /// `--enable-conntrack-deletion`: run after every sync that changed rules.
    conntrack: Option<crate::conntrack::Conntrack>,
}

/// Seconds to wait for the xtables lock (`-w`): kube-proxy and CNI plugins
/// take it too.
const LOCK_WAIT_SECS: &str = "5";

impl Runner {
    /// Runs `program` (normally `iptables`).
    pub fn new(program: impl Into<PathBuf>) -> Self {
        Runner {
            program: program.into(),
            prefix: Vec::new(),
            conntrack: None,
        }
    }

    /// Runs `program prefix... iptables-args...`, e.g. `ip netns exec ns iptables`.
    pub fn with_prefix(program: impl Into<PathBuf>, prefix: &[&str]) -> Self {
        Runner {
            program: program.into(),
            prefix: prefix.iter().map(|s| s.to_string()).collect(),
            conntrack: None,
        }
    }

    /// After every [`Runner::sync`] that changed rules, deletes the
    /// conntrack entries of connections to the metadata address that are not
    /// redirected (see [`crate::conntrack`]).
    pub fn with_conntrack(mut self, conntrack: crate::conntrack::Conntrack) -> Self {
        self.conntrack = Some(conntrack);
        self
    }

    /// Deletes the conntrack entries of not-redirected connections to
    /// `redirect`'s metadata address, when conntrack deletion is on; returns
    /// how many (`None`: off).
    pub async fn cut_old_connections(
        &self,
        redirect: &Redirect,
    ) -> Result<Option<u64>, IptablesError> {
        let Some(ct) = &self.conntrack else {
            return Ok(None);
        };
        let n = ct
            .delete_to(redirect.metadata_ip, redirect.metadata_port)
            .await?;
        if n > 0 {
            tracing::warn!(
                deleted = n,
                "cut connections to {}:{} opened before the redirect",
                redirect.metadata_ip,
                redirect.metadata_port
            );
        }
        Ok(Some(n))
    }

    async fn run(&self, args: &[String]) -> Result<String, IptablesError> {
        let mut cmd = tokio::process::Command::new(&self.program);
        cmd.args(&self.prefix)
            .args(["-w", LOCK_WAIT_SECS, "-t", "nat"])
            .args(args)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        let out = cmd.output().await.map_err(|source| IptablesError::Spawn {
            program: self.program.display().to_string(),
            source,
        })?;
        if !out.status.success() {
            return Err(IptablesError::Failed {
                args: args.join(" "),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The nat table as `-S` prints it. The whole table is listed rather than
    /// one chain: iptables-nft reports a missing chain as "incompatible" in a
    /// namespace whose nat table does not exist yet.
    async fn list_table(&self) -> Result<Tables, IptablesError> {
        let out = self.run(&["-S".into()]).await?;
        let lines: Vec<String> = out.lines().map(|l| l.trim().to_owned()).collect();
        let new_chain = format!("-N {CHAIN}");
        let chain_prefix = format!("-A {CHAIN} ");
        let chain = lines.contains(&new_chain).then(|| {
            lines
                .iter()
                .filter(|l| l.starts_with(&chain_prefix))
                .cloned()
                .collect()
        });
        let pre_prefix = format!("-A {PREROUTING} ");
        let prerouting = lines
            .iter()
            .filter(|l| l.starts_with(&pre_prefix))
            .cloned()
            .collect();
        Ok(Tables { chain, prerouting })
    }

    /// Brings the rules in line with `redirect`; returns the actions taken.
    /// When it changed anything and conntrack deletion is on
    /// ([`Runner::with_conntrack`]), then cuts connections opened before.
    pub async fn sync(&self, redirect: &Redirect) -> Result<Vec<Action>, IptablesError> {
        let t = self.list_table().await?;
        let actions = plan(redirect, t.chain.as_deref(), &t.prerouting);
        for a in &actions {
            self.run(&a.args()).await?;
        }
        if !actions.is_empty() {
            self.cut_old_connections(redirect).await?;
        }
        Ok(actions)
    }

    /// Removes the jump(s) and the chain (explicit cleanup only).
    pub async fn cleanup(&self) -> Result<(), IptablesError> {
        let t = self.list_table().await?;
        let jump = jump_line();
        for _ in t.prerouting.iter().filter(|l| **l == jump) {
            self.run(&Action::DeleteJump.args()).await?;
        }
        if t.chain.is_some() {
            self.run(&Action::FlushChain.args()).await?;
            self.run(&["-X".into(), CHAIN.into()]).await?;
        }
        Ok(())
    }
}

/// Where the kernel keeps `net.ipv4.conf.all.route_localnet` (per network
/// namespace: the reader's).
pub const ROUTE_LOCALNET_PATH: &str = "/proc/sys/net/ipv4/conf/all/route_localnet";

/// The chart value that runs a privileged init container setting
/// route_localnet=1 before NMI starts.
pub const CHART_INIT_CONTAINER_VALUE: &str = "nmi.routeLocalnetInitContainer=true";

/// The chart value that binds NMI to the node's IP (the redirect then
/// targets it and needs no route_localnet).
pub const CHART_LISTEN_ADDRESS_VALUE: &str = "nmi.listenAddress=\"$(HOST_IP)\"";

/// What to do about `route_localnet` at start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LocalnetStep {
    /// The DNAT target is not loopback: the setting does not matter.
    NotNeeded,
    /// It is 1 already.
    AlreadyOn,
    /// Write 1 (`--set-route-localnet`, and it is 0 or unreadable).
    Write,
    /// It is 0 and `--set-route-localnet=false`: the redirect cannot work;
    /// say so and go on (something else may set it later).
    WarnOff,
    /// Unreadable and `--set-route-localnet=false`: say it cannot be checked.
    WarnUnknown,
}

/// The decision: `needed` is [`Redirect::needs_route_localnet`], `set` is
/// `--set-route-localnet`, `current` what the file says (`None`: unreadable).
pub fn localnet_step(needed: bool, set: bool, current: Option<bool>) -> LocalnetStep {
    match (needed, current, set) {
        (false, _, _) => LocalnetStep::NotNeeded,
        (true, Some(true), _) => LocalnetStep::AlreadyOn,
        (true, _, true) => LocalnetStep::Write,
        (true, Some(false), false) => LocalnetStep::WarnOff,
        (true, None, false) => LocalnetStep::WarnUnknown,
    }
}

/// Whether a failed write means `/proc/sys` is not writable here (a
/// container without privileges: read-only mount, or no permission), as
/// opposed to some other failure.
pub fn is_read_only(error: &std::io::Error) -> bool {
    const EPERM: i32 = 1;
    const EACCES: i32 = 13;
    const EROFS: i32 = 30;
    matches!(error.raw_os_error(), Some(EPERM | EACCES | EROFS))
        || error.kind() == std::io::ErrorKind::PermissionDenied
}

/// The message for route_localnet=0 with a loopback target; `why` says what
/// went wrong (the write error, or the flag that forbade writing).
pub fn localnet_message(target: IpAddr, port: u16, why: &str) -> String {
    format!(
        "net.ipv4.conf.all.route_localnet is 0 in NMI's network namespace and {why}. \
         Without it the kernel drops the pod traffic that the redirect sends to {target}:{port}, \
         so no pod on this node can reach NMI (requests to 169.254.169.254 time out). \
         Fix it in one of two ways: (1) set it to 1 before NMI starts: with the Helm chart, \
         {CHART_INIT_CONTAINER_VALUE} (a small privileged init container runs \
         `echo 1 > {ROUTE_LOCALNET_PATH}`); or (2) bind NMI to the node's IP instead of \
         loopback: --nmi-listen-address=<node IP>, with the Helm chart \
         {CHART_LISTEN_ADDRESS_VALUE}; this needs no route_localnet"
    )
}

/// Applies [`localnet_step`] in the caller's network namespace: reads
/// [`ROUTE_LOCALNET_PATH`] and writes 1 when needed and allowed. A write
/// refused because `/proc/sys` is read-only is
/// [`IptablesError::RouteLocalnetReadOnly`], with [`localnet_message`];
/// `--set-route-localnet=false` with 0 is logged as an error and NMI goes on.
pub fn ensure_route_localnet(redirect: &Redirect, set: bool) -> Result<(), IptablesError> {
    let current = std::fs::read_to_string(ROUTE_LOCALNET_PATH)
        .ok()
        .map(|v| v.trim() != "0");
    match localnet_step(redirect.needs_route_localnet(), set, current) {
        LocalnetStep::NotNeeded | LocalnetStep::AlreadyOn => Ok(()),
        LocalnetStep::Write => match std::fs::write(ROUTE_LOCALNET_PATH, "1") {
            Ok(()) => {
                tracing::info!(
                    "set net.ipv4.conf.all.route_localnet=1 (the redirect targets loopback)"
                );
                Ok(())
            }
            Err(e) if is_read_only(&e) => {
                Err(IptablesError::RouteLocalnetReadOnly(localnet_message(
                    redirect.target_ip,
                    redirect.target_port,
                    &format!(
                        "NMI cannot set it to 1: writing {ROUTE_LOCALNET_PATH} failed ({e}): /proc/sys is read-only here, as in a container without privileges"
                    ),
                )))
            }
            Err(e) => Err(IptablesError::RouteLocalnet(e)),
        },
        LocalnetStep::WarnOff => {
            tracing::error!(
                "{}",
                localnet_message(
                    redirect.target_ip,
                    redirect.target_port,
                    "--set-route-localnet=false forbids NMI to set it: the redirect cannot work until something sets it to 1"
                )
            );
            Ok(())
        }
        LocalnetStep::WarnUnknown => {
            tracing::warn!(
                "cannot read {ROUTE_LOCALNET_PATH} and --set-route-localnet=false: if it is 0 the redirect to {}:{} cannot work",
                redirect.target_ip,
                redirect.target_port
            );
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redirect() -> Redirect {
        Redirect {
            metadata_ip: Ipv4Addr::new(169, 254, 169, 254),
            metadata_port: 80,
            target_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            target_port: 2579,
        }
    }

    fn lines(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn expected_rules_are_upstreams() {
        assert_eq!(
            redirect().expected_rules(),
            [
                "-A aad-metadata ! -s 127.0.0.1/32 -d 169.254.169.254/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination 127.0.0.1:2579",
                "-A aad-metadata -j RETURN",
            ]
        );
        assert!(redirect().needs_route_localnet());
        let node_ip = Redirect {
            target_ip: "10.240.0.4".parse().unwrap(),
            ..redirect()
        };
        assert!(!node_ip.needs_route_localnet());
    }

    #[test]
    fn plans() {
        let r = redirect();
        let good_chain = {
            let mut v = lines(&["-N aad-metadata"]);
            v.extend(r.expected_rules());
            v
        };
        let rules: Vec<Action> = r
            .expected_rules()
            .into_iter()
            .map(Action::AppendRule)
            .collect();
        let with = |mut v: Vec<Action>, more: &[Action]| {
            v.extend_from_slice(more);
            v
        };
        type Case = (&'static str, Option<Vec<String>>, Vec<String>, Vec<Action>);
        let cases: Vec<Case> = vec![
            (
                "fresh node",
                None,
                lines(&["-P PREROUTING ACCEPT", "-A PREROUTING -j KUBE-SERVICES"]),
                with(
                    with(vec![Action::CreateChain], &rules),
                    &[Action::InsertJump],
                ),
            ),
            (
                "all in place",
                Some(good_chain.clone()),
                lines(&[
                    "-P PREROUTING ACCEPT",
                    "-A PREROUTING -j aad-metadata",
                    "-A PREROUTING -j KUBE-SERVICES",
                ]),
                vec![],
            ),
            (
                "tampered rule",
                Some(lines(&["-N aad-metadata", "-A aad-metadata -j RETURN"])),
                lines(&["-A PREROUTING -j aad-metadata"]),
                with(vec![Action::FlushChain], &rules),
            ),
            (
                "extra rule appended",
                Some({
                    let mut v = good_chain.clone();
                    v.push("-A aad-metadata -j ACCEPT".into());
                    v
                }),
                lines(&["-A PREROUTING -j aad-metadata"]),
                with(vec![Action::FlushChain], &rules),
            ),
            (
                "jump pushed down",
                Some(good_chain.clone()),
                lines(&[
                    "-P PREROUTING ACCEPT",
                    "-A PREROUTING -j ACCEPT",
                    "-A PREROUTING -j aad-metadata",
                ]),
                vec![Action::DeleteJump, Action::InsertJump],
            ),
            (
                "jump duplicated",
                Some(good_chain.clone()),
                lines(&[
                    "-A PREROUTING -j aad-metadata",
                    "-A PREROUTING -j aad-metadata",
                ]),
                vec![Action::DeleteJump, Action::DeleteJump, Action::InsertJump],
            ),
            (
                "jump missing",
                Some(good_chain),
                lines(&["-P PREROUTING ACCEPT"]),
                vec![Action::InsertJump],
            ),
        ];
        for (name, chain, pre, want) in cases {
            assert_eq!(plan(&r, chain.as_deref(), &pre), want, "{name}");
        }
    }

    #[test]
    fn route_localnet_steps() {
        use LocalnetStep::*;
        let cases = [
            // (needed, --set-route-localnet, current, step)
            (false, true, Some(false), NotNeeded),
            (false, false, None, NotNeeded),
            (true, true, Some(true), AlreadyOn),
            (true, false, Some(true), AlreadyOn),
            (true, true, Some(false), Write),
            (true, true, None, Write),
            (true, false, Some(false), WarnOff),
            (true, false, None, WarnUnknown),
        ];
        for (needed, set, current, want) in cases {
            assert_eq!(
                localnet_step(needed, set, current),
                want,
                "needed={needed} set={set} current={current:?}"
            );
        }
    }

    #[test]
    fn read_only_proc_sys_is_recognised() {
        use std::io::{Error, ErrorKind};
        for (e, want) in [
            (Error::from_raw_os_error(30), true), // EROFS
            (Error::from_raw_os_error(13), true), // EACCES
            (Error::from_raw_os_error(1), true),  // EPERM
            (Error::from(ErrorKind::PermissionDenied), true),
            (Error::from_raw_os_error(2), false), // ENOENT
            (Error::from_raw_os_error(5), false), // EIO
        ] {
            assert_eq!(is_read_only(&e), want, "{e}");
        }
    }

    #[test]
    fn route_localnet_message_names_the_problem_and_both_fixes() {
        let m = localnet_message(
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            2579,
            "NMI cannot set it to 1: read-only",
        );
        for part in [
            "net.ipv4.conf.all.route_localnet is 0",
            "127.0.0.1:2579",
            "nmi.routeLocalnetInitContainer=true",
            "--nmi-listen-address=<node IP>",
            "/proc/sys/net/ipv4/conf/all/route_localnet",
        ] {
            assert!(m.contains(part), "{part} missing from: {m}");
        }
    }

    #[test]
    fn action_args() {
        assert_eq!(
            Action::InsertJump.args(),
            ["-I", "PREROUTING", "1", "-j", "aad-metadata"]
        );
        assert_eq!(
            Action::AppendRule("-A aad-metadata -j RETURN".into()).args(),
            ["-A", "aad-metadata", "-j", "RETURN"]
        );
    }
}
