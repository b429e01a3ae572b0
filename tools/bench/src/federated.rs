//! Row 8 (this project only: upstream has no federated token source): the
//! first token for a new pod whose AzureIdentity is federated (annotated
//! `aadpodidentity.k8s.io/token-source: federated`). mic marks its
//! AzureAssignedIdentity Assigned with no ARM write; nmi asks the API server
//! for a token of the pod's ServiceAccount bound to the pod and exchanges it
//! at the emulator's Entra ID, which trusts the shared cluster's
//! ServiceAccount issuer (its discovery document and keys, read with
//! `kubectl get --raw`). Each sample is a new pod on NMI's node with a
//! ServiceAccount of its own (nmi caches a federated token per
//! ServiceAccount, so a second pod of the same one would be served from
//! the cache), timed from the Pod's creation to a token in it; the ARM
//! writes and IMDS token requests over all samples are counted.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use aadpodid_api::{
    ANNOTATION_TOKEN_SOURCE, AzureIdentity, AzureIdentityBinding, AzureIdentitySpec,
    FEDERATED_TOKEN_AUDIENCE, TokenSource,
};
use aadpodid_testkit::world::{TENANT, id_client, id_name, id_resource, trust_cluster_issuer};
use anyhow::{Context as _, bail};
use azure_emulator::{Counters, FederatedCredentialSeed};
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use serde_json::json;

use crate::report::{Figures, Metric};
use crate::stats::Summary;
use crate::subject::{move_pod_ip_in, token_after};
use crate::world::World;

/// The federated AzureIdentity's name, and its binding's selector.
const IDENTITY: &str = "fed-bench";

/// The row's metrics.
pub(crate) const METRICS: [Metric; 4] = [
    Metric::FederatedFirstToken,
    Metric::FederatedFirstTokenP95,
    Metric::FederatedArmWrites,
    Metric::FederatedImdsTokens,
];

/// What the upstream column says.
pub(crate) const UPSTREAM: &str =
    "not run: upstream has no federated token source (this project's own)";

/// The row: `first_token_samples` new pods, one after the other.
pub(crate) async fn row(w: &mut World, f: &mut Figures) -> anyhow::Result<()> {
    let n = w.scale.first_token_samples.max(1);
    let issuer = trust_issuer(w).await?;
    // The tenant's last identity: no other row binds a pod to it before
    // this row runs.
    let j = w.scale.tenant_identities() - 1;
    let ns = w.ns_nmi.name().to_string();
    create_identity(w, &ns, j).await?;
    let (pod_ns, ip) = w.pod(0)?;
    let pod_ns = pod_ns.name().to_string();
    vacate(w, ip, 0).await?;
    let before = w.emu()?.counters();
    let mut samples = Vec::with_capacity(n);
    for k in 0..n {
        let name = format!("fed-{k}");
        create_service_account(w, &ns, &name).await?;
        let credential = FederatedCredentialSeed {
            issuer: issuer.clone(),
            subject: format!("system:serviceaccount:{ns}:{name}"),
            audience: FEDERATED_TOKEN_AUDIENCE.into(),
        };
        if !w.emu()?.add_federated_credential(&id_name(j), credential) {
            bail!("the emulator has no identity {}", id_name(j));
        }
        let t0 = Instant::now();
        create_pod(w, &ns, &name, ip).await?;
        let pod = w
            .kit
            .nodes
            .first()
            .and_then(|node| node.net.pods.first())
            .map(|(netns, _)| netns)
            .with_context(|| format!("pod namespace {pod_ns}"))?;
        let took = token_after(pod, t0, &name).await?;
        samples.push(took.as_secs_f64() * 1000.0);
        vacate(w, ip, k + 1).await?;
    }
    let after = w.emu()?.counters();
    let (writes, imds) = spent(&before, &after);
    let s = Summary::of(&samples).context("no sample")?;
    f.set(Metric::FederatedFirstToken, s.median);
    f.set(Metric::FederatedFirstTokenP95, s.p95);
    f.set(Metric::FederatedArmWrites, writes as f64);
    f.set(Metric::FederatedImdsTokens, imds as f64);
    let each: Vec<String> = samples.iter().map(|v| format!("{v:.0}")).collect();
    f.note(format!(
        "federated first token: {} samples (ms from the Pod's creation, each pod with a ServiceAccount of its own), in order: {}; min {:.0}, max {:.0}; ARM writes {writes}, IMDS token requests {imds} over all samples",
        s.n,
        each.join(", "),
        s.min,
        s.max
    ));
    Ok(())
}

/// ARM writes and IMDS token requests between two readings of the
/// emulator's counters.
fn spent(before: &Counters, after: &Counters) -> (u64, u64) {
    let sum = |m: &BTreeMap<String, u64>| m.values().sum::<u64>();
    (
        sum(&after.arm_writes).saturating_sub(sum(&before.arm_writes)),
        sum(&after.imds_token_requests).saturating_sub(sum(&before.imds_token_requests)),
    )
}

/// Gives the emulator's Entra ID the shared cluster's ServiceAccount keys
/// (its discovery document's `issuer`, its `/openid/v1/jwks`); the issuer.
async fn trust_issuer(w: &World) -> anyhow::Result<String> {
    let cluster = w
        .kit
        .shared_cluster()
        .context("the bench runs on the shared cluster")?;
    Ok(trust_cluster_issuer(cluster, w.emu()?).await?.issuer)
}

/// AzureIdentity [`IDENTITY`] in `ns` for the emulator's identity `j`,
/// federated, naming the tenant and the emulator's Entra ID, and its
/// binding to selector [`IDENTITY`].
async fn create_identity(w: &World, ns: &str, j: usize) -> anyhow::Result<()> {
    let mut id = AzureIdentity::new(
        IDENTITY,
        AzureIdentitySpec {
            resource_id: id_resource(&id_name(j)),
            client_id: id_client(j),
            tenant_id: TENANT.into(),
            ad_endpoint: w.emu()?.aad_url(),
            ..Default::default()
        },
    );
    id.metadata.namespace = Some(ns.into());
    id.metadata.annotations = Some(BTreeMap::from([(
        ANNOTATION_TOKEN_SOURCE.to_string(),
        TokenSource::Federated.as_str().to_string(),
    )]));
    Api::<AzureIdentity>::namespaced(w.client.clone(), ns)
        .create(&PostParams::default(), &id)
        .await
        .context("create the federated AzureIdentity")?;
    let binding: AzureIdentityBinding = serde_json::from_value(json!({
        "metadata": {"name": format!("{IDENTITY}-binding"), "namespace": ns},
        "spec": {"azureIdentity": IDENTITY, "selector": IDENTITY},
    }))?;
    Api::<AzureIdentityBinding>::namespaced(w.client.clone(), ns)
        .create(&PostParams::default(), &binding)
        .await
        .context("create the federated identity's binding")?;
    Ok(())
}

/// ServiceAccount `ns/name`.
async fn create_service_account(w: &World, ns: &str, name: &str) -> anyhow::Result<()> {
    let sa: ServiceAccount = serde_json::from_value(json!({"metadata": {"name": name}}))?;
    Api::<ServiceAccount>::namespaced(w.client.clone(), ns)
        .create(&PostParams::default(), &sa)
        .await
        .with_context(|| format!("create ServiceAccount {ns}/{name}"))?;
    Ok(())
}

/// Pod `ns/name` on NMI's node, running as ServiceAccount `name`, bound to
/// [`IDENTITY`], reported Running at `ip`.
async fn create_pod(w: &World, ns: &str, name: &str, ip: Ipv4Addr) -> anyhow::Result<()> {
    let api: Api<Pod> = Api::namespaced(w.client.clone(), ns);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"aadpodidbinding": IDENTITY}},
        "spec": {
            "nodeName": w.nmi_node,
            "serviceAccountName": name,
            "containers": [{"name": "app", "image": "app"}],
        },
    }))?;
    api.create(&PostParams::default(), &pod)
        .await
        .with_context(|| format!("create pod {ns}/{name}"))?;
    let ip = ip.to_string();
    let status = json!({"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}});
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(status))
        .await
        .with_context(|| format!("pod {ns}/{name} Running"))?;
    Ok(())
}

/// Every pod reported at `ip` moved to an address no namespace backs
/// (`10.246.8.x`, `k` apart between calls), so that the next sample's pod is
/// alone there; then time for NMI's watch to see it.
async fn vacate(w: &World, ip: Ipv4Addr, k: usize) -> anyhow::Result<()> {
    let pods = Api::<Pod>::all(w.client.clone())
        .list(&ListParams::default())
        .await?;
    let at_ip = pods.items.iter().filter(|p| {
        p.status
            .as_ref()
            .and_then(|s| s.pod_ip.as_deref())
            .is_some_and(|a| a == ip.to_string())
    });
    let mut moved = 0;
    for p in at_ip {
        let (Some(ns), Some(name)) = (p.metadata.namespace.as_deref(), p.metadata.name.as_deref())
        else {
            continue;
        };
        let away = Ipv4Addr::new(10, 246, 8, ((k * 4 + moved) % 250 + 1) as u8);
        move_pod_ip_in(w, ns, name, away).await?;
        moved += 1;
    }
    if moved > 0 {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(())
}
