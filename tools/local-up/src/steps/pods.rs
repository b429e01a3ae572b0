//! Step 7: the seeds' two pods, applied with `kubectl apply` and then
//! scheduled as the scheduler and the kubelet would (bound to a node, Running
//! with the IP of a pod namespace of that node); their AzureAssignedIdentities
//! going `Created` -> `Assigned`, mic's ARM calls, and the identities on the
//! scale set and the VM as ARM `GET` returns them. Then the federated pod
//! the same way: Assigned at once, no ARM call, its identity on no machine.
//! Each pod's first token (curl in the pod, polled from its creation) is
//! timed, and the ARM writes each pod caused counted (the emulator's
//! counters).

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use aadpodid_api::{AzureAssignedIdentity, TokenSource};
use aadpodid_testkit::netns::{IMDS_ADDRESS, NetNs};
use aadpodid_testkit::world::{WorldBuilder, WorldNode, curl_in};
use aadpodid_testkit::{Cluster, SUB, fill_template, fixture};
use anyhow::{Context as _, bail};
use azure_emulator::Emulator;
use azure_emulator::observe::Service;
use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;

use crate::say::{done, info, step};
use crate::steps::federated::{self, Federated};
use crate::steps::manifests::Seeds;
use crate::steps::{WAIT, kubectl_apply, wait};
use crate::tenant::{
    CLOCK_SPEED, Resource, SEED002, SEED004, SEED4_NAMESPACE, SEED4_POD_IDENTITY, arm_identities,
    short_arm_path,
};

/// One of the demo's pods and where it runs.
#[derive(Debug)]
pub struct DemoPod {
    pub fixture: &'static str,
    pub manifest: String,
    pub namespace: &'static str,
    pub name: &'static str,
    pub node: String,
    /// Its node among the world's nodes, and its namespace among the node's pods.
    pub node_index: usize,
    pub pod_index: usize,
    /// Its network namespace's name and address.
    pub netns: String,
    pub ip: Ipv4Addr,
    pub resource: Resource,
    pub identity: &'static str,
    pub client_id: String,
    /// Where its identity's tokens come from.
    pub source: TokenSource,
    /// From its Pod's creation to its first token (step 7).
    pub first_token: Option<Duration>,
    /// ARM writes it caused (step 7).
    pub arm_writes: Option<u64>,
}

impl DemoPod {
    /// The pod's network namespace in `world`.
    pub fn netns_in<'a>(&self, world: &'a WorldBuilder) -> anyhow::Result<&'a NetNs> {
        world
            .nodes
            .get(self.node_index)
            .and_then(|n| n.net.pods.get(self.pod_index))
            .map(|(ns, _)| ns)
            .context("pod namespace")
    }

    /// Whether `aai` is this pod's.
    pub fn owns(&self, aai: &AzureAssignedIdentity) -> bool {
        aai.spec.pod == self.name && aai.spec.pod_namespace == self.namespace
    }
}

/// Where pod namespace `pod_index` of node `node_index` is: the node's
/// name, the namespace's name and its address.
pub fn place(
    nodes: &[WorldNode],
    node_index: usize,
    pod_index: usize,
) -> anyhow::Result<(String, String, Ipv4Addr)> {
    let node = nodes
        .get(node_index)
        .with_context(|| format!("node {node_index}"))?;
    let (ns, ip) = node
        .net
        .pods
        .get(pod_index)
        .with_context(|| format!("pod namespace {pod_index} of {}", node.name))?;
    Ok((node.name.clone(), ns.name().to_string(), *ip))
}

/// The two pods: seed 002's on the first scale-set node, seed 004's on the
/// VM (the second pod namespace of its node).
pub fn demo_pods(seeds: &Seeds, nodes: &[WorldNode]) -> anyhow::Result<Vec<DemoPod>> {
    let vars4 = [
        ("POD_IDENTITY_NAME", SEED4_POD_IDENTITY),
        ("SUBSCRIPTION_ID", SUB),
        ("IDENTITY_CLIENT_ID", seeds.app_client.as_str()),
        ("IDENTITY_RESOURCE_GROUP", SEED004.resource_group),
    ];
    let (node0, netns0, ip0) = place(nodes, 0, 0)?;
    let (node2, netns2, ip2) = place(nodes, 2, 1)?;
    Ok(vec![
        DemoPod {
            fixture: "seed002-pod.yaml",
            manifest: fill_template(&fixture("seed002-pod.yaml")?, &seeds.vars002()),
            namespace: "default",
            name: "nginx-secrets-store-inline",
            node: node0,
            node_index: 0,
            pod_index: 0,
            netns: netns0,
            ip: ip0,
            resource: Resource::ScaleSet,
            identity: SEED002.name,
            client_id: seeds.uai_client.clone(),
            source: TokenSource::Imds,
            first_token: None,
            arm_writes: None,
        },
        DemoPod {
            fixture: "seed004-pod.yaml",
            manifest: fill_template(&fixture("seed004-pod.yaml")?, &vars4),
            namespace: SEED4_NAMESPACE,
            name: "demo",
            node: node2,
            node_index: 2,
            pod_index: 1,
            netns: netns2,
            ip: ip2,
            resource: Resource::Vm,
            identity: SEED004.name,
            client_id: seeds.app_client.clone(),
            source: TokenSource::Imds,
            first_token: None,
            arm_writes: None,
        },
    ])
}

/// Runs the pods and shows their identities assigned (the seeds' through
/// ARM, then the federated one with none); returns the pods.
pub async fn run(
    cluster: &'static Cluster,
    world: &WorldBuilder,
    seeds: &Seeds,
) -> anyhow::Result<Vec<DemoPod>> {
    let (client, emu) = (world.client()?, world.emu()?);
    let t = step(
        7,
        "Three pods, scheduled to nodes, each with its IP and network namespace: the seeds' two, then the federated one",
    );
    let mut pods = demo_pods(seeds, &world.nodes)?;
    let arm_since = emu.requests(0).last().map_or(0, |r| r.seq);
    let writes_before = emu.counters().arm_writes;
    let mut created = Vec::new();
    for p in &pods {
        let out = kubectl_apply(cluster, p.namespace, &p.manifest).await?;
        info(&format!("tests/fixtures/{}: {}", p.fixture, out.trim()));
        schedule(client, p).await?;
        created.push(Instant::now());
    }
    let (assigned, first0, first1) = tokio::join!(
        show_assigned(client, &pods, created[0]),
        first_token(world, &pods[0], created[0]),
        first_token(world, &pods[1], created[1]),
    );
    assigned?;
    pods[0].first_token = Some(first0?);
    pods[1].first_token = Some(first1?);
    info(
        "mic created each AzureAssignedIdentity, added the identity to the node's scale set or VM through ARM, then marked it Assigned:",
    );
    show_arm_calls(emu, arm_since);
    let writes_after = emu.counters().arm_writes;
    for p in &mut pods {
        p.arm_writes =
            Some(writes_on(&writes_after, p.resource) - writes_on(&writes_before, p.resource));
        let ids = show_identities(emu, p.resource, "").await?;
        if !ids.iter().any(|i| i == p.identity) {
            bail!(
                "{} is not on {} although its AAI is Assigned",
                p.identity,
                p.resource.name()
            );
        }
    }
    let fed = seeds
        .federated
        .as_ref()
        .context("the federated identity is applied in step 6")?;
    pods.push(run_federated(cluster, world, fed).await?);
    done(t);
    Ok(pods)
}

/// The federated pod: created, scheduled, Assigned with no ARM write, its
/// identity on no machine.
async fn run_federated(
    cluster: &'static Cluster,
    world: &WorldBuilder,
    fed: &Federated,
) -> anyhow::Result<DemoPod> {
    let (client, emu) = (world.client()?, world.emu()?);
    let mut p = federated::demo_pod(fed, &world.nodes)?;
    info(&format!(
        "the federated pod, running as ServiceAccount {}/{}:",
        p.namespace,
        crate::tenant::FED_SERVICE_ACCOUNT
    ));
    let before = emu.counters();
    kubectl_apply(cluster, p.namespace, &p.manifest).await?;
    schedule(client, &p).await?;
    let created = Instant::now();
    let one = std::slice::from_ref(&p);
    let (assigned, first) = tokio::join!(
        show_assigned(client, one, created),
        first_token(world, &p, created)
    );
    assigned?;
    p.first_token = Some(first?);
    let after = emu.counters();
    let writes = total(&after.arm_writes) - total(&before.arm_writes);
    let imds = total(&after.imds_token_requests) - total(&before.imds_token_requests);
    p.arm_writes = Some(writes);
    info(&format!(
        "  mic marked it Assigned with no ARM call; ARM writes since the pod was created: {writes}, IMDS token requests: {imds}"
    ));
    let note = format!("  ({} is on no machine)", p.identity);
    let ids = show_identities(emu, p.resource, &note).await?;
    if writes != 0 || imds != 0 || ids.iter().any(|i| i == p.identity) {
        bail!(
            "the federated identity caused {writes} ARM write(s) and {imds} IMDS token request(s); on {}: {ids:?}",
            p.resource.name()
        );
    }
    Ok(p)
}

/// Reads `resource`'s identities through ARM and shows them, followed by
/// `note`; returns their names.
pub async fn show_identities(
    emu: &Emulator,
    resource: Resource,
    note: &str,
) -> anyhow::Result<Vec<String>> {
    let ids = arm_identities(emu, resource).await?;
    info(&format!(
        "ARM GET {}: userAssignedIdentities = [{}]{note}",
        resource.name(),
        ids.join(", ")
    ));
    Ok(ids)
}

/// The sum of a per-key counter.
fn total(counts: &std::collections::BTreeMap<String, u64>) -> u64 {
    counts.values().sum()
}

/// ARM writes on `resource` (and its instances) in the emulator's per-resource counts.
fn writes_on(counts: &std::collections::BTreeMap<String, u64>, resource: Resource) -> u64 {
    let path = resource.arm_path().to_lowercase();
    counts
        .iter()
        .filter(|(id, _)| id.contains(&path))
        .map(|(_, n)| n)
        .sum()
}

/// Asks for `p`'s identity's token in its network namespace (curl, as an
/// application would) until it comes; the time from `since` (its Pod's
/// creation). nmi holds a request while the pod's identity is not yet
/// Assigned, so the first answer is usually the token.
async fn first_token(
    world: &WorldBuilder,
    p: &DemoPod,
    since: Instant,
) -> anyhow::Result<Duration> {
    let ns = p.netns_in(world)?;
    let url = format!(
        "http://{IMDS_ADDRESS}/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https%3A%2F%2Fmanagement.azure.com%2F&client_id={}",
        p.client_id
    );
    wait(
        &format!("the first token of {}/{}", p.namespace, p.name),
        || async {
            let (status, _) = curl_in(ns, &url, &["Metadata: true"], 30).await.ok()?;
            (status == 200).then(|| since.elapsed())
        },
    )
    .await
}

/// What the scheduler and the kubelet would do: bind the pod to its node,
/// then report it Running with its IP.
async fn schedule(client: &Client, p: &DemoPod) -> anyhow::Result<()> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), p.namespace);
    pods.create_subresource::<_, serde_json::Value>(
        "binding",
        p.name,
        &PostParams::default(),
        &json!({
            "apiVersion": "v1", "kind": "Binding",
            "metadata": {"name": p.name},
            "target": {"apiVersion": "v1", "kind": "Node", "name": p.node},
        }),
    )
    .await
    .context("bind the pod to its node")?;
    let ip = p.ip.to_string();
    pods.patch_status(
        p.name,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {
            "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
        }})),
    )
    .await?;
    info(&format!(
        "  {}/{} on {}, IP {ip} (netns {})",
        p.namespace, p.name, p.node, p.netns
    ));
    Ok(())
}

/// Shows each pod's AzureAssignedIdentity status as it changes, until all
/// are `Assigned`. Polled rather than watched so each status is shown as
/// seen; bounded by [`WAIT`].
async fn show_assigned(client: &Client, pods: &[DemoPod], since: Instant) -> anyhow::Result<()> {
    let aais: Api<AzureAssignedIdentity> = Api::all(client.clone());
    let mut shown: Vec<String> = vec![String::new(); pods.len()];
    let deadline = Instant::now() + WAIT;
    loop {
        let list = aais.list(&ListParams::default()).await?;
        for (p, seen) in pods.iter().zip(shown.iter_mut()) {
            let Some(a) = list.items.iter().find(|a| p.owns(a)) else {
                continue;
            };
            let status = a
                .status
                .as_ref()
                .map(|s| s.status.clone())
                .unwrap_or_default();
            if status != *seen {
                info(&format!(
                    "AzureAssignedIdentity {}/{}: {} (+{:.1}s)",
                    a.metadata.namespace.clone().unwrap_or_default(),
                    a.metadata.name.clone().unwrap_or_default(),
                    if status.is_empty() {
                        "(no status yet)"
                    } else {
                        &status
                    },
                    since.elapsed().as_secs_f64()
                ));
                *seen = status;
            }
        }
        if shown.iter().all(|s| s == "Assigned") {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "timed out after {WAIT:?} waiting for the AzureAssignedIdentities to be Assigned"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// mic's ARM requests since request `since`, with their times in real seconds.
fn show_arm_calls(emu: &Emulator, since: u64) {
    let arm_calls: Vec<_> = emu
        .requests(since)
        .into_iter()
        .filter(|r| r.service == Service::Arm)
        .take(16)
        .collect();
    let first_at = arm_calls.first().map_or(0, |r| r.at_ms);
    for r in &arm_calls {
        // Request times are the emulator's virtual clock; shown in real seconds.
        let real = r.at_ms.saturating_sub(first_at) as f64 / 1000.0 / CLOCK_SPEED;
        info(&format!(
            "  mic -> ARM (+{real:.1}s): {} {} -> {}",
            r.method,
            short_arm_path(&r.uri),
            r.status
        ));
    }
    info(&format!(
        "  (writes take {:.1}s (scale set) and {:.1}s (VM) here; mic polls each operation when ARM's Retry-After says, then every 5 s)",
        45.0 / CLOCK_SPEED,
        15.0 / CLOCK_SPEED
    ));
}
