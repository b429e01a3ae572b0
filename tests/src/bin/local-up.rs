//! `local-up`: the whole system on one machine, step by step, for a newcomer.
//!
//! It brings up the harness's test cluster (etcd + kube-apiserver), the Azure
//! emulator with a small tenant, two mic replicas and one nmi per node (each
//! node a network namespace), applies the user's seed manifests with a real
//! `kubectl apply`, starts the seeds' two pods (one on a scale-set node, one on
//! the VM) and shows their identities being assigned, a real Azure SDK client in
//! each pod getting a token through 169.254.169.254, and the identities
//! released when the pods go. Everything is torn down at the end or on
//! SIGINT/SIGTERM. Needs root (network namespaces, iptables inside them).
//!
//! mic and nmi run as processes of the crate's `e2e-mic` and `e2e-nmi`
//! binaries, found next to this executable (cargo builds all binaries of the
//! package into one folder; `CARGO_BIN_EXE_*` exists only for tests).
//!
//! Network layout (as tests/tests/nmi_netns.rs): the apiserver and the emulator
//! listen on loopback in the root namespace; inside each node namespace a relay
//! (this binary, `local-up relay`) carries the node's `127.0.0.1:6443`
//! (apiserver) and `169.254.169.254:80` (that machine's IMDS) to Unix sockets
//! that this process forwards to them. Unix sockets are not network-namespaced,
//! so nothing is added to the root namespace's network.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aadpodid_api::AzureAssignedIdentity;
use aadpodid_tests::netns::{IMDS_ADDRESS, Node};
use aadpodid_tests::relay::{tcp_to_unix, unix_to_tcp};
use aadpodid_tests::{
    Cluster, IdentitySelector, SUB, TENANT, fill_template, fixture, free_ports, python_imds_token,
};
use anyhow::{Context as _, bail};
use azure_emulator::config::{
    IdentityAssignmentSeed, IdentitySeed, PermissionsSeed, ScaleSetSeed, SecretSeed,
    ServicePrincipalSeed, VmSeed,
};
use azure_emulator::{Config, Emulator};
use clap::Parser as _;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node as KubeNode, Pod};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use tokio::process::{Child, Command};

/// The AKS node resource group.
const NODE_RG: &str = "MC_demo-rg_demo-aks_eastus";
/// Where the application identities live.
const APP_RG: &str = "demo-identities";
const VMSS: &str = "aks-nodepool1-12345678-vmss";
/// A standalone VM node (availability-set naming).
const VM: &str = "aks-agentpool-12345678-0";
const MIC_CLIENT: &str = "5b1c2c4e-0000-4000-8000-00000000c1d1";
const MIC_SECRET: &str = "demo-mic-secret";
const KUBELET_CLIENT: &str = "c0000000-0000-4000-8000-00000000000a";
/// The seed's `${UAIName}`: the identity the seed-002 manifests name.
const UAI_NAME: &str = "uai-kv";
const UAI_CLIENT: &str = "7c8e5e33-2b4a-4a36-8a3c-5d0b6e1f2a9d";
/// The seed's `${KVName}` (only the pod's CSI volume names it).
const KV_NAME: &str = "kv-demo";
/// Seed 004 (an AKS walkthrough): `az identity create` in
/// `${IDENTITY_RESOURCE_GROUP}`, then `az aks pod-identity add` binds it as
/// `${POD_IDENTITY_NAME}` in `${POD_IDENTITY_NAMESPACE}`.
const SEED4_RG: &str = "myIdentityResourceGroup";
const SEED4_IDENTITY: &str = "application-identity";
const SEED4_CLIENT: &str = "4e2d1c1b-6a0f-4f55-9a43-2f1f3c7b9e11";
const SEED4_POD_IDENTITY: &str = "my-pod-identity";
const SEED4_NAMESPACE: &str = "my-app";
const ARM_RESOURCE: &str = "https://management.azure.com/";
/// Port of the apiserver inside each node namespace (relayed).
const NODE_API_PORT: u16 = 6443;
/// nmi's probe port inside each node namespace.
const NMI_PROBE_PORT: u16 = 8085;
/// Virtual seconds per real second: a 45 s scale-set write takes 1.5 s.
const CLOCK_SPEED: f64 = 30.0;
/// Bound on every wait of the demo.
const WAIT: Duration = Duration::from_secs(90);
const STEPS: usize = 9;

#[derive(clap::Parser, Debug)]
#[command(
    name = "local-up",
    about = "Runs aad-pod-identity locally: test cluster, Azure emulator, mic, nmi and pods getting tokens"
)]
struct Cli {
    /// Keep everything running after the token step (the pods stay) until Ctrl-C.
    #[arg(long)]
    keep: bool,
    /// Folder with the `e2e-mic` and `e2e-nmi` binaries (default: next to this one).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
}

/// What must be undone, registered as soon as it exists so that teardown
/// finds it however the demo ends.
#[derive(Default)]
struct Registry {
    children: Vec<(String, Child)>,
    netns: Vec<String>,
    nodes: Vec<Arc<Node>>,
    dirs: Vec<PathBuf>,
    emulator: Option<Arc<Emulator>>,
    cluster_dir: Option<PathBuf>,
    keeping: bool,
    /// Set while the harness starts the cluster on a blocking thread.
    cluster_starting: Arc<std::sync::atomic::AtomicBool>,
}

type Reg = Arc<Mutex<Registry>>;

/// Set once the demo is stopping: failures of half-started parts are expected
/// then and need no panic report.
static STOPPING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

struct ClearOnDrop(Arc<std::sync::atomic::AtomicBool>);

impl Drop for ClearOnDrop {
    fn drop(&mut self) {
        self.0.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

fn reg(r: &Reg) -> std::sync::MutexGuard<'_, Registry> {
    r.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("local-up: cannot start the Tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Hidden mode: the relay run inside a node namespace.
    if args.get(1).map(String::as_str) == Some("relay") {
        return match rt.block_on(relay_main(&args[2..])) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("relay: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let cli = Cli::parse();
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !STOPPING.load(std::sync::atomic::Ordering::SeqCst) {
            default_hook(info);
        }
    }));
    rt.block_on(run(cli))
}

async fn run(cli: Cli) -> ExitCode {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        eprintln!("local-up: cannot install signal handlers");
        return ExitCode::FAILURE;
    };
    let registry: Reg = Arc::default();
    let started = Instant::now();
    let mut outcome = tokio::select! {
        biased;
        _ = int.recv() => Err("SIGINT"),
        _ = term.recv() => Err("SIGTERM"),
        r = demo(&registry, &cli) => Ok(r),
    };
    // Ctrl-C reaches the whole process group: a child may die of it and fail
    // the demo a moment before this process sees the signal. Then the signal,
    // not the failure, is the story.
    if matches!(outcome, Ok(Err(_))) {
        let late = tokio::time::timeout(Duration::from_millis(500), async {
            tokio::select! {
                _ = int.recv() => "SIGINT",
                _ = term.recv() => "SIGTERM",
            }
        })
        .await;
        if let Ok(sig) = late {
            outcome = Err(sig);
        }
    }
    STOPPING.store(true, std::sync::atomic::Ordering::SeqCst);
    let code = match &outcome {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            println!("\nlocal-up FAILED: {e:#}");
            print_logs(&registry);
            ExitCode::FAILURE
        }
        Err(sig) if reg(&registry).keeping => {
            println!("\n{sig} received: stopping.");
            ExitCode::SUCCESS
        }
        Err(sig) => {
            println!("\n{sig} received: stopping early.");
            ExitCode::from(if *sig == "SIGINT" { 130 } else { 143 })
        }
    };
    teardown(&registry).await;
    if matches!(outcome, Ok(Ok(()))) {
        println!(
            "\nDone in {:.1}s. Run it again any time: scripts/local-up.sh",
            started.elapsed().as_secs_f64()
        );
    }
    code
}

/// Prints one numbered step and returns when it started.
fn step(n: usize, title: &str) -> Instant {
    println!("\n[{n}/{STEPS}] {title}");
    Instant::now()
}

fn done(since: Instant) {
    println!("      ok ({:.1}s)", since.elapsed().as_secs_f64());
}

fn info(line: &str) {
    println!("      {line}");
}

fn vmss_node(i: usize) -> String {
    format!("{VMSS}{i:06}")
}

async fn demo(registry: &Reg, cli: &Cli) -> anyhow::Result<()> {
    println!("aad-pod-identity, running locally");
    println!(
        "  A test Kubernetes control plane, an emulated Azure tenant, mic (2 replicas) and nmi"
    );
    println!("  (one per node, each node a network namespace) work together to give pods Azure AD");
    println!("  tokens for user-assigned managed identities, with no secret in any pod.");

    if !is_root() {
        bail!("needs root: it creates network namespaces and iptables rules inside them");
    }
    let bins = match &cli.bin_dir {
        Some(d) => d.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("executable has no folder")?
            .to_path_buf(),
    };
    let (mic_bin, nmi_bin) = (bins.join("e2e-mic"), bins.join("e2e-nmi"));
    for b in [&mic_bin, &nmi_bin] {
        if !b.exists() {
            bail!(
                "{} not found; build it with `cargo build -p aadpodid-tests --bin e2e-mic --bin e2e-nmi --locked` (scripts/local-up.sh does)",
                b.display()
            );
        }
    }
    let dir = std::env::temp_dir().join(format!("aadpodid-local-up-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    reg(registry).dirs.push(dir.clone());

    // 1. Cluster.
    let t = step(
        1,
        "Test cluster: etcd + kube-apiserver with RBAC and the aad-pod-identity CRDs",
    );
    let starting = reg(registry).cluster_starting.clone();
    starting.store(true, std::sync::atomic::Ordering::SeqCst);
    let cluster = tokio::task::spawn_blocking(move || {
        // Cleared however the start ends (the harness panics on failure).
        let _started = ClearOnDrop(starting);
        Cluster::shared()
    })
    .await?;
    let cluster_dir = cluster
        .kubeconfig()
        .parent()
        .context("kubeconfig has no folder")?
        .to_path_buf();
    reg(registry).cluster_dir = Some(cluster_dir);
    let client = cluster.admin_client().await?;
    info(&format!(
        "kube-apiserver {} and etcd {} at {}",
        aadpodid_tests::KUBERNETES_VERSION,
        aadpodid_tests::ETCD_VERSION,
        cluster.server()
    ));
    done(t);

    // 2. Emulator.
    let t = step(
        2,
        "Azure emulator: ARM (compute), Entra ID and one IMDS per machine",
    );
    let emu = Arc::new(Emulator::start(emulator_config()).await?);
    reg(registry).emulator = Some(emu.clone());
    info(&format!("tenant {TENANT}, subscription {SUB}"));
    info(&format!(
        "scale set {VMSS} (instances 0 and 1) and VM {VM} in {NODE_RG}"
    ));
    info(&format!(
        "identities: kubelet (the cluster's own, on the scale set); {UAI_NAME}, uai-reports, uai-dns in {APP_RG}; {SEED4_IDENTITY} in {SEED4_RG}"
    ));
    info(&format!(
        "ARM {}  Entra ID {}  (a 45 s scale-set write takes {:.1} s here: the clock runs {CLOCK_SPEED}x)",
        emu.arm_url(),
        emu.aad_url(),
        45.0 / CLOCK_SPEED
    ));
    done(t);

    // 3. Nodes.
    let t = step(
        3,
        "Nodes: three Node objects whose providerIDs point at the emulated machines",
    );
    let mut machines = Vec::new();
    for i in 0..2 {
        let provider = format!(
            "azure:///subscriptions/{SUB}/resourceGroups/{}/providers/Microsoft.Compute/virtualMachineScaleSets/{VMSS}/virtualMachines/{i}",
            NODE_RG.to_lowercase()
        );
        machines.push((vmss_node(i), provider, format!("vmss/{VMSS}/{i}")));
    }
    machines.push((
        VM.to_string(),
        format!(
            "azure:///subscriptions/{SUB}/resourceGroups/{}/providers/Microsoft.Compute/virtualMachines/{VM}",
            NODE_RG.to_lowercase()
        ),
        format!("vm/{VM}"),
    ));
    let nodes_api: Api<KubeNode> = Api::all(client.clone());
    for (name, provider, _) in &machines {
        let node: KubeNode = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"kubernetes.io/os": "linux"}},
            "spec": {"providerID": provider},
        }))?;
        nodes_api.create(&PostParams::default(), &node).await?;
        info(&format!("{name:<36} {provider}"));
    }
    done(t);

    // 4. mic.
    let t = step(
        4,
        "mic: 2 replicas (processes of e2e-mic) with leader election",
    );
    let cloud_file = dir.join("cloud.json");
    std::fs::write(
        &cloud_file,
        json!({
            "name": "AzureStackCloud",
            "resourceManagerEndpoint": emu.arm_url(),
            "activeDirectoryEndpoint": emu.aad_url(),
            "tokenAudience": ARM_RESOURCE,
        })
        .to_string(),
    )?;
    let azure_json = dir.join("azure.json");
    std::fs::write(
        &azure_json,
        json!({
            "cloud": "AzureStackCloud",
            "tenantId": TENANT,
            "aadClientId": MIC_CLIENT,
            "aadClientSecret": MIC_SECRET,
            "subscriptionId": SUB,
            "resourceGroup": NODE_RG,
            "vmType": "vmss",
            "userAssignedIdentityID": KUBELET_CLIENT,
        })
        .to_string(),
    )?;
    for i in 0..2 {
        let [probe, metrics] = free_ports()?;
        let instance = format!("mic-{i}");
        let log = std::fs::File::create(dir.join(format!("{instance}.log")))?;
        let mut cmd = std::process::Command::new("setpriv");
        cmd.args(["--pdeathsig", "KILL", "--"])
            .arg(&mic_bin)
            .arg(format!("--cloudconfig={}", azure_json.display()))
            .arg(format!("--kubeconfig={}", cluster.kubeconfig().display()))
            .arg(format!("--leader-election-instance={instance}"))
            .arg("--leader-election-namespace=default")
            .arg(format!("--http-probe-port={probe}"))
            .arg(format!("--prometheus-port={metrics}"))
            .env("MIC_POD_NAMESPACE", "default")
            .env("AZURE_ENVIRONMENT_FILEPATH", &cloud_file)
            .env("SSL_CERT_FILE", emu.ca_bundle_path())
            .env("NO_PROXY", "127.0.0.1,localhost")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = Command::from(cmd).spawn().context("start e2e-mic")?;
        info(&format!(
            "{instance}: pid {}, probes on 127.0.0.1:{probe}",
            child.id().unwrap_or_default()
        ));
        reg(registry).children.push((instance, child));
    }
    let leases: Api<Lease> = Api::namespaced(client.clone(), "default");
    let leader = wait("a mic replica to take the lease", || async {
        leases
            .get_opt("aad-pod-identity-mic")
            .await
            .ok()
            .flatten()
            .and_then(|l| l.spec?.holder_identity)
    })
    .await?;
    info(&format!(
        "leader: {leader} (Lease default/aad-pod-identity-mic); the other replica stands by"
    ));
    done(t);

    // 5. nmi.
    let t = step(
        5,
        "nmi: one per node, each in the node's own network namespace",
    );
    let api_addr: SocketAddr = cluster
        .server()
        .trim_start_matches("https://")
        .parse()
        .context("apiserver address")?;
    let api_sock = dir.join("api.sock");
    unix_to_tcp(api_sock.clone(), api_addr).await?;
    let node_kubeconfig = dir.join("node.kubeconfig");
    std::fs::write(
        &node_kubeconfig,
        std::fs::read_to_string(cluster.kubeconfig())?.replace(
            cluster.server(),
            &format!("https://127.0.0.1:{NODE_API_PORT}"),
        ),
    )?;
    let relay_bin = std::env::current_exe()?;
    let mut homes = Vec::new();
    for (i, (name, _, machine)) in machines.iter().enumerate() {
        // Pods of step 7: one on the first scale-set node (10.244.0.10), one on
        // the VM; the VM's node gets two pod namespaces and uses the second
        // (10.244.0.11), so the two pods' IPs differ as in a real cluster.
        let pods = match i {
            0 => 1,
            2 => 2,
            _ => 0,
        };
        let node = Arc::new(Node::with_pods(pods)?);
        {
            let mut r = reg(registry);
            r.netns.push(node.node.name().to_string());
            r.netns
                .extend(node.pods.iter().map(|(p, _)| p.name().to_string()));
            r.nodes.push(node.clone());
        }
        node.node.add_local_address(IMDS_ADDRESS)?;
        let imds = emu.add_imds(machine, "127.0.0.1:0".parse()?).await?;
        let imds_sock = dir.join(format!("imds-{i}.sock"));
        unix_to_tcp(imds_sock.clone(), imds).await?;
        let mut relay = Command::from(node.node.command(&relay_bin));
        relay
            .arg("relay")
            .arg(format!("127.0.0.1:{NODE_API_PORT}={}", api_sock.display()))
            .arg(format!("{IMDS_ADDRESS}:80={}", imds_sock.display()))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut relay = relay.spawn().context("start relay")?;
        let out = relay.stdout.take().context("relay stdout")?;
        reg(registry)
            .children
            .push((format!("relay-{name}"), relay));
        let mut line = String::new();
        tokio::time::timeout(
            Duration::from_secs(10),
            tokio::io::AsyncBufReadExt::read_line(&mut tokio::io::BufReader::new(out), &mut line),
        )
        .await
        .context("relay did not start within 10 s")??;
        if line.trim() != "READY" {
            bail!("relay did not start: {line}");
        }
        let log = std::fs::File::create(dir.join(format!("nmi-{name}.log")))?;
        let mut cmd = node.node.command(&nmi_bin);
        cmd.arg(format!("--node={name}"))
            .arg(format!("--kubeconfig={}", node_kubeconfig.display()))
            .arg(format!("--http-probe-port={NMI_PROBE_PORT}"))
            .arg("--allow-network-plugin-kubenet=true")
            .env("NO_COLOR", "1")
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = Command::from(cmd).spawn().context("start e2e-nmi")?;
        reg(registry).children.push((format!("nmi-{name}"), child));
        let nodens = node.clone();
        wait(&format!("nmi on {name} to be Active"), || {
            let nodens = nodens.clone();
            async move {
                let mut cmd = Command::from(nodens.node.command("curl"));
                cmd.args([
                    "-s",
                    "--max-time",
                    "1",
                    &format!("http://127.0.0.1:{NMI_PROBE_PORT}/healthz"),
                ]);
                let out = cmd.output().await.ok()?;
                (out.stdout == b"Active").then_some(())
            }
        })
        .await?;
        info(&format!(
            "{name:<36} netns {}, IMDS {IMDS_ADDRESS} -> {machine}; pods' {IMDS_ADDRESS}:80 redirected to nmi",
            node.node.name()
        ));
        homes.push(node);
    }
    done(t);

    // 6. Seed manifests.
    let t = step(
        6,
        "The user's manifests, applied unchanged with kubectl apply",
    );
    let uai = emu
        .identity(UAI_NAME)
        .context("the seed's identity is in the emulator")?;
    let vars2 = [
        ("UAIName", UAI_NAME),
        ("UAIId", uai.id.as_str()),
        ("UAIClientId", uai.client_id.as_str()),
        ("KVName", KV_NAME),
    ];
    info("seed 002 (a blog post; Terraform's templatefile fills the variables):");
    info(&format!(
        "  ${{UAIName}}={UAI_NAME}  ${{UAIClientId}}={}  ${{UAIId}}=<its ARM resource ID>",
        uai.client_id
    ));
    for file in [
        "seed002-azureidentity.yaml",
        "seed002-azureidentitybinding.yaml",
    ] {
        let out =
            kubectl_apply(cluster, "default", &fill_template(&fixture(file)?, &vars2)).await?;
        info(&format!("  tests/fixtures/{file}: {}", out.trim()));
    }
    let app = emu
        .identity(SEED4_IDENTITY)
        .context("seed 004's identity is in the emulator")?;
    info(&format!(
        "seed 004 (an AKS walkthrough): `az aks pod-identity add --namespace {SEED4_NAMESPACE} --name {SEED4_POD_IDENTITY}` creates these two objects:"
    ));
    let addon = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {SEED4_NAMESPACE}\n---\napiVersion: aadpodidentity.k8s.io/v1\nkind: AzureIdentity\nmetadata:\n  name: {SEED4_POD_IDENTITY}\n  namespace: {SEED4_NAMESPACE}\nspec:\n  type: 0\n  resourceID: {}\n  clientID: {}\n---\napiVersion: aadpodidentity.k8s.io/v1\nkind: AzureIdentityBinding\nmetadata:\n  name: {SEED4_POD_IDENTITY}-binding\n  namespace: {SEED4_NAMESPACE}\nspec:\n  azureIdentity: {SEED4_POD_IDENTITY}\n  selector: {SEED4_POD_IDENTITY}\n",
        app.id, app.client_id
    );
    for line in kubectl_apply(cluster, SEED4_NAMESPACE, &addon)
        .await?
        .lines()
    {
        info(&format!("  {line}"));
    }
    done(t);

    // 7. Pods.
    let t = step(
        7,
        "Two pods from the seeds, scheduled to nodes, each with its IP and network namespace",
    );
    let vars4 = [
        ("POD_IDENTITY_NAME", SEED4_POD_IDENTITY),
        ("SUBSCRIPTION_ID", SUB),
        ("IDENTITY_CLIENT_ID", app.client_id.as_str()),
        ("IDENTITY_RESOURCE_GROUP", SEED4_RG),
    ];
    let home0 = homes.first().context("node 0")?.clone();
    let home2 = homes.get(2).context("node 2")?.clone();
    let demo_pods = [
        DemoPod {
            fixture: "seed002-pod.yaml",
            manifest: fill_template(&fixture("seed002-pod.yaml")?, &vars2),
            namespace: "default",
            name: "nginx-secrets-store-inline",
            node: vmss_node(0),
            home: home0,
            pod_index: 0,
            resource: Resource::ScaleSet,
            identity: UAI_NAME,
            client_id: uai.client_id.clone(),
        },
        DemoPod {
            fixture: "seed004-pod.yaml",
            manifest: fill_template(&fixture("seed004-pod.yaml")?, &vars4),
            namespace: SEED4_NAMESPACE,
            name: "demo",
            node: VM.to_string(),
            home: home2,
            pod_index: 1,
            resource: Resource::Vm,
            identity: SEED4_IDENTITY,
            client_id: app.client_id.clone(),
        },
    ];
    let arm_since = emu.requests(0).last().map_or(0, |r| r.seq);
    let t_pod = Instant::now();
    for p in &demo_pods {
        let out = kubectl_apply(cluster, p.namespace, &p.manifest).await?;
        info(&format!("tests/fixtures/{}: {}", p.fixture, out.trim()));
        let pods: Api<Pod> = Api::namespaced(client.clone(), p.namespace);
        // What the scheduler and the kubelet would do: bind, then report Running with an IP.
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
        let ip = p.ip()?.to_string();
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
            p.namespace,
            p.name,
            p.node,
            p.netns()?.name()
        ));
    }
    let aais: Api<AzureAssignedIdentity> = Api::all(client.clone());
    // Polled rather than watched so each status is shown as seen; bounded by WAIT.
    let mut shown: Vec<String> = vec![String::new(); demo_pods.len()];
    let deadline = Instant::now() + WAIT;
    loop {
        let list = aais.list(&ListParams::default()).await?;
        for (p, seen) in demo_pods.iter().zip(shown.iter_mut()) {
            let Some(a) = list
                .items
                .iter()
                .find(|a| a.spec.pod == p.name && a.spec.pod_namespace == p.namespace)
            else {
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
                    t_pod.elapsed().as_secs_f64()
                ));
                *seen = status;
            }
        }
        if shown.iter().all(|s| s == "Assigned") {
            break;
        }
        if Instant::now() >= deadline {
            bail!(
                "timed out after {WAIT:?} waiting for the AzureAssignedIdentities to be Assigned"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    info(
        "mic created each AzureAssignedIdentity, added the identity to the node's scale set or VM through ARM, then marked it Assigned:",
    );
    let arm_calls: Vec<_> = emu
        .requests(arm_since)
        .into_iter()
        .filter(|r| r.service == azure_emulator::observe::Service::Arm)
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
    for p in &demo_pods {
        let ids = arm_identities(&emu, p.resource).await?;
        info(&format!(
            "ARM GET {}: userAssignedIdentities = [{}]",
            p.resource.name(),
            ids.join(", ")
        ));
        if !ids.iter().any(|i| i == p.identity) {
            bail!(
                "{} is not on {} although its AAI is Assigned",
                p.identity,
                p.resource.name()
            );
        }
    }
    done(t);

    // 8. Tokens.
    let t = step(
        8,
        "A real Azure SDK client in each pod gets a token through 169.254.169.254",
    );
    for p in &demo_pods {
        info(&format!(
            "{}/{}: python azure-identity ManagedIdentityCredential(client_id={}) in netns {}",
            p.namespace,
            p.name,
            p.client_id,
            p.netns()?.name()
        ));
        let out = {
            let home = p.home.clone();
            let index = p.pod_index;
            let client_id = p.client_id.clone();
            tokio::time::timeout(
                Duration::from_secs(120),
                tokio::task::spawn_blocking(move || {
                    python_imds_token(
                        None,
                        "https://management.azure.com/.default",
                        IdentitySelector::ClientId(&client_id),
                        home.pods.get(index).map(|(ns, _)| ns),
                    )
                }),
            )
            .await
            .context("the SDK call did not finish within 120 s")???
        };
        let token = out["token"]
            .as_str()
            .with_context(|| format!("the SDK got no token: {out}"))?;
        let claims = emu
            .verify_token(token)
            .map_err(|e| anyhow::anyhow!("token does not verify: {e:?}"))?;
        info(&format!(
            "  token: {} bytes, signature verified with the emulated Entra ID's key",
            token.len()
        ));
        info(&format!(
            "  claims: appid={} ({}), oid={}, tid={}, aud={}",
            claims.appid, p.identity, claims.oid, claims.tid, claims.aud
        ));
        info(&format!(
            "  expires_on={} (in {}h); path: pod -> iptables DNAT -> nmi on {} -> its IMDS",
            out["expires_on"],
            out["expires_on"]
                .as_u64()
                .map(|e| e.saturating_sub(unix_now()) / 3600)
                .unwrap_or_default(),
            p.node
        ));
        if !claims.appid.eq_ignore_ascii_case(&p.client_id) {
            bail!("the token is for {}, not {}", claims.appid, p.identity);
        }
    }
    done(t);

    if cli.keep {
        reg(registry).keeping = true;
        println!("\n--keep: everything stays up until Ctrl-C. Try:");
        println!(
            "  {} --kubeconfig {} get azureidentities,azureidentitybindings,azureassignedidentities,pods,nodes -A",
            cluster.bin_dir().join("kubectl").display(),
            cluster.kubeconfig().display()
        );
        for p in &demo_pods {
            println!(
                "  ip netns exec {} curl -s -H Metadata:true 'http://169.254.169.254/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://management.azure.com/'",
                p.netns()?.name()
            );
        }
        println!("  logs of mic and nmi: {}", dir.display());
        std::future::pending::<()>().await;
    }

    // 9. Release.
    let t = step(
        9,
        "Delete the pods: mic deletes their AzureAssignedIdentities and releases the identities",
    );
    let t_del = Instant::now();
    for p in &demo_pods {
        Api::<Pod>::namespaced(client.clone(), p.namespace)
            .delete(p.name, &DeleteParams::default().grace_period(0))
            .await?;
        info(&format!("pod {}/{} deleted", p.namespace, p.name));
    }
    for p in &demo_pods {
        wait("the AzureAssignedIdentity to be deleted", || {
            let aais = aais.clone();
            async move {
                let list = aais.list(&ListParams::default()).await.ok()?;
                (!list
                    .items
                    .iter()
                    .any(|a| a.spec.pod == p.name && a.spec.pod_namespace == p.namespace))
                .then_some(())
            }
        })
        .await?;
        info(&format!(
            "AzureAssignedIdentity of {}/{}: gone (+{:.1}s)",
            p.namespace,
            p.name,
            t_del.elapsed().as_secs_f64()
        ));
    }
    for p in &demo_pods {
        let suffix = format!("/{}", p.identity.to_lowercase());
        wait(
            &format!("{} to leave {}", p.identity, p.resource.name()),
            || {
                let present = emu
                    .assigned_identities(p.resource.name())
                    .unwrap_or_default()
                    .iter()
                    .any(|i| i.to_lowercase().ends_with(&suffix));
                async move { (!present).then_some(()) }
            },
        )
        .await?;
        let ids = arm_identities(&emu, p.resource).await?;
        info(&format!(
            "ARM GET {}: userAssignedIdentities = [{}]  ({} released{})",
            p.resource.name(),
            ids.join(", "),
            p.identity,
            if p.resource == Resource::ScaleSet {
                "; the cluster's kubelet identity stays"
            } else {
                ""
            }
        ));
        if ids.iter().any(|i| i == p.identity) {
            bail!("{} is still on {}", p.identity, p.resource.name());
        }
    }
    done(t);
    Ok(())
}

/// Where a node's identities live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Resource {
    ScaleSet,
    Vm,
}

impl Resource {
    fn name(self) -> &'static str {
        match self {
            Resource::ScaleSet => VMSS,
            Resource::Vm => VM,
        }
    }

    fn arm_path(self) -> String {
        match self {
            Resource::ScaleSet => format!("virtualMachineScaleSets/{VMSS}"),
            Resource::Vm => format!("virtualMachines/{VM}"),
        }
    }
}

/// One of the demo's pods and where it runs.
struct DemoPod {
    fixture: &'static str,
    manifest: String,
    namespace: &'static str,
    name: &'static str,
    node: String,
    home: Arc<Node>,
    pod_index: usize,
    resource: Resource,
    identity: &'static str,
    client_id: String,
}

impl DemoPod {
    fn netns(&self) -> anyhow::Result<&aadpodid_tests::netns::NetNs> {
        self.home
            .pods
            .get(self.pod_index)
            .map(|(ns, _)| ns)
            .context("pod namespace")
    }

    fn ip(&self) -> anyhow::Result<std::net::Ipv4Addr> {
        self.home
            .pods
            .get(self.pod_index)
            .map(|(_, ip)| *ip)
            .context("pod address")
    }
}

/// An ARM request path without the subscription prefix and the query.
fn short_arm_path(uri: &str) -> String {
    let path = uri.split('?').next().unwrap_or(uri);
    let rest = path.split_once("/providers/").map_or(path, |(_, r)| r);
    format!(".../{rest}")
}

fn emulator_config() -> Config {
    let mut cfg = Config::new(TENANT, SUB);
    cfg.resource_groups = vec![NODE_RG.into(), APP_RG.into(), SEED4_RG.into()];
    let ident = |name: &str, rg: &str, client: &str| IdentitySeed {
        name: name.into(),
        resource_group: rg.into(),
        client_id: Some(client.into()),
        principal_id: None,
        federated_credentials: vec![],
        permissions: PermissionsSeed::default(),
    };
    cfg.identities = vec![
        ident("kubelet", NODE_RG, KUBELET_CLIENT),
        ident(UAI_NAME, APP_RG, UAI_CLIENT),
        ident(
            "uai-reports",
            APP_RG,
            "c0000000-0000-4000-8000-000000000002",
        ),
        ident("uai-dns", APP_RG, "c0000000-0000-4000-8000-000000000003"),
        ident(SEED4_IDENTITY, SEED4_RG, SEED4_CLIENT),
    ];
    cfg.scale_sets = vec![ScaleSetSeed {
        name: VMSS.into(),
        resource_group: NODE_RG.into(),
        instances: vec!["0".into(), "1".into()],
        identity: IdentityAssignmentSeed {
            system_assigned: false,
            user_assigned: vec!["kubelet".into()],
        },
    }];
    cfg.virtual_machines = vec![VmSeed {
        name: VM.into(),
        resource_group: NODE_RG.into(),
        identity: IdentityAssignmentSeed {
            system_assigned: true,
            user_assigned: vec![],
        },
    }];
    cfg.service_principals = vec![ServicePrincipalSeed {
        client_id: MIC_CLIENT.into(),
        object_id: None,
        secrets: vec![SecretSeed::Plain(MIC_SECRET.into())],
        certificates: vec![],
        federated_credentials: vec![],
        permissions: PermissionsSeed::default(),
    }];
    cfg.clock.speed = CLOCK_SPEED;
    cfg
}

/// Polls `check` every 100 ms until it returns `Some`, at most [`WAIT`].
async fn wait<T, F, Fut>(what: &str, check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    aadpodid_tests::wait_for(what, WAIT, check).await
}

/// Effective user ID 0, from `/proc/self/status` (`Uid: real effective ...`).
fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|u| u.split_whitespace().nth(1).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// `kubectl apply -n NS -f -` with `manifest`; returns what kubectl printed.
async fn kubectl_apply(cluster: &Cluster, ns: &str, manifest: &str) -> anyhow::Result<String> {
    use tokio::io::AsyncWriteExt as _;
    let mut cmd = Command::from(cluster.kubectl());
    cmd.args(["apply", "-n", ns, "-f", "-", "--request-timeout=30s"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().context("run kubectl")?;
    let mut stdin = child.stdin.take().context("kubectl stdin")?;
    stdin.write_all(manifest.as_bytes()).await?;
    drop(stdin);
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .context("kubectl apply did not finish within 60 s")??;
    if !out.status.success() {
        bail!(
            "kubectl apply failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Reads the scale set through ARM, as an operator would: a client-credentials
/// token from the emulated Entra ID, then `GET` on the resource. Returns the
/// names of its user-assigned identities.
async fn arm_identities(emu: &Emulator, resource: Resource) -> anyhow::Result<Vec<String>> {
    let ca = emu.ca_bundle_path().display().to_string();
    let token_url = format!("{}{TENANT}/oauth2/token", emu.aad_url());
    let body = curl(&[
        "--cacert",
        &ca,
        "-d",
        "grant_type=client_credentials",
        "-d",
        &format!("client_id={MIC_CLIENT}"),
        "-d",
        &format!("client_secret={MIC_SECRET}"),
        "--data-urlencode",
        &format!("resource={ARM_RESOURCE}"),
        &token_url,
    ])
    .await?;
    let token = body["access_token"]
        .as_str()
        .with_context(|| format!("no ARM token from Entra ID: {body}"))?
        .to_string();
    let url = format!(
        "{}/subscriptions/{SUB}/resourceGroups/{NODE_RG}/providers/Microsoft.Compute/{}?api-version=2024-11-01",
        emu.arm_url(),
        resource.arm_path()
    );
    let machine = curl(&[
        "--cacert",
        &ca,
        "-H",
        &format!("Authorization: Bearer {token}"),
        &url,
    ])
    .await?;
    if machine["id"].as_str().is_none() {
        bail!("ARM GET {}: {machine}", resource.name());
    }
    // No `userAssignedIdentities` at all once the last one is removed.
    let empty = serde_json::Map::new();
    let ids = machine["identity"]["userAssignedIdentities"]
        .as_object()
        .unwrap_or(&empty);
    Ok(ids
        .keys()
        .map(|k| k.rsplit('/').next().unwrap_or(k).to_string())
        .collect())
}

async fn curl(args: &[&str]) -> anyhow::Result<serde_json::Value> {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "--noproxy", "*"])
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .context("run curl")?;
    if !out.status.success() {
        bail!("curl failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "curl printed no JSON: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// `local-up relay ADDR:PORT=SOCKET...`, run inside a node namespace: listens
/// on each address and carries every connection to its Unix socket. Prints
/// `READY` once all listen.
async fn relay_main(specs: &[String]) -> anyhow::Result<()> {
    for spec in specs {
        let (addr, path) = spec
            .split_once('=')
            .with_context(|| format!("relay spec {spec}: want ADDR:PORT=SOCKET"))?;
        let addr: SocketAddr = addr.parse().with_context(|| format!("address {addr}"))?;
        tcp_to_unix(addr, PathBuf::from(path)).await?;
    }
    println!("READY");
    std::future::pending::<()>().await;
    Ok(())
}

/// The last lines of the mic and nmi logs, to explain a failure.
fn print_logs(registry: &Reg) {
    let dirs = reg(registry).dirs.clone();
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "log") {
                let text = std::fs::read_to_string(&p).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                println!("\n--- last lines of {} ---", p.display());
                for l in &lines[lines.len().saturating_sub(15)..] {
                    println!("{l}");
                }
            }
        }
    }
}

/// Stops every process, deletes every network namespace and folder, then
/// checks that nothing of this run is left.
async fn teardown(registry: &Reg) {
    println!("\nCleaning up");
    // A cluster still starting would spawn etcd/kube-apiserver after the
    // cleanup; it takes seconds (its binaries are built beforehand), so wait.
    let starting = reg(registry).cluster_starting.clone();
    let deadline = Instant::now() + Duration::from_secs(30);
    while starting.load(std::sync::atomic::Ordering::SeqCst) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (children, netns, nodes, dirs, emulator, cluster_dir) = {
        let mut r = reg(registry);
        (
            std::mem::take(&mut r.children),
            std::mem::take(&mut r.netns),
            std::mem::take(&mut r.nodes),
            std::mem::take(&mut r.dirs),
            r.emulator.take(),
            // The harness's folder name for this process, also when the
            // cluster never answered.
            r.cluster_dir.take().unwrap_or_else(|| {
                std::env::temp_dir().join(format!("aadpodid-cluster-{}", std::process::id()))
            }),
        )
    };
    let mut stopped: std::collections::BTreeMap<String, usize> = Default::default();
    for (name, mut c) in children.into_iter().rev() {
        let _ = c.start_kill();
        if tokio::time::timeout(Duration::from_secs(10), c.wait())
            .await
            .is_ok()
        {
            let kind = name.split('-').next().unwrap_or(&name).to_string();
            *stopped.entry(kind).or_default() += 1;
        }
    }
    // The cluster's etcd and kube-apiserver (the harness started them) and any
    // helper still running: every remaining child of this process.
    let others = child_pids();
    for pid in &others {
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        let _ = std::process::Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        *stopped.entry(comm.trim().to_string()).or_default() += 1;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !child_pids().is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let total: usize = stopped.values().sum();
    let kinds: Vec<String> = stopped
        .iter()
        .map(|(k, n)| {
            if *n > 1 {
                format!("{k} x{n}")
            } else {
                k.clone()
            }
        })
        .collect();
    info(&format!("stopped {total} processes: {}", kinds.join(", ")));
    for name in &netns {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
    drop(nodes);
    info(&format!("deleted {} network namespaces", netns.len()));
    // The emulator's own folder (its CA bundle), named azure-emulator-<guid>.
    let emulator_dir = emulator.and_then(|emu| {
        emu.shutdown();
        emu.ca_bundle_path()
            .parent()
            .filter(|d| {
                d.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("azure-emulator-"))
            })
            .map(Path::to_path_buf)
    });
    // (The emulator removes its own folder when dropped, just above.)
    let mut removed = Vec::new();
    for d in emulator_dir.iter().chain(&dirs).chain([&cluster_dir]) {
        let _ = std::fs::remove_dir_all(d);
        if !d.exists() {
            removed.push(d.display().to_string());
        }
    }
    info(&format!("removed temporary folders: {}", removed.join(" ")));
    let left_procs = child_pids();
    let prefix = format!("aadpodid-{}-", std::process::id());
    let left_ns: Vec<String> = std::fs::read_dir("/run/netns")
        .map(|es| {
            es.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&prefix))
                .collect()
        })
        .unwrap_or_default();
    if left_procs.is_empty() && left_ns.is_empty() {
        info("nothing left running");
    } else {
        info(&format!(
            "LEFT BEHIND: processes {left_procs:?}, network namespaces {left_ns:?}"
        ));
    }
}

/// Live (not zombie) child processes of this process, from every thread.
fn child_pids() -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for t in tasks.flatten() {
        let text = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
        for pid in text
            .split_whitespace()
            .filter_map(|p| p.parse::<u32>().ok())
        {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // The state follows the parenthesised command name.
            let state = stat.rsplit_once(") ").map(|(_, r)| r.chars().next());
            if matches!(state, Some(Some(s)) if s != 'Z') {
                out.push(pid);
            }
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}
