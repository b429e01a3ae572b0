//! The world's machines: nodes (a scale-set instance, its Node object,
//! network namespaces, IMDS and nmi), mic replicas (a pod namespace each), and
//! the identities the scale sets carry.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use anyhow::Context as _;
use azure_emulator::Emulator;
use k8s_openapi::api::core::v1::Node as KubeNode;
use kube::Client;
use kube::api::{Api, PostParams};
use serde_json::json;

use super::builder::{NodeLinks, NodeSpec, Source};
use super::chart::Launch;
use super::options::Dialect;
use super::processes::{Proc, spawn_kept};
use super::{ADDON, KUBELET, PodRef, Program, World, id_name, vmss_name};
use crate::netns::{IMDS_ADDRESS, NetNs, Node, read_until_ready};
use crate::relay::{gated_forward, unix_to_tcp};
use crate::wait_for;

/// The address of a listener's URL (`https://127.0.0.1:1234/` and the like).
pub fn socket_of(url: &str) -> anyhow::Result<SocketAddr> {
    url.trim_start_matches("https://")
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()
        .with_context(|| format!("address of {url}"))
}

/// Starts a relay in `ns` carrying each `(listen, target, peer log)` from
/// inside the namespace to the root namespace (sockets in a folder of
/// `dir`): the kit's Python relay, which logs each connection's peer where a
/// log is named ([`NetNs::relay_logged`]), or `program` when given (same
/// arguments, same `READY`; no peer logs).
async fn relay_in(
    ns: &NetNs,
    dir: &Path,
    pairs: &[(SocketAddr, SocketAddr, Option<PathBuf>)],
    program: Option<&Program>,
) -> anyhow::Result<Child> {
    let sockets = dir.join(ns.name());
    std::fs::create_dir_all(&sockets)?;
    let Some(program) = program else {
        return ns.relay_logged(pairs, &sockets).await;
    };
    let mut cmd = ns.command(&program.path);
    cmd.args(&program.args)
        .envs(program.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    for (i, (listen, target, _)) in pairs.iter().enumerate() {
        let path = sockets.join(format!("relay-{i}.sock"));
        unix_to_tcp(path.clone(), *target).await?;
        cmd.arg(format!("{listen}={}", path.display()));
    }
    cmd.stdout(Stdio::piped()).stderr(Stdio::inherit());
    let mut relay = spawn_kept(cmd)?;
    if let Err(e) = read_until_ready(&mut relay, "relay") {
        stop_relay(&mut relay);
        return Err(e);
    }
    Ok(relay)
}

/// The relay of `ns` for `pairs` (see [`relay_in`]) and the process of pod
/// `pod_name` on node `node` from `source`, not started yet.
async fn relay_and_process(
    launch: &Launch<'_>,
    ns: &NetNs,
    pairs: &[(SocketAddr, SocketAddr, Option<PathBuf>)],
    source: &Source<'_>,
    pod_name: &str,
    node: &str,
) -> anyhow::Result<(Child, Proc)> {
    let mut relay = relay_in(ns, launch.dir, pairs, launch.relay).await?;
    let proc = process_or_stop(launch, source, pod_name, node, &mut relay).await?;
    Ok((relay, proc))
}

/// The process of pod `pod_name` on node `node` from `source`, not started
/// yet; when that fails, `relay` is stopped.
async fn process_or_stop(
    launch: &Launch<'_>,
    source: &Source<'_>,
    pod_name: &str,
    node: &str,
    relay: &mut Child,
) -> anyhow::Result<Proc> {
    let r = launch.process_of(source, pod_name, node).await;
    if r.is_err() {
        stop_relay(relay);
    }
    r
}

/// Creates the Node object of `spec` (a Linux node with its providerID).
pub(super) async fn create_node_object(client: &Client, spec: &NodeSpec) -> anyhow::Result<()> {
    let node: KubeNode = serde_json::from_value(json!({
        "metadata": {"name": spec.name, "labels": {"kubernetes.io/os": "linux"}},
        "spec": {"providerID": spec.provider_id},
    }))?;
    Api::<KubeNode>::all(client.clone())
        .create(&PostParams::default(), &node)
        .await
        .with_context(|| format!("create node {}", spec.name))?;
    Ok(())
}

fn stop_relay(relay: &mut Child) {
    let _ = relay.kill();
    let _ = relay.wait();
}

/// One node: a scale-set instance, its Node object, network namespaces and nmi.
#[derive(Debug)]
pub struct WorldNode {
    /// Node object name.
    pub name: String,
    /// Scale set it belongs to (or the VM it is).
    pub vmss: String,
    /// Emulator machine label, `vmss/<name>/<id>` (or `vm/<name>`).
    pub machine: String,
    /// The node and its pods' namespaces.
    pub net: Node,
    /// nmi on it.
    pub nmi: Proc,
    /// With the kit's relay: the file of every connection to
    /// 169.254.169.254:80 inside the node that reached the node's IMDS
    /// (around any redirect), with its peer ([`crate::relay::peer_log`]).
    pub imds_peers: Option<PathBuf>,
    relay: Child,
}

/// What a node step needs besides the emulator and nmi's source.
pub(super) struct NodeBase<'a> {
    /// An admin client (creates the Node object).
    pub(super) client: &'a Client,
    /// The world's folder (relay sockets, the IMDS peer log).
    pub(super) dir: &'a Path,
    /// The apiserver's address.
    pub(super) apiserver: SocketAddr,
    /// The relay program of [`super::Options::relay`] (`None`: the kit's).
    pub(super) relay: Option<&'a Program>,
}

impl<'a> NodeBase<'a> {
    /// What `launch` holds of it.
    fn of(launch: &Launch<'a>) -> NodeBase<'a> {
        NodeBase {
            client: launch.client,
            dir: launch.dir,
            apiserver: launch.apiserver,
            relay: launch.relay,
        }
    }
}

/// A node before its nmi: its namespaces and relay.
pub(super) struct NodeNet {
    net: Node,
    relay: Child,
    imds_peers: Option<PathBuf>,
}

impl NodeNet {
    /// Node `index` as `spec` and `links` say: its Node object, its pod
    /// namespaces, 169.254.169.254 on its loopback, and its relay carrying
    /// the apiserver, the IMDS `emu` adds for the machine (none without
    /// `emu`) and `links.extra` into the node namespace. `upstream`: nmi is
    /// upstream's.
    pub(super) async fn build(
        base: &NodeBase<'_>,
        spec: &NodeSpec,
        index: usize,
        emu: Option<&Emulator>,
        upstream: bool,
        links: NodeLinks,
    ) -> anyhow::Result<NodeNet> {
        create_node_object(base.client, spec).await?;
        let subnet = match links.pod_subnet {
            Some(n) => n,
            None => u8::try_from(index + 1).context("too many nodes")?,
        };
        let net = Node::with_pods_in(spec.pods, subnet)?;
        net.node.add_local_address(IMDS_ADDRESS)?;
        if upstream {
            // Upstream's nmi DNATs to loopback without setting this itself
            // (kube-proxy does on a real node).
            net.node.run(
                "sysctl",
                &["-q", "-w", "net.ipv4.conf.all.route_localnet=1"],
            )?;
        }
        let api = match links.api_gate {
            Some(gate) => gated_forward(base.apiserver, gate).await?,
            None => base.apiserver,
        };
        let mut pairs = vec![(links.apiserver_at.unwrap_or(base.apiserver), api, None)];
        let mut imds_peers = None;
        if let Some(emu) = emu {
            let imds = emu.add_imds(&spec.machine, "127.0.0.1:0".parse()?).await?;
            imds_peers = base
                .relay
                .is_none()
                .then(|| base.dir.join(format!("imds-peers-{}.log", spec.name)));
            pairs.push((
                SocketAddr::from((IMDS_ADDRESS, 80)),
                imds,
                imds_peers.clone(),
            ));
        }
        pairs.extend(links.extra.into_iter().map(|(l, t)| (l, t, None)));
        let relay = relay_in(&net.node, base.dir, &pairs, base.relay).await?;
        Ok(NodeNet {
            net,
            relay,
            imds_peers,
        })
    }

    /// The node of `spec` with `nmi` on it.
    pub(super) fn with_nmi(self, spec: &NodeSpec, nmi: Proc) -> WorldNode {
        WorldNode {
            name: spec.name.clone(),
            vmss: spec.vmss.clone(),
            machine: spec.machine.clone(),
            net: self.net,
            nmi,
            imds_peers: self.imds_peers,
            relay: self.relay,
        }
    }
}

impl WorldNode {
    /// Node `index` of the world as `spec` describes it: its Node object,
    /// its pod namespaces, its IMDS at 169.254.169.254:80, the apiserver and
    /// the emulator's Entra ID inside the node namespace, and nmi's process
    /// from `nmi` (not started yet).
    pub(super) async fn add(
        launch: &Launch<'_>,
        nmi: &Source<'_>,
        spec: &NodeSpec,
        index: usize,
    ) -> anyhow::Result<WorldNode> {
        let upstream = nmi.program().dialect == Dialect::Upstream;
        let base = NodeBase::of(launch);
        // Entra ID too: nmi asks it for service principals' and federated
        // identities' tokens from the node.
        let aad = socket_of(&launch.emu.aad_url())?;
        let links = NodeLinks {
            extra: vec![(aad, aad)],
            ..NodeLinks::default()
        };
        let mut net = NodeNet::build(&base, spec, index, Some(launch.emu), upstream, links).await?;
        let pod_name = nmi.nmi_name(index, &spec.name);
        let proc = process_or_stop(launch, nmi, &pod_name, &spec.name, &mut net.relay).await?;
        Ok(net.with_nmi(spec, proc))
    }

    /// Stops nmi and the relay.
    pub(super) fn stop(&mut self) {
        self.nmi.kill();
        stop_relay(&mut self.relay);
    }
}

/// A mic replica: a process in a pod namespace of its own.
#[derive(Debug)]
pub struct MicReplica {
    /// Its network namespace.
    pub net: NetNs,
    /// The process.
    pub proc: Proc,
    relay: Child,
}

impl MicReplica {
    /// Replica `r`: a namespace reaching the apiserver, ARM and Entra ID, and
    /// its pod on node `node` (mic not started yet).
    pub(super) async fn add(
        launch: &Launch<'_>,
        mic: &Source<'_>,
        r: usize,
        node: &str,
    ) -> anyhow::Result<MicReplica> {
        let net = NetNs::new("mic")?;
        let pairs = [
            launch.apiserver,
            socket_of(&launch.emu.arm_url())?,
            socket_of(&launch.emu.aad_url())?,
        ]
        .map(|a| (a, a, None));
        let (relay, proc) =
            relay_and_process(launch, &net, &pairs, mic, &mic.mic_name(r), node).await?;
        Ok(MicReplica { net, proc, relay })
    }

    /// Stops mic and the relay.
    pub(super) fn stop(&mut self) {
        self.proc.kill();
        stop_relay(&mut self.relay);
    }
}

impl World {
    /// Names of the user-assigned identities on scale set `vmss`.
    pub fn vmss_identities(&self, vmss: &str) -> BTreeSet<String> {
        self.emu
            .assigned_identities(vmss)
            .unwrap_or_default()
            .iter()
            .map(|id| id.rsplit('/').next().unwrap_or(id).to_string())
            .collect()
    }

    /// What each scale set should carry for `pods`: the kubelet identity (and
    /// [`ADDON`] when seeded) and the valid identities of the pods on its nodes.
    pub fn expected_identities(&self, pods: &[PodRef]) -> BTreeMap<String, BTreeSet<String>> {
        let mut base = BTreeSet::from([KUBELET.to_lowercase()]);
        if self.opts.addon_identity {
            base.insert(ADDON.to_lowercase());
        }
        let mut out: BTreeMap<String, BTreeSet<String>> = (0..self.opts.scale_sets)
            .map(|s| (vmss_name(s), base.clone()))
            .collect();
        for p in pods {
            if let Some(j) = p.identity {
                out.entry(self.nodes[p.node].vmss.clone())
                    .or_default()
                    .insert(id_name(j));
            }
        }
        out
    }

    /// Every scale set's identities (names).
    pub fn all_vmss_identities(&self) -> BTreeMap<String, BTreeSet<String>> {
        (0..self.opts.scale_sets)
            .map(|s| (vmss_name(s), self.vmss_identities(&vmss_name(s))))
            .collect()
    }

    /// Waits (bounded) until the scale sets carry exactly `want`.
    pub async fn wait_vmss(
        &self,
        want: &BTreeMap<String, BTreeSet<String>>,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let r = wait_for("scale-set identities", timeout, || async {
            (self.all_vmss_identities() == *want).then_some(())
        })
        .await;
        let r = r.with_context(|| format!("want {want:?}, have {:?}", self.all_vmss_identities()));
        self.with_dump(r).await
    }

    /// Runs `body` while sampling every scale set every 100 ms; returns its
    /// result and every sample in which one of `keep` (identity names),
    /// once seen on a scale set, was missing from it, as `<vmss>: <identities>`.
    pub async fn while_watching_vmss<T>(
        &self,
        keep: &[&str],
        body: impl Future<Output = T>,
    ) -> (T, Vec<String>) {
        use std::sync::atomic::{AtomicBool, Ordering};
        let done = AtomicBool::new(false);
        let body = async {
            let r = body.await;
            done.store(true, Ordering::Relaxed);
            r
        };
        let watch = async {
            let mut missing = Vec::new();
            let mut seen: BTreeSet<(String, String)> = BTreeSet::new();
            loop {
                for (vmss, ids) in self.all_vmss_identities() {
                    let mut gone = false;
                    for k in keep {
                        let k = k.to_lowercase();
                        if ids.iter().any(|i| i.eq_ignore_ascii_case(&k)) {
                            seen.insert((vmss.clone(), k));
                        } else if seen.contains(&(vmss.clone(), k)) {
                            gone = true;
                        }
                    }
                    let line = format!("{vmss}: {ids:?}");
                    if gone && missing.last() != Some(&line) {
                        missing.push(line);
                    }
                }
                if done.load(Ordering::Relaxed) {
                    return missing;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        tokio::join!(body, watch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listener_urls_become_addresses() {
        let want: SocketAddr = "127.0.0.1:8443".parse().unwrap();
        for url in [
            "https://127.0.0.1:8443",
            "https://127.0.0.1:8443/",
            "http://127.0.0.1:8443",
        ] {
            assert_eq!(socket_of(url).unwrap(), want, "{url}");
        }
        assert!(socket_of("https://localhost:8443").is_err());
    }
}
