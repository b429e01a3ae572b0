//! Network namespaces that stand in for nodes and pods, made by the test itself.
//!
//! Nothing here touches the root namespace: every namespace is new, both ends of
//! every veth pair are created directly inside test namespaces, and addresses
//! (pod ranges, 169.254.169.254) exist only inside them. Namespaces are deleted
//! when their guard drops; those left by a test process that died are deleted by
//! the next one (their names carry the creating process ID).
//!
//! Needs root and iproute2's `ip`. Layout: a node namespace with pod namespaces
//! joined to it by veth pairs, each pod's default route via the node's end (a
//! DNAT to loopback inside the node also needs `route_localnet=1` there, which
//! nmi sets).

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context as _, bail};

use crate::cluster::remove_dead_owners;

pub use crate::relay::read_until_ready;

const PREFIX: &str = "aadpodid-";

/// The address Azure serves IMDS on; in tests it exists only inside test namespaces.
pub const IMDS_ADDRESS: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);

/// One network namespace, deleted on drop.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates a namespace named `aadpodid-<pid>-<n>-<role>` with loopback up.
    pub fn new(role: &str) -> anyhow::Result<Self> {
        static N: AtomicU32 = AtomicU32::new(0);
        remove_stale();
        let name = format!(
            "{PREFIX}{}-{}-{role}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        ip(&["netns", "add", &name])?;
        let ns = NetNs { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name (for `ip netns exec`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip <args>` inside this namespace.
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<()> {
        ip(&[&["-n", &self.name][..], args].concat())
    }

    /// A command that runs `program` inside this namespace. The process gets
    /// SIGKILL when the thread that spawns it ends, so a test's servers never
    /// outlive the test.
    pub fn command(&self, program: impl AsRef<Path>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args([
            "netns",
            "exec",
            &self.name,
            "setpriv",
            "--pdeathsig",
            "KILL",
            "--",
        ])
        .arg(program.as_ref())
        .stdin(Stdio::null());
        cmd
    }

    /// Runs `program args` inside the namespace to completion; returns stdout,
    /// or an error with stderr when it fails.
    pub fn run(&self, program: &str, args: &[&str]) -> anyhow::Result<String> {
        let out = self
            .command(program)
            .args(args)
            .output()
            .with_context(|| format!("run {program}"))?;
        if !out.status.success() {
            bail!(
                "{program} {args:?} in {} failed ({}): {}",
                self.name,
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Adds `addr/32` to this namespace's loopback, so processes here can
    /// bind it (for example IMDS's 169.254.169.254). Loopback rather than a
    /// dummy interface: the kernels here may lack the dummy driver.
    pub fn add_local_address(&self, addr: Ipv4Addr) -> anyhow::Result<()> {
        self.ip(&["addr", "add", &format!("{addr}/32"), "dev", "lo"])
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// A node namespace with pod namespaces attached by veth pairs: pod `i` has
/// `eth0` with `10.244.0.(10+i)/32` and a default route via the node's end of
/// its link, `10.244.0.1`.
#[derive(Debug)]
pub struct Node {
    /// The node's namespace (host network of the "node").
    pub node: NetNs,
    /// The pods' namespaces with their addresses.
    pub pods: Vec<(NetNs, Ipv4Addr)>,
}

/// The node's address on every pod link.
pub const NODE_POD_GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 1);

impl Node {
    /// Creates the node and `pods` pod namespaces (at most 200).
    pub fn with_pods(pods: u8) -> anyhow::Result<Self> {
        Self::with_pods_in(pods, 0)
    }

    /// Like [`Node::with_pods`], with the pods in `10.244.<subnet>.0/24`
    /// (gateway `10.244.<subnet>.1`), so several test nodes of one cluster
    /// give their pods different addresses, as a real pod CIDR per node does.
    pub fn with_pods_in(pods: u8, subnet: u8) -> anyhow::Result<Self> {
        if pods > 200 {
            bail!("at most 200 pods per test node");
        }
        let gateway = Ipv4Addr::new(10, 244, subnet, 1);
        let node = NetNs::new("node")?;
        let mut out = Vec::with_capacity(usize::from(pods));
        for i in 0..pods {
            let pod = NetNs::new("pod")?;
            let addr = Ipv4Addr::new(10, 244, subnet, 10 + i);
            let host_end = format!("veth{i}");
            // Both ends are created inside test namespaces: the root namespace
            // never sees them.
            ip(&[
                "link",
                "add",
                "name",
                &host_end,
                "netns",
                node.name(),
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                pod.name(),
            ])?;
            node.ip(&["link", "set", &host_end, "up"])?;
            // Point-to-point pod links, as Calico sets them up: the node's end
            // carries the gateway address on every link, each pod has a /32 and a
            // default route through the gateway.
            node.ip(&["addr", "add", &format!("{gateway}/32"), "dev", &host_end])?;
            node.ip(&["route", "add", &format!("{addr}/32"), "dev", &host_end])?;
            pod.ip(&["link", "set", "eth0", "up"])?;
            pod.ip(&["addr", "add", &format!("{addr}/32"), "dev", "eth0"])?;
            let gw = gateway.to_string();
            pod.ip(&[
                "route", "add", "default", "via", &gw, "dev", "eth0", "onlink",
            ])?;
            out.push((pod, addr));
        }
        node.run("sysctl", &["-q", "-w", "net.ipv4.ip_forward=1"])?;
        Ok(Node { node, pods: out })
    }
}

/// The node's IPv6 address on every pod link (see [`Node::add_ipv6`]).
pub const NODE_POD_GATEWAY_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x244, 0, 0, 0, 0, 1);

impl Node {
    /// Gives pod `i` the IPv6 address `fd00:10:244::(10+i)/128` next to its
    /// IPv4 one, with a default IPv6 route through the node's end of its
    /// link (`fd00:10:244::1`). Addresses skip duplicate-address detection so
    /// they are usable at once. Returns the pod's IPv6 address.
    pub fn add_ipv6(&self, i: usize) -> anyhow::Result<Ipv6Addr> {
        let Some((pod, _)) = self.pods.get(i) else {
            bail!("no pod {i}");
        };
        let n = u16::try_from(10 + i).context("pod index")?;
        let addr = Ipv6Addr::new(0xfd00, 0x10, 0x244, 0, 0, 0, 0, n);
        let host_end = format!("veth{i}");
        let gw = NODE_POD_GATEWAY_V6.to_string();
        self.node.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{gw}/128"),
            "dev",
            &host_end,
            "nodad",
        ])?;
        self.node.ip(&[
            "-6",
            "route",
            "add",
            &format!("{addr}/128"),
            "dev",
            &host_end,
        ])?;
        pod.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{addr}/128"),
            "dev",
            "eth0",
            "nodad",
        ])?;
        pod.ip(&[
            "-6", "route", "add", "default", "via", &gw, "dev", "eth0", "onlink",
        ])?;
        Ok(addr)
    }
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("run ip")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Deletes test namespaces whose creating process no longer runs.
fn remove_stale() {
    remove_dead_owners(Path::new("/run/netns"), PREFIX, |_, name| {
        let _ = ip(&["netns", "del", name]);
    });
}
