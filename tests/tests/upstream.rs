//! Upstream aad-pod-identity v1.8.17's own Go `mic` and `nmi` (built from their
//! Go module by `tests/upstream/build.sh`) against the harness's real
//! kube-apiserver and the Azure emulator: the upstream column of the benchmark
//! is only meaningful if this passes.
//!
//! The world is the kit's [`WorldBuilder`] with plain flags on the shared
//! cluster, as the benchmark runs upstream: MIC on the host with the admin
//! kubeconfig, talking HTTPS to the emulator's ARM and AAD (its test CA
//! through `SSL_CERT_FILE`); NMI inside a node network namespace with real
//! iptables, the node's relay carrying the apiserver and the emulator's IMDS
//! for the node's scale-set instance on `169.254.169.254:80`.
//!
//! The first run builds upstream's binaries (a cold build took 6m42s on two
//! busy cores); later runs reuse the cache.

use std::time::Duration;

use aadpodid_api::{
    AzureAssignedIdentity, AzureIdentity, AzureIdentityBinding, AzureIdentityBindingSpec,
    AzureIdentitySpec,
};
use aadpodid_tests::netns::IMDS_ADDRESS;
use aadpodid_tests::tenant::{APP_CLIENT, CloudEnvironment, KUBELET, MicCloud, NODE_RG, Tenant};
use aadpodid_tests::upstream::log_tail;
use aadpodid_tests::world::{
    ArgsSource, ClusterChoice, NodeSpec, Options, Program, TOKEN_PATH, WorldBuilder, curl_in,
};
use aadpodid_tests::{unique_name, wait_for};
use anyhow::Context as _;
use azure_emulator::observe::Service;
use k8s_openapi::api::core::v1::{Node as KubeNode, Pod};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(120);

/// The last lines of upstream MIC's and NMI's logs, for a failure message.
fn logs(kit: &WorldBuilder) -> String {
    let tail = |log: Option<String>| log_tail(&log.unwrap_or_default(), 60);
    format!(
        "--- upstream mic log ---\n{}\n--- upstream nmi log ---\n{}",
        tail(kit.host_mic.as_ref().map(|(mic, _)| mic.log())),
        tail(kit.nodes.first().map(|n| n.nmi.log()))
    )
}

/// Upstream MIC assigns a bound pod's identity to the emulated scale set
/// (AAI Created → Assigned), upstream NMI in the node namespace hands the pod
/// a token for it through 169.254.169.254, and deleting the pod releases the
/// identity again, keeping the kubelet identity.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upstream_mic_and_nmi_on_cluster_and_emulator() -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let (mic, nmi) = tokio::task::spawn_blocking(|| {
        anyhow::Ok((Program::upstream("mic")?, Program::upstream("nmi")?))
    })
    .await??;
    eprintln!(
        "upstream binaries built or found in {:?}",
        started.elapsed()
    );

    let mic = mic.with_args(["--leader-election-duration=4s"]);
    let dir = std::env::temp_dir().join(unique_name("upstream-test"));
    let mut kit = WorldBuilder::new(Options::with_programs(mic, nmi), ArgsSource::Flags, dir)?;
    let ns_guard = kit
        .cluster(ClusterChoice::Shared)
        .await?
        .temp_namespace("upstream")
        .await?;
    let ns = ns_guard.name().to_string();
    let client = kit.client()?.clone();
    kit.opts_mut().mic_namespace = ns.clone();

    // The emulated tenant: one scale set carrying the kubelet identity, an app
    // identity, MIC's service principal; LROs 100x faster than Azure's.
    let vmss = unique_name("up-vmss");
    kit.tenant(Tenant::standard().scale_set(&vmss, 1, &[KUBELET]))
        .await?;
    let emu = kit.emu()?;
    let app = emu.identity("app-id").context("app identity seeded")?;
    // go-autorest reads only the two endpoints of the environment file.
    let env = CloudEnvironment {
        token_audience: None,
        ..CloudEnvironment::of(emu)
    };
    kit.host_files_with(&MicCloud::standard(), &env)?;

    // The node: a Node object on scale-set instance 0, and its network
    // namespace with one pod; then upstream MIC and NMI.
    let spec = NodeSpec::scale_set(NODE_RG, &vmss, 0, 1);
    let node_name = spec.name.clone();
    kit.nodes(std::slice::from_ref(&spec)).await?;
    kit.host_mic()?;
    kit.start_host_mic().await?;
    kit.start_nmi(0).await?;
    let (emu, node) = (kit.emu()?, &kit.nodes[0]);
    wait_for("upstream nmi /healthz Active", WAIT, || async {
        let (code, body) = curl_in(&node.net.node, &node.nmi.probe_url(), &[], 60)
            .await
            .ok()?;
        (code == 200 && body == "Active").then_some(())
    })
    .await
    .with_context(|| logs(&kit))?;
    let chain = node
        .net
        .node
        .run("iptables", &["-t", "nat", "-S", "aad-metadata"])?;
    assert!(
        chain.contains(
            "-d 169.254.169.254/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination 127.0.0.1:2579"
        ),
        "{chain}"
    );

    // A pod bound to the app identity.
    let mut id = AzureIdentity::new(
        "app-id",
        AzureIdentitySpec {
            resource_id: app.id.clone(),
            client_id: APP_CLIENT.into(),
            ..Default::default()
        },
    );
    id.metadata.namespace = Some(ns.clone());
    Api::<AzureIdentity>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &id)
        .await?;
    let mut binding = AzureIdentityBinding::new(
        "app-binding",
        AzureIdentityBindingSpec {
            azure_identity: "app-id".into(),
            selector: "app".into(),
            weight: 0,
        },
    );
    binding.metadata.namespace = Some(ns.clone());
    Api::<AzureIdentityBinding>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &binding)
        .await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let (pod_ns, pod_ip) = &node.net.pods[0];
    let pod_ip = pod_ip.to_string();
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "app", "labels": {"aadpodidbinding": "app"}},
        "spec": {"nodeName": node_name, "containers": [{"name": "app", "image": "app"}]},
    }))?;
    pods.create(&PostParams::default(), &pod).await?;
    pods.patch_status(
        "app",
        &PatchParams::default(),
        &Patch::Merge(json!({
            "status": {"phase": "Running", "podIP": pod_ip, "podIPs": [{"ip": pod_ip}]}
        })),
    )
    .await?;

    // Upstream MIC: AAI `<pod>-<ns>-<identity>` in `default`, Assigned, and
    // the identity on the scale set (kubelet identity kept).
    let aais: Api<AzureAssignedIdentity> = Api::namespaced(client.clone(), "default");
    let aai_name = format!("app-{ns}-app-id");
    let assigned_in = std::time::Instant::now();
    wait_for("AAI Assigned by upstream mic", WAIT, || async {
        let a = aais.get_opt(&aai_name).await.ok()??;
        (a.status.as_ref()?.status == "Assigned").then_some(())
    })
    .await
    .with_context(|| logs(&kit))?;
    eprintln!(
        "AAI Assigned {:?} after the pod was created",
        assigned_in.elapsed()
    );
    let on_vmss = emu.assigned_identities(&vmss).context("scale set exists")?;
    assert!(
        on_vmss.contains(&app.id.to_lowercase()),
        "{on_vmss:?}\n{}",
        logs(&kit)
    );
    // It was upstream's Go SDK that wrote: compute api-version 2019-12-01.
    let reqs = emu.requests(0);
    assert!(
        reqs.iter().any(|r| r.service == Service::Arm
            && r.method == "PATCH"
            && r.uri.contains(&vmss)
            && r.uri.contains("api-version=2019-12-01")),
        "no 2019-12-01 PATCH of {vmss}: {reqs:?}"
    );
    let aai = aais.get(&aai_name).await?;
    assert_eq!(
        aai.metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("nodename"))
            .map(String::as_str),
        Some(node_name.as_str())
    );

    // Upstream NMI: the pod gets the app identity's token through 169.254.169.254.
    let url = format!("http://{IMDS_ADDRESS}{TOKEN_PATH}");
    let (code, body) = curl_in(pod_ns, &url, &["Metadata: true"], 60).await?;
    assert_eq!(code, 200, "{body}\n{}", logs(&kit));
    let v: serde_json::Value = serde_json::from_str(&body).with_context(|| body.clone())?;
    let token = v["access_token"].as_str().context("access_token")?;
    let claims = emu
        .verify_token(token)
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    assert_eq!(claims.appid, APP_CLIENT, "{body}");
    assert_eq!(v["resource"], "https://management.azure.com/", "{body}");
    // NMI fetched it from the instance's IMDS as adal does.
    assert!(
        emu.requests(0).iter().any(|r| r.service == Service::Imds
            && r.uri.contains("api-version=2018-02-01")
            && r.uri.contains(&format!("client_id={APP_CLIENT}"))),
        "no adal IMDS request"
    );
    // Without the Metadata header: upstream's 400.
    let (code, body) = curl_in(pod_ns, &url, &[], 60).await?;
    assert_eq!(code, 400, "{body}");

    // Deleting the pod releases the identity; the kubelet identity stays.
    // Grace period 0: no kubelet runs to finish a graceful deletion, and
    // upstream MIC keeps serving terminating pods.
    pods.delete("app", &DeleteParams::default().grace_period(0))
        .await?;
    wait_for("AAI removed by upstream mic", WAIT, || async {
        aais.get_opt(&aai_name).await.ok()?.is_none().then_some(())
    })
    .await
    .with_context(|| logs(&kit))?;
    let on_vmss = emu.assigned_identities(&vmss).context("scale set exists")?;
    assert!(!on_vmss.contains(&app.id.to_lowercase()), "{on_vmss:?}");
    let kubelet = emu.identity("kubelet").context("kubelet identity")?;
    assert!(on_vmss.contains(&kubelet.id.to_lowercase()), "{on_vmss:?}");

    let left = aais
        .list(&ListParams::default().labels(&format!("nodename={node_name}")))
        .await?;
    assert!(left.items.is_empty(), "AAIs left: {}", left.items.len());
    let report = kit.teardown().await;
    eprintln!("teardown: {report:?}");
    let _ = Api::<KubeNode>::all(client)
        .delete(&node_name, &DeleteParams::default())
        .await;
    Ok(())
}
