//! The redirect of pod IMDS traffic to NMI (upstream's rules and their limits:
//! docs/upstream-behaviour.md#iptables-redirect). Pure: the expected rules and the
//! plan that turns what `iptables -S` shows into them. Thin: [`Runner`], over the
//! `iptables` binary.
//!
//! **Fail-closed.** NMI leaves the chains and the jumps in place when it stops,
//! so during a restart or rolling update pods' requests to 169.254.169.254 are
//! refused at once (nothing listens on the DNAT target) instead of reaching the
//! real IMDS, which would hand out any node identity. Only `nmi
//! --cleanup-iptables` (by hand), `--cleanup-on-uninstall` when NMI's own
//! DaemonSet is gone (what the chart sets; see `uninstall.rs`) or
//! `--remove-iptables-on-exit` (upstream's behaviour) removes them.
//!
//! **Two chains.** [`CHAIN`] is upstream's `aad-metadata`, with upstream's
//! rules, jumped to first: upstream's NMI adopts it unchanged (rollback) and
//! tools that read it keep working. Upstream's NMI deletes that chain when it
//! gets SIGTERM, also while a newer NMI runs beside it on the node (a
//! DaemonSet rolling update with surge). So NMI writes the same redirect into
//! a second chain, [`GUARD_CHAIN`], jumped to second: a name upstream never
//! touches. While `aad-metadata` is there the guard is never reached (DNAT
//! ends the nat traversal); once upstream's NMI has deleted it, the guard
//! keeps sending pods to the same address and port until NMI's next check
//! puts `aad-metadata` back. The same guard keeps a repair of either jump
//! from opening a window: one jump is always in place while the other is
//! deleted and inserted again.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

/// The nat chain NMI shares with upstream's NMI (upstream's name and rules).
pub const CHAIN: &str = "aad-metadata";
/// The nat chain only NMI writes: the same redirect, which upstream's NMI
/// does not delete on SIGTERM.
pub const GUARD_CHAIN: &str = "aad-metadata-guard";
/// The built-in chain that jumps to [`CHAIN`] then [`GUARD_CHAIN`] (pod
/// traffic only: host-network traffic goes through OUTPUT and is not
/// redirected, as upstream).
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
    /// [`CHAIN`]'s rules exactly as `iptables -t nat -S aad-metadata` prints them.
    pub fn expected_rules(&self) -> Vec<String> {
        self.rules_of(CHAIN)
    }

    /// The rules of `chain` (one of [`CHAIN`] and [`GUARD_CHAIN`]) as
    /// `iptables -t nat -S <chain>` prints them.
    pub fn rules_of(&self, chain: &str) -> Vec<String> {
        vec![
            format!(
                "-A {chain} ! -s 127.0.0.1/32 -d {}/32 -p tcp -m tcp --dport {} -j DNAT --to-destination {}:{}",
                self.metadata_ip, self.metadata_port, self.target_ip, self.target_port
            ),
            format!("-A {chain} -j RETURN"),
        ]
    }

    /// Whether packets DNATed to the target need `route_localnet`.
    pub fn needs_route_localnet(&self) -> bool {
        self.target_ip.is_loopback()
    }
}

/// One iptables change; the chain is [`CHAIN`] or [`GUARD_CHAIN`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// `-N <chain>`.
    CreateChain(&'static str),
    /// `-F <chain>`.
    FlushChain(&'static str),
    /// `-A <chain> <rule>`; the string is a `-S` line.
    AppendRule(String),
    /// `-D PREROUTING -j <chain>` (a jump out of place, or a duplicate).
    DeleteJump(&'static str),
    /// `-I PREROUTING <position> -j <chain>` (1-based position).
    InsertJump(&'static str, usize),
}

impl Action {
    /// The iptables arguments after `-t nat`.
    pub fn args(&self) -> Vec<String> {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        match self {
            Action::CreateChain(chain) => s(&["-N", chain]),
            Action::FlushChain(chain) => s(&["-F", chain]),
            Action::AppendRule(rule) => rule.split_whitespace().map(str::to_owned).collect(),
            Action::DeleteJump(chain) => s(&["-D", PREROUTING, "-j", chain]),
            Action::InsertJump(chain, position) => {
                s(&["-I", PREROUTING, &position.to_string(), "-j", chain])
            }
        }
    }
}

/// `-A PREROUTING -j <chain>` as `-S` prints it.
pub fn jump_line(chain: &str) -> String {
    format!("-A {PREROUTING} -j {chain}")
}

/// The `-A` lines of a listing, trimmed.
fn appended(lines: &[String]) -> Vec<&str> {
    lines
        .iter()
        .map(|l| l.trim())
        .filter(|l| l.starts_with("-A "))
        .collect()
}

/// Creates `name` (absent: `current` is `None`) or rewrites it when its rules
/// are not `expected` (tampered: flushed and rewritten, as upstream does at
/// its next check).
fn plan_chain(
    actions: &mut Vec<Action>,
    name: &'static str,
    current: Option<&[String]>,
    expected: Vec<String>,
) {
    match current {
        None => actions.push(Action::CreateChain(name)),
        Some(lines)
            if appended(lines) == expected.iter().map(String::as_str).collect::<Vec<_>>() =>
        {
            return;
        }
        Some(_) => actions.push(Action::FlushChain(name)),
    }
    actions.extend(expected.into_iter().map(Action::AppendRule));
}

/// Puts the single jump to `chain` at index `want` of `rules` (the `-A
/// PREROUTING` lines, updated as the actions will leave them).
fn plan_jump(actions: &mut Vec<Action>, rules: &mut Vec<String>, chain: &'static str, want: usize) {
    let jump = jump_line(chain);
    let positions: Vec<usize> = rules
        .iter()
        .enumerate()
        .filter(|(_, l)| **l == jump)
        .map(|(i, _)| i)
        .collect();
    if positions == [want] {
        return;
    }
    actions.extend(positions.iter().map(|_| Action::DeleteJump(chain)));
    rules.retain(|l| *l != jump);
    let at = want.min(rules.len());
    rules.insert(at, jump);
    actions.push(Action::InsertJump(chain, at + 1));
}

/// What to change, given `chain` and `guard` (the `-S` lines of [`CHAIN`] and
/// [`GUARD_CHAIN`], `None` when the chain does not exist) and `prerouting`
/// (the `-S PREROUTING` lines). Empty when everything is in place. Both
/// chains hold the redirect; the jump to [`CHAIN`] is kept first in
/// PREROUTING and the jump to [`GUARD_CHAIN`] second, each single, so no rule
/// inserted before them can divert pod traffic around NMI. A jump out of
/// place is deleted before it is inserted again: the other jump redirects
/// meanwhile.
pub fn plan(
    redirect: &Redirect,
    chain: Option<&[String]>,
    guard: Option<&[String]>,
    prerouting: &[String],
) -> Vec<Action> {
    let mut actions = Vec::new();
    plan_chain(&mut actions, CHAIN, chain, redirect.rules_of(CHAIN));
    plan_chain(
        &mut actions,
        GUARD_CHAIN,
        guard,
        redirect.rules_of(GUARD_CHAIN),
    );
    let mut rules: Vec<String> = appended(prerouting)
        .into_iter()
        .map(str::to_owned)
        .collect();
    plan_jump(&mut actions, &mut rules, CHAIN, 0);
    plan_jump(&mut actions, &mut rules, GUARD_CHAIN, 1);
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
    /// `-A aad-metadata-guard` lines; `None` when the chain does not exist.
    guard: Option<Vec<String>>,
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
        let chain_lines = |name: &str| {
            let prefix = format!("-A {name} ");
            lines.contains(&format!("-N {name}")).then(|| {
                lines
                    .iter()
                    .filter(|l| l.starts_with(&prefix))
                    .cloned()
                    .collect::<Vec<_>>()
            })
        };
        let pre_prefix = format!("-A {PREROUTING} ");
        Ok(Tables {
            chain: chain_lines(CHAIN),
            guard: chain_lines(GUARD_CHAIN),
            prerouting: lines
                .iter()
                .filter(|l| l.starts_with(&pre_prefix))
                .cloned()
                .collect(),
        })
    }

    /// Brings the rules in line with `redirect`; returns the actions taken.
    /// When it changed anything and conntrack deletion is on
    /// ([`Runner::with_conntrack`]), then cuts connections opened before.
    pub async fn sync(&self, redirect: &Redirect) -> Result<Vec<Action>, IptablesError> {
        let t = self.list_table().await?;
        let actions = plan(
            redirect,
            t.chain.as_deref(),
            t.guard.as_deref(),
            &t.prerouting,
        );
        for a in &actions {
            self.run(&a.args()).await?;
        }
        if !actions.is_empty() {
            self.cut_old_connections(redirect).await?;
        }
        Ok(actions)
    }

    /// Removes the jumps and both chains (explicit cleanup and uninstall).
    pub async fn cleanup(&self) -> Result<(), IptablesError> {
        let t = self.list_table().await?;
        for (name, present) in [(CHAIN, t.chain.is_some()), (GUARD_CHAIN, t.guard.is_some())] {
            let jump = jump_line(name);
            for _ in t.prerouting.iter().filter(|l| **l == jump) {
                self.run(&Action::DeleteJump(name).args()).await?;
            }
            if present {
                self.run(&Action::FlushChain(name).args()).await?;
                self.run(&["-X".into(), name.into()]).await?;
            }
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
    fn guard_rules_are_the_same_redirect_in_a_chain_of_our_own() {
        assert_eq!(
            redirect().rules_of(GUARD_CHAIN),
            [
                "-A aad-metadata-guard ! -s 127.0.0.1/32 -d 169.254.169.254/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination 127.0.0.1:2579",
                "-A aad-metadata-guard -j RETURN",
            ]
        );
        // iptables limits chain names to 28 characters.
        assert!(GUARD_CHAIN.len() <= 28);
        assert_ne!(GUARD_CHAIN, CHAIN);
    }

    #[test]
    fn plans() {
        use Action::*;
        let r = redirect();
        let chain_of = |name: &str| {
            let mut v = lines(&[&format!("-N {name}")]);
            v.extend(r.rules_of(name));
            v
        };
        let good = chain_of(CHAIN);
        let good_guard = chain_of(GUARD_CHAIN);
        let rules =
            |name: &str| -> Vec<Action> { r.rules_of(name).into_iter().map(AppendRule).collect() };
        let cat = |parts: Vec<Vec<Action>>| parts.concat();
        // A chain made, or emptied, then filled with its rules.
        let created = |name: &'static str| cat(vec![vec![CreateChain(name)], rules(name)]);
        let refilled = |name: &'static str| cat(vec![vec![FlushChain(name)], rules(name)]);
        const MAIN: &str = "-A PREROUTING -j aad-metadata";
        const GUARD: &str = "-A PREROUTING -j aad-metadata-guard";
        type Case = (
            &'static str,
            Option<Vec<String>>,
            Option<Vec<String>>,
            Vec<String>,
            Vec<Action>,
        );
        let cases: Vec<Case> = vec![
            (
                "fresh node",
                None,
                None,
                lines(&["-P PREROUTING ACCEPT", "-A PREROUTING -j KUBE-SERVICES"]),
                cat(vec![
                    created(CHAIN),
                    created(GUARD_CHAIN),
                    vec![InsertJump(CHAIN, 1), InsertJump(GUARD_CHAIN, 2)],
                ]),
            ),
            (
                "all in place",
                Some(good.clone()),
                Some(good_guard.clone()),
                lines(&[
                    "-P PREROUTING ACCEPT",
                    MAIN,
                    GUARD,
                    "-A PREROUTING -j KUBE-SERVICES",
                ]),
                vec![],
            ),
            (
                "upstream's NMI alone (its chain is ours): the guard is added second",
                Some(good.clone()),
                None,
                lines(&[MAIN, "-A PREROUTING -j KUBE-SERVICES"]),
                cat(vec![created(GUARD_CHAIN), vec![InsertJump(GUARD_CHAIN, 2)]]),
            ),
            (
                "upstream's NMI deleted aad-metadata on SIGTERM: the guard stays, aad-metadata comes back first",
                None,
                Some(good_guard.clone()),
                lines(&[GUARD, "-A PREROUTING -j KUBE-SERVICES"]),
                cat(vec![created(CHAIN), vec![InsertJump(CHAIN, 1)]]),
            ),
            (
                "tampered rule",
                Some(lines(&["-N aad-metadata", "-A aad-metadata -j RETURN"])),
                Some(good_guard.clone()),
                lines(&[MAIN, GUARD]),
                refilled(CHAIN),
            ),
            (
                "guard flushed",
                Some(good.clone()),
                Some(lines(&["-N aad-metadata-guard"])),
                lines(&[MAIN, GUARD]),
                refilled(GUARD_CHAIN),
            ),
            (
                "extra rule appended",
                Some({
                    let mut v = good.clone();
                    v.push("-A aad-metadata -j ACCEPT".into());
                    v
                }),
                Some(good_guard.clone()),
                lines(&[MAIN, GUARD]),
                refilled(CHAIN),
            ),
            (
                "jumps pushed down",
                Some(good.clone()),
                Some(good_guard.clone()),
                lines(&[
                    "-P PREROUTING ACCEPT",
                    "-A PREROUTING -j ACCEPT",
                    MAIN,
                    GUARD,
                ]),
                vec![
                    DeleteJump(CHAIN),
                    InsertJump(CHAIN, 1),
                    DeleteJump(GUARD_CHAIN),
                    InsertJump(GUARD_CHAIN, 2),
                ],
            ),
            (
                "a rule between the two jumps",
                Some(good.clone()),
                Some(good_guard.clone()),
                lines(&[MAIN, "-A PREROUTING -j ACCEPT", GUARD]),
                vec![DeleteJump(GUARD_CHAIN), InsertJump(GUARD_CHAIN, 2)],
            ),
            (
                "jumps in the wrong order",
                Some(good.clone()),
                Some(good_guard.clone()),
                lines(&[GUARD, MAIN]),
                vec![DeleteJump(CHAIN), InsertJump(CHAIN, 1)],
            ),
            (
                "jump duplicated",
                Some(good.clone()),
                Some(good_guard.clone()),
                lines(&[MAIN, MAIN, GUARD]),
                vec![DeleteJump(CHAIN), DeleteJump(CHAIN), InsertJump(CHAIN, 1)],
            ),
            (
                "guard jump duplicated",
                Some(good.clone()),
                Some(good_guard.clone()),
                lines(&[MAIN, GUARD, "-A PREROUTING -j KUBE-SERVICES", GUARD]),
                vec![
                    DeleteJump(GUARD_CHAIN),
                    DeleteJump(GUARD_CHAIN),
                    InsertJump(GUARD_CHAIN, 2),
                ],
            ),
            (
                "jumps missing",
                Some(good),
                Some(good_guard),
                lines(&["-P PREROUTING ACCEPT"]),
                vec![InsertJump(CHAIN, 1), InsertJump(GUARD_CHAIN, 2)],
            ),
        ];
        for (name, chain, guard, pre, want) in cases {
            assert_eq!(
                plan(&r, chain.as_deref(), guard.as_deref(), &pre),
                want,
                "{name}"
            );
        }
    }

    /// Every plan, carried out on a model of PREROUTING, leaves the two jumps
    /// first and single, and never leaves both missing between two actions
    /// when one of them was there before (no window for pods to reach IMDS).
    #[test]
    fn plans_never_open_a_window() {
        let r = redirect();
        let main = jump_line(CHAIN);
        let guard = jump_line(GUARD_CHAIN);
        let other = "-A PREROUTING -j KUBE-SERVICES".to_string();
        let starts: Vec<Vec<String>> = vec![
            vec![],
            vec![main.clone()],
            vec![guard.clone()],
            vec![other.clone(), main.clone(), guard.clone()],
            vec![guard.clone(), main.clone()],
            vec![main.clone(), other.clone(), guard.clone(), main.clone()],
            vec![other.clone(), guard.clone(), other.clone(), guard.clone()],
        ];
        for start in starts {
            let actions = plan(
                &r,
                Some(&r.rules_of(CHAIN)),
                Some(&r.rules_of(GUARD_CHAIN)),
                &start,
            );
            let had_one = start.contains(&main) || start.contains(&guard);
            let mut model = start.clone();
            for a in &actions {
                match a {
                    Action::DeleteJump(c) => {
                        let j = jump_line(c);
                        let i = model.iter().position(|l| *l == j).unwrap();
                        model.remove(i);
                    }
                    Action::InsertJump(c, at) => model.insert(at - 1, jump_line(c)),
                    other => panic!("unexpected {other:?}"),
                }
                if had_one {
                    assert!(
                        model.contains(&main) || model.contains(&guard),
                        "window after {a:?} from {start:?}"
                    );
                }
            }
            assert_eq!(model[..2], [main.clone(), guard.clone()], "from {start:?}");
            assert_eq!(model.iter().filter(|l| **l == main).count(), 1);
            assert_eq!(model.iter().filter(|l| **l == guard).count(), 1);
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
            Action::InsertJump(CHAIN, 1).args(),
            ["-I", "PREROUTING", "1", "-j", "aad-metadata"]
        );
        assert_eq!(
            Action::InsertJump(GUARD_CHAIN, 2).args(),
            ["-I", "PREROUTING", "2", "-j", "aad-metadata-guard"]
        );
        assert_eq!(
            Action::DeleteJump(GUARD_CHAIN).args(),
            ["-D", "PREROUTING", "-j", "aad-metadata-guard"]
        );
        assert_eq!(
            Action::AppendRule("-A aad-metadata -j RETURN".into()).args(),
            ["-A", "aad-metadata", "-j", "RETURN"]
        );
    }
}
