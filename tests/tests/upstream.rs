//! Upstream aad-pod-identity v1.8.17's own Go `mic` and `nmi` (built from their
//! Go module by `tests/upstream/build.sh`) against the harness's real
//! kube-apiserver and the Azure emulator: the upstream column of the benchmark
//! is only meaningful if this passes.
//!
//! MIC runs on loopback with the admin kubeconfig and talks HTTPS to the
//! emulator's ARM and AAD (trusting its test CA through `SSL_CERT_FILE`, set on
//! the Go child only). NMI runs inside a node network namespace with real
//! iptables; a relay there carries the node's `127.0.0.1:6443` (apiserver) and
//! `169.254.169.254:80` (the emulator's IMDS for the node's scale-set instance)
//! to Unix sockets this process forwards to the root namespace's loopback.
//!
//! The first run builds upstream's binaries (a cold build took 6m42s on two
//! busy cores); later runs reuse the cache.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::Duration;

use aadpodid_api::{
    AzureAssignedIdentity, AzureIdentity, AzureIdentityBinding, AzureIdentityBindingSpec,
    AzureIdentitySpec,
};
use aadpodid_tests::netns::{IMDS_ADDRESS, NetNs, Node};
use aadpodid_tests::tenant::{
    self, APP_CLIENT, CloudEnvironment, KUBELET, MicCloud, NODE_RG, Tenant,
};
use aadpodid_tests::upstream::{
    MicOptions, NmiOptions, UpstreamChild, spawn_upstream_mic, spawn_upstream_nmi, upstream_bin_dir,
};
use aadpodid_tests::{Cluster, free_port, unique_name, wait_for};
use anyhow::Context as _;
use azure_emulator::observe::Service;
use k8s_openapi::api::core::v1::{Node as KubeNode, Pod};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;

const API_RELAY_PORT: u16 = 6443;
const NMI_PROBE_PORT: u16 = 8085;
const WAIT: Duration = Duration::from_secs(120);
const TOKEN_PATH: &str = "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https%3A%2F%2Fmanagement.azure.com%2F";

/// Kills the relay and removes the scratch folder on drop.
struct Scratch {
    dir: PathBuf,
    relay: Option<Child>,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Some(mut r) = self.relay.take() {
            let _ = r.kill();
            let _ = r.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `curl` inside `ns`: (status, body).
async fn curl(ns: &NetNs, url: &str, headers: &[&str]) -> anyhow::Result<(u16, String)> {
    let mut args = vec!["-s", "--max-time", "60", "-w", "\n%{http_code}"];
    for h in headers {
        args.extend(["-H", h]);
    }
    args.push(url);
    let mut cmd = ns.command("curl");
    cmd.args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let out = tokio::process::Command::from(cmd).output().await?;
    let out = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = out
        .rsplit_once('\n')
        .with_context(|| format!("curl output: {out}"))?;
    Ok((code.trim().parse()?, body.to_string()))
}

fn logs(mic: &UpstreamChild, nmi: Option<&UpstreamChild>) -> String {
    format!(
        "--- upstream mic log ---\n{}\n--- upstream nmi log ---\n{}",
        tail(&mic.log()),
        nmi.map(|n| tail(&n.log())).unwrap_or_default()
    )
}

fn tail(s: &str) -> String {
    // client-go warns at every leader-lock renewal (Endpoints are deprecated).
    let lines: Vec<&str> = s
        .lines()
        .filter(|l| !l.contains("v1 Endpoints is deprecated"))
        .collect();
    lines[lines.len().saturating_sub(60)..].join("\n")
}

/// Upstream MIC assigns a bound pod's identity to the emulated scale set
/// (AAI Created → Assigned), upstream NMI in the node namespace hands the pod
/// a token for it through 169.254.169.254, and deleting the pod releases the
/// identity again, keeping the kubelet identity.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upstream_mic_and_nmi_on_cluster_and_emulator() -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let bins = tokio::task::spawn_blocking(upstream_bin_dir).await??;
    eprintln!(
        "upstream binaries in {} ({:?})",
        bins.display(),
        started.elapsed()
    );

    let cluster = Cluster::shared();
    let client = cluster.admin_client().await?;
    let ns_guard = cluster.temp_namespace("upstream").await?;
    let ns = ns_guard.name().to_string();
    let dir = std::env::temp_dir().join(unique_name("upstream-test"));
    std::fs::create_dir_all(&dir)?;
    let mut scratch = Scratch {
        dir: dir.clone(),
        relay: None,
    };

    // The emulated tenant: one scale set carrying the kubelet identity, an app
    // identity, MIC's service principal; LROs 100x faster than Azure's.
    let vmss = unique_name("up-vmss");
    let emu = Tenant::standard()
        .scale_set(&vmss, 1, &[KUBELET])
        .start()
        .await?;
    let app = emu.identity("app-id").context("app identity seeded")?;

    // The node: a Node object on scale-set instance 0, and its network namespace
    // with one pod, IMDS for that instance on 169.254.169.254:80.
    let node_name = unique_name("up-node");
    let kube_node: KubeNode = serde_json::from_value(json!({
        "metadata": {"name": node_name},
        "spec": {"providerID": tenant::vmss_provider_id(NODE_RG, &vmss, 0)},
    }))?;
    Api::<KubeNode>::all(client.clone())
        .create(&PostParams::default(), &kube_node)
        .await?;
    let net = Node::with_pods(1)?;
    net.node.add_local_address(IMDS_ADDRESS)?;
    let imds = emu
        .add_imds(&format!("vmss/{vmss}/0"), "127.0.0.1:0".parse()?)
        .await?;
    let api: SocketAddr = cluster
        .server()
        .trim_start_matches("https://")
        .parse()
        .context("apiserver address")?;
    scratch.relay = Some(
        net.node
            .relay_many(
                &[
                    (SocketAddr::from(([127, 0, 0, 1], API_RELAY_PORT)), api),
                    (SocketAddr::from((IMDS_ADDRESS, 80)), imds),
                ],
                &dir,
            )
            .await?,
    );
    let node_kubeconfig = dir.join("node.kubeconfig");
    std::fs::write(
        &node_kubeconfig,
        std::fs::read_to_string(cluster.kubeconfig())?.replace(
            cluster.server(),
            &format!("https://127.0.0.1:{API_RELAY_PORT}"),
        ),
    )?;

    // Upstream MIC and NMI.
    // go-autorest reads only the two endpoints of the environment file.
    let files = tenant::write_mic_cloud_files(
        &dir,
        "",
        &MicCloud::standard(),
        &CloudEnvironment {
            token_audience: None,
            ..CloudEnvironment::of(&emu)
        },
    )?;
    let mic = spawn_upstream_mic(
        &MicOptions {
            kubeconfig: cluster.kubeconfig().to_path_buf(),
            azure_json: files.azure_json,
            cloud_env_file: files.environment,
            ca_bundle: emu.ca_bundle_path().to_path_buf(),
            namespace: ns.clone(),
            instance: "upstream-mic-0".into(),
            probe_port: free_port()?,
            metrics_port: free_port()?,
            extra_args: vec!["--leader-election-duration=4s".into()],
        },
        &dir.join("mic.log"),
    )?;
    let nmi = spawn_upstream_nmi(
        &net.node,
        &NmiOptions {
            node: node_name.clone(),
            kubeconfig: node_kubeconfig,
            probe_port: NMI_PROBE_PORT,
            extra_args: vec![],
        },
        &dir.join("nmi.log"),
    )?;
    let node_ns = &net.node;
    wait_for("upstream nmi /healthz Active", WAIT, || async {
        let url = format!("http://127.0.0.1:{NMI_PROBE_PORT}/healthz");
        let (code, body) = curl(node_ns, &url, &[]).await.ok()?;
        (code == 200 && body == "Active").then_some(())
    })
    .await
    .with_context(|| logs(&mic, Some(&nmi)))?;
    let chain = net
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
    let pod_ip = net.pods[0].1.to_string();
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
    .with_context(|| logs(&mic, Some(&nmi)))?;
    eprintln!(
        "AAI Assigned {:?} after the pod was created",
        assigned_in.elapsed()
    );
    let on_vmss = emu.assigned_identities(&vmss).context("scale set exists")?;
    assert!(
        on_vmss.contains(&app.id.to_lowercase()),
        "{on_vmss:?}\n{}",
        logs(&mic, Some(&nmi))
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
    let (code, body) = curl(&net.pods[0].0, &url, &["Metadata: true"]).await?;
    assert_eq!(code, 200, "{body}\n{}", logs(&mic, Some(&nmi)));
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
    let (code, body) = curl(&net.pods[0].0, &url, &[]).await?;
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
    .with_context(|| logs(&mic, Some(&nmi)))?;
    let on_vmss = emu.assigned_identities(&vmss).context("scale set exists")?;
    assert!(!on_vmss.contains(&app.id.to_lowercase()), "{on_vmss:?}");
    let kubelet = emu.identity("kubelet").context("kubelet identity")?;
    assert!(on_vmss.contains(&kubelet.id.to_lowercase()), "{on_vmss:?}");

    let left = aais
        .list(&ListParams::default().labels(&format!("nodename={node_name}")))
        .await?;
    assert!(left.items.is_empty(), "AAIs left: {}", left.items.len());
    drop(nmi);
    drop(mic);
    let _ = Api::<KubeNode>::all(client)
        .delete(&node_name, &DeleteParams::default())
        .await;
    Ok(())
}
